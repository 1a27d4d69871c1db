"""A misbehaving OpenAI-compatible judge on 127.0.0.1 for the fault tests: a real HTTP server (stdlib
``ThreadingHTTPServer`` in a thread) that answers ``/v1/chat/completions`` as its ``behaviour`` says:
``ok:<text>``, ``500``, ``timeout`` (answers after the client gave up), ``drop`` (closes the connection
without a reply) or ``garbage`` (a 200 whose body is not JSON). It records every request it receives."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    def __init__(self, behaviour: Callable[[dict], str] | str = "ok:safe", delay: float = 3.0) -> None:
        self.behaviour = behaviour
        self.delay = delay
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                what = server.behaviour if isinstance(server.behaviour, str) else server.behaviour(body)
                if what == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if what == "timeout":
                    time.sleep(server.delay)
                    what = "ok:safe"
                if what == "500":
                    self._send(500, b'{"error": {"message": "overloaded"}}')
                elif what == "401":  # as OpenAI answers a wrong key: the key echoed, partly masked
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    message = f"Incorrect API key provided: {key[:8]}****{key[-4:]} and {key}"
                    self._send(401, json.dumps({"error": {"message": message}}).encode())
                elif what == "garbage":
                    self._send(200, b"<html>not json")
                else:
                    text = what.removeprefix("ok:")
                    reply = {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": f"{body.get('model')}-2026-11-01",
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text},
                            }
                        ],
                    }
                    self._send(200, json.dumps(reply).encode())

            def _send(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
