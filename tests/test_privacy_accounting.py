"""Calibration and ledgers against independent Opacus accounting, on the FedASK paper's schedule."""

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedalign.errors import RecipeError
from fedalign.privacy.accounting import Ledger, calibrate_noise

DELTA = 1e-5
# FedASK (algorithms.md §1.4): 10 clients of ~1,500 Dolly rows, 2 per round, 10 local steps, batch 6.
CLIENTS, PER_ROUND, LOCAL_STEPS, ROUNDS = 10, 2, 10, 800
SAMPLE_RATE = 6 / 1500
PLANNED_STEPS = ROUNDS * LOCAL_STEPS * PER_ROUND // CLIENTS  # 1,600 expected local steps per client


def _independent(accountant, sigma: float, sample_rate: float, steps: int) -> float:
    """Step-by-step accounting, a different path through Opacus than a ledger's merged history."""
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
    return accountant.get_epsilon(delta=DELTA)


@pytest.mark.parametrize("target", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_ledger_matches_independent_accounting_on_the_fedask_schedule(target: float, kind: str) -> None:
    sigma = calibrate_noise(target, DELTA, SAMPLE_RATE, PLANNED_STEPS, kind)
    # A client picked as often as planned: 160 visits of 10 local steps.
    ledger = Ledger()
    for _ in range(PLANNED_STEPS // LOCAL_STEPS):
        ledger.spend(sigma, SAMPLE_RATE, LOCAL_STEPS)
    ours = ledger.epsilon(DELTA, kind)
    theirs = _independent(
        RDPAccountant() if kind == "rdp" else PRVAccountant(), sigma, SAMPLE_RATE, PLANNED_STEPS
    )
    assert ours == pytest.approx(theirs, rel=0.01)
    assert target - 0.05 <= ours <= target * 1.01


def test_a_client_picked_more_often_than_planned_is_stopped_at_its_budget() -> None:
    """The FedASK code's overshoot: σ calibrated to the expected visits, client picked more often."""
    target, rounds = 3.0, 10
    planned = rounds * LOCAL_STEPS * PER_ROUND // CLIENTS  # 2 visits expected
    sigma = calibrate_noise(target, DELTA, SAMPLE_RATE, planned, "rdp")
    ledger, trained = Ledger(), 0
    for _ in range(5):  # picked 5 times instead of 2
        if ledger.epsilon_after(sigma, SAMPLE_RATE, LOCAL_STEPS, DELTA, "rdp") > target:
            continue
        ledger.spend(sigma, SAMPLE_RATE, LOCAL_STEPS)
        trained += 1
    unchecked = Ledger([(sigma, SAMPLE_RATE, 5 * LOCAL_STEPS)]).epsilon(DELTA, "rdp")
    assert unchecked > target  # what happens without a ledger
    assert 2 <= trained < 5
    assert ledger.epsilon(DELTA, "rdp") <= target


def test_ledger_merges_identical_spends_and_round_trips() -> None:
    ledger = Ledger()
    ledger.spend(1.0, 0.01, 10)
    ledger.spend(1.0, 0.01, 10)
    ledger.spend(1.2, 0.01, 5)
    assert ledger.history == [(1.0, 0.01, 20), (1.2, 0.01, 5)]
    assert Ledger.from_json(ledger.to_json()).history == ledger.history
    assert Ledger().epsilon(DELTA, "rdp") == 0.0
    assert np.isfinite(ledger.epsilon(DELTA, "prv"))


def test_unreachable_target_is_refused_naming_the_key() -> None:
    with pytest.raises(RecipeError, match=r"privacy\.target_epsilon: .*cannot be reached"):
        calibrate_noise(1e-6, DELTA, 0.5, 100_000, "rdp")


def test_budget_verdicts_are_recomputed_only_when_a_client_spends() -> None:
    from fedalign.privacy.example_level import ExampleLevelDP
    from fedalign.recipe import PrivacySection

    dp = ExampleLevelDP(
        PrivacySection(unit="example", noise_multiplier=1.0, target_epsilon=2.5, delta=1e-3),
        sigma=1.0,
        sample_rates=[0.1, 0.1],
        local_steps=10,
        planned_steps=20,
    )
    visits = 0
    while dp.can_visit(0):
        assert dp.can_visit(0) is dp._can_visit[0]  # answered from the memo, no accountant call
        dp.record_visit(0, 10)
        assert 0 not in dp._can_visit  # spending invalidates the client's verdict
        visits += 1
    assert visits >= 1 and dp.epsilon(0) <= 2.5
    assert dp.can_visit(1) and dp.anyone_can_visit()
