"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) on the linear protocol.

The protected unit is everything one client contributes. Each client's update (its uploaded factors minus
what it started from) is clipped to L2 norm C over all tensors together; the server adds N(0, σ²C²) to
the *sum* of clipped updates once per round and divides by the expected cohort size, never by the realised
one (which would depend on who took part). Clients are Poisson-sampled at rate q = clients_per_round /
num_clients by default, which is what the accountant assumes; ``privacy.sampling: shuffle`` draws exactly
clients_per_round instead, accounted as what it is (sampling without replacement, replace-one neighbours;
see :mod:`fedalign.privacy.accounting`).

Cohorts and noise are drawn from the server's secret (:mod:`fedalign.privacy.randomness`), never from the
run seed: amplification by sampling holds only if nobody reading the run can tell who was sampled, so the
cohort is server-private too. Noise goes only on what the clients uploaded (RoLoRA's active factor,
FedSA-LoRA's A): a tensor no client trained is not released again, so it needs no noise and gets none.

Only algorithms whose single upload is the trained factors themselves can be privatised this way.
"""

from __future__ import annotations

import torch

from fedalign.algorithms.base import Algorithm, Tensors
from fedalign.errors import RecipeError
from fedalign.privacy.accounting import Ledger, calibrate_noise
from fedalign.privacy.randomness import SecretRandomness
from fedalign.recipe import FederationSection, PrivacySection


def clip_update(upload: Tensors, start: Tensors, clip_norm: float) -> tuple[Tensors, float]:
    """``upload - start`` scaled to L2 norm ≤ ``clip_norm`` (jointly over all tensors), and its raw norm."""
    delta = {k: v.float() - start[k].float() for k, v in upload.items()}
    norm = float(torch.sqrt(sum((d * d).sum() for d in delta.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: d * scale for k, d in delta.items()}, norm


class ClientLevelDP:
    def __init__(
        self,
        privacy: PrivacySection,
        federation: FederationSection,
        randomness: SecretRandomness,
        algorithm: Algorithm,
    ) -> None:
        if algorithm.num_stages != 1 or not algorithm.client_level_dp:
            raise RecipeError(
                f"privacy.unit: 'client' needs an algorithm whose one upload is the trained factors; "
                f"{algorithm.name!r} is not one"
            )
        self.cfg = privacy
        self.num_clients = federation.num_clients
        self.expected_cohort = float(federation.clients_per_round)
        self.sample_rate = federation.clients_per_round / federation.num_clients
        # fixed-size cohorts are accounted as sampling without replacement from the whole population
        self.population = federation.num_clients if privacy.sampling == "shuffle" else None
        if privacy.noise_multiplier is not None:
            self.sigma = privacy.noise_multiplier
        else:
            assert privacy.target_epsilon is not None
            self.sigma = calibrate_noise(
                privacy.target_epsilon,
                privacy.delta,
                self.sample_rate,
                federation.rounds,
                privacy.accountant,
                self.population,
            )
        self.ledger = Ledger()
        self.randomness = randomness

    def describe(self) -> str:
        return (
            f"client-level DP: σ={self.sigma:.4f}, q={self.sample_rate:.4g} per round, "
            f"C={self.cfg.clip_norm}, "
            f"δ={self.cfg.delta}, {self.cfg.accountant.upper()} accountant"
        )

    def sample(self, round_idx: int) -> list[int]:
        """The round's cohort, from the server's secret."""
        draw = self.randomness.child("cohort", round_idx)
        if self.cfg.sampling == "poisson":
            return draw.bernoulli(self.num_clients, self.sample_rate)
        return draw.sample_without_replacement(self.num_clients, int(self.expected_cohort))

    def budget_left_for_a_round(self) -> bool:
        """False when one more round would take ε past ``target_epsilon``."""
        if self.cfg.target_epsilon is None:
            return True
        after = self.ledger.epsilon_after(
            self.sigma, self.sample_rate, 1, self.cfg.delta, self.cfg.accountant, self.population
        )
        return after <= self.cfg.target_epsilon

    def noisy_mean(self, round_idx: int, summed_updates: Tensors, uploaded: Tensors) -> Tensors:
        """(Σ clipped updates + N(0, σ²C²)) / expected cohort, for exactly the keys of ``uploaded`` (what a
        client uploads this round; it also gives the shapes when the cohort is empty)."""
        std = self.sigma * self.cfg.clip_norm
        draw = self.randomness.child("noise", round_idx)
        out: Tensors = {}
        for index, (key, like) in enumerate(sorted(uploaded.items())):
            total = summed_updates.get(key, torch.zeros(like.shape))
            noise = draw.child(index).gaussian(like.numel(), std).view(like.shape)
            out[key] = (total.float() + noise) / self.expected_cohort
        return out

    def record_round(self) -> float:
        """Spend one round; returns ε so far."""
        self.ledger.spend(self.sigma, self.sample_rate, 1)
        return self.epsilon()

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.cfg.delta, self.cfg.accountant, self.population)
