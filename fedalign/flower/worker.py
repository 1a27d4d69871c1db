"""A Flower node's long-lived worker: it keeps the node's model and data loaded between messages.

Flower's deployment engine starts a fresh ClientApp process for every message, so a ClientApp that
trains would import torch and TRL, load the model and tokenize the data for every stage of every round.
Instead, the ClientApp forwards each message to this worker over a Unix socket in the node's state dir
(owner-only, authenticated with a key that only the node's user can read) and returns its answer; the
first message starts the worker, which exits after ``idle_s`` without a message (or when stopped). All of
a node's state is on disk (:mod:`.node`), so a worker that dies loses nothing: the next message starts
another.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

SOCKET, KEY, PID, LOG = "worker.sock", "worker.key", "worker.pid", "worker.log"
START_TIMEOUT_S = 300.0


def make_private_dir(path: Path) -> None:
    """Owner-only (0700) whatever the umask; here rather than imported, so that a ClientApp that only
    forwards does not import torch (:func:`fedalign.privacy.randomness.make_private_dir` does the same)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def _key(state_dir: Path) -> bytes | None:
    try:
        return (state_dir / KEY).read_bytes()
    except OSError:
        return None


def _connect(state_dir: Path):
    key = _key(state_dir)
    if key is None or not (state_dir / SOCKET).exists():
        return None
    try:
        return Client(str(state_dir / SOCKET), family="AF_UNIX", authkey=key)
    except (OSError, EOFError, AuthenticationError):  # gone, or a stale key of a dead worker
        return None


def _start(state_dir: Path) -> None:
    """Start the worker, detached from this short-lived process, and wait until it listens."""
    for name in (SOCKET, KEY, PID):  # a dead worker's leftovers: the new one writes its own
        (state_dir / name).unlink(missing_ok=True)
    log = os.fdopen(os.open(state_dir / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a")
    subprocess.Popen(
        [sys.executable, "-m", "fedalign.flower.worker", str(state_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (state_dir / SOCKET).exists() and _key(state_dir) is not None:
            return
        time.sleep(0.05)
    raise RuntimeError(
        f"the node's worker did not start within {START_TIMEOUT_S:.0f} s; see {state_dir / LOG}"
    )


def forward(
    state_dir: Path, message_type: str, content: RecordDict, node_config: dict[str, Any]
) -> RecordDict:
    """The worker's answer to one message (starting the worker if none is listening)."""
    make_private_dir(state_dir)
    connection = _connect(state_dir)
    if connection is None:
        _start(state_dir)
        connection = _connect(state_dir)
        if connection is None:
            raise RuntimeError(f"cannot reach the node's worker; see {state_dir / LOG}")
    with connection:
        connection.send((message_type, content, node_config))
        return connection.recv()


def serve(state_dir: Path, idle_s: float) -> None:
    from fedalign.flower.apps import handle

    make_private_dir(state_dir)  # the socket and the key live in an owner-only folder
    key = os.urandom(32)
    path = state_dir / SOCKET
    if len(str(path).encode()) > 100:
        raise SystemExit(f"{path}: too long for a Unix socket (100 bytes); use a shorter state-dir")
    path.unlink(missing_ok=True)
    staged = state_dir / f".{KEY}"
    staged.unlink(missing_ok=True)
    try:
        with Listener(str(path), family="AF_UNIX", authkey=key) as listener:
            os.chmod(path, 0o600)
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(key)
            (state_dir / PID).write_text(str(os.getpid()))
            os.replace(staged, state_dir / KEY)  # last: a client that sees it can connect
            listener._listener._socket.settimeout(idle_s)  # exit when idle
            while True:
                try:
                    connection = listener.accept()
                except TimeoutError:
                    break
                except Exception:  # a client with the wrong key, or one that went away: wait for the next
                    continue
                with connection:
                    try:
                        message_type, content, node_config = connection.recv()
                        connection.send(handle(message_type, content, node_config, None))
                    except (EOFError, OSError):  # the ClientApp went away (Flower timed it out)
                        continue
    finally:
        for name in (SOCKET, KEY, PID):
            (state_dir / name).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--idle-s", type=float, default=1800.0)
    args = parser.parse_args()
    serve(args.state_dir, args.idle_s)


if __name__ == "__main__":
    main()
