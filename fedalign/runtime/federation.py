"""The in-process federated round: sample clients, run their visits on one model, aggregate linearly.

One base model lives in the process; a client visit writes the client's starting adapter into it in
place, trains, and reads the result back. The server only ever sees the weighted sum of each stage's
uploads (see :mod:`fedalign.algorithms.base`), and the bytes each client sends and receives are counted
here, where the tensors cross between the client and the server side.

Randomness is owned, never global. What the public seed decides (so non-private runs replay exactly):
client sampling outside client-level DP (its generator's state is in every checkpoint), and each
visit's batch order and dropout, from a seed derived from (run seed, client, round). What a DP guarantee
rests on never comes from the seed: under example/pair-level DP each client's Poisson batches and noise
come from that client's secret, under client-level DP the cohort and the noise from the server's
(:mod:`fedalign.privacy.randomness`).

A DP run never stalls on budgets: under example/pair-level DP a round samples among the clients that can
still take a visit within ``target_epsilon`` (cohorts stay full while enough have budget; a round with
fewer says so), and the runtime stops when nobody has budget left.
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
    select,
    weighted_sum,
)
from fedalign.errors import FedalignError, TrainingDiverged
from fedalign.models.adapter import AdapterSlots
from fedalign.privacy.client_level import ClientLevelDP, clip_update
from fedalign.privacy.example_level import ExampleLevelDP
from fedalign.privacy.randomness import RunSecrets, SecretRandomness
from fedalign.recipe import FederationSection
from fedalign.runtime.faults import ClientFailure, FaultInjector, RoundFailed, non_finite, poison
from fedalign.runtime.metrics import MetricsLog, PeakMemory
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
    """One client's part in one round, as the server side sees it."""

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


@dataclass
class Cohort:
    """The clients of one round and, under example/pair-level DP, how many had no budget left for it."""

    clients: list[int]
    out_of_budget: int = 0


class CohortSelector:
    """The *select clients* point of a round.

    - no DP: ``clients_per_round`` of all clients, from the public seed's generator (checkpointed);
    - client-level DP: the privacy mechanism's own cohort (Poisson or fixed size, from the server secret);
    - example/pair-level DP: ``clients_per_round`` of the clients whose next visit stays within the
      budget, from the public generator (which clients visit is not what that DP protects). Sampling among
      them, rather than dropping the exhausted ones from a cohort drawn from everyone, keeps cohorts full
      and never yields an empty round while anyone has budget (the FedASK recipe's 800 rounds hit such a
      round in 98.8% of simulated runs when exhausted clients were dropped).
    """

    def __init__(
        self,
        federation: FederationSection,
        seed: int,
        client_dp: ClientLevelDP | None = None,
        example_dp: ExampleLevelDP | None = None,
    ) -> None:
        self.cfg, self.client_dp, self.example_dp = federation, client_dp, example_dp
        self.sampler = np.random.default_rng(np.random.SeedSequence([seed, 1]))

    def select(self, round_idx: int) -> Cohort:
        if self.client_dp is not None:
            return Cohort(self.client_dp.sample(round_idx))
        if self.example_dp is None:
            chosen = self.sampler.choice(self.cfg.num_clients, size=self.cfg.clients_per_round, replace=False)
            return Cohort(sorted(int(c) for c in chosen))
        eligible = self.example_dp.clients_with_budget()
        size = min(self.cfg.clients_per_round, len(eligible))
        chosen = self.sampler.choice(np.asarray(eligible, dtype=np.int64), size=size, replace=False)
        return Cohort(sorted(int(c) for c in chosen), self.cfg.num_clients - len(eligible))


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
        secrets: RunSecrets | None = None,
        faults: FaultInjector | None = None,
    ) -> None:
        self.algorithm, self.slots, self.trainer = algorithm, slots, trainer
        self.faults = faults or FaultInjector()
        self.failed_in_a_row = 0
        self.last_client_error: BaseException | None = None  # chained to a failed run (--debug shows it)
        self.client_rows, self.cfg, self.store, self.metrics = client_rows, federation, store, metrics
        self.seed, self.persist_optimizer, self.device = seed, persist_optimizer, device
        self.selector = CohortSelector(federation, seed, client_dp, example_dp)
        self.client_dp, self.example_dp, self.secrets = client_dp, example_dp, secrets
        if example_dp is not None and secrets is None:
            raise ValueError("example/pair-level DP needs each client's secret randomness")
        self.memory = PeakMemory(device)
        self.epsilon: float | None = None

    def _weights(self, clients: list[int]) -> list[float]:
        if not clients:
            return []
        if self.cfg.weighting == "uniform":
            return [1.0 / len(clients)] * len(clients)
        sizes = [len(self.client_rows[c]) for c in clients]
        return [n / sum(sizes) for n in sizes]

    def _local_training(self, client: int, round_idx: int, received: Tensors, weight: float) -> Visit:
        """The client side of a round up to its first upload: load state, start adapter, train K steps."""
        started = time.perf_counter()
        self.memory.reset()
        state = self.store.load(client)
        self.slots.write(self.algorithm.local_start(round_idx, received, state))
        self.slots.set_trainable(self.algorithm.trainable(round_idx))
        seed = visit_seed(self.seed, client, round_idx)
        torch.manual_seed(seed)  # dropout inside the visit
        rate, secret = None, None
        if self.example_dp is not None:
            assert self.secrets is not None
            rate = self.example_dp.sample_rates[client]
            secret = self.secrets.client(client).child("visit", round_idx)
        term = self.algorithm.gradient_term(round_idx, received, state)
        result = self.trainer.train(
            self.client_rows[client],
            self.cfg.local_steps,
            torch.Generator().manual_seed(seed),
            state.optimizer if self.persist_optimizer else None,
            sample_rate=rate,
            before_step=None if term is None else self._gradient_term_applier(term),
            randomness=secret,
        )
        if self.persist_optimizer:
            state.optimizer = result.optimizer_state
        visit = Visit(client, weight, self.slots.read(), state, result, bytes_down=payload_bytes(received))
        if self.example_dp is not None:
            self.example_dp.record_visit(client, result.steps)
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

    def run_round(self, round_idx: int, glob: Tensors) -> tuple[Tensors, list[Visit]]:
        """One round: returns the new global adapter and the visits (for metrics)."""
        started = time.perf_counter()
        self.memory.reset()
        cohort = self.selector.select(round_idx)
        clients = cohort.clients
        received = self.algorithm.broadcast(round_idx, glob)
        weights = [1.0] * len(clients) if self.client_dp is not None else self._weights(clients)
        visits, dropped = self._visits(round_idx, clients, weights, received)
        diverged = [r for _, r in dropped if r.startswith("non-finite") and "injected" not in r]
        if clients and not visits and len(diverged) == len(dropped) > 0:
            raise TrainingDiverged(
                f"round {round_idx + 1}: every client's update has NaN or infinite values ({diverged[0]}); "
                "nothing from this round is saved. Lower train.learning_rate, or set train.max_grad_norm"
            )
        if self.client_dp is None and dropped and len(visits) < min(self.cfg.min_clients, len(clients)):
            return glob, self._failed_round(round_idx, cohort, clients, visits, dropped, started)
        self.failed_in_a_row = 0
        if dropped and self.client_dp is None:  # the survivors' weights sum to one again
            for visit, weight in zip(visits, self._weights([v.client for v in visits]), strict=True):
                visit.weight = weight
        aggregated = True
        self.algorithm.begin_aggregation(round_idx, len(visits))
        if self.client_dp is not None:  # noise is released even for an empty cohort
            glob = self._private_aggregate(round_idx, received, glob, visits)
        elif visits:
            glob = self._aggregate(round_idx, glob, visits)
        else:  # nobody to train: the global adapter stays as it is
            aggregated = False
        bad = non_finite(glob) if aggregated else None
        base_update = self.algorithm.take_base_update() if aggregated and self.algorithm.moves_base else None
        bad = bad or (non_finite(base_update) if base_update is not None else None)
        if bad is not None:  # before any state is saved: nothing non-finite outlives the round
            raise TrainingDiverged(
                f"round {round_idx + 1}: the aggregate has NaN or infinite values (first: {bad}); nothing "
                "from this round is saved. Lower train.learning_rate, or set train.max_grad_norm"
            )
        if base_update is not None:  # one shared base here; remote clients apply it too
            self.slots.add_to_base(base_update)
        for visit in visits:
            visit.state = self.algorithm.local_end(round_idx, visit.trained, visit.state)
            self.store.save(visit.client, visit.state)
            visit.trained = {}  # release the client's adapter copy as soon as the round is done
        peak = max([self.memory.read(), *(v.peak_mib for v in visits)])
        self._log_dropped(round_idx, dropped)
        self._log(round_idx, cohort, visits, time.perf_counter() - started, peak, dropped)
        return glob, visits

    def _failed_round(self, round_idx, cohort, clients, visits, dropped, started) -> list[Visit]:
        """Fewer survivors than ``min_clients``: the round leaves the global adapter and every client's state
        as they were (the survivors' privacy spend stays spent) and is recorded; ``max_failed_rounds`` such
        rounds in a row stop the run. Not under client-level DP, where the noised sum is released whatever
        the cohort, so that the output never shows how many took part."""
        self.failed_in_a_row += 1
        self._log_dropped(round_idx, dropped)
        reasons = "; ".join(f"client {c}: {r}" for c, r in dropped[:3])
        summary = f"{len(visits)} of {len(clients)} clients survived ({reasons})"
        if self.failed_in_a_row >= self.cfg.max_failed_rounds:
            raise RoundFailed(
                f"round {round_idx + 1}: {summary}; {self.failed_in_a_row} rounds in a row had fewer than "
                f"federation.min_clients={self.cfg.min_clients}; the last checkpoint is kept"
            ) from self.last_client_error
        for visit in visits:
            visit.trained = {}
        self._log(round_idx, cohort, [], time.perf_counter() - started, self.memory.read(), dropped)
        return []

    def _visits(
        self, round_idx: int, clients: list[int], weights: list[float], received: Tensors
    ) -> tuple[list[Visit], list[tuple[int, str]]]:
        """Each sampled client's visit, or the reason it was dropped (it raised, was late, or returned
        non-finite tensors; injected faults go through the same checks)."""
        visits: list[Visit] = []
        dropped: list[tuple[int, str]] = []
        timeout = self.cfg.client_timeout_s
        for client, weight in zip(clients, weights, strict=True):
            fault = self.faults.draw(client, round_idx)
            if fault == "drop":
                dropped.append((client, "no answer (injected drop)"))
                continue
            try:
                if fault == "crash":
                    raise ClientFailure("injected crash")
                if fault == "slow":
                    time.sleep(self.faults.slow_s)
                started = time.perf_counter()
                visit = self._local_training(client, round_idx, received, weight)
                visit.wall_s = (
                    time.perf_counter() - started + (self.faults.slow_s if fault == "slow" else 0.0)
                )
            except (FedalignError, AssertionError):
                raise  # a bad row (on_bad_row: stop) or a broken invariant: the run's problem
            except Exception as error:  # a client's failure is its own: the round goes on without it
                for param in self.slots.named_trainable().values():
                    param.grad = None  # nothing of the failed visit reaches the next client's first step
                self.last_client_error = error
                first = (str(error).strip().splitlines() or [""])[0][:160]
                dropped.append((client, f"raised {type(error).__name__}: {first}"))
                continue
            if fault == "nan":
                poison(visit.trained)
            bad = non_finite(visit.trained)
            if bad is not None:
                injected = " (injected nan)" if fault == "nan" else ""
                dropped.append((client, f"non-finite values in {bad}{injected}"))
            elif timeout is not None and visit.wall_s > timeout:
                dropped.append((client, f"answered after {visit.wall_s:.1f} s (client_timeout_s={timeout})"))
            else:
                visits.append(visit)
        return visits, dropped

    def _log_dropped(self, round_idx: int, dropped: list[tuple[int, str]]) -> None:
        for client, reason in dropped:
            self.metrics.write_private(
                {"type": "client_dropped", "round": round_idx + 1, "client": client, "reason": reason}
            )

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
        uploaded = select(received, self.algorithm.uploaded_factors(round_idx))
        mean_update = self.client_dp.noisy_mean(
            round_idx, weighted_sum(updates, [1.0] * len(updates)), uploaded
        )
        self.epsilon = self.client_dp.record_round()
        return self.algorithm.server_step(
            0, round_idx, {k: received[k] + v for k, v in mean_update.items()}, glob
        )

    def _log(
        self,
        round_idx: int,
        cohort: Cohort,
        visits: list[Visit],
        wall_s: float,
        peak: float,
        dropped: list[tuple[int, str]] = (),  # type: ignore[assignment]
    ) -> None:
        """Client-private records for every visit and the round; the public round record, DP-safe only."""
        memory = self.memory.field
        for v in visits:
            self.metrics.write_private(
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
                    memory: round(v.peak_mib, 1),
                    **({} if v.update_norm is None else {"update_norm": v.update_norm}),
                    **self._example_privacy_of(v),
                }
            )
        self.metrics.write_private(
            {
                "type": "round",
                "round": round_idx + 1,
                "clients": [v.client for v in visits],
                "loss": _mean_loss(visits),
                "examples": sum(v.result.examples for v in visits),
                "bytes_up": sum(v.bytes_up for v in visits),
                "bytes_down": sum(v.bytes_down for v in visits),
                "wall_s": round(wall_s, 4),
                memory: round(peak, 1),
            }
        )
        public: dict[str, Any] = {"type": "round", "round": round_idx + 1}
        if self.client_dp is None:  # under client-level DP who took part (even how many) is secret
            public |= {
                "clients": [v.client for v in visits],
                "bytes_up": sum(v.bytes_up for v in visits),
                "bytes_down": sum(v.bytes_down for v in visits),
            }
        else:
            public["epsilon"] = self.epsilon
        if self.client_dp is None and self.example_dp is None:  # under DP, timing follows the secret draws
            public["wall_s"] = round(wall_s, 4)
            if dropped:  # under DP which client failed, and why, follows its data: client-private
                public["dropped"] = [{"client": c, "reason": r} for c, r in dropped]
        if self.example_dp is not None:
            public |= {
                "epsilon_max": self.example_dp.max_epsilon(),
                "out_of_budget": cohort.out_of_budget,
                "cohort_short": len(visits) < self.cfg.clients_per_round,
            }
        if not visits and self.client_dp is None:
            public["skipped"] = (
                f"fewer than federation.min_clients={self.cfg.min_clients} clients survived"
                if dropped
                else "no client to train"
            )
        self.metrics.write(public)

    def _example_privacy_of(self, visit: Visit) -> dict[str, Any]:
        if self.example_dp is None:
            return {}
        return {
            "epsilon": self.example_dp.epsilon(visit.client),
            "sample_rate": self.example_dp.sample_rates[visit.client],
            "empty_draws": visit.result.steps - len(visit.result.losses),
        }

    def server_state(self, round_idx: int) -> dict[str, Any]:
        """What a checkpoint needs besides the global adapter to continue this run exactly, and may publish
        (the sampler follows from the public seed)."""
        return {"round": round_idx + 1, "sampler": self.selector.sampler.bit_generator.state}

    def private_state(self) -> dict[str, Any] | None:
        """The privacy ledgers (each client's reveals its row count through its sampling rate)."""
        if self.client_dp is not None:
            return {"privacy_ledger": self.client_dp.ledger.to_json()}
        if self.example_dp is not None:
            return {"privacy_ledgers": self.example_dp.to_json()}
        return None
