"""Example-level DP-SGD in real federated runs: per-client ledgers, the budget, empty Poisson draws."""

import io
import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from rich.console import Console

from fedalign.algorithms import registry
from fedalign.errors import RecipeError
from fedalign.recipe import validate_recipe
from fedalign.runtime.sft import run_sft


def _run(raw: dict):
    result = run_sft(validate_recipe(raw), Console(file=io.StringIO(), width=120))
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, records


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
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
    plan = next(r for r in records if r["type"] == "privacy")
    sigma, rates = plan["sigma"], plan["q"]
    ledgers = json.loads((result.run_dir / "privacy_ledgers.json").read_text())
    for client, reported in {r["client"]: r["epsilon"] for r in records if r["type"] == "client"}.items():
        visits = sum(1 for r in records if r["type"] == "client" and r["client"] == client)
        independent = RDPAccountant() if accountant == "rdp" else PRVAccountant()
        for _ in range(visits * 3):  # every local step, empty Poisson draws included
            independent.step(noise_multiplier=sigma, sample_rate=rates[client])
        assert reported == pytest.approx(independent.get_epsilon(delta=1e-3), rel=0.01)
        assert sum(steps for _, _, steps in ledgers[str(client)]) == visits * 3
        assert reported <= 6.0
    checkpoint = json.loads((result.run_dir / "checkpoints" / "round-00003" / "server.json").read_text())
    assert checkpoint["privacy_ledgers"] == ledgers  # ledgers are run state, saved with every checkpoint


def test_a_small_budget_stops_clients_before_they_exceed_it(base_recipe: dict) -> None:
    base_recipe["federation"].update(rounds=8, local_steps=2)
    # σ fixed, target as a cap: each client can afford only a few visits.
    base_recipe["privacy"] = {"unit": "example", "noise_multiplier": 1.0, "target_epsilon": 2.5}
    base_recipe["privacy"]["delta"] = 1e-3
    _, records = _run(base_recipe)
    clients = [r for r in records if r["type"] == "client"]
    rounds = [r for r in records if r["type"] == "round"]
    summary = next(r for r in records if r["type"] == "summary")
    assert all(r["epsilon"] <= 2.5 for r in clients)
    assert all(r["epsilon_max"] <= 2.5 for r in rounds)
    assert any(r["out_of_budget"] for r in rounds) or summary["rounds"] < 8
    assert summary["epsilon"] <= 2.5


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
