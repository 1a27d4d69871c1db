"""Noise calibration and privacy ledgers on Opacus's accountants (RDP or PRV), never a home-made formula.

σ is calibrated once, from the *planned* schedule; what each protected party actually spends is then
recorded as it happens (its realised noise multipliers, sampling rates and steps) in a :class:`Ledger`.
The FedASK code calibrates to the expected number of participations and never looks again, so a client
picked more often than expected overshoots its budget (measured: ε ≈ 3.46 for a target of 3 when picked
5 times instead of 2). Here a party whose next spend would cross ``target_epsilon`` is not trained again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedalign.errors import RecipeError

Spend = tuple[float, float, int]  # (noise multiplier σ, sampling rate q, steps)


def epsilon_of(history: list[Spend], delta: float, accountant: str) -> float:
    """ε after the composed ``history`` of subsampled Gaussian steps."""
    if not history:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest σ (to Opacus's 0.01 tolerance in ε) keeping ``steps`` at ``sample_rate`` within target."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as error:
        raise RecipeError(
            f"privacy.target_epsilon: ε={target_epsilon} at δ={delta} cannot be reached by this schedule "
            f"({steps} steps at sampling rate {sample_rate:.4g}): {error}. Raise the target, or lower "
            "rounds, local steps or the batch size"
        ) from None


@dataclass
class Ledger:
    """What one protected party (a client's data, or the whole federation for client-level DP) spent."""

    history: list[Spend] = field(default_factory=list)

    def spend(self, sigma: float, sample_rate: float, steps: int) -> None:
        if self.history and self.history[-1][:2] == (sigma, sample_rate):
            last = self.history[-1]
            self.history[-1] = (last[0], last[1], last[2] + steps)
        else:
            self.history.append((sigma, sample_rate, steps))

    def epsilon(self, delta: float, accountant: str) -> float:
        return epsilon_of(self.history, delta, accountant)

    def epsilon_after(
        self, sigma: float, sample_rate: float, steps: int, delta: float, accountant: str
    ) -> float:
        """ε if ``steps`` more steps were spent: what the budget check asks before training."""
        trial = Ledger(list(self.history))
        trial.spend(sigma, sample_rate, steps)
        return trial.epsilon(delta, accountant)

    def to_json(self) -> list[list[float]]:
        return [[s, q, n] for s, q, n in self.history]

    @classmethod
    def from_json(cls, rows: list[list[float]]) -> Ledger:
        return cls([(float(s), float(q), int(n)) for s, q, n in rows])
