"""The command line: bad input gives one clear line and a non-zero exit, and writes nothing."""

import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from fedalign.cli import app

from .conftest import REPO, TINY_MODEL

runner = CliRunner()


def test_hub_model_offline_fails_fast_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedalign.cli",
            "sft",
            str(REPO / "recipes" / "dolly.yaml"),
            f"output_dir={out}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model.name_or_path" in lines[0] and "meta-llama/Llama-2-7b-hf" in lines[0]
    assert "set model.name_or_path=" in lines[0]
    assert not out.exists()


def test_hub_data_offline_names_the_key(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    result = runner.invoke(
        app,
        [
            "sft",
            str(REPO / "recipes" / "dolly.yaml"),
            f"model.name_or_path={TINY_MODEL}",
            f"output_dir={out}",
        ],
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "data.path" in lines[0] and "databricks/databricks-dolly-15k" in lines[0]
    assert not out.exists()


def test_invalid_recipe_lists_each_problem_and_writes_nothing(tmp_path: Path, base_recipe: dict) -> None:
    base_recipe["federation"]["clients_per_round"] = 9
    base_recipe["lora"]["r"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base_recipe))
    result = runner.invoke(app, ["sft", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 2
    assert any("federation.clients_per_round" in line for line in lines)
    assert any("lora.r" in line for line in lines)
    assert not Path(base_recipe["output_dir"]).exists()


def test_bad_data_row_names_file_and_line(tmp_path: Path, base_recipe: dict) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n')
    base_recipe["data"] = {"source": "dolly", "path": str(data)}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_recipe))
    result = runner.invoke(app, ["sft", str(path)])
    assert result.exit_code == 2
    assert f"{data}:2" in result.output and "response" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_eval_lists_its_benchmarks() -> None:
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0
    assert "gsm8k" in result.output and "gsmhard" in result.output
