"""The server side of a federated round: sample clients, send them the broadcast, sum their uploads.

The clients are reached through :class:`fedalign.runtime.clients.LocalClients` (in this process: one base
model, adapters swapped in place); the privacy mechanism through the points of
:mod:`fedalign.privacy.mechanism`. The server only ever sees the weighted sum of each stage's uploads (see
:mod:`fedalign.algorithms.base`), and the bytes each client sends and receives are counted here, where the
tensors cross between the client and the server side.

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
from typing import Any

import numpy as np

from fedalign.algorithms.base import Algorithm, Tensors, payload_bytes, select
from fedalign.errors import TrainingDiverged
from fedalign.privacy.mechanism import Cohort, NoPrivacy
from fedalign.recipe import FederationSection
from fedalign.runtime.clients import ClientSide, LocalTrainer, Visit, visit_seed
from fedalign.runtime.faults import ClientFailure, FaultInjector, RoundFailed, non_finite, poison
from fedalign.runtime.metrics import MetricsLog, PeakMemory
from fedalign.runtime.state import BaseMoves, RoundState

__all__ = ["Federation", "LocalTrainer", "Visit", "visit_seed"]


class _LateFailure(Exception):
    """A client that uploaded in an earlier stage of this round failed before a later one."""

    def __init__(self, visit: Visit, stage: int, reason: str = "injected late") -> None:
        self.visit, self.stage, self.reason = visit, stage, reason


def _mean_loss(visits: list[Visit]) -> float | None:
    """Clients' mean losses weighted by the examples they saw (None when no client produced a loss)."""
    scored = [v for v in visits if v.result.mean_loss is not None and v.result.examples]
    if not scored:
        return None
    return sum(v.result.mean_loss * v.result.examples for v in scored) / sum(
        v.result.examples for v in scored
    )


class Federation:
    """The round: the algorithm, the privacy mechanism and local training, over one model in this process.

    Its state between rounds is explicit (:meth:`state` / :meth:`restore`, a :class:`RoundState`): the
    global adapter, the algorithm's server state, the public sampler, the failed-round count and the
    mechanism's ledgers; clients' own state is on disk (:class:`ClientStateStore`) and so is the moved
    base of algorithms that move it (:class:`BaseMoves`).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        clients: ClientSide,
        federation: FederationSection,
        metrics: MetricsLog,
        *,
        seed: int,
        memory: PeakMemory,
        faults: FaultInjector | None = None,
        base_moves: BaseMoves | None = None,
    ) -> None:
        self.algorithm, self.clients = algorithm, clients
        self.privacy: NoPrivacy = clients.privacy  # one mechanism: its client-side and server-side points
        self.faults = faults or FaultInjector()
        self.base_moves = base_moves
        self.failed_in_a_row = 0
        self.last_client_error: BaseException | None = None  # chained to a failed run (--debug shows it)
        self.cfg, self.metrics, self.memory = federation, metrics, memory
        # client sampling outside client-level DP: from the public seed, its state in every checkpoint
        self.sampler = np.random.default_rng(np.random.SeedSequence([seed, 1]))

    # -- run state ---------------------------------------------------------------------------------------

    def state(self, rounds_done: int, glob: Tensors) -> RoundState:
        return RoundState(
            rounds_done=rounds_done,
            glob=glob,
            algorithm=self.algorithm.state_dict(),
            sampler=self.sampler.bit_generator.state,
            failed_in_a_row=self.failed_in_a_row,
            privacy=self.privacy.state_dict(),
        )

    def restore(self, state: RoundState) -> Tensors:
        """Continue from ``state`` (after the algorithm's :meth:`init_global`); returns the global adapter."""
        self.algorithm.load_state_dict(state.algorithm)
        self.sampler.bit_generator.state = state.sampler
        self.failed_in_a_row = state.failed_in_a_row
        self.privacy.load_state_dict(state.privacy)
        self.clients.rollback(state.rounds_done)
        # the algorithm's state, the sampler and the ledgers above; the clients' files and the base below
        if self.base_moves is not None:  # rebuild the moved base, round by round, as the run moved it
            for update in self.base_moves.replay(state.rounds_done):
                self.clients.move_base(update)
        return state.glob

    def restart(self) -> None:
        """A resume with no checkpoint left: the run's start again (no client state, no base moves)."""
        self.clients.rollback(0)
        if self.base_moves is not None:
            self.base_moves.truncate(0)

    # -- the round ---------------------------------------------------------------------------------------

    def _weights(self, clients: list[int]) -> list[float]:
        if not clients:
            return []
        if self.cfg.weighting == "uniform":
            by_size = [1.0 / len(clients)] * len(clients)
        else:
            sizes = self.clients.sizes(clients)
            by_size = [n / sum(sizes) for n in sizes]
        return self.privacy.weights(clients, by_size)

    def run_round(self, round_idx: int, glob: Tensors) -> tuple[Tensors, list[Visit]]:
        """One round: returns the new global adapter and the visits (for metrics)."""
        started = time.perf_counter()
        self.memory.reset()
        cohort = self.privacy.select(round_idx, self.sampler)
        clients = cohort.clients
        received = self.algorithm.broadcast(round_idx, glob)
        visits, dropped = self._visits(round_idx, clients, self._weights(clients), received)
        diverged = [r for _, r in dropped if r.startswith("non-finite") and "injected" not in r]
        if clients and not visits and len(diverged) == len(dropped) > 0:
            raise TrainingDiverged(
                f"round {round_idx + 1}: every client's update has NaN or infinite values ({diverged[0]}); "
                "nothing from this round is saved. Lower train.learning_rate, or set train.max_grad_norm"
            )
        while True:  # once, or again without a client that failed between two stages
            if (
                self.privacy.renormalises
                and dropped
                and len(visits) < min(self.cfg.min_clients, len(clients))
            ):
                return glob, self._failed_round(round_idx, cohort, clients, visits, dropped, started)
            if dropped and self.privacy.renormalises:  # the survivors' weights sum to one again
                for visit, weight in zip(visits, self._weights([v.client for v in visits]), strict=True):
                    visit.weight = weight
            aggregated = bool(visits) or self.privacy.releases_empty_rounds
            try:
                if aggregated:
                    self.algorithm.begin_aggregation(round_idx, len(visits))
                    new_glob = self._aggregate(round_idx, received, glob, visits)
                break
            except _LateFailure as late:
                # Recompute every stage without it: a stage-2 sum over fewer clients than stage 1's would
                # not be the sketch of any aggregate (FedASK's Q came from the clients that answered).
                visits.remove(late.visit)
                late.visit.trained = {}
                dropped.append(
                    (late.visit.client, f"failed before stage {late.stage + 1} ({late.reason[:160]}); the "
                     "round's stages ran again without it")
                )  # fmt: skip
        self.failed_in_a_row = 0
        glob = new_glob if aggregated else glob
        bad = non_finite(glob) if aggregated else None
        base_update = self.algorithm.take_base_update() if aggregated and self.algorithm.moves_base else None
        bad = bad or (non_finite(base_update) if base_update is not None else None)
        if bad is not None:  # before any state is saved: nothing non-finite outlives the round
            raise TrainingDiverged(
                f"round {round_idx + 1}: the aggregate has NaN or infinite values (first: {bad}); nothing "
                "from this round is saved. Lower train.learning_rate, or set train.max_grad_norm"
            )
        if self.base_moves is not None:  # every round has its move on disk, empty when there was none
            self.base_moves.save(round_idx + 1, base_update or {})
        if base_update is not None:
            self.clients.move_base(base_update)
        for visit in visits:
            self.clients.finish(visit, round_idx)
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
        if self.base_moves is not None:
            self.base_moves.save(round_idx + 1, {})
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
        planned: list[tuple[int, float, str | None]] = []
        for client, weight in zip(clients, weights, strict=True):
            fault = self.faults.draw(client, round_idx)
            if fault == "drop":
                dropped.append((client, "no answer (injected drop)"))
            elif fault == "crash":
                self.last_client_error = ClientFailure("injected crash")
                dropped.append((client, "raised ClientFailure: injected crash"))
            else:
                planned.append((client, weight, fault))
        slow = [c for c, _, fault in planned if fault == "slow"]
        if slow:
            time.sleep(self.faults.slow_s * len(slow))
        outcomes = self.clients.train_all(round_idx, [c for c, _, _ in planned], received)
        for (client, weight, fault), visit in zip(planned, outcomes, strict=True):
            if isinstance(visit, Exception):  # a client's failure is its own: the round goes on without it
                self.last_client_error = visit
                first = (str(visit).strip().splitlines() or [""])[0][:160]
                dropped.append((client, f"raised {type(visit).__name__}: {first}"))
                continue
            visit.weight, visit.bytes_down = weight, payload_bytes(received)
            if fault == "slow":
                visit.wall_s += self.faults.slow_s
            if fault == "nan":
                poison(visit.trained)
            bad = non_finite(visit.trained)
            if fault == "late" and self.algorithm.num_stages == 1:
                dropped.append((client, "trained, then failed before its upload (injected late)"))
            elif bad is not None:
                injected = " (injected nan)" if fault == "nan" else ""
                dropped.append((client, f"non-finite values in {bad}{injected}"))
            elif timeout is not None and visit.wall_s > timeout:
                dropped.append((client, f"answered after {visit.wall_s:.1f} s (client_timeout_s={timeout})"))
            else:
                visit.fails_after_first_stage = fault == "late"
                visits.append(visit)
        return visits, dropped

    def _log_dropped(self, round_idx: int, dropped: list[tuple[int, str]]) -> None:
        for client, reason in dropped:
            self.metrics.write_private(
                {"type": "client_dropped", "round": round_idx + 1, "client": client, "reason": reason}
            )

    def _aggregate(self, round_idx: int, received: Tensors, glob: Tensors, visits: list[Visit]) -> Tensors:
        """Every stage: each client's upload (through the mechanism's client-side step), the server-side
        sum, the server step (a reply, or the new global adapter)."""
        reply: Tensors = {}
        start = select(received, self.algorithm.uploaded_factors(round_idx))
        for stage in range(self.algorithm.num_stages):
            late = next((v for v in visits if stage > 0 and v.fails_after_first_stage), None)
            if late is not None:
                raise _LateFailure(late, stage)
            uploads = self.clients.upload_all(visits, stage, round_idx, reply, start)
            for visit, upload in zip(visits, uploads, strict=True):
                if isinstance(upload, Exception):  # it answered an earlier stage, then failed (a node died)
                    self.last_client_error = upload
                    raise _LateFailure(visit, stage, f"{type(upload).__name__}: {upload}")
                visit.bytes_up += payload_bytes(upload)
            summed = self.privacy.server_sum(round_idx, uploads, [v.weight for v in visits], start)
            del uploads
            result = self.algorithm.server_step(stage, round_idx, summed, glob)
            if stage < self.algorithm.num_stages - 1:
                reply = result
                for visit in visits:
                    visit.bytes_down += payload_bytes(reply)
            else:
                glob = result
        return glob

    def _log(
        self,
        round_idx: int,
        cohort: Cohort,
        visits: list[Visit],
        wall_s: float,
        peak: float,
        dropped: list[tuple[int, str]] = (),  # type: ignore[assignment]
    ) -> None:
        """Client-private records for every visit and the round; the public round record, DP-safe only
        (what of it may be published is the mechanism's call)."""
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
                    **self.privacy.client_record(v),
                }
            )
        self.metrics.write_private(
            {
                "type": "round",
                "round": round_idx + 1,
                "clients": [v.client for v in visits],
                "loss": _mean_loss(visits),
                "examples": None  # on Flower, clients' example counts stay on their nodes
                if any(v.result.examples is None for v in visits)
                else sum(v.result.examples for v in visits),
                "bytes_up": sum(v.bytes_up for v in visits),
                "bytes_down": sum(v.bytes_down for v in visits),
                "wall_s": round(wall_s, 4),
                memory: round(peak, 1),
            }
        )
        public: dict[str, Any] = {
            "type": "round",
            "round": round_idx + 1,
            **self.privacy.public_round(visits, cohort, dropped, wall_s),
        }
        if not visits and not self.privacy.releases_empty_rounds:
            public["skipped"] = (
                f"fewer than federation.min_clients={self.cfg.min_clients} clients survived"
                if dropped
                else "no client to train"
            )
        self.metrics.write(public)
