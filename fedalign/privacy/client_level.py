"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) on the linear protocol.

The protected unit is everything one client contributes. Each client's update (its uploaded factors minus
what it started from) is clipped to L2 norm C over all tensors together; the server adds N(0, σ²C²) to
the *sum* of clipped updates once per round and divides by the expected cohort size, never by the realised
one (which would depend on who took part). Clients are Poisson-sampled at rate q = clients_per_round /
num_clients by default, which is what the accountant assumes; ``privacy.sampling: shuffle`` draws exactly
clients_per_round instead (the common approximation, accounted at the same q).

Only algorithms whose single upload is the trained factors themselves can be privatised this way.
"""

from __future__ import annotations

import numpy as np
import torch

from fedalign.algorithms.base import Algorithm, Tensors
from fedalign.errors import RecipeError
from fedalign.privacy.accounting import Ledger, calibrate_noise
from fedalign.recipe import FederationSection, PrivacySection


def clip_update(upload: Tensors, start: Tensors, clip_norm: float) -> tuple[Tensors, float]:
    """``upload - start`` scaled to L2 norm ≤ ``clip_norm`` (jointly over all tensors), and its raw norm."""
    delta = {k: v.float() - start[k].float() for k, v in upload.items()}
    norm = float(torch.sqrt(sum((d * d).sum() for d in delta.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: d * scale for k, d in delta.items()}, norm


class ClientLevelDP:
    def __init__(
        self, privacy: PrivacySection, federation: FederationSection, seed: int, algorithm: Algorithm
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
        if privacy.noise_multiplier is not None:
            self.sigma = privacy.noise_multiplier
        else:
            assert privacy.target_epsilon is not None
            self.sigma = calibrate_noise(
                privacy.target_epsilon, privacy.delta, self.sample_rate, federation.rounds, privacy.accountant
            )
        self.ledger = Ledger()
        noise_seed = int(np.random.SeedSequence([seed, 3]).generate_state(1)[0])
        self.noise = torch.Generator().manual_seed(noise_seed)

    def describe(self) -> str:
        return (
            f"client-level DP: σ={self.sigma:.4f}, q={self.sample_rate:.4g} per round, "
            f"C={self.cfg.clip_norm}, "
            f"δ={self.cfg.delta}, {self.cfg.accountant.upper()} accountant"
        )

    def sample(self, rng: np.random.Generator) -> list[int]:
        if self.cfg.sampling == "poisson":
            return [int(c) for c in np.flatnonzero(rng.random(self.num_clients) < self.sample_rate)]
        chosen = rng.choice(self.num_clients, size=int(self.expected_cohort), replace=False)
        return sorted(int(c) for c in chosen)

    def budget_left_for_a_round(self) -> bool:
        """False when one more round would take ε past ``target_epsilon``."""
        if self.cfg.target_epsilon is None:
            return True
        after = self.ledger.epsilon_after(
            self.sigma, self.sample_rate, 1, self.cfg.delta, self.cfg.accountant
        )
        return after <= self.cfg.target_epsilon

    def noisy_mean(self, summed_updates: Tensors, template: Tensors) -> Tensors:
        """(Σ clipped updates + N(0, σ²C²)) / expected cohort; ``template`` gives shapes (empty cohorts)."""
        std = self.sigma * self.cfg.clip_norm
        out: Tensors = {}
        for key, like in template.items():
            total = summed_updates.get(key, torch.zeros(like.shape))
            noise = torch.normal(0.0, std, size=tuple(like.shape), generator=self.noise)
            out[key] = (total.float() + noise) / self.expected_cohort
        return out

    def record_round(self) -> float:
        """Spend one round; returns ε so far."""
        self.ledger.spend(self.sigma, self.sample_rate, 1)
        return self.epsilon()

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.cfg.delta, self.cfg.accountant)
