"""Client-level DP (DP-FedAvg): clipping, noise scale, accounting in a real run, the budget stop."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedalign.algorithms import build, registry
from fedalign.errors import RecipeError
from fedalign.models.adapter import AdapterSlots
from fedalign.models.loading import load_model
from fedalign.privacy.accounting import epsilon_of
from fedalign.privacy.client_level import ClientLevelDP, clip_update
from fedalign.privacy.randomness import SecretRandomness
from fedalign.recipe import FederationSection, PrivacySection, validate_recipe
from fedalign.runtime.sft import run_sft

FED = FederationSection(num_clients=10, clients_per_round=2, rounds=5, local_steps=1)


def _dp(**privacy) -> ClientLevelDP:
    return ClientLevelDP(
        PrivacySection(unit="client", **privacy),
        FED,
        SecretRandomness.fresh(),
        build(registry()["fedavg"].config_class()),
    )


def test_clip_update_bounds_the_change_and_keeps_its_direction() -> None:
    start = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    big = {"a": torch.ones(2, 2) + 3.0, "b": torch.tensor([4.0, 0.0, 0.0])}
    clipped, norm = clip_update(big, start, clip_norm=1.0)
    assert norm == pytest.approx(float(torch.sqrt(torch.tensor(4 * 9.0 + 16.0))))
    total = torch.sqrt(sum((v * v).sum() for v in clipped.values()))
    assert float(total) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(clipped["a"] / clipped["a"].norm(), torch.ones(2, 2) / 2)
    small = {"a": torch.ones(2, 2) + 0.1, "b": torch.zeros(3)}
    unclipped, _ = clip_update(small, start, clip_norm=1.0)
    assert torch.allclose(unclipped["a"], torch.full((2, 2), 0.1))


def test_server_noise_has_the_promised_scale() -> None:
    dp = _dp(noise_multiplier=1.3, clip_norm=0.7)
    template = {"w": torch.zeros(200, 50)}
    draws = torch.stack([dp.noisy_mean(r, {}, template)["w"] for r in range(20)])
    expected = 1.3 * 0.7 / FED.clients_per_round
    assert float(draws.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(draws.mean())) < 0.01


def test_poisson_cohorts_average_the_expected_size() -> None:
    dp = _dp(noise_multiplier=1.0)
    sizes = [len(dp.sample(r)) for r in range(2000)]
    assert np.mean(sizes) == pytest.approx(2.0, rel=0.05)
    assert min(sizes) == 0 and max(sizes) > 2  # variable cohorts, empty ones included


def test_calibrated_sigma_spends_the_target_over_the_planned_rounds() -> None:
    for accountant in ("pld", "rdp"):
        dp = _dp(target_epsilon=4.0, delta=1e-3, accountant=accountant)
        assert epsilon_of([(dp.sigma, 0.2, FED.rounds)], 1e-3, accountant) <= 4.0
        assert epsilon_of([(dp.sigma * 0.9, 0.2, FED.rounds)], 1e-3, accountant) > 4.0


def test_algorithms_that_cannot_be_privatised_per_client_are_refused() -> None:
    algorithm = build(registry()["fedavg"].config_class())
    algorithm.client_level_dp = False
    with pytest.raises(RecipeError, match=r"privacy\.unit: 'client'"):
        ClientLevelDP(
            PrivacySection(unit="client", noise_multiplier=1.0), FED, SecretRandomness.fresh(), algorithm
        )


def _run(raw: dict):
    return run_sft(validate_recipe(raw), Console(file=io.StringIO(), width=120))


def _lines(result, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (result.run_dir / name).read_text().splitlines()]


def _private_lines(result) -> list[dict]:
    return _lines(result, "private/client_metrics.jsonl")


def test_a_private_run_reports_epsilon_every_round_within_the_budget(base_recipe: dict) -> None:
    base_recipe["federation"]["rounds"] = 3
    base_recipe["privacy"] = {"unit": "client", "target_epsilon": 20.0, "delta": 1e-3, "clip_norm": 0.1}
    result = _run(base_recipe)
    records = _lines(result)
    sigma = next(r for r in records if r["type"] == "privacy")["sigma"]
    epsilons = [r["epsilon"] for r in records if r["type"] == "round"]
    assert len(epsilons) == 3 and epsilons == sorted(epsilons)
    assert all(e <= 20.0 for e in epsilons)
    q = 2 / 3
    assert epsilons[-1] == pytest.approx(epsilon_of([(sigma, q, 3)], 1e-3, "pld"), rel=1e-9)
    assert all("clients" not in r and "bytes_up" not in r for r in records if r["type"] == "round")
    clients = [r for r in _private_lines(result) if r["type"] == "client"]
    assert all(r["update_norm"] > 0 for r in clients)


def test_the_run_stops_cleanly_when_the_budget_is_spent(base_recipe: dict) -> None:
    base_recipe["federation"]["rounds"] = 6
    base_recipe["privacy"] = {"unit": "client", "noise_multiplier": 2.0, "target_epsilon": 2.0, "delta": 1e-3}
    base_recipe["checkpoint"] = {"every": 4}
    result = _run(base_recipe)
    records = _lines(result)
    summary = next(r for r in records if r["type"] == "summary")
    rounds_done = [r for r in records if r["type"] == "round"]
    assert 0 < summary["rounds"] == len(rounds_done) < 4
    assert all(r["epsilon"] <= 2.0 for r in rounds_done)
    assert summary["epsilon"] <= 2.0
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # the last round is checkpointed although it does not fall on checkpoint.every
    assert (result.run_dir / "checkpoints" / f"round-{summary['rounds']:05d}").is_dir()


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"unit": "pair", "target_epsilon": 3.0}, "'pair' protects DPO preference pairs"),
        ({"unit": "client", "target_epsilon": 1e-6, "delta": 1e-3, "accountant": "rdp"}, "cannot be reached"),
    ],
)
def test_units_and_budgets_that_cannot_work_for_sft_are_refused(base_recipe: dict, privacy, message) -> None:
    base_recipe["privacy"] = privacy
    with pytest.raises(RecipeError, match=message):
        _run(base_recipe)
    assert not Path(base_recipe["output_dir"]).exists()


@pytest.mark.parametrize("name", sorted(registry()))
def test_each_algorithm_composes_with_client_level_dp_or_is_refused(base_recipe: dict, name: str) -> None:
    base_recipe["federation"]["rounds"] = 1
    base_recipe["algorithm"] = {"name": name}
    base_recipe["privacy"] = {"unit": "client", "noise_multiplier": 1.0, "delta": 1e-3, "clip_norm": 0.1}
    if registry()[name].num_stages != 1 or not registry()[name].client_level_dp:
        with pytest.raises(RecipeError, match=rf"privacy\.unit: 'client' .*{name!r}"):
            _run(base_recipe)
        assert not Path(base_recipe["output_dir"]).exists()
    else:
        rounds = [r for r in _lines(_run(base_recipe)) if r["type"] == "round"]
        assert len(rounds) == 1 and rounds[0]["epsilon"] > 0


@pytest.mark.parametrize(("name", "untrained"), [("rolora", ".lora_A."), ("fedsa", ".lora_B.")])
def test_client_level_noise_goes_only_on_what_the_clients_uploaded(
    base_recipe: dict, name: str, untrained: str
) -> None:
    """RoLoRA's round 0 trains and uploads B only; FedSA-LoRA uploads A only. The factor nobody uploaded
    is released bit-identical: noise on it would buy no privacy and break RoLoRA's exactness."""
    base_recipe["federation"]["rounds"] = 1
    base_recipe["algorithm"] = {"name": name}
    base_recipe["privacy"] = {"unit": "client", "noise_multiplier": 1.0, "delta": 1e-3, "clip_norm": 0.1}
    recipe = validate_recipe(base_recipe)
    loaded = load_model(recipe.model, recipe.lora, recipe.seed, torch.device("cpu"))
    initial = AdapterSlots(loaded.model).read()
    final = load_file(_run(base_recipe).run_dir / "adapter" / "adapter_model.safetensors")
    assert final.keys() == initial.keys()
    frozen = [k for k in initial if untrained in k]
    assert frozen and all(torch.equal(final[k], initial[k]) for k in frozen)
    assert all(not torch.equal(final[k], initial[k]) for k in initial if k not in frozen)
