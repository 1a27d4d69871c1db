"""The server's side of a run on Flower: the in-process run (:func:`fedalign.runtime.run.run_federated`) with
its clients on the nodes.

Only the preparation differs (:func:`flower_preparation`): the server loads the model (for the adapter it
starts from and saves) but no data, finds which node hosts which clients (``query.hello``), plans the
privacy from what the nodes report, and hands the round :class:`.remote.RemoteClients`. The round, the
algorithm's server step, the privacy mechanism's server side, the run directory and the checkpoints are
the in-process ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from fedalign.errors import FedalignError, RecipeError
from fedalign.flower.remote import Node, RemoteClients, WireCount
from fedalign.models.adapter import AdapterSlots
from fedalign.models.loading import check_model_reachable, load_model, resolve_device
from fedalign.privacy.mechanism import NoPrivacy
from fedalign.privacy.randomness import RunSecrets
from fedalign.recipe import Recipe
from fedalign.runtime.metrics import PeakMemory
from fedalign.runtime.prepare import Prepared, Task, check_recipe
from fedalign.runtime.privacy_plan import plan_example_privacy
from fedalign.runtime.run import RunResult, run_federated

DEFAULT_TIMEOUT_S = 3600.0  # a node that has not answered a stage within this is dropped from the round


class FlowerError(FedalignError):
    """The federation on Flower cannot run (too few nodes, a node that cannot host its clients)."""


class GridMessenger:
    """Messages through Flower's :class:`Grid`, polled every ``poll_s`` (``send_and_receive`` sleeps 3 s
    between pulls: most of a stage's overhead on a fast round)."""

    def __init__(self, grid: Grid, poll_s: float = 0.1) -> None:
        self.grid, self.poll_s = grid, poll_s

    def connected(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def node_ids(self, wanted: int, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.connected()
            if len(nodes) >= wanted:
                return nodes
            if time.monotonic() > deadline:
                raise FlowerError(
                    f"{len(nodes)} of {wanted} Flower nodes connected within {timeout:.0f} s; start the "
                    "SuperNodes (see the README) or lower --nodes"
                )
            time.sleep(self.poll_s)

    def send(
        self, message_type: str, contents: dict[int, RecordDict], timeout: float | None
    ) -> dict[int, RecordDict | str]:
        messages = [
            Message(content, dst_node_id=n, message_type=message_type) for n, content in contents.items()
        ]
        ids = set(self.grid.push_messages(messages))
        replies: dict[int, RecordDict | str] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while ids:
            for reply in self.grid.pull_messages(list(ids)):
                ids.discard(reply.metadata.reply_to_message_id)
                node = reply.metadata.src_node_id
                replies[node] = f"error: {reply.error.reason}" if reply.has_error() else reply.content
            if ids and deadline is not None and time.monotonic() > deadline:
                break
            if ids:
                time.sleep(self.poll_s)
        for node in contents:
            replies.setdefault(node, f"no answer within {timeout:.0f} s" if timeout else "no answer")
        return replies


def public_fields(recipe: Recipe, task: str, run_key: str) -> dict[str, Any]:
    """What every message carries: the recipe (public: it is the run config), the task and the run."""
    return {"recipe": recipe.resolved_yaml(), "task": task, "run-key": run_key}


def needs_sizes(recipe: Recipe) -> bool:
    """Whether the server needs clients' row counts: to weight by examples, or to account example/pair-level
    DP (each client's sampling rate is batch / rows)."""
    return recipe.federation.weighting == "examples" or recipe.privacy.unit in ("example", "pair")


def hello(
    messenger: GridMessenger,
    ids: list[int],
    fields: dict[str, Any],
    want_sizes: bool,
    timeout: float,
    wire: WireCount,
) -> dict[int, tuple[list[int], list[int] | None] | str]:
    """Each node's clients (and their row counts when ``want_sizes``), or why it did not say."""
    config = ConfigRecord({**fields, "want-sizes": want_sizes})
    replies = messenger.send("query.hello", {n: RecordDict({"run": config}) for n in ids}, timeout)
    out: dict[int, tuple[list[int], list[int] | None] | str] = {}
    for node_id, reply in replies.items():
        if not isinstance(reply, str):
            wire.record("query.hello", node_id, reply)
        if isinstance(reply, str) or "hello" not in reply.config_records:
            out[node_id] = (
                reply if isinstance(reply, str) else str(reply.config_records["status"].get("node"))
            )
            continue
        said = reply.config_records["hello"]
        sizes = [int(n) for n in said["sizes"]] if "sizes" in said else None
        out[node_id] = ([int(c) for c in said["clients"]], sizes)
    return out


def discover(
    messenger: GridMessenger,
    recipe: Recipe,
    fields: dict[str, Any],
    wanted: int,
    timeout: float,
    wire: WireCount,
) -> tuple[list[Node], dict[int, int] | None]:
    """Which node hosts which clients (every client on exactly one node), and their row counts if needed."""
    ids = messenger.node_ids(wanted, timeout)
    nodes, sizes, hosts = [], {}, {}
    for node_id, said in hello(messenger, ids, fields, needs_sizes(recipe), timeout, wire).items():
        if isinstance(said, str):
            raise FlowerError(f"Flower node {node_id} cannot host its clients ({said}); see that node's log")
        clients, counts = said
        for client in clients:
            if client in hosts:
                raise FlowerError(f"client {client} is hosted by two nodes ({hosts[client]} and {node_id})")
            hosts[client] = node_id
        if counts is not None:
            sizes.update(dict(zip(clients, counts, strict=True)))
        nodes.append(Node(node_id, tuple(clients)))
    missing = sorted(set(range(recipe.federation.num_clients)) - set(hosts))
    if missing:
        raise FlowerError(
            f"no Flower node hosts client(s) {missing[:5]} of federation.num_clients="
            f"{recipe.federation.num_clients}; give every client to one node (node-config clients=...)"
        )
    return nodes, (sizes if needs_sizes(recipe) else None)


def rejoiner(
    messenger: GridMessenger, fields: dict[str, Any], wire: WireCount
) -> Callable[[set[int]], list[Node]]:
    """Nodes that connected since ``seen`` (a restarted SuperNode gets a new id), with their clients."""

    def rejoin(seen: set[int]) -> list[Node]:
        new = [n for n in messenger.connected() if n not in seen]
        if not new:
            return []
        said = hello(messenger, new, fields, False, 60.0, wire)
        return [
            Node(n, tuple(got[0])) if not isinstance(got, str) else Node(n, ()) for n, got in said.items()
        ]

    return rejoin


def flower_preparation(
    messenger: GridMessenger, run_key: str, wanted_nodes: int, timeout: float = DEFAULT_TIMEOUT_S
) -> Callable[[Recipe, Task, Console, RunSecrets | None], Prepared]:
    """``run_federated``'s preparation for clients on Flower nodes."""

    def prepare(recipe: Recipe, task: Task, console: Console, secrets: RunSecrets | None) -> Prepared:
        algorithm, secrets, client_dp = check_recipe(recipe, task, secrets)
        if algorithm.moves_base:
            raise RecipeError(
                f"algorithm: {algorithm.name} moves the base weights on every node; fedalign flower does not "
                "run it yet"
            )
        check_model_reachable(recipe.model)
        device = resolve_device(recipe.device)
        loaded = load_model(recipe.model, recipe.lora, recipe.seed, device)
        fields = public_fields(recipe, task.name, run_key)
        with console.status(f"waiting for {wanted_nodes} Flower nodes"):
            wire = WireCount()
            nodes, sizes = discover(messenger, recipe, fields, wanted_nodes, max(timeout, 600.0), wire)
        example_dp = None
        if recipe.privacy.unit in ("example", "pair"):
            assert sizes is not None
            example_dp = plan_example_privacy(
                recipe, [sizes[c] for c in range(recipe.federation.num_clients)]
            )
            fields["sigma"] = example_dp.sigma
        template = AdapterSlots(loaded.model).read()

        def clients(privacy: NoPrivacy, private_dir: Any, memory: PeakMemory) -> RemoteClients:
            timeout_s = recipe.federation.client_timeout_s or timeout
            audit = private_dir / "flower_wire.json"
            return RemoteClients(
                messenger, nodes, sizes, algorithm, privacy, template, fields, timeout_s, audit,
                recipe.federation.local_steps, rejoiner(messenger, fields, wire), wire,
            )  # fmt: skip

        manifest = {
            "transport": "flower",
            "nodes": [{"node": str(n.node_id), "clients": list(n.clients)} for n in nodes],
            "row_counts_sent": sizes is not None,
        }
        disclosures = []
        if sizes is not None:
            why = "example/pair-level DP accounting" if example_dp is not None else "weighting by examples"
            disclosures.append(
                f"the Flower nodes sent each client's row count to the server (for {why}); row counts are "
                "not covered by ε"
            )
        return Prepared(
            algorithm,
            secrets,
            client_dp,
            example_dp,
            loaded.model,
            loaded.tokenizer,
            None,  # held-out evaluation needs data: it runs where the data is (fedalign eval on a node)
            clients,
            manifest,
            device,
            transport="flower",
            disclosures=disclosures,
        )

    return prepare


def run_on_flower(
    recipe: Recipe,
    task: Task,
    grid: Grid,
    run_key: str,
    nodes: int,
    console: Console | None = None,
    node_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RunResult:
    """``node_timeout_s``: how long the server waits for a node's answer to a stage before it drops the
    node's clients from the round (``federation.client_timeout_s`` instead when the recipe sets it). Under
    DP the recipe cannot set a client timeout (a visit's time follows its secret batches); set this one far
    above any visit's time, so that what it drops is a dead node, not a slow visit."""
    prepare = flower_preparation(GridMessenger(grid), run_key, nodes, node_timeout_s)
    return run_federated(recipe, task, console, prepare=prepare)
