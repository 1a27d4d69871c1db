"""Bad DPO input through the command line: one line naming the row (and file), exit 2, nothing written;
or, with ``data.on_bad_row: skip``, the run goes on and every skipped row is counted and listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedalign.cli import app

from .conftest import TINY_MODEL
from .dpo_data import dpo_recipe, save_tiny_llava, write_spavl_parquet, write_text_pairs

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


def _dpo(tmp_path: Path, raw: dict) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["dpo", str(path)])
    return result.exit_code, result.output


def _one_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    return lines[0]


def test_row_missing_chosen(tmp_path: Path) -> None:
    data = write_text_pairs(tmp_path / "pairs.jsonl", n=12)
    rows = data.read_text().splitlines()
    broken = json.loads(rows[2])
    del broken["chosen"]
    rows[2] = json.dumps(broken)
    data.write_text("\n".join(rows) + "\n")
    code, output = _dpo(tmp_path, dpo_recipe(str(TINY_MODEL), data, tmp_path / "runs", source="preference"))
    line = _one_error(output)
    assert code == 2 and f"{data}:3" in line and "'chosen'" in line
    assert not (tmp_path / "runs").exists()


def test_unreadable_image(tmp_path: Path, llava: Path) -> None:
    data = write_spavl_parquet(tmp_path / "spavl.parquet", n=12, bad={5: b"\x89PNG\r\n\x1a\n broken"})
    code, output = _dpo(tmp_path, dpo_recipe(str(llava), data, tmp_path / "runs"))
    line = _one_error(output)
    assert code == 2 and f"{data}:row 5" in line and "not a readable image" in line
    assert not (tmp_path / "runs").exists()


def test_missing_image_file(tmp_path: Path, llava: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    rows = [
        {
            "image": "images/missing.png",
            "prompt": "What is it?",
            "chosen": "I will not say.",
            "rejected": "Go.",
        }
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows * 8) + "\n")
    code, output = _dpo(tmp_path, dpo_recipe(str(llava), data, tmp_path / "runs", source="preference"))
    line = _one_error(output)
    assert code == 2 and f"{data}:1" in line and "missing.png" in line and "file not found" in line


def test_image_column_for_a_text_only_model(tmp_path: Path) -> None:
    data = write_spavl_parquet(tmp_path / "spavl.parquet", n=12)
    code, output = _dpo(tmp_path, dpo_recipe(str(TINY_MODEL), data, tmp_path / "runs"))
    line = _one_error(output)
    assert code == 2 and f"{data}:row 0" in line and "text-only" in line and "'image'" in line


def test_text_only_row_for_a_multimodal_recipe(tmp_path: Path, llava: Path) -> None:
    data = write_spavl_parquet(tmp_path / "spavl.parquet", n=12, bad={3: None})
    code, output = _dpo(tmp_path, dpo_recipe(str(llava), data, tmp_path / "runs"))
    line = _one_error(output)
    assert code == 2 and f"{data}:row 3" in line and "has no image" in line


def test_skip_counts_and_lists_bad_rows(tmp_path: Path, llava: Path) -> None:
    data = write_spavl_parquet(tmp_path / "spavl.parquet", n=20, bad={3: None, 7: b"junk"})
    raw = dpo_recipe(str(llava), data, tmp_path / "runs", data__on_bad_row="skip")
    raw["federation"].update(rounds=1, local_steps=1)
    raw["eval"].pop("preferred_pattern")
    code, output = _dpo(tmp_path, raw)
    assert code == 0, output
    assert "left out 2 bad rows" in output
    (run,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run / "partition.json").read_text())
    skipped = manifest["skipped_rows"]
    assert [s["origin"] for s in skipped] == [f"{data}:row 3", f"{data}:row 7"]
    assert "has no image" in skipped[0]["reason"] and "not a readable image" in skipped[1]["reason"]
    used = {r for c in manifest["clients"] for r in c["row_ids"]} | set(manifest["eval_rows"])
    assert used == set(range(20)) - {3, 7}  # row ids stay the rows' positions in the file


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"privacy": {"unit": "example", "noise_multiplier": 1.0}}, "'example' protects SFT examples"),
        ({"algorithm": {"name": "frlora"}}, "moves the base weights"),
        ({"dpo": {"loss_type": "aot"}, "privacy": {"unit": "pair", "noise_multiplier": 1.0}}, "'aot'"),
    ],
)
def test_combinations_dpo_cannot_run_are_refused_before_a_run_dir(tmp_path: Path, override, message) -> None:
    data = write_text_pairs(tmp_path / "pairs.jsonl", n=12)
    raw = dpo_recipe(str(TINY_MODEL), data, tmp_path / "runs", source="preference")
    raw.update(override)
    code, output = _dpo(tmp_path, raw)
    assert code == 2 and message in _one_error(output)
    assert not (tmp_path / "runs").exists()
