"""A Flower node's side of a run: the clients it hosts, trained by :class:`LocalClients` as in-process.

What a node holds never leaves it except as the algorithm's uploads: its data (its share of the recipe's
data, or its own file), its clients' state (FedSA's B, SCAFFOLD's variates, optimizer state), their
privacy ledgers and noise keys, and their losses (in its own metrics file). All of it lives on disk under
the node's ``state-dir`` (owner-only), so that it survives the node's restart and so that a fresh process
per message (Flower's deployment engine) or any worker of a pool (its simulation engine) continues it.

A visit is kept on disk between the stages of a round (``pending/``) and becomes the client's state only
when the server says the round completed (``commit``, carried by the next message the node gets): a round
that failed, or a client dropped between stages, leaves the client's state as it was, as in-process.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from safetensors.torch import load_file

from fedalign import algorithms
from fedalign.algorithms.base import Tensors, select
from fedalign.errors import RecipeError
from fedalign.models.adapter import AdapterSlots
from fedalign.privacy.client_level import ClientLevelDP
from fedalign.privacy.example_level import ExampleLevelDP
from fedalign.privacy.mechanism import ClientLevel, ExampleLevel, NoPrivacy
from fedalign.privacy.randomness import RunSecrets, SecretRandomness, make_private_dir
from fedalign.recipe import Recipe
from fedalign.runtime.clients import LocalClients, RowsByClient, Visit
from fedalign.runtime.metrics import PeakMemory
from fedalign.runtime.prepare import load_and_partition, run_context
from fedalign.runtime.state import ClientStateStore, save_tensors_atomic, write_text_atomic


@dataclass(frozen=True)
class NodeSettings:
    """A node's private settings, from its own ``--node-config`` (never from the server)."""

    state_dir: Path
    clients: tuple[int, ...]
    data_path: str | None = (
        None  # the node's own data, all of it its one client's; None: a share of the recipe's
    )

    @classmethod
    def parse(
        cls, node_config: dict[str, Any], num_clients: int, state_root: Path | None = None
    ) -> NodeSettings:
        """``state-dir``, ``clients`` ("0,3" or 3) and ``data-path`` (optional); in Flower's simulation, where
        a node has only ``partition-id`` and ``num-partitions``, node p hosts clients p, p+N, p+2N, ..."""
        if "clients" in node_config:
            try:
                text = str(node_config["clients"])
                clients = tuple(int(part) for part in text.split(",") if part.strip())
            except ValueError:
                raise RecipeError(
                    f"node-config clients={node_config['clients']!r}: expected e.g. '0,3'"
                ) from None
        elif "partition-id" in node_config:
            part, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
            clients = tuple(range(part, num_clients, parts))
        else:
            raise RecipeError("node-config: needs clients='0,3' (the clients this node hosts)")
        bad = [c for c in clients if not 0 <= c < num_clients]
        if bad or not clients:
            raise RecipeError(
                f"node-config clients={node_config.get('clients')!r}: each must be in 0..{num_clients - 1}"
            )
        if "state-dir" in node_config:
            state_dir = Path(str(node_config["state-dir"]))
        elif state_root is not None:
            state_dir = state_root / f"node-{node_config.get('partition-id', clients[0])}"
        else:
            raise RecipeError("node-config: needs state-dir=... (where this node keeps its clients' state)")
        data_path = node_config.get("data-path")
        if data_path is not None and len(clients) != 1:
            raise RecipeError("node-config: data-path is one client's own data; give exactly one client id")
        return cls(state_dir, clients, None if data_path is None else str(data_path))


class NodeRuntime:
    """The node's clients for one run: loaded once per process, their state read from disk per message."""

    def __init__(self, recipe: Recipe, task: Any, settings: NodeSettings, run_key: str):
        self.recipe, self.settings = recipe, settings
        self.root = make_private_dir(settings.state_dir / f"run-{run_key}")
        self.algorithm = algorithms.build(recipe.algorithm, run_context(recipe))
        if settings.data_path is not None:
            recipe = recipe.model_copy(
                update={"data": recipe.data.model_copy(update={"path": settings.data_path})}
            )
            fed = recipe.federation.model_copy(update={"num_clients": 1})
            recipe = recipe.model_copy(update={"federation": fed})
        device, setup, partition = load_and_partition(recipe, task, Console(quiet=True))
        self.trainer = setup.trainer
        if settings.data_path is not None:  # the whole file is its one client's
            ids = {settings.clients[0]: partition.clients[0]}
        else:
            ids = {c: partition.clients[c] for c in settings.clients}
        self.client_ids = list(ids)
        self.rows = RowsByClient(self.trainer.rows, ids)
        self.privacy: NoPrivacy = NoPrivacy(recipe.federation)  # until the server's plan arrives (σ)
        self._planned = False
        self.clients = LocalClients(
            self.algorithm,
            AdapterSlots(self.trainer.model),
            self.trainer,
            self.rows,
            ClientStateStore(self.root / "clients"),
            self.privacy,
            PeakMemory(device),
            seed=self.recipe.seed,
            local_steps=self.recipe.federation.local_steps,
            persist_optimizer=self.recipe.train.optimizer_state == "persist",
        )
        self.template = AdapterSlots(self.trainer.model).read()
        # the client side of some algorithms is set up by init_global (FedSA's B₀), as on the server
        self.algorithm.init_global(self.template)

    def sizes(self) -> dict[int, int]:
        return {client: self.rows.size(client) for client in self.client_ids}

    def plan(self, sigma: float | None) -> None:
        """Take the server's public plan (σ of example/pair-level DP-SGD), once per process."""
        if not self._planned:
            self.privacy = self.clients.privacy = self._privacy(self.rows, sigma)
            self._planned = True

    def _privacy(self, rows: RowsByClient, sigma: float | None) -> NoPrivacy:
        """The mechanism's client-side points on this node: its clients' DP-SGD (their keys and ledgers
        here), or client-level DP's clipping (the noise is the server's)."""
        recipe = self.recipe
        fed, dp = recipe.federation, recipe.privacy
        if dp.unit == "client":  # the node only clips; the key is never drawn from here
            level = ClientLevelDP(dp, fed, SecretRandomness.fresh(), self.algorithm)
            return ClientLevel(fed, level)
        if dp.unit in ("example", "pair"):
            if sigma is None:
                raise RecipeError("the server sent no σ for this DP run")
            self.trainer.make_private(dp, sigma)
            rates = [math.nan] * fed.num_clients  # only this node's clients' rates are known here
            for client in self.client_ids:
                rates[client] = min(1.0, recipe.train.batch_size / rows.size(client))
            level_dp = ExampleLevelDP(dp, sigma, rates, fed.local_steps, fed.local_steps)
            return ExampleLevel(fed, level_dp, self._secrets())
        return NoPrivacy(fed)

    def _secrets(self) -> RunSecrets:
        """This node's clients' keys: drawn here once and kept in its state dir (derived from the public
        seed under ``privacy.randomness: seeded``, as in-process, so that runs can be compared)."""
        recipe = self.recipe
        try:
            return RunSecrets.load(self.root)
        except FileNotFoundError:
            secrets = RunSecrets.create(recipe.privacy.randomness, recipe.federation.num_clients, recipe.seed)
            if recipe.privacy.randomness != "seeded":  # the other clients' keys are not this node's
                secrets.clients = [
                    key if c in self.settings.clients else SecretRandomness.fresh()
                    for c, key in enumerate(secrets.clients)
                ]
            secrets.save(self.root)
            return secrets

    # -- ledgers and pending visits, on disk ---

    @property
    def _ledgers(self) -> Path:
        return self.root / "privacy_ledgers.json"

    def _load_ledgers(self) -> None:
        if isinstance(self.privacy, ExampleLevel) and self._ledgers.is_file():
            self.privacy.dp.load_json(json.loads(self._ledgers.read_text()))

    def _save_ledgers(self) -> None:
        if isinstance(self.privacy, ExampleLevel):
            write_text_atomic(json.dumps(self.privacy.dp.to_json()), self._ledgers, private=True)

    def ledgers(self) -> dict[str, Any]:
        self._load_ledgers()
        return self.privacy.dp.to_json() if isinstance(self.privacy, ExampleLevel) else {}

    def _pending(self, round_idx: int) -> Path:
        return self.root / "pending" / f"round-{round_idx:05d}"

    def commit(self, finished: list[tuple[int, int]], through_round: int) -> None:
        """The server's word on earlier rounds: ``finished`` (round, client) visits become the clients'
        state; every other pending visit of a round up to ``through_round`` is dropped."""
        for round_idx, client in finished:
            pending = ClientStateStore(self._pending(round_idx) / "end")
            if (self._pending(round_idx) / "done").joinpath(str(client)).exists():
                self.clients.store.save(client, pending.load(client))
        root = self.root / "pending"
        for folder in sorted(root.glob("round-*")) if root.is_dir() else []:
            if int(folder.name.removeprefix("round-")) <= through_round:
                shutil.rmtree(folder)

    # -- the messages ---

    def expected_broadcast(self, round_idx: int) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.algorithm.broadcast(round_idx, self.template).items()}

    def train(
        self, round_idx: int, clients: list[int], received: Tensors
    ) -> dict[int, tuple[Tensors, int] | str]:
        """Train each client and return its first-stage upload and its step count, or the name of the
        exception it raised (the message stays on the node, in its metrics: it may quote data)."""
        self._load_ledgers()
        start = select(received, self.algorithm.uploaded_factors(round_idx))
        out: dict[int, tuple[Tensors, int] | str] = {}
        try:
            visits = self.clients.train_all(round_idx, clients, received)
        finally:  # whatever stopped the message, the spend of the visits that trained is on disk
            self._save_ledgers()
        for client, visit in zip(clients, visits, strict=True):
            if isinstance(visit, Exception):
                self._log(
                    {"type": "client_failed", "round": round_idx + 1, "client": client, "error": repr(visit)}
                )
                out[client] = type(visit).__name__
                continue
            upload = self.clients.upload(visit, 0, round_idx, {}, start)
            self._keep(visit, round_idx, stage=0)
            out[client] = (upload, visit.result.steps)
            self._log(
                {
                    "type": "client",
                    "round": round_idx + 1,
                    "client": client,
                    "loss": visit.result.mean_loss,
                    "steps": visit.result.steps,
                    "examples": visit.result.examples,
                    "wall_s": round(visit.wall_s, 4),
                    **self.privacy.client_record(visit),
                }
            )
        self._save_ledgers()
        return out

    def stage(
        self, round_idx: int, stage: int, clients: list[int], reply: Tensors
    ) -> dict[int, Tensors | str]:
        out: dict[int, Tensors | str] = {}
        for client in clients:
            try:
                visit = self._resume_visit(round_idx, client)
                out[client] = self.clients.upload(visit, stage, round_idx, reply, {})
                self._keep(visit, round_idx, stage)
            except Exception as error:  # e.g. the pending visit is gone (the node lost its disk)
                self._log(
                    {"type": "client_failed", "round": round_idx + 1, "client": client, "error": repr(error)}
                )
                out[client] = type(error).__name__
        return out

    def _keep(self, visit: Visit, round_idx: int, stage: int) -> None:
        """Keep the visit on disk: after a stage with more to come, its trained adapter and state (what
        the next stage, or a rerun of it without a lost client, starts from); after the last, what the
        client would keep (``end/``, which a commit makes its state). All of it goes when the round is
        decided."""
        folder = self._pending(round_idx)
        if stage == self.algorithm.num_stages - 1:
            end = self.algorithm.local_end(round_idx, visit.trained, visit.state)
            ClientStateStore(folder / "end").save(visit.client, end)
            (folder / "done").mkdir(parents=True, exist_ok=True)
            (folder / "done" / str(visit.client)).touch()
        else:
            ClientStateStore(folder / "state").save(visit.client, visit.state)
            (folder / "trained").mkdir(parents=True, exist_ok=True)
            save_tensors_atomic(visit.trained, folder / "trained" / f"{visit.client}.safetensors")

    def _resume_visit(self, round_idx: int, client: int) -> Visit:
        folder = self._pending(round_idx)
        trained = load_file(folder / "trained" / f"{client}.safetensors")
        state = ClientStateStore(folder / "state").load(client)
        return Visit(client, 0.0, trained, state, None)

    def _log(self, record: dict[str, Any]) -> None:
        with (self.root / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")


_RUNTIMES: dict[tuple[str, str], NodeRuntime] = {}
_LOCK = threading.Lock()


def runtime_for(recipe: Recipe, task: Any, settings: NodeSettings, run_key: str) -> NodeRuntime:
    """The node's runtime, built once per process (Flower's simulation keeps its workers; its deployment
    engine starts a process per message, which then pays the load every time)."""
    key = (run_key, str(settings.state_dir))
    with _LOCK:
        if key not in _RUNTIMES:
            _RUNTIMES[key] = NodeRuntime(recipe, task, settings, run_key)
        return _RUNTIMES[key]
