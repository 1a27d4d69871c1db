"""Exact resume (issue 13): a run killed with SIGKILL at a round's end or in the middle of writing a
checkpoint, then resumed with ``fedalign resume``, ends with the adapter and ledgers of a run that was
never interrupted, bit for bit on CPU, for every algorithm, SFT and DPO, with and without DP.

The kill is real (``FEDALIGN_TEST_KILL=point:K`` makes the run SIGKILL itself at that point: no cleanup,
as an out-of-memory killer or a pre-empted node ends it). The uninterrupted reference runs in this process
with the killed run's own DP keys (what replays its noise and sampling)."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from fedalign.privacy.randomness import RunSecrets
from fedalign.recipe import validate_recipe
from fedalign.runtime.dpo import run_dpo
from fedalign.runtime.loop import KILL_HOOK
from fedalign.runtime.resume import resume_run
from fedalign.runtime.sft import run_sft

from .conftest import TINY_MODEL, small_recipe
from .dpo_data import dpo_recipe, write_text_pairs
from .processes import run_cli, start_cli

ALGORITHMS = ["fedavg", "fedask", "fedsa", "scaffold", "rolora", "frlora"]
# (point, K) per case, rotating so that every point meets every task: a round's end between checkpoints
# (every 2), a checkpoint half written (its folder staged, not yet renamed into place), and a kill before
# any checkpoint, whose resume starts from round 0.
POINTS = [("after-round", 3), ("checkpoint", 4), ("checkpoint", 2), ("after-round", 1)]


def _console() -> Console:
    return Console(file=io.StringIO(), width=200)


def _raw(task: str, algorithm: str, dp: bool, tmp_path: Path) -> dict:
    if task == "sft":
        raw = small_recipe(tmp_path)
        raw["data"]["max_rows"] = 60
        raw["federation"] |= {"num_clients": 3, "clients_per_round": 2, "local_steps": 1}
        raw["train"]["batch_size"] = 2
    else:
        data = write_text_pairs(tmp_path / "pairs.jsonl", 20)
        raw = dpo_recipe(str(TINY_MODEL), data, tmp_path / "runs", source="preference")
        raw["federation"] |= {"clients_per_round": 2, "local_steps": 1}
        raw["eval"].pop("preferred_pattern")
    raw["federation"]["rounds"] = 4
    raw["train"]["optimizer_state"] = "persist"  # optimizer moments in client state: resumed too
    raw["algorithm"] = {"name": algorithm}
    raw["eval"] |= {"every": 2}
    raw["checkpoint"] = {"every": 2, "keep_last": 2}
    raw["device"] = "cpu"
    if dp:
        unit = "client" if dp == "client" else "example" if task == "sft" else "pair"
        raw["privacy"] = {"unit": unit, "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-3}
    return raw


def _killed_run(raw: dict, task: str, point: str, k: int, tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    output = tmp_path / "killed.log"
    code = run_cli([task, str(recipe)], output, **{KILL_HOOK: f"{point}:{k}"})
    assert code == -signal.SIGKILL, output.read_text()[-2000:]
    (run_dir,) = Path(raw["output_dir"]).iterdir()
    return run_dir


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    residual = run_dir / "adapter" / "residual_base.safetensors"
    if residual.exists():
        tensors |= {f"residual::{k}": v for k, v in load_file(residual).items()}
    return tensors


def _public_rounds(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records if r["type"] in ("round", "eval")]


CASES = [  # FRLoRA moves the base, which is DPO's reference: fedalign dpo refuses it (test_dpo_bad_input)
    (task, algorithm, dp)
    for task in ("sft", "dpo")
    for dp in (False, True)
    for algorithm in ALGORITHMS
    if not (task == "dpo" and algorithm == "frlora")
] + [("sft", "fedavg", "client"), ("dpo", "rolora", "client")]  # client-level DP: noise on the server


@pytest.mark.parametrize(
    ("task", "algorithm", "dp"),
    CASES,
    ids=[f"{t}-{a}-{'client-dp' if d == 'client' else 'dp' if d else 'nodp'}" for t, a, d in CASES],
)
def test_a_killed_run_resumes_to_the_uninterrupted_result(task, algorithm, dp, tmp_path):
    point, k = POINTS[CASES.index((task, algorithm, dp)) % len(POINTS)]
    raw = _raw(task, algorithm, dp, tmp_path)
    run_dir = _killed_run(raw, task, point, k, tmp_path)
    assert not (run_dir / "adapter").exists()
    resumed = resume_run(run_dir, console=_console())
    secrets = RunSecrets.load(run_dir / "private") if dp else None
    runner = run_sft if task == "sft" else run_dpo
    reference = runner(validate_recipe(raw), _console(), secrets)
    got, expected = _adapter(resumed.run_dir), _adapter(reference.run_dir)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} differs after resume ({point}:{k})"
    assert _public_rounds(run_dir) == _public_rounds(reference.run_dir)
    if dp is True:
        ledgers = "private/privacy_ledgers.json"
        assert json.loads((run_dir / ledgers).read_text()) == json.loads(
            (reference.run_dir / ledgers).read_text()
        )
    info = json.loads((run_dir / "run.json").read_text())
    assert info["resumes"][0]["from_round"] == {3: 2, 4: 2, 2: 0, 1: 0}[k]


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tmp_path):
    """FRLoRA (its base moves replayed) with a failed round (no move) and keep_last pruning around the
    damaged checkpoint that was set aside."""
    raw = _raw("sft", "frlora", False, tmp_path)
    raw["checkpoint"] = {"every": 1, "keep_last": 2}
    raw["faults"] = {"crash": 0.4, "seed": 5}  # round 1 loses a client and fails; rounds 2 and 3 do not
    raw["federation"] |= {"min_clients": 2, "max_failed_rounds": 4}
    run_dir = _killed_run(raw, "sft", "after-round", 3, tmp_path)
    adapter = run_dir / "checkpoints" / "round-00002" / "global_adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in a weight
    adapter.write_bytes(bytes(data))
    out = io.StringIO()
    resume_run(run_dir, console=Console(file=out, width=300))
    assert "checkpoint round-00002 is damaged" in out.getvalue()
    assert json.loads((run_dir / "run.json").read_text())["resumes"][0]["from_round"] == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "base_moves", "round-00002.damaged", "round-00003", "round-00004"
    ]  # fmt: skip
    reference = run_sft(validate_recipe(raw), _console())
    assert any("skipped" in r for r in _public_rounds(reference.run_dir))  # the failed round happened
    assert _public_rounds(run_dir) == _public_rounds(reference.run_dir)
    got, expected = _adapter(run_dir), _adapter(reference.run_dir)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_finished_run_is_extended_by_more_rounds(tmp_path):
    raw = _raw("sft", "fedavg", False, tmp_path)
    raw["federation"]["rounds"] = 2
    first = run_sft(validate_recipe(raw), _console())
    resume_run(first.run_dir, ["federation.rounds=4"], console=_console())
    raw["federation"]["rounds"] = 4
    reference = run_sft(validate_recipe(raw), _console())
    got, expected = _adapter(first.run_dir), _adapter(reference.run_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    rounds = [r["round"] for r in _public_rounds(first.run_dir) if r["type"] == "round"]
    assert rounds == [1, 2, 3, 4]


def _start(tmp_path: Path):
    """A long real run (40 rounds) in a child process, and the file its output goes to."""
    raw = _raw("sft", "fedavg", False, tmp_path)
    raw["federation"] |= {"rounds": 40, "local_steps": 4}
    raw["eval"]["every"] = 0
    raw["checkpoint"] = {"every": 1, "keep_last": 2}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    output = tmp_path / "run.log"
    return start_cli(["sft", str(recipe)], output), output


def _wait_for_round(process, tmp_path: Path) -> None:
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("runs/*/checkpoints/round-00001")) and time.monotonic() < deadline:
        assert process.is_alive()
        time.sleep(0.1)


def _stop(process, *signals: int) -> None:
    try:
        for number in signals:
            os.kill(process.pid, number)
            time.sleep(0.05)
        process.join(120)
    finally:
        if process.is_alive():
            process.kill()
            process.join()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_the_round_end_with_a_checkpoint_and_the_resume_command(signal_name, tmp_path):
    process, output = _start(tmp_path)
    _wait_for_round(process, tmp_path)
    _stop(process, getattr(signal, signal_name))
    err = output.read_text()
    assert process.exitcode == 130, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {signal_name}: stopped after round "), err
    assert "Traceback" not in err
    stopped = int(lines[0].split("stopped after round ")[1].split(",")[0])
    assert (run_dir / "checkpoints" / f"round-{stopped:05d}" / "manifest.json").is_file()
    assert f"Resume with: fedalign resume {run_dir}" in lines[0]
    assert not (run_dir / "adapter").exists()
    result = resume_run(run_dir, ["federation.rounds=" + str(stopped + 1)], console=_console())
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_a_second_ctrl_c_aborts_at_once_keeping_the_last_complete_checkpoint(tmp_path):
    process, output = _start(tmp_path)
    _wait_for_round(process, tmp_path)
    _stop(process, signal.SIGINT, signal.SIGINT)
    err = output.read_text()
    assert process.exitcode == 130, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: aborted: the last complete checkpoint is round "), err
    assert f"fedalign resume {run_dir}" in last
    kept = int(last.split("checkpoint is round ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / f"round-{kept:05d}" / "manifest.json").is_file()
