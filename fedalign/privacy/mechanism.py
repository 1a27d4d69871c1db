"""A run's privacy mechanism behind one interface, which the round calls at fixed points.

The round (:class:`fedalign.runtime.federation.Federation`) never asks which DP it runs under; it calls:

1. ``stop_reason()`` before a round: a budget that cannot pay for another round ends the run;
2. ``select(round, sampler)``: the cohort;
3. ``weights(clients, by_size)`` and ``renormalises``: how uploads are weighted, and whether the weights
   of survivors are renormalised when clients drop out;
4. ``visit(client, round)`` / ``after_visit(client, steps)``: what a client's local DP-SGD draws from, and
   the spend of its visit;
5. ``client_transform(upload, start)`` on each upload (a client-side step: client-level DP clips there)
   and ``server_sum(round, uploads, weights, start)`` (a server-side step: client-level DP noises
   there);
6. ``public_round(...)`` / ``client_record(...)``: what of a round may be published, and the client-private
   extras;
7. ``state_dict()`` / ``load_state_dict()``: the ledgers, kept in the run's private folder.

Three mechanisms: :class:`NoPrivacy`, :class:`ExampleLevel` (DP-SGD per example or pair inside each client)
and :class:`ClientLevel` (DP-FedAvg, noise on the server). Flower drives the same objects from its
ServerApp and ClientApp (the client-side points run on the node, the server-side ones on the server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedalign.algorithms.base import Tensors, weighted_sum
from fedalign.privacy.accounting import Ledger
from fedalign.privacy.client_level import ClientLevelDP, clip_update
from fedalign.privacy.example_level import ExampleLevelDP
from fedalign.privacy.randomness import RunSecrets, SecretRandomness
from fedalign.recipe import FederationSection


@dataclass
class Cohort:
    """The clients of one round and, under example/pair-level DP, how many had no budget left for it."""

    clients: list[int]
    out_of_budget: int = 0


class NoPrivacy:
    """No DP: cohorts from the public seed's sampler, weighted sums, everything about a round public."""

    unit = "none"
    renormalises = True  # survivors' weights sum to one again after a drop
    releases_empty_rounds = False  # a round nobody survived changes nothing and releases nothing

    def __init__(self, federation: FederationSection) -> None:
        self.cfg = federation

    def describe(self) -> str | None:
        return None

    def plan_record(self) -> dict[str, Any] | None:
        """Public facts of the mechanism (σ, sampling rate), written once at the start."""
        return None

    def stop_reason(self) -> str | None:
        return None

    def select(self, round_idx: int, sampler: np.random.Generator) -> Cohort:
        chosen = sampler.choice(self.cfg.num_clients, size=self.cfg.clients_per_round, replace=False)
        return Cohort(sorted(int(c) for c in chosen))

    def weights(self, clients: list[int], by_size: list[float]) -> list[float]:
        return by_size

    def visit(self, client: int, round_idx: int) -> tuple[float | None, SecretRandomness | None]:
        """(Poisson sampling rate, secret randomness) of a client's local DP-SGD; (None, None): none."""
        return None, None

    def after_visit(self, client: int, steps: int) -> None:
        """A client trained ``steps`` local steps (its spend, counted even if its upload is dropped)."""

    def client_transform(self, upload: Tensors, start: Tensors) -> tuple[Tensors, float | None]:
        """A client's upload as it leaves the client (``start``: the broadcast values of the uploaded keys),
        and its norm before clipping when it is clipped."""
        return upload, None

    def server_sum(
        self, round_idx: int, uploads: list[Tensors], weights: list[float], start: Tensors
    ) -> Tensors:
        """What the server makes of a stage's uploads: their weighted sum."""
        return weighted_sum(uploads, weights)

    def public_round(self, visits: list, cohort: Cohort, dropped: list[tuple[int, str]], wall_s: float):
        return {
            "clients": [v.client for v in visits],
            "bytes_up": sum(v.bytes_up for v in visits),
            "bytes_down": sum(v.bytes_down for v in visits),
            "wall_s": round(wall_s, 4),
            **({"dropped": [{"client": c, "reason": r} for c, r in dropped]} if dropped else {}),
        }

    def client_record(self, visit: Any) -> dict[str, Any]:
        return {}

    def epsilon(self) -> float | None:
        return None

    def progress(self, record: dict[str, Any]) -> str | None:
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """What the mechanism must keep to continue exactly (private: ledgers reveal clients' row counts)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class ExampleLevel(NoPrivacy):
    """Example/pair-level DP-SGD inside each client, accounted per client (:mod:`.example_level`)."""

    def __init__(self, federation: FederationSection, dp: ExampleLevelDP, secrets: RunSecrets) -> None:
        super().__init__(federation)
        self.dp, self.secrets = dp, secrets
        self.unit = dp.cfg.unit

    def describe(self) -> str:
        return self.dp.describe() + f"; {self.dp.planned_steps} local steps planned per client"

    def plan_record(self) -> dict[str, Any]:
        return {
            "sigma": self.dp.sigma,
            "q_max": max(self.dp.sample_rates),  # what σ was calibrated for; each q_i is private
            "planned_steps": self.dp.planned_steps,
        }

    def stop_reason(self) -> str | None:
        if self.dp.anyone_can_visit():
            return None
        return f"no client can take another visit within ε={self.dp.cfg.target_epsilon}"

    def select(self, round_idx: int, sampler: np.random.Generator) -> Cohort:
        """``clients_per_round`` of the clients whose next visit stays within budget, from the public
        sampler (which clients visit is not what this DP protects). Sampling among them, rather than
        dropping exhausted ones from a cohort drawn from everyone, keeps cohorts full and never yields an
        empty round while anyone has budget."""
        eligible = self.dp.clients_with_budget()
        size = min(self.cfg.clients_per_round, len(eligible))
        chosen = sampler.choice(np.asarray(eligible, dtype=np.int64), size=size, replace=False)
        return Cohort(sorted(int(c) for c in chosen), self.cfg.num_clients - len(eligible))

    def visit(self, client: int, round_idx: int) -> tuple[float | None, SecretRandomness | None]:
        return self.dp.sample_rates[client], self.secrets.client(client).child("visit", round_idx)

    def after_visit(self, client: int, steps: int) -> None:
        self.dp.record_visit(client, steps)

    def public_round(self, visits: list, cohort: Cohort, dropped: list[tuple[int, str]], wall_s: float):
        # Timing follows the secret draws, and which client failed (and why) follows its data: private.
        return {
            "clients": [v.client for v in visits],
            "bytes_up": sum(v.bytes_up for v in visits),
            "bytes_down": sum(v.bytes_down for v in visits),
            "epsilon_max": self.dp.max_epsilon(),
            "out_of_budget": cohort.out_of_budget,
            "cohort_short": len(visits) < self.cfg.clients_per_round,
        }

    def client_record(self, visit: Any) -> dict[str, Any]:
        return {
            "epsilon": self.dp.epsilon(visit.client),
            "sample_rate": self.dp.sample_rates[visit.client],
            "empty_draws": None  # on Flower, known on the client's node only
            if visit.result.losses is None
            else visit.result.steps - len(visit.result.losses),
        }

    def epsilon(self) -> float:
        return self.dp.max_epsilon()

    def progress(self, record: dict[str, Any]) -> str:
        return f"ε {record['epsilon_max']:.3f}"

    def state_dict(self) -> dict[str, Any]:
        return {"privacy_ledgers": self.dp.to_json()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.dp.load_json((state or {}).get("privacy_ledgers", {}))


class ClientLevel(NoPrivacy):
    """DP-FedAvg (:mod:`.client_level`): cohorts and noise from the server's secret; clients clip their
    update (client side), the server noises the sum and divides by the expected cohort (server side)."""

    renormalises = False  # the sum is divided by the expected cohort, never by who took part
    releases_empty_rounds = True  # the noised sum is released whatever the cohort, even an empty one

    def __init__(self, federation: FederationSection, dp: ClientLevelDP) -> None:
        super().__init__(federation)
        self.dp, self.unit = dp, "client"
        self.last_epsilon: float | None = None

    def describe(self) -> str:
        return self.dp.describe() + f"; {self.cfg.rounds} rounds planned"

    def plan_record(self) -> dict[str, Any]:
        return {"sigma": self.dp.sigma, "q": self.dp.sample_rate}

    def stop_reason(self) -> str | None:
        if self.dp.budget_left_for_a_round():
            return None
        spent = self.dp.epsilon()
        return f"another round would take ε past {self.dp.cfg.target_epsilon} (spent {spent:.3f})"

    def select(self, round_idx: int, sampler: np.random.Generator) -> Cohort:
        return Cohort(self.dp.sample(round_idx))

    def weights(self, clients: list[int], by_size: list[float]) -> list[float]:
        return [1.0] * len(clients)

    def client_transform(self, upload: Tensors, start: Tensors) -> tuple[Tensors, float | None]:
        return clip_update(upload, start, self.dp.cfg.clip_norm)

    def server_sum(
        self, round_idx: int, uploads: list[Tensors], weights: list[float], start: Tensors
    ) -> Tensors:
        """start + (Σ clipped updates + noise) / E[cohort], on exactly the keys of ``start`` (what a client
        uploads this round, as broadcast), so that an empty cohort releases noise of the same shape."""
        mean_update = self.dp.noisy_mean(round_idx, weighted_sum(uploads, weights), start)
        self.last_epsilon = self.dp.record_round()
        return {k: start[k] + v for k, v in mean_update.items()}

    def public_round(self, visits: list, cohort: Cohort, dropped: list[tuple[int, str]], wall_s: float):
        return {"epsilon": self.last_epsilon}  # who took part, even how many, is secret

    def client_record(self, visit: Any) -> dict[str, Any]:
        return {} if visit.update_norm is None else {"update_norm": visit.update_norm}

    def epsilon(self) -> float:
        return self.dp.epsilon()

    def progress(self, record: dict[str, Any]) -> str:
        return f"ε {record['epsilon']:.3f}"

    def state_dict(self) -> dict[str, Any]:
        return {"privacy_ledger": self.dp.ledger.to_json()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.dp.ledger = Ledger.from_json((state or {}).get("privacy_ledger", []))
