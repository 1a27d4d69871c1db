"""Example-level DP-SGD in real federated runs: per-client ledgers, the budget, empty Poisson draws."""

import io
import json

import dp_accounting
import dp_accounting.pld
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from rich.console import Console

from fedalign.algorithms import registry
from fedalign.errors import RecipeError
from fedalign.recipe import validate_recipe
from fedalign.runtime.sft import run_sft


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _run(raw: dict):
    """The run, its public records and the client-private ones (per-visit facts are client-private)."""
    result = run_sft(validate_recipe(raw), Console(file=io.StringIO(), width=120))
    private = _lines(result.run_dir / "private" / "client_metrics.jsonl")
    return result, _lines(result.run_dir / "metrics.jsonl") + private


def _independent(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    """ε from the accountant's own library, stepped one local step at a time."""
    if accountant == "pld":
        pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
        for _ in range(steps):
            pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
        return pld.get_epsilon(delta)
    independent = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(steps):
        independent.step(noise_multiplier=sigma, sample_rate=q)
    return independent.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant", ["pld", "rdp", "prv"])
def test_reported_epsilon_matches_an_independent_accountant(base_recipe: dict, accountant: str) -> None:
    base_recipe["federation"].update(rounds=3, local_steps=3)
    base_recipe["privacy"] = {
        "unit": "example",
        "target_epsilon": 6.0,
        "delta": 1e-3,
        "clip_norm": 0.5,
        "accountant": accountant,
    }
    result, records = _run(base_recipe)
    plans = [r for r in records if r["type"] == "privacy"]
    sigma, rates = plans[0]["sigma"], plans[1]["q"]  # σ is public; each client's rate is private
    assert "q" not in plans[0] and plans[0]["q_max"] == max(rates)
    ledgers = json.loads((result.run_dir / "private" / "privacy_ledgers.json").read_text())
    for client, reported in {r["client"]: r["epsilon"] for r in records if r["type"] == "client"}.items():
        visits = sum(1 for r in records if r["type"] == "client" and r["client"] == client)
        # every local step, empty Poisson draws included
        expected = _independent(accountant, sigma, rates[client], visits * 3, 1e-3)
        assert reported == pytest.approx(expected, rel=0.01)
        assert sum(steps for _, _, steps in ledgers[str(client)]) == visits * 3
        assert reported <= 6.0
    # ledgers are run state, saved with every checkpoint, owner-only (they reveal each client's row count)
    checkpoint = json.loads((result.run_dir / "private" / "checkpoints" / "round-00003.json").read_text())
    assert checkpoint["privacy"]["privacy_ledgers"] == ledgers and checkpoint["round"] == 3
    public = json.loads((result.run_dir / "checkpoints" / "round-00003" / "server.json").read_text())
    assert set(public) == {"format_version", "round", "sampler", "failed_in_a_row"}  # no ledger in public


def test_a_small_budget_stops_clients_before_they_exceed_it(base_recipe: dict) -> None:
    base_recipe["federation"].update(rounds=8, local_steps=2)
    # σ fixed, target as a cap: each client can afford only a few visits.
    base_recipe["privacy"] = {"unit": "example", "noise_multiplier": 1.0, "target_epsilon": 1.6}
    base_recipe["privacy"]["delta"] = 1e-3
    _, records = _run(base_recipe)
    clients = [r for r in records if r["type"] == "client"]
    rounds = [r for r in records if r["type"] == "round" and "epsilon_max" in r]  # the public ones
    summary = next(r for r in records if r["type"] == "summary")
    assert all(r["epsilon"] <= 1.6 for r in clients)
    assert all(r["epsilon_max"] <= 1.6 for r in rounds)
    assert any(r["out_of_budget"] for r in rounds if "out_of_budget" in r) or summary["rounds"] < 8
    assert summary["epsilon"] <= 1.6


def test_empty_poisson_draws_are_steps_that_count(base_recipe: dict) -> None:
    base_recipe["federation"].update(rounds=1, local_steps=6)
    base_recipe["train"]["batch_size"] = 1  # q = 1/33: most draws are empty
    base_recipe["privacy"] = {"unit": "example", "noise_multiplier": 1.0, "delta": 1e-3}
    _, records = _run(base_recipe)
    clients = [r for r in records if r["type"] == "client"]
    assert all(r["steps"] == 6 for r in clients)
    assert sum(r["empty_draws"] for r in clients) > 0  # steps that drew no row still ran and were counted


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sampling": "shuffle"}, "privacy.sampling"),
        ({"delta": 0.2}, "privacy.delta: must be < 1/n"),
    ],
)
def test_example_level_refusals(base_recipe: dict, override: dict, message: str) -> None:
    base_recipe["privacy"] = {"unit": "example", "target_epsilon": 3.0, **override}
    with pytest.raises(RecipeError, match=message):
        _run(base_recipe)


@pytest.mark.parametrize("name", sorted(registry()))
def test_each_algorithm_trains_under_example_level_dp(base_recipe: dict, name: str) -> None:
    base_recipe["federation"].update(rounds=1, local_steps=2)
    base_recipe["algorithm"] = {"name": name}
    base_recipe["privacy"] = {"unit": "example", "noise_multiplier": 1.0, "delta": 1e-3}
    _, records = _run(base_recipe)
    clients = [r for r in records if r["type"] == "client"]
    assert len(clients) == 2 and all(r["epsilon"] > 0 for r in clients)
