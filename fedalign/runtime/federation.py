"""The in-process federated round: sample clients, run their visits on one model, aggregate linearly.

One base model lives in the process; a client visit writes the client's starting adapter into it in
place, trains, and reads the result back. The server only ever sees the weighted sum of each stage's
uploads (see :mod:`fedalign.algorithms.base`), and the bytes each client sends and receives are counted
here, where the tensors cross between the client and the server side.

Randomness is owned, never global: client sampling draws from its own generator (whose state is part of
every checkpoint), and each visit's data order and dropout come from a seed derived from
(run seed, client, round), so any round can be replayed without stored cursors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedalign.algorithms.base import (
    Algorithm,
    ClientState,
    GradientTerm,
    Tensors,
    payload_bytes,
    weighted_sum,
)
from fedalign.models.adapter import AdapterSlots
from fedalign.privacy.client_level import ClientLevelDP, clip_update
from fedalign.privacy.example_level import ExampleLevelDP
from fedalign.recipe import FederationSection
from fedalign.runtime.metrics import MetricsLog, peak_memory_mib
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
    ) -> Any: ...


def visit_seed(seed: int, client: int, round_idx: int) -> int:
    return int(np.random.SeedSequence([seed, 2, client, round_idx]).generate_state(1)[0])


@dataclass
class Visit:
    """One client's part in one round, as the server side sees it."""

    client: int
    weight: float
    trained: Tensors
    state: ClientState
    result: Any
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    update_norm: float | None = None  # before clipping, under client-level DP
    epsilon: float | None = None  # the client's ε so far, under example-level DP


def _mean_loss(visits: list[Visit]) -> float | None:
    """Clients' mean losses weighted by the examples they saw (None when no client produced a loss)."""
    scored = [v for v in visits if v.result.mean_loss is not None and v.result.examples]
    if not scored:
        return None
    return sum(v.result.mean_loss * v.result.examples for v in scored) / sum(
        v.result.examples for v in scored
    )


class Federation:
    def __init__(
        self,
        algorithm: Algorithm,
        slots: AdapterSlots,
        trainer: LocalTrainer,
        client_rows: list[Any],
        federation: FederationSection,
        store: ClientStateStore,
        metrics: MetricsLog,
        *,
        seed: int,
        persist_optimizer: bool,
        device: torch.device,
        client_dp: ClientLevelDP | None = None,
        example_dp: ExampleLevelDP | None = None,
    ) -> None:
        self.algorithm, self.slots, self.trainer = algorithm, slots, trainer
        self.client_rows, self.cfg, self.store, self.metrics = client_rows, federation, store, metrics
        self.seed, self.persist_optimizer, self.device = seed, persist_optimizer, device
        self.sampler = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        self.client_dp, self.example_dp = client_dp, example_dp
        self.epsilon: float | None = None
        self.out_of_budget: list[int] = []

    def sample(self) -> list[int]:
        chosen = self.sampler.choice(self.cfg.num_clients, size=self.cfg.clients_per_round, replace=False)
        return sorted(int(c) for c in chosen)

    def _weights(self, clients: list[int]) -> list[float]:
        if self.cfg.weighting == "uniform":
            return [1.0 / len(clients)] * len(clients)
        sizes = [len(self.client_rows[c]) for c in clients]
        return [n / sum(sizes) for n in sizes]

    def _local_training(self, client: int, round_idx: int, received: Tensors, weight: float) -> Visit:
        """The client side of a round up to its first upload: load state, start adapter, train K steps."""
        started = time.perf_counter()
        state = self.store.load(client)
        self.slots.write(self.algorithm.local_start(round_idx, received, state))
        self.slots.set_trainable(self.algorithm.trainable(round_idx))
        seed = visit_seed(self.seed, client, round_idx)
        torch.manual_seed(seed)  # dropout inside the visit
        rate = None if self.example_dp is None else self.example_dp.sample_rates[client]
        term = self.algorithm.gradient_term(round_idx, received, state)
        result = self.trainer.train(
            self.client_rows[client],
            self.cfg.local_steps,
            torch.Generator().manual_seed(seed),
            state.optimizer if self.persist_optimizer else None,
            sample_rate=rate,
            before_step=None if term is None else self._gradient_term_applier(term),
        )
        if self.persist_optimizer:
            state.optimizer = result.optimizer_state
        visit = Visit(client, weight, self.slots.read(), state, result, bytes_down=payload_bytes(received))
        if self.example_dp is not None:
            visit.epsilon = self.example_dp.record_visit(client, result.steps)
        visit.wall_s = time.perf_counter() - started
        return visit

    def _gradient_term_applier(self, term: GradientTerm) -> Callable[[], None]:
        def apply() -> None:
            with torch.no_grad():
                for key, param in self.slots.named_trainable().items():
                    extra = term(key, param.detach())
                    param.grad = extra.clone() if param.grad is None else param.grad + extra

        return apply

    def run_round(self, round_idx: int, glob: Tensors) -> tuple[Tensors, list[Visit]]:
        """One round: returns the new global adapter and the visits (for metrics)."""
        started = time.perf_counter()
        private = self.client_dp is not None
        clients = self.client_dp.sample(self.sampler) if self.client_dp is not None else self.sample()
        if self.example_dp is not None:  # a client whose next visit would cross its budget is not trained
            self.out_of_budget = [c for c in clients if not self.example_dp.can_visit(c)]
            clients = [c for c in clients if c not in self.out_of_budget]
        received = self.algorithm.broadcast(round_idx, glob)
        weights = [1.0] * len(clients) if private else self._weights(clients)
        visits = [
            self._local_training(c, round_idx, received, w) for c, w in zip(clients, weights, strict=True)
        ]
        if self.client_dp is not None:
            glob = self._private_aggregate(round_idx, received, glob, visits)
        else:
            glob = self._aggregate(round_idx, glob, visits)
        if self.algorithm.moves_base:  # one shared base here; remote clients apply the same change themselves
            self.slots.add_to_base(self.algorithm.take_base_update())
        for visit in visits:
            visit.state = self.algorithm.local_end(round_idx, visit.trained, visit.state)
            self.store.save(visit.client, visit.state)
            visit.trained = {}  # release the client's adapter copy as soon as the round is done
        self._log(round_idx, visits, time.perf_counter() - started)
        return glob, visits

    def _aggregate(self, round_idx: int, glob: Tensors, visits: list[Visit]) -> Tensors:
        """Every stage: uploads, their weighted sum, the server step (a reply, or the new global adapter)."""
        reply: Tensors = {}
        for stage in range(self.algorithm.num_stages):
            uploads = []
            for visit in visits:
                upload = self.algorithm.client_upload(stage, round_idx, visit.trained, reply, visit.state)
                visit.bytes_up += payload_bytes(upload)
                uploads.append(upload)
            summed = weighted_sum(uploads, [v.weight for v in visits])
            del uploads
            result = self.algorithm.server_step(stage, round_idx, summed, glob)
            if stage < self.algorithm.num_stages - 1:
                reply = result
                for visit in visits:
                    visit.bytes_down += payload_bytes(reply)
            else:
                glob = result
        return glob

    def _private_aggregate(
        self, round_idx: int, received: Tensors, glob: Tensors, visits: list[Visit]
    ) -> Tensors:
        """DP-FedAvg: clients upload clipped updates; the server noises their sum, divides by E[cohort]."""
        assert self.client_dp is not None
        updates = []
        for visit in visits:
            upload = self.algorithm.client_upload(0, round_idx, visit.trained, {}, visit.state)
            update, visit.update_norm = clip_update(upload, received, self.client_dp.cfg.clip_norm)
            visit.bytes_up += payload_bytes(update)
            updates.append(update)
        mean_update = self.client_dp.noisy_mean(weighted_sum(updates, [1.0] * len(updates)), received)
        self.epsilon = self.client_dp.record_round()
        return self.algorithm.server_step(
            0, round_idx, {k: received[k] + v for k, v in mean_update.items()}, glob
        )

    def _log(self, round_idx: int, visits: list[Visit], wall_s: float) -> None:
        peak = peak_memory_mib(self.device)
        for v in visits:
            self.metrics.write(
                {
                    "type": "client",
                    "round": round_idx + 1,
                    "client": v.client,
                    "weight": v.weight,
                    "loss": v.result.mean_loss,
                    "loss_first": v.result.losses[0] if v.result.losses else None,
                    "loss_last": v.result.losses[-1] if v.result.losses else None,
                    "steps": v.result.steps,
                    "examples": v.result.examples,
                    "tokens": v.result.tokens,
                    "bytes_up": v.bytes_up,
                    "bytes_down": v.bytes_down,
                    "wall_s": round(v.wall_s, 4),
                    "peak_mem_mib": round(peak, 1),
                    **({} if v.update_norm is None else {"update_norm": v.update_norm}),
                    **(
                        {}
                        if v.epsilon is None
                        else {"epsilon": v.epsilon, "empty_draws": v.result.steps - len(v.result.losses)}
                    ),
                }
            )
        self.metrics.write(
            {
                "type": "round",
                "round": round_idx + 1,
                "clients": [v.client for v in visits],
                "loss": _mean_loss(visits),
                "examples": sum(v.result.examples for v in visits),
                "bytes_up": sum(v.bytes_up for v in visits),
                "bytes_down": sum(v.bytes_down for v in visits),
                "wall_s": round(wall_s, 4),
                "peak_mem_mib": round(peak, 1),
                **({} if self.epsilon is None else {"epsilon": self.epsilon}),
                **self._example_privacy_record(),
            }
        )

    def _example_privacy_record(self) -> dict[str, Any]:
        if self.example_dp is None:
            return {}
        return {"epsilon_max": self.example_dp.max_epsilon(), "out_of_budget": self.out_of_budget}

    def server_state(self, round_idx: int) -> dict[str, Any]:
        """What a checkpoint needs besides the global adapter to continue this run exactly."""
        state: dict[str, Any] = {"round": round_idx + 1, "sampler": self.sampler.bit_generator.state}
        if self.client_dp is not None:
            state["privacy_ledger"] = self.client_dp.ledger.to_json()
        if self.example_dp is not None:
            state["privacy_ledgers"] = self.example_dp.to_json()
        return state
