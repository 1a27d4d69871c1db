"""``fedalign report`` on two real quickstart runs (FedAvg, and FedASK under example-level DP): the figures,
the series drawn (``report.json``) against the runs' own metrics files, the Markdown summary, what is left
out of a DP run without ``--private``, and a bad run directory."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fedalign.cli import app
from fedalign.recipe import load_recipe
from fedalign.runtime.sft import run_sft

from .conftest import REPO

runner = CliRunner()
_SHORT = ["federation.rounds=2", "federation.local_steps=2", "eval.every=1", "data.holdout=40"]
_MIB = 2**20


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    dp = [
        "privacy.unit=example",
        "privacy.target_epsilon=4",
        "privacy.delta=1e-4",
        "privacy.randomness=seeded",
    ]
    made = {}
    for algorithm, extra in (("fedavg", []), ("fedask", dp)):
        overrides = [*_SHORT, f"output_dir={out}", f"algorithm.name={algorithm}", *extra]
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)
        made[algorithm] = run_sft(recipe, Console(file=io.StringIO())).run_dir
    return made


def _records(run_dir: Path, kind: str, private: bool = False) -> list[dict]:
    path = run_dir / "private" / "client_metrics.jsonl" if private else run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_report_on_two_runs_writes_figures_and_summary_from_their_metrics(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(runs["fedavg"]), str(runs["fedask"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("metrics.png", "epsilon.png", "bytes.png"):
        assert _is_png(out / name), name
    data = json.loads((out / "report.json").read_text())
    figures = data["figures"]
    fedavg, fedask = "fedavg", "fedask, example DP ε=4"

    for label, run in ((fedavg, runs["fedavg"]), (fedask, runs["fedask"])):
        evals = _records(run, "eval")
        assert figures["metrics.png"]["eval_loss"][label] == {
            "x": [e["round"] for e in evals],
            "y": [e["eval_loss"] for e in evals],
        }
        assert figures["metrics.png"]["eval_loss"][label]["x"] == [0, 1, 2]
        rounds = _records(run, "round")
        assert figures["bytes.png"]["bytes_up"][label]["y"] == [r["bytes_up"] / _MIB for r in rounds]
        assert figures["bytes.png"]["bytes_down"][label]["x"] == [1, 2]

    # training loss is client-private: a non-private run's is drawn, the DP run's only with --private
    train = figures["metrics.png"]["train_loss"]
    assert train == {fedavg: {"x": [1, 2], "y": [r["loss"] for r in _records(runs["fedavg"], "round", True)]}}
    assert any(fedask in line and "training loss" in line for line in data["left_out"])
    # ε: only the DP run, the largest client's per round, as published
    epsilon = figures["epsilon.png"]
    assert list(epsilon) == ["epsilon"]
    spent = [r["epsilon_max"] for r in _records(runs["fedask"], "round")]
    assert epsilon["epsilon"] == {f"{fedask} (largest client)": {"x": [1, 2], "y": spent}}
    assert 0 < spent[0] <= spent[1] <= 4.0

    summary = (out / "report.md").read_text()
    for label, run in ((fedavg, runs["fedavg"]), (fedask, runs["fedask"])):
        s = _records(run, "summary")[0]
        row = next(line for line in summary.splitlines() if line.startswith(f"| {label} |"))
        assert f"{s['eval_before']:.4f} → {s['eval_after']:.4f}" in row
        assert f"| {s['rounds']} |" in row
    assert f"| {_records(runs['fedask'], 'summary')[0]['epsilon']:.3f} |" in summary
    for name in ("metrics.png", "epsilon.png", "bytes.png"):
        assert f"]({name})" in summary
    assert not list(out.glob(".report-*"))  # the staging folder is gone


def test_private_report_adds_the_dp_runs_training_loss_and_per_client_epsilon(runs: dict[str, Path]) -> None:
    result = runner.invoke(app, ["report", str(runs["fedask"]), "--private"])
    assert result.exit_code == 0, result.output
    out = runs["fedask"] / "report"  # one run: its own report/ folder
    data = json.loads((out / "report.json").read_text())
    label = "fedask, example DP ε=4"
    per_client = data["figures"]["epsilon.png"][f"epsilon_clients: {label}"]
    visits = _records(runs["fedask"], "client", private=True)
    assert sorted(per_client) == sorted({f"client {v['client']}" for v in visits})
    for v in visits:
        s = per_client[f"client {v['client']}"]
        assert s["y"][s["x"].index(v["round"])] == v["epsilon"]
    assert data["figures"]["metrics.png"]["train_loss"][label]["x"] == [1, 2]
    assert data["left_out"] == []


def test_a_folder_that_is_not_a_run_is_one_line_and_writes_nothing(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(runs["fedavg"]), str(tmp_path / "empty"), "--out", str(out)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "empty: not a fedalign run directory" in lines[0], result.output
    assert not out.exists()


def test_a_run_killed_before_round_one_reports_what_it_has(runs: dict[str, Path], tmp_path: Path) -> None:
    """The run's own files, cut as a kill before round 1 leaves them: the round-0 evaluation and a torn
    line. The report draws the one held-out point, leaves out the empty figures and the missing summary."""
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "recipe.yaml").write_text((runs["fedavg"] / "recipe.yaml").read_text())
    first = (runs["fedavg"] / "metrics.jsonl").read_text().splitlines()[0]
    (killed / "metrics.jsonl").write_text(first + '\n{"type": "round", "rou')
    result = runner.invoke(app, ["report", str(killed)])
    assert result.exit_code == 0, result.output
    data = json.loads((killed / "report" / "report.json").read_text())
    assert list(data["figures"]) == ["metrics.png"]
    assert data["figures"]["metrics.png"]["eval_loss"]["fedavg"]["x"] == [0]
    assert _is_png(killed / "report" / "metrics.png")
    assert not (killed / "report" / "bytes.png").exists()
    assert "| fedavg |" in (killed / "report" / "report.md").read_text()
