"""Client faults (issue 13): with seeded drop / crash / NaN injection every algorithm's 10-round run
completes, no non-finite value reaches a checkpoint or the final adapter, and every dropped client is in
``metrics.jsonl`` with the reason its fault implies."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedalign.algorithms import registry
from fedalign.errors import FedalignError
from fedalign.recipe import validate_recipe
from fedalign.runtime.faults import FaultInjector
from fedalign.runtime.sft import run_sft

from .conftest import small_recipe

QUIET = Console(quiet=True)
FAULTS = {"drop": 0.3, "crash": 0.1, "nan": 0.1, "seed": 3}
REASON = {"drop": "no answer", "crash": "raised ClientFailure", "nan": "non-finite values"}


def _recipe(tmp_path, algorithm: str, **federation):
    raw = small_recipe(tmp_path)
    raw["federation"] |= {
        "num_clients": 4,
        "clients_per_round": 3,
        "rounds": 10,
        "local_steps": 1,
    } | federation
    raw["algorithm"] = {"name": algorithm}
    raw["faults"] = dict(FAULTS)
    raw["eval"] |= {"every": 0}
    raw["checkpoint"] = {"every": 1}
    return validate_recipe(raw)


@pytest.mark.parametrize("algorithm", sorted(registry()))
def test_every_algorithm_survives_dropped_crashing_and_nan_clients(algorithm, tmp_path):
    recipe = _recipe(tmp_path, algorithm)
    result = run_sft(recipe, QUIET)
    run_dir = result.run_dir
    for file in [*run_dir.glob("checkpoints/*/*.safetensors"), *run_dir.glob("adapter/*.safetensors")]:
        assert all(torch.isfinite(t).all() for t in load_file(str(file)).values()), file
    injector = FaultInjector(**recipe.faults.model_dump())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    rounds = [r for r in rounds if r["type"] == "round"]
    assert len(rounds) == 10
    dropped_total = 0
    for record in rounds:
        for entry in record.get("dropped", []):
            fault = injector.draw(entry["client"], record["round"] - 1)
            assert fault in REASON and REASON[fault] in entry["reason"], (record["round"], entry)
            dropped_total += 1
        for client in record["clients"]:  # every survivor was a client without a fault
            assert injector.draw(client, record["round"] - 1) is None
    assert dropped_total >= 5  # the injection did bite


def test_too_many_failed_rounds_in_a_row_stop_the_run_clearly(tmp_path):
    raw = small_recipe(tmp_path)
    raw["faults"] = {"crash": 1.0}
    raw["federation"] |= {"max_failed_rounds": 2}
    with pytest.raises(FedalignError, match=r"round 2: 0 of 2 clients survived .*2 rounds in a row"):
        run_sft(validate_recipe(raw), QUIET)


def test_fault_probabilities_are_checked():
    raw = small_recipe(__import__("pathlib").Path("/tmp"))
    raw["faults"] = {"drop": 0.8, "crash": 0.3}
    with pytest.raises(FedalignError, match="at most 1"):
        validate_recipe(raw)


def test_fedask_recomputes_its_stages_without_a_client_that_failed_after_stage_1(tmp_path):
    """A client that uploads its stage-1 sketch and then fails: the round's stages run again over the
    others, so the result is exactly the round without that client (as if it had crashed before training)."""
    adapters, reasons = [], []
    for kind in ("late", "crash"):
        raw = small_recipe(tmp_path / kind)
        raw["federation"] |= {"num_clients": 4, "clients_per_round": 3, "rounds": 3, "local_steps": 1}
        raw["algorithm"] = {"name": "fedask", "train_a": True}
        raw["faults"] = {kind: 0.3, "seed": 1}
        raw["eval"] |= {"every": 0}
        result = run_sft(validate_recipe(raw), QUIET)
        adapters.append(load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors")))
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
        reasons.append([d["reason"] for r in records if r["type"] == "round" for d in r.get("dropped", [])])
    assert reasons[0] and all("failed before stage 2 (injected late)" in r for r in reasons[0])
    assert len(reasons[0]) == len(reasons[1])  # the same clients, failing at another point
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[1])
