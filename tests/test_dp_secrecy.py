"""The DP guarantee holds against anyone holding what a run publishes (recipe and seed, metrics, adapters).

Tried as a reviewer would: re-run the published recipe with its seed. The noise and the sampled batches
(or cohorts) then differ, so the released adapters cannot be reproduced, and the noise cannot be
subtracted. The run's own keys, kept only in its owner-only ``private/`` folder, do reproduce it bit for
bit: they, not the seed, decide every privacy-relevant draw.
"""

import io
import json
import stat
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedalign.errors import RecipeError
from fedalign.privacy.randomness import RunSecrets
from fedalign.recipe import validate_recipe
from fedalign.runtime.sft import run_sft


def _recipe(base: dict, unit: str, randomness: str = "secret"):
    base["federation"].update(num_clients=3, clients_per_round=2, rounds=2, local_steps=2)
    base["privacy"] = {
        "unit": unit,
        "noise_multiplier": 1.0,
        "delta": 1e-3,
        "clip_norm": 0.5,
        "randomness": randomness,
    }
    base["eval"]["every"] = 0
    return validate_recipe(base)


def _run(recipe, secrets: RunSecrets | None = None):
    console = Console(file=io.StringIO(), width=200)
    result = run_sft(recipe, console, secrets)
    return result, console.file.getvalue()


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _private(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "private" / "client_metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.mark.parametrize("unit", ["example", "client"])
def test_the_published_recipe_and_seed_do_not_regenerate_noise_or_sampling(base_recipe, unit) -> None:
    recipe = _recipe(base_recipe, unit)
    first, _ = _run(recipe)
    rerun, _ = _run(recipe)  # everything public: recipe.yaml holds the seed and every setting
    assert (first.run_dir / "recipe.yaml").read_text() == (rerun.run_dir / "recipe.yaml").read_text()
    released, again = _adapter(first.run_dir), _adapter(rerun.run_dir)
    assert not any(torch.equal(released[k], again[k]) for k in released if ".lora_B." in k)

    keys = RunSecrets.load(first.run_dir / "private")
    replay, _ = _run(recipe, keys)
    assert _same(released, _adapter(replay.run_dir))
    if unit == "example":  # the sampled batches: replayed with the key, not with the seed
        sizes = [r["examples"] for r in _private(first.run_dir, "client")]
        assert sizes == [r["examples"] for r in _private(replay.run_dir, "client")]
        assert sizes != [r["examples"] for r in _private(rerun.run_dir, "client")]
    else:  # the secret cohorts: in the private records only, and replayed with the key
        cohorts = [r["clients"] for r in _private(first.run_dir, "round")]
        assert cohorts == [r["clients"] for r in _private(replay.run_dir, "round")]

    # what a run publishes under DP: no timing, no client-private fact; under client DP not even the cohort
    public = [json.loads(x) for x in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("wall_s" in r or "loss" in r for r in public)
    if unit == "client":
        assert not any("clients" in r or "bytes_up" in r for r in public if r["type"] == "round")
    # keys replay only their own run: on another recipe they would let two runs' noise cancel
    other = _recipe(base_recipe, unit)
    other.train.learning_rate = 0.004
    with pytest.raises(RecipeError, match="belong to another run"):
        _run(other, keys)

    # the keys are nowhere but in the owner-only private/ folder
    hexes = [keys.server.hex(), *(c.hex() for c in keys.clients)]
    for path in first.run_dir.rglob("*"):
        if path.is_file() and "private" not in path.relative_to(first.run_dir).parts:
            data = path.read_bytes()
            assert not any(h.encode() in data or bytes.fromhex(h) in data for h in hexes), path
    assert stat.S_IMODE((first.run_dir / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((first.run_dir / "private" / "secrets.json").stat().st_mode) == 0o600


def test_seeded_randomness_reproduces_from_the_seed_and_the_run_says_its_epsilon_is_no_guarantee(
    base_recipe,
) -> None:
    recipe = _recipe(base_recipe, "example", randomness="seeded")
    first, shown = _run(recipe)
    second, _ = _run(recipe)
    assert _same(_adapter(first.run_dir), _adapter(second.run_dir))
    records = [json.loads(x) for x in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if r["type"] == "summary")
    assert "no guarantee against anyone who holds the seed" in summary["guarantee"]
    assert "no guarantee against anyone who holds the seed" in " ".join(shown.split())
    secret = _recipe(base_recipe, "example")
    assert "guarantee" not in next(
        r
        for r in map(json.loads, (_run(secret)[0].run_dir / "metrics.jsonl").read_text().splitlines())
        if r["type"] == "summary"
    )
