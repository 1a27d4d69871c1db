"""A DP run whose clients run out of budget one by one finishes, for FedASK and for uniform weighting.

3 clients, 1 per round, a budget of three one-step visits each, 12 rounds planned. Rounds come in which two
of the three clients are out of budget: a cohort drawn from everyone (as fedalign did before) would then
be all out of budget with probability 2/3, which crashed FedASK's server step (an empty sum) and uniform
weighting (a division by zero). Now the round samples among the clients with budget, and the run stops
cleanly, with its final adapter and a checkpoint of its last round, when nobody has budget left.
"""

import io
import json

import pytest
from rich.console import Console

from fedalign.recipe import validate_recipe
from fedalign.runtime.sft import run_sft


@pytest.mark.parametrize(
    "setting",
    [{"algorithm": {"name": "fedask"}}, {"federation": {"weighting": "uniform"}}],
    ids=["fedask", "uniform-weighting"],
)
def test_a_dp_run_finishes_when_its_clients_run_out_of_budget(base_recipe: dict, setting: dict) -> None:
    base_recipe["federation"].update(num_clients=3, clients_per_round=1, rounds=12, local_steps=1)
    base_recipe["federation"].update(setting.get("federation", {}))
    base_recipe.update({k: v for k, v in setting.items() if k != "federation"})
    base_recipe["privacy"] = {
        "unit": "example",
        "noise_multiplier": 1.0,
        "target_epsilon": 1.25,
        "delta": 1e-3,
    }
    base_recipe["checkpoint"] = {"every": 5}
    base_recipe["eval"]["every"] = 0
    result = run_sft(validate_recipe(base_recipe), Console(file=io.StringIO(), width=200))

    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["type"] == "round"]
    summary = next(r for r in records if r["type"] == "summary")
    assert summary["rounds"] == len(rounds) < 12  # stopped when nobody had budget left
    assert all(len(r["clients"]) == 1 for r in rounds)  # every round trained a client
    assert any(r["out_of_budget"] == 2 for r in rounds)  # ... also when only one of three had budget
    assert max(r["epsilon_max"] for r in rounds) <= 1.25
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (result.run_dir / "checkpoints" / f"round-{summary['rounds']:05d}").is_dir()
