"""The client side of a round, for the clients hosted in this process.

A round (:class:`fedalign.runtime.federation.Federation`) talks to its clients through these calls, and
nothing else crosses between the two sides:

- ``train_all(round, clients, received)``: for each client, load its state, write its starting adapter
  into the model, train K local steps (under example/pair-level DP with the client's own secret
  randomness), keep the trained adapter for the stages to come; a client's failure is its outcome;
- ``upload_all(visits, stage, round, reply, start)``: each client's upload for one stage, through the
  privacy mechanism's client-side step (client-level DP clips here);
- ``finish(visit, round)``: what the client keeps (its state, written to disk);
- ``move_base(update)``: apply a base-weight move (FRLoRA) that the server decided;
- ``sizes(clients)``, ``rollback(rounds_done)``, ``close()``.

In this process every client shares one base model and adapters are swapped in place. On Flower
(:mod:`fedalign.flower`) each node hosts its clients with this same class, and the server reaches them
through :class:`fedalign.flower.remote.RemoteClients`, which has these calls too and batches each one
into one message per node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedalign.algorithms.base import Algorithm, ClientState, GradientTerm, Tensors, low_rank_delta
from fedalign.errors import FedalignError
from fedalign.models.adapter import AdapterSlots
from fedalign.privacy.mechanism import NoPrivacy
from fedalign.privacy.randomness import SecretRandomness
from fedalign.runtime.metrics import PeakMemory
from fedalign.runtime.state import ClientStateStore


class LocalTrainer(Protocol):
    """What the runtime needs from local training (:mod:`fedalign.client.sft`, :mod:`fedalign.client.dpo`)."""

    def train(
        self,
        rows: Any,
        steps: int,
        generator: torch.Generator,
        optimizer_state: Tensors | None,
        sample_rate: float | None = None,
        before_step: Callable[[], None] | None = None,
        randomness: SecretRandomness | None = None,
    ) -> Any: ...


def visit_seed(seed: int, client: int, round_idx: int) -> int:
    return int(np.random.SeedSequence([seed, 2, client, round_idx]).generate_state(1)[0])


@dataclass
class Visit:
    """One client's part in one round."""

    client: int
    weight: float
    trained: Tensors
    state: ClientState
    result: Any
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    peak_mib: float = 0.0
    update_norm: float | None = None  # before clipping, under client-level DP
    fails_after_first_stage: bool = False  # injected ``late`` fault of a multi-stage algorithm


class ClientSide(Protocol):
    """What a round needs from its clients, wherever they run (:class:`LocalClients` in this process,
    :class:`fedalign.flower.remote.RemoteClients` on Flower nodes)."""

    privacy: NoPrivacy

    def sizes(self, clients: list[int]) -> list[int]: ...

    def train_all(self, round_idx: int, clients: list[int], received: Tensors) -> list[Visit | Exception]: ...

    def upload_all(
        self, visits: list[Visit], stage: int, round_idx: int, reply: Tensors, start: Tensors
    ) -> list[Tensors | Exception]: ...

    def finish(self, visit: Visit, round_idx: int) -> None: ...

    def move_base(self, update: Tensors) -> None: ...

    def rollback(self, rounds_done: int) -> None: ...

    def close(self) -> None: ...


class RowsByClient:
    """Each client's training rows, made when the client trains: a view of the tokenized rows per visit.

    Making every client's view up front cost 30 s of setup and 92 MiB of peak memory at 10,000 clients
    (``bench/client_scale.py``); a view takes a few milliseconds, and a round visits a few clients.
    """

    def __init__(
        self, rows: Callable[[list[int]], Any], row_ids: Mapping[int, list[int]] | Sequence[list[int]]
    ) -> None:
        self._rows, self._ids = rows, row_ids

    def __getitem__(self, client: int) -> Any:
        return self._rows(self._ids[client])

    def size(self, client: int) -> int:
        return len(self._ids[client])


class LocalClients:
    """The clients of this process: their data, their state on disk, and one model they all train."""

    def __init__(
        self,
        algorithm: Algorithm,
        slots: AdapterSlots,
        trainer: LocalTrainer,
        client_rows: RowsByClient,
        store: ClientStateStore,
        privacy: NoPrivacy,
        memory: PeakMemory,
        *,
        seed: int,
        local_steps: int,
        persist_optimizer: bool,
    ) -> None:
        self.algorithm, self.slots, self.trainer = algorithm, slots, trainer
        self.client_rows, self.store, self.privacy, self.memory = client_rows, store, privacy, memory
        self.seed, self.local_steps, self.persist_optimizer = seed, local_steps, persist_optimizer

    def sizes(self, clients: list[int]) -> list[int]:
        """Row counts (what ``weighting: examples`` weights by; not covered by ε, see the README)."""
        return [self.client_rows.size(c) for c in clients]

    def train_all(self, round_idx: int, clients: list[int], received: Tensors) -> list[Visit | Exception]:
        """Each client's visit, or the exception it raised (its own failure: the round goes on without
        it). A bad row under ``on_bad_row: stop`` or a broken invariant is the run's problem and raises."""
        outcomes: list[Visit | Exception] = []
        for client in clients:
            try:
                outcomes.append(self.train(client, round_idx, received))
            except (FedalignError, AssertionError):
                raise
            except Exception as error:
                outcomes.append(error)
        return outcomes

    def upload_all(
        self, visits: list[Visit], stage: int, round_idx: int, reply: Tensors, start: Tensors
    ) -> list[Tensors | Exception]:
        return [self.upload(visit, stage, round_idx, reply, start) for visit in visits]

    def rollback(self, rounds_done: int) -> None:
        """Clients' state as of the checkpoint after ``rounds_done`` rounds (a resume)."""
        self.store.rollback(rounds_done)

    def close(self) -> None:
        """Nothing to flush here: every visit's state is on disk when its round ends."""

    def train(self, client: int, round_idx: int, received: Tensors) -> Visit:
        """Load state, write the start adapter, train K steps; the visit keeps the trained adapter."""
        started = time.perf_counter()
        self.memory.reset()
        state = self.store.load(client)
        self.slots.write(self.algorithm.local_start(round_idx, received, state))
        self.slots.set_trainable(self.algorithm.trainable(round_idx))
        seed = visit_seed(self.seed, client, round_idx)
        torch.manual_seed(seed)  # dropout inside the visit
        rate, secret = self.privacy.visit(client, round_idx)
        term = self.algorithm.gradient_term(round_idx, received, state)
        try:
            result = self.trainer.train(
                self.client_rows[client],
                self.local_steps,
                torch.Generator().manual_seed(seed),
                state.optimizer if self.persist_optimizer else None,
                sample_rate=rate,
                before_step=None if term is None else self._gradient_term_applier(term),
                randomness=secret,
            )
        except Exception:
            for param in self.slots.named_trainable().values():
                param.grad = None  # nothing of the failed visit reaches the next client's first step
            raise
        if self.persist_optimizer:
            state.optimizer = result.optimizer_state
        visit = Visit(client, 0.0, self.slots.read(), state, result)
        self.privacy.after_visit(client, result.steps)
        visit.wall_s = time.perf_counter() - started
        visit.peak_mib = self.memory.read()
        return visit

    def _gradient_term_applier(self, term: GradientTerm) -> Callable[[], None]:
        def apply() -> None:
            with torch.no_grad():
                for key, param in self.slots.named_trainable().items():
                    extra = term(key, param.detach())
                    param.grad = extra.clone() if param.grad is None else param.grad + extra

        return apply

    def upload(self, visit: Visit, stage: int, round_idx: int, reply: Tensors, start: Tensors) -> Tensors:
        """The visit's upload for ``stage``, as it leaves the client (``start``: the broadcast values of the
        uploaded keys, what client-level DP clips the update against)."""
        upload = self.algorithm.client_upload(stage, round_idx, visit.trained, reply, visit.state)
        upload, norm = self.privacy.client_transform(upload, start)
        if norm is not None:
            visit.update_norm = norm
        return upload

    def finish(self, visit: Visit, round_idx: int) -> None:
        """What the client keeps after the round, on disk; its trained adapter is released."""
        visit.state = self.algorithm.local_end(round_idx, visit.trained, visit.state)
        self.store.save(visit.client, visit.state)
        visit.trained = {}

    def move_base(self, update: Tensors) -> None:
        """Apply a low-rank base-weight move (one shared base here; each node applies it on Flower)."""
        self.slots.add_to_base(low_rank_delta(update))
