"""Bad input, table-driven, through the CLI as a user meets it: each case exits 2 with one ``error:`` line
naming the file, key or value at fault, and leaves nothing behind in the output folder. These are the
recipe-level classes the 87-input review found ending in a traceback or silently accepted (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedalign.cli import app

from .conftest import REPO

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
DPO = str(REPO / "recipes" / "quickstart-dpo.yaml")


def _non_utf8_recipe(tmp: Path) -> str:
    path = tmp / "latin1.yaml"
    path.write_bytes((REPO / "recipes" / "quickstart.yaml").read_bytes() + "# caf\xe9\n".encode("latin-1"))
    return str(path)


def _file_in_the_way(tmp: Path) -> str:
    (tmp / "a-file").write_text("")
    return f"output_dir={tmp / 'a-file' / 'runs'}"


def _model_copy(tmp: Path, damage) -> str:
    import shutil

    folder = tmp / "model"
    shutil.copytree(REPO / "data" / "tiny-llama", folder)
    damage(folder)
    return f"model.name_or_path={folder}"


def _truncate(name: str, keep: int):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:keep])


def _data_with_a_latin1_row(tmp: Path, suffix: str) -> str:
    rows = (REPO / "data" / "quickstart" / "dolly.jsonl").read_bytes().splitlines()[:30]
    bad = '{"instruction": "caf\xe9?", "context": "", "response": "Yes.", "category": "open_qa"}'.encode(
        "latin-1"
    )
    path = tmp / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_bytes(b"\n".join([*rows, bad]) + b"\n")
    else:
        path.write_bytes(b"[" + b",\n".join([*rows, bad]) + b"]")
    return f"data.path={path}"


def _bad_template(tmp: Path) -> str:
    (tmp / "t.jinja").write_text("{% for m in messages %}{{ m.content }\n")
    return f"model.chat_template={tmp / 't.jinja'}"


CASES = [
    # (id, command, recipe, overrides, what the line must name)
    ("recipe not UTF-8", "sft", _non_utf8_recipe, [], "not UTF-8"),
    ("recipe missing", "sft", lambda t: str(t / "nope.yaml"), [], "recipe file not found"),
    ("override malformed YAML", "sft", QUICKSTART, ["train.learning_rate=[1,"], "not valid YAML"),
    ("override without =", "sft", QUICKSTART, ["federation.rounds"], "expected dotted.key=value"),
    ("unknown key", "sft", QUICKSTART, ["train.lr=1"], "train.lr: unknown key"),
    ("negative seed", "sft", QUICKSTART, ["seed=-1"], "seed"),
    ("seed beyond 32 bits", "sft", QUICKSTART, [f"seed={2**32}"], "seed"),
    ("unknown optimizer", "sft", QUICKSTART, ["train.optim=adamw_bogus"], "train.optim"),
    ("unknown DPO loss", "dpo", DPO, ["dpo.loss_type=bogus"], "dpo.loss_type"),
    ("sft on a DPO recipe", "sft", DPO, [], "a DPO recipe (preference pairs); run it with fedalign dpo"),
    ("dpo on an SFT recipe", "dpo", QUICKSTART, [], "'dolly' is an SFT dataset"),
    ("unknown DPO loss in a list", "dpo", DPO, ["dpo.loss_type=[sigmoid, nope]"], "dpo.loss_type"),
    ("infinite learning rate", "sft", QUICKSTART, ["train.learning_rate=.inf"], "train.learning_rate"),
    ("NaN LoRA alpha", "sft", QUICKSTART, ["lora.alpha=.nan"], "lora.alpha"),
    ("name escaping output_dir", "sft", QUICKSTART, ["name=../escape"], "name"),
    ("name with a separator", "sft", QUICKSTART, ["name=a/b"], "name"),
    ("rich markup in a value", "sft", QUICKSTART, ["name=x[/y]"], "'x[/y]'"),
    ("min_clients above the cohort", "sft", QUICKSTART, ["federation.min_clients=99"], "min_clients"),
    ("a timeout under DP", "sft", QUICKSTART,
     ["federation.client_timeout_s=5", "privacy.unit=example", "privacy.target_epsilon=4"],
     "client_timeout_s"),
    ("infinite algorithm setting", "sft", QUICKSTART, ["algorithm.name=fedprox", "algorithm.mu=.inf"], "mu"),
    ("rounds given as true", "sft", QUICKSTART, ["federation.rounds=true"], "federation.rounds"),
    (
        "clients per round as false",
        "sft",
        QUICKSTART,
        ["federation.clients_per_round=false"],
        "clients_per_round",
    ),
    ("output_dir through a file", "sft", QUICKSTART, [_file_in_the_way], "is a file, not a folder"),
    ("data row not UTF-8 (JSONL)", "sft", QUICKSTART, [lambda t: _data_with_a_latin1_row(t, ".jsonl")],
     "rows.jsonl:31: not UTF-8"),
    ("data not UTF-8 (JSON)", "sft", QUICKSTART, [lambda t: _data_with_a_latin1_row(t, ".json")],
     "rows.json:31: not UTF-8"),
    ("truncated weights", "sft", QUICKSTART,
     [lambda t: _model_copy(t, _truncate("model.safetensors", 100_000))], "model.safetensors: truncated"),
    ("damaged safetensors header", "sft", QUICKSTART,
     [lambda t: _model_copy(t, _truncate("model.safetensors", 5))], "not a readable safetensors file"),
    ("missing weights", "sft", QUICKSTART,
     [lambda t: _model_copy(t, lambda f: (f / "model.safetensors").unlink())], "has no weights"),
    ("truncated tokenizer", "sft", QUICKSTART, [lambda t: _model_copy(t, _truncate("tokenizer.json", 5000))],
     "tokenizer.json: not valid JSON"),
    ("chat template syntax error", "sft", QUICKSTART, [_bad_template], "t.jinja: line 1"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "recipe", "overrides", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_and_writes_nothing(command, recipe, overrides, names, tmp_path):
    recipe = recipe(tmp_path) if callable(recipe) else recipe
    overrides = [o(tmp_path) if callable(o) else o for o in overrides]
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides.append(f"output_dir={tmp_path / 'runs'}")
    before = sorted(tmp_path.rglob("*"))  # what the case set up (a damaged model, a data file)
    result = CliRunner().invoke(app, [command, recipe, *overrides], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert names in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert sorted(tmp_path.rglob("*")) == before  # nothing new behind


def _adapter_for(model_dir: Path, folder: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    return folder


def test_a_dpo_start_adapter_trained_for_another_base_is_refused(tmp_path):
    """PEFT merges an adapter of another model silently (no tensor matches); the run must refuse it."""
    adapter = _adapter_for(REPO / "data" / "tiny-llama", tmp_path / "llama-adapter")
    result = CliRunner().invoke(
        app,
        ["dpo", DPO, f"model.adapter={adapter}", f"output_dir={tmp_path / 'runs'}"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2, result.output
    # (in-process, the library's own loading bar shows; `fedalign` itself turns it off)
    lines = [line for line in result.output.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and "model.adapter" in lines[0] and "trained for another model" in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_completions_cut_by_max_length_are_reported_and_counted(tmp_path):
    """Truncation that removes the end-of-sequence token trains a model to go on rather than stop: the run
    says so and lists the rows in partition.json (beside the rows truncation left without a completion)."""
    import json

    result = CliRunner().invoke(
        app,
        ["sft", QUICKSTART, "train.max_length=48", "federation.rounds=1", "federation.local_steps=1",
         "eval.every=0", f"output_dir={tmp_path}"],
        env={"COLUMNS": "300"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.iterdir()
    manifest = json.loads((run_dir / "partition.json").read_text())
    truncated = manifest["truncated_rows"]["rows"]
    assert truncated and not set(truncated) & set(manifest["dropped_rows"]["rows"])
    assert f"{len(truncated)} training rows lose their end-of-sequence token" in result.output


def test_an_exception_fedalign_did_not_raise_is_one_line_unless_debugging(monkeypatch, capsys):
    import sys

    import fedalign.cli as cli

    def broken() -> None:
        raise RuntimeError("something deep\nwith a second line")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.setattr(sys, "argv", ["fedalign", "sft", "recipe.yaml"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "unexpected RuntimeError: something deep" in lines[0] and "--debug" in lines[0]
    monkeypatch.setattr(sys, "argv", ["fedalign", "sft", "recipe.yaml", "--debug"])
    with pytest.raises(RuntimeError, match="something deep"):
        cli.main()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_real_run_with_where_it_stands(signal_name, tmp_path):
    """SIGTERM (a scheduler, `kill`) ends a run as Ctrl-C does: exit 130 and one line naming the run
    directory and the last checkpoint it keeps."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [
        sys.executable, "-c", "from fedalign.cli import main; main()", "sft", QUICKSTART,
        "federation.rounds=50", "federation.local_steps=2", "eval.every=0", f"output_dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("*/checkpoints/round-00001*")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        process.send_signal(getattr(signal, signal_name))
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    (run_dir,) = tmp_path.iterdir()
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: interrupted:") and str(run_dir) in " ".join(lines), err
    assert "keeps the checkpoints of round" in " ".join(lines) and not (run_dir / "adapter").exists()


def test_a_diverging_run_stops_and_never_saves_a_non_finite_adapter(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "sft",
            QUICKSTART,
            "train.learning_rate=1e6",
            "federation.rounds=3",
            "eval.every=0",
            f"output_dir={tmp_path}",
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2, result.output
    assert "round 1: every client's update has NaN or infinite values" in result.output
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "adapter").exists() and not list(run_dir.glob("checkpoints/round-*"))
