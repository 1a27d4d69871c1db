"""The server's view of clients that live on Flower nodes: the calls of
:class:`fedalign.runtime.clients.ClientSide`, each batched into one message per node.

Per round a node gets ``train.visit`` (the broadcast; it trains its sampled clients and answers with their
first-stage uploads) and, for a multi-stage algorithm (FedASK), ``train.stage`` for every later stage (the
server's reply; it answers with the next uploads). The server's decisions on earlier rounds (which visits
completed, so become the clients' state) ride along on the next message a node gets, and ``query.commit``
flushes them at the end: a round costs one message per stage, nothing more.

What comes back from a node is exactly: per client, its upload (named tensors, key- and shape-checked
against what the algorithm uploads at that stage, see :mod:`.wire`), its local step count (fixed by the
recipe: public), and, for a client that failed, the name of the exception (its message may quote the
node's data and stays in the node's own metrics). Losses, example counts and timings stay on the node.
Row counts reach the server only where the recipe needs them (``federation.weighting: examples``, or the
sampling rates of example/pair-level DP accounting), once, at discovery; the run records that they did.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedalign.algorithms.base import Algorithm, ClientState, Tensors
from fedalign.errors import RecipeError
from fedalign.flower.wire import WireError, decode, encode, record_bytes, shapes
from fedalign.privacy.mechanism import NoPrivacy
from fedalign.runtime.clients import Visit
from fedalign.runtime.faults import ClientFailure
from fedalign.runtime.state import write_text_atomic

log = logging.getLogger("fedalign.flower")


class NodeFailure(ClientFailure):
    """The client's node did not answer (it died, or Flower's timeout passed)."""


class Messenger(Protocol):
    def send(
        self, message_type: str, contents: dict[int, RecordDict], timeout: float | None
    ) -> dict[int, RecordDict | str]:
        """One message per node; per node its reply's content, or why there is none."""


@dataclass
class WireCount:
    """Bytes of tensors that crossed, as Flower serialised them, and every reply's record names."""

    down: int = 0
    up: int = 0
    replies: list[dict[str, Any]] = field(default_factory=list)  # what each reply held (the wire test)

    def record(self, message_type: str, node_id: int, reply: RecordDict) -> None:
        """A reply as it arrived: its tensor bytes, and the names, keys and fields of its records."""
        self.up += sum(record_bytes(r) for r in reply.array_records.values())
        self.replies.append(
            {
                "type": message_type,
                "node": node_id,
                "arrays": {name: sorted(rec.keys()) for name, rec in reply.array_records.items()},
                "configs": {name: dict(rec) for name, rec in reply.config_records.items()},
                "metrics": {name: dict(rec) for name, rec in reply.metric_records.items()},
            }
        )


@dataclass
class RemoteResult:
    """What the server knows of a visit: how many local steps it took (the recipe fixes it). Its losses,
    examples and timing stay on the node."""

    steps: int
    mean_loss: None = None
    losses: None = None
    examples: None = None
    tokens: None = None
    optimizer_state: None = None


@dataclass(frozen=True)
class Node:
    node_id: int
    clients: tuple[int, ...]


class RemoteClients:
    """The clients of the run's Flower nodes, behind the calls the round makes of its clients."""

    def __init__(
        self,
        messenger: Messenger,
        nodes: list[Node],
        sizes: dict[int, int] | None,
        algorithm: Algorithm,
        privacy: NoPrivacy,
        template: Tensors,
        fields: dict[str, Any],
        timeout: float | None,
        audit: Path | None = None,
        local_steps: int = 1,
        rejoin: Callable[[set[int]], list[Node]] | None = None,
        wire: WireCount | None = None,
    ) -> None:
        self.messenger, self.nodes, self._sizes = messenger, nodes, sizes
        self.algorithm, self.privacy, self.template = algorithm, privacy, template
        self.fields, self.timeout, self.audit, self.local_steps = fields, timeout, audit, local_steps
        self.owner = {client: node.node_id for node in nodes for client in node.clients}
        self.rejoin, self._seen = rejoin, {node.node_id for node in nodes}
        self._finished: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self._received: Tensors = {}
        self._in_flight: dict[int, list[tuple[int, int]]] = {}  # commits sent, until their node answers
        self.wire = wire or WireCount()  # with discovery's replies when the server made it

    def sizes(self, clients: list[int]) -> list[int]:
        if self._sizes is None:
            raise RecipeError("federation.weighting: 'examples' needs the nodes' row counts, not asked for")
        return [self._sizes[c] for c in clients]

    # -- messages ---

    def _content(self, node_id: int, round_idx: int, stage: int, clients: list[int]) -> RecordDict:
        """The run's public fields, this message's round, stage and clients, and the server's decisions
        on earlier rounds for this node's clients (popped: each is sent once)."""
        finished = self._finished.pop(node_id, [])
        self._in_flight[node_id] = finished
        return RecordDict(
            {
                "run": ConfigRecord(
                    {
                        **self.fields,
                        "round": round_idx,
                        "stage": stage,
                        "clients": clients,
                        "finished-rounds": [r for r, _ in finished],
                        "finished-clients": [c for _, c in finished],
                        "through-round": round_idx - 1,
                    }
                )
            }
        )

    def _send(self, message_type: str, contents: dict[int, RecordDict]) -> dict[int, RecordDict | str]:
        for content in contents.values():
            self.wire.down += sum(record_bytes(r) for r in content.array_records.values())
        replies = self.messenger.send(message_type, contents, self.timeout)
        for node_id, reply in replies.items():
            sent = self._in_flight.pop(node_id, [])
            node_failed = isinstance(reply, str) or reply.config_records.get("status", {}).get(
                "node"
            ) not in (
                None,
                "ok",
            )
            if node_failed and sent:  # its node never took them in: they go with its next message
                self._finished[node_id] = sent + self._finished[node_id]
            if not isinstance(reply, str):
                self.wire.record(message_type, node_id, reply)
        return replies

    def _by_node(self, clients: list[int]) -> dict[int, list[int]]:
        grouped: dict[int, list[int]] = defaultdict(list)
        for client in clients:
            grouped[self.owner[client]].append(client)
        return grouped

    def _expected(self, stage: int, round_idx: int, reply: Tensors) -> dict[str, tuple[int, ...]]:
        """The keys and shapes the algorithm uploads at ``stage``: its own client step on the server's
        copy of the adapter (no data: only the shapes matter)."""
        state = ClientState()
        trained = {**self.template, **self.algorithm.local_start(round_idx, self._received, state)}
        return shapes(self.algorithm.client_upload(stage, round_idx, trained, reply, state))

    def _uploads(
        self, replies: dict[int, RecordDict | str], clients: list[int], stage: int, expected
    ) -> list[tuple[Tensors, int] | Exception]:
        out: list[tuple[Tensors, int] | Exception] = []
        for client in clients:
            reply = replies.get(self.owner[client], "no reply")
            if isinstance(reply, str):
                out.append(NodeFailure(f"node {self.owner[client]}: {reply}"))
                continue
            status = reply.config_records.get("status", ConfigRecord())
            outcome = status.get(str(client))
            if outcome != "ok":
                out.append(ClientFailure(f"failed on its node ({outcome or 'not answered'})"))
                continue
            try:
                record = reply.array_records.get(f"upload.{client}", ArrayRecord())
                tensors = decode(record, expected, f"client {client}'s stage-{stage} upload")
                steps = int(reply.config_records["steps"][str(client)]) if stage == 0 else 0
            except (WireError, KeyError, ValueError, TypeError) as error:
                out.append(error if isinstance(error, WireError) else WireError(f"client {client}: {error}"))
                continue
            out.append((tensors, steps))
        return out

    # -- the calls of a round ---

    def _take_rejoined(self) -> None:
        """A node that connected since (a restarted SuperNode has a new id) takes over the clients it
        says it hosts, with their pending commits: its state dir is the one they were made for."""
        if self.rejoin is None:
            return
        for node in self.rejoin(self._seen):
            self._seen.add(node.node_id)
            for client in node.clients:
                old = self.owner.get(client)
                self.owner[client] = node.node_id
                if old is not None and old != node.node_id:
                    moved = [(r, c) for r, c in self._finished.get(old, []) if c == client]
                    self._finished[old] = [(r, c) for r, c in self._finished.get(old, []) if c != client]
                    self._finished[node.node_id].extend(moved)
            if node.clients:
                log.warning("Flower node %s joined, hosting clients %s", node.node_id, list(node.clients))
        hosts: dict[int, list[int]] = defaultdict(list)
        for client, node_id in sorted(self.owner.items()):
            hosts[node_id].append(client)
        self.nodes = [Node(node_id, tuple(hosted)) for node_id, hosted in hosts.items()]

    def train_all(self, round_idx: int, clients: list[int], received: Tensors) -> list[Visit | Exception]:
        self._take_rejoined()
        self._received = received
        broadcast = encode(received)
        contents = {}
        for node_id, hosted in self._by_node(clients).items():
            content = self._content(node_id, round_idx, 0, hosted)
            content["received"] = broadcast
            contents[node_id] = content
        replies = self._send("train.visit", contents)
        outcomes: list[Visit | Exception] = []
        expected = self._expected(0, round_idx, {})
        for client, got in zip(clients, self._uploads(replies, clients, 0, expected), strict=True):
            if isinstance(got, Exception):
                if type(got) is not ClientFailure:  # no answer, or a refused one: it may have trained
                    self.privacy.after_visit(client, self.local_steps)  # (the node's own failure did not)
                outcomes.append(got)
                continue
            upload, steps = got
            self.privacy.after_visit(client, steps)  # the server's copy of the ledger; the node keeps its own
            visit = Visit(client, 0.0, upload, ClientState(), RemoteResult(steps))
            outcomes.append(visit)
        return outcomes

    def upload_all(
        self, visits: list[Visit], stage: int, round_idx: int, reply: Tensors, start: Tensors
    ) -> list[Tensors | Exception]:
        if stage == 0:  # it came with the visit
            return [visit.trained for visit in visits]
        clients = [visit.client for visit in visits]
        encoded = encode(reply)
        contents = {}
        for node_id, hosted in self._by_node(clients).items():
            content = self._content(node_id, round_idx, stage, hosted)
            content["reply"] = encoded
            contents[node_id] = content
        replies = self._send("train.stage", contents)
        expected = self._expected(stage, round_idx, reply)
        return [
            got if isinstance(got, Exception) else got[0]
            for got in self._uploads(replies, clients, stage, expected)
        ]

    def finish(self, visit: Visit, round_idx: int) -> None:
        """The visit's state becomes the client's, on its node, with the next message the node gets."""
        self._finished[self.owner[visit.client]].append((round_idx, visit.client))
        visit.trained = {}

    def move_base(self, update: Tensors) -> None:
        raise RecipeError(
            "algorithm: frlora moves the base weights, which fedalign flower does not support yet"
        )

    def rollback(self, rounds_done: int) -> None:
        raise RecipeError(
            "a Flower run cannot be resumed by fedalign resume (its clients' state is on the nodes)"
        )

    def close(self, rounds_done: int | None = None) -> None:
        """Every node learns the fate of its last visits, so that its clients' state is final (a node
        that does not answer within a minute keeps them pending: a warning, not a failed run)."""
        contents = {}
        for node in self.nodes:
            content = self._content(node.node_id, rounds_done if rounds_done is not None else 1 << 30, 0, [])
            contents[node.node_id] = content
        timeout, self.timeout = self.timeout, min(self.timeout or 60.0, 60.0)
        try:
            replies = self._send("query.commit", contents)
            silent = [n for n, r in replies.items() if isinstance(r, str)]
            if silent:
                log.warning("Flower nodes %s did not confirm the last rounds' client state", silent)
        except Exception as error:  # the run's result is already saved
            log.warning("could not reach the Flower nodes at the end (%s)", type(error).__name__)
        finally:
            self.timeout = timeout
        if self.audit is not None:  # what every reply held (names, keys, fields; no tensor values)
            summary = {"bytes_down": self.wire.down, "bytes_up": self.wire.up, "replies": self.wire.replies}
            write_text_atomic(json.dumps(summary, indent=1), self.audit, private=True)
