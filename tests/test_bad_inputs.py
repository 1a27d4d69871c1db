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
    ("unknown DPO loss in a list", "dpo", DPO, ["dpo.loss_type=[sigmoid, nope]"], "dpo.loss_type"),
    ("infinite learning rate", "sft", QUICKSTART, ["train.learning_rate=.inf"], "train.learning_rate"),
    ("NaN LoRA alpha", "sft", QUICKSTART, ["lora.alpha=.nan"], "lora.alpha"),
    ("name escaping output_dir", "sft", QUICKSTART, ["name=../escape"], "name"),
    ("name with a separator", "sft", QUICKSTART, ["name=a/b"], "name"),
    ("rounds given as true", "sft", QUICKSTART, ["federation.rounds=true"], "federation.rounds"),
    (
        "clients per round as false",
        "sft",
        QUICKSTART,
        ["federation.clients_per_round=false"],
        "clients_per_round",
    ),
    ("output_dir through a file", "sft", QUICKSTART, [_file_in_the_way], "is a file, not a folder"),
]


@pytest.mark.parametrize(
    ("command", "recipe", "overrides", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_and_writes_nothing(command, recipe, overrides, names, tmp_path):
    recipe = recipe(tmp_path) if callable(recipe) else recipe
    overrides = [o(tmp_path) if callable(o) else o for o in overrides]
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides.append(f"output_dir={tmp_path / 'runs'}")
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, [command, recipe, *overrides], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert names in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert sorted(tmp_path.rglob("*")) == before  # nothing new behind
