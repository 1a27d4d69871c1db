"""Client faults: what a round does when a sampled client fails, and seeded fault injection to study it.

A client that raises, answers after ``federation.client_timeout_s`` or returns non-finite tensors is
dropped from its round; the round goes on over the survivors, their weights renormalised (under
client-level DP the sum is noised and divided by the expected cohort as always: a drop only lowers the
signal). Below ``federation.min_clients`` survivors the round fails and the run stops with one line; the
last checkpoint is what a resume starts from.

A multi-stage round (FedASK) whose client answers stage 1 and then fails is recomputed from stage 1 without
it: the stage-2 sum must come from exactly the clients whose sketches made Q, and their trained adapters
are still at hand, so no one trains again; the weights renormalise and ``min_clients`` applies as for any
drop. (Retrying the whole round would train every client twice and spend privacy twice.)

The recipe's ``faults`` section injects such failures with fixed probabilities, drawn per (client, round)
from its own seed, so a study of robustness (as the FedASK paper's) or a test is reproducible: ``drop``
(the client never answers), ``crash`` (it raises), ``nan`` (its update is NaN), ``slow`` (it answers
``slow_s`` seconds late), ``late`` (it answers its first upload, then fails: before stage 2 for FedASK,
before its only upload for one-stage algorithms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedalign.errors import FedalignError

KINDS = ("drop", "crash", "nan", "slow", "late")


class ClientFailure(RuntimeError):
    """An injected crash (what a client's own exception looks like to the round)."""


class RoundFailed(FedalignError):
    """Fewer clients than ``federation.min_clients`` survived a round."""


@dataclass(frozen=True)
class FaultInjector:
    drop: float = 0.0
    crash: float = 0.0
    nan: float = 0.0
    slow: float = 0.0
    late: float = 0.0
    slow_s: float = 0.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return any((self.drop, self.crash, self.nan, self.slow, self.late))

    def draw(self, client: int, round_idx: int) -> str | None:
        """The fault of this client in this round, or None: one uniform draw against the cumulative
        probabilities, from a stream of its own (independent of training and of DP randomness)."""
        if not self.active:
            return None
        u = np.random.default_rng(np.random.SeedSequence([self.seed, 7, client, round_idx])).random()
        edge = 0.0
        for kind in KINDS:
            edge += getattr(self, kind)
            if u < edge:
                return kind
        return None


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first tensor holding a NaN or an infinity, if any."""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            return name
    return None


def poison(tensors: dict[str, torch.Tensor]) -> None:
    """An injected ``nan`` fault: the client's first tensor becomes NaN."""
    for tensor in tensors.values():
        tensor.fill_(float("nan"))
        return
