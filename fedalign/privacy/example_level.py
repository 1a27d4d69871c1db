"""Example-level (SFT) and pair-level (DPO) DP: DP-SGD inside each client's local steps, accounted per client.

The protected unit is one row of one client's data, against everything that client ever releases. Each
client Poisson-samples its own rows at q_i = batch_size / n_i and every local step spends (σ, q_i, 1) on
*that client's* ledger; the FedASK code instead calibrates to the expected number of participations and
never checks, so a client picked more often overshoots. One σ serves all clients: it is calibrated for the
client with the largest q_i (the smallest) over the planned number of local steps,
rounds · local_steps · clients_per_round / num_clients. A client whose next visit would cross
``target_epsilon`` is not trained again.

The budget check runs for every client every round (the runtime samples among the clients that still
have budget), so it is answered without an accountant whenever it can be: with σ calibrated for the
largest q_i over ``planned_steps``, any client with q_i ≤ that q can take ``planned_steps`` steps within the
target (ε grows with q and with steps). Past that, the accountant decides, once per client and spend.

Each client's sampling rate, and so its own ε, follows from its row count: like every DP-SGD
implementation, the accounting treats a client's dataset size as public. The run keeps both in the
client-private metrics anyway and publishes only the largest ε.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedalign.privacy.accounting import Ledger, calibrate_noise
from fedalign.recipe import FederationSection, PrivacySection, TrainSection


@dataclass
class ExampleLevelDP:
    cfg: PrivacySection
    sigma: float
    sample_rates: list[float]  # per client
    local_steps: int
    planned_steps: int
    calibrated_rate: float | None = None  # the q that σ was calibrated for (None: σ given by the recipe)
    ledgers: dict[int, Ledger] = field(default_factory=dict)
    spent: dict[int, float] = field(default_factory=dict)  # ε per client, once per spend (PLD is slow)
    # can_visit's answer per client; it changes only when that client spends, so it is recomputed then only.
    _can_visit: dict[int, bool] = field(default_factory=dict)

    @classmethod
    def plan(
        cls,
        privacy: PrivacySection,
        federation: FederationSection,
        train: TrainSection,
        client_sizes: list[int],
    ) -> ExampleLevelDP:
        rates = [min(1.0, train.batch_size / n) for n in client_sizes]
        visits = federation.rounds * federation.clients_per_round / federation.num_clients
        planned = max(1, round(visits * federation.local_steps))
        if privacy.noise_multiplier is not None:
            sigma = privacy.noise_multiplier
        else:
            assert privacy.target_epsilon is not None
            sigma = calibrate_noise(
                privacy.target_epsilon, privacy.delta, max(rates), planned, privacy.accountant
            )
        calibrated = None if privacy.noise_multiplier is not None else max(rates)
        return cls(privacy, sigma, rates, federation.local_steps, planned, calibrated)

    def describe(self) -> str:
        return (
            f"{self.cfg.unit}-level DP-SGD: σ={self.sigma:.4f}, q per client "
            f"{min(self.sample_rates):.4g}..{max(self.sample_rates):.4g}, C={self.cfg.clip_norm}, "
            f"δ={self.cfg.delta}, {self.cfg.accountant.upper()} accountant"
        )

    def ledger(self, client: int) -> Ledger:
        return self.ledgers.setdefault(client, Ledger())

    def can_visit(self, client: int) -> bool:
        """Whether the client's next visit keeps its ε within ``target_epsilon``."""
        if self.cfg.target_epsilon is None:
            return True
        if client not in self._can_visit:
            ledger = self.ledger(client)
            within_plan = (  # σ keeps planned_steps at the calibrated q (or any smaller q) within target
                self.calibrated_rate is not None
                and ledger.steps + self.local_steps <= self.planned_steps
                and self.sample_rates[client] <= self.calibrated_rate
            )
            self._can_visit[client] = within_plan or (
                ledger.epsilon_after(
                    self.sigma,
                    self.sample_rates[client],
                    self.local_steps,
                    self.cfg.delta,
                    self.cfg.accountant,
                )
                <= self.cfg.target_epsilon
            )
        return self._can_visit[client]

    def clients_with_budget(self) -> list[int]:
        return [c for c in range(len(self.sample_rates)) if self.can_visit(c)]

    def anyone_can_visit(self) -> bool:
        return any(self.can_visit(c) for c in range(len(self.sample_rates)))

    def record_visit(self, client: int, steps: int) -> None:
        """Spend the steps a visit actually took (empty Poisson draws included)."""
        self.ledger(client).spend(self.sigma, self.sample_rates[client], steps)
        self._can_visit.pop(client, None)
        self.spent.pop(client, None)

    def epsilon(self, client: int) -> float:
        if client not in self.spent:
            self.spent[client] = self.ledger(client).epsilon(self.cfg.delta, self.cfg.accountant)
        return self.spent[client]

    def max_epsilon(self) -> float:
        return max((self.epsilon(c) for c in self.ledgers), default=0.0)

    def to_json(self) -> dict[str, list[list[float]]]:
        return {str(c): ledger.to_json() for c, ledger in self.ledgers.items()}

    def load_json(self, ledgers: dict[str, list[list[float]]]) -> None:
        """Replace the ledgers by :meth:`to_json`'s (a resumed run); the cached answers go with them."""
        self.ledgers = {int(c): Ledger.from_json(rows) for c, rows in ledgers.items()}
        self.spent.clear()
        self._can_visit.clear()
