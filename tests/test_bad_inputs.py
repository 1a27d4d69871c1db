"""Bad input, table-driven, through the CLI as a user meets it: each case exits 2 with one ``error:`` line
naming the file, key or value at fault, and leaves nothing behind in the output folder. These are the
recipe-level classes the 87-input review found ending in a traceback or silently accepted (issue 13), then
more of the recipe file, data files and rows, model, tokenizer and adapter folders, and the images of a
vision-language DPO recipe. Every case fails before a model trains (most before one loads)."""

from __future__ import annotations

import json
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


def _model_copy(tmp: Path, damage, model: str = "tiny-llama") -> str:
    import shutil

    folder = tmp / "model"
    shutil.copytree(REPO / "data" / model, folder)
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


def _write(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _recipe(text: str):
    return lambda tmp: str(_write(tmp, "recipe.yaml", text))


def _data(name: str, content: str):
    return lambda tmp: f"data.path={_write(tmp, name, content)}"


def _dolly(damage) -> str:
    """Five quickstart rows and a sixth, ``damage`` applied to a copy of the first."""
    import json

    rows = (REPO / "data" / "quickstart" / "dolly.jsonl").read_text().splitlines()[:5]
    bad = json.loads(rows[0])
    damage(bad)
    return "\n".join([*rows, json.dumps(bad)]) + "\n"


def _image(kind: str, size: int = 48) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.effect_noise((size, size), 40).convert("RGB").save(out, format=kind)
    return out.getvalue()


def _huge_png() -> bytes:
    """A PNG header claiming 60000 x 60000 pixels (PIL refuses it as a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _pairs(image, files: dict[str, bytes] | None = None):
    """Overrides for the LLaVA DPO quickstart on four preference pairs whose third has ``image``."""

    def make(tmp: Path) -> str:
        import json

        _write(tmp, "ok.png", _image("PNG"))
        for name, content in (files or {}).items():
            _write(tmp, name, content)
        rows = [
            {"image": image if i == 2 else "ok.png", "prompt": f"What is thing {i}?",
             "chosen": "I would not do this.", "rejected": f"Sure, thing {i}."}
            for i in range(4)
        ]  # fmt: skip
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        return f"data.path={_write(tmp, 'pairs.jsonl', lines)}"

    return ["data.source=preference", make]


def _adapter(files: dict[str, str]):
    def make(tmp: Path) -> str:
        (tmp / "adapter").mkdir()
        for name, content in files.items():
            _write(tmp / "adapter", name, content)
        return f"model.adapter={tmp / 'adapter'}"

    return make


def _remove(*names: str):
    return lambda folder: [(folder / name).unlink() for name in names]


def _replace(name: str, content: str | bytes):
    return lambda folder: _write(folder, name, content)


_BROKEN_TEMPLATE = "{% for m in messages %}{{ m.content }\n"
_LORA = '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}'


def _run_dir(info: str | None = '{"format_version": 2, "task": "sft", "resumes": []}', dp: bool = False,
             extra: dict[str, str] | None = None, changed: str | None = None):  # fmt: skip
    """A run directory as a run leaves it before its first checkpoint (or damaged as ``info``/``extra``
    say), for ``fedalign resume``."""

    def build(tmp: Path) -> str:
        from fedalign.recipe import validate_recipe

        from .conftest import small_recipe

        raw = small_recipe(tmp)
        raw["train"]["max_length"] = 1024  # no truncation warnings before the line under test
        if dp:
            raw["privacy"] = {"unit": "example", "noise_multiplier": 1.0, "delta": 1e-3}
        run = tmp / "runs" / "test-20261130-000000"
        _write(run, "recipe.yaml", validate_recipe(raw).resolved_yaml())
        if info is not None:
            _write(run, "run.json", info)
        from fedalign.runtime.inputs import input_fingerprints

        recorded = input_fingerprints(validate_recipe(raw))
        if changed is not None:
            recorded[changed] = "0" * 32  # the files under this key were others when the run started
        _write(run, "private/inputs.json", json.dumps(recorded))
        for name, content in (extra or {}).items():
            _write(run, name, content)
        return str(run)

    return build


CASES = [
    # (id, command, recipe or run directory, overrides, what the line must name)
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
    # the recipe file
    ("recipe a list, not a mapping", "sft", _recipe("- name: x\n- seed: 1\n"), [],
     "a recipe is a mapping of sections, got list"),
    ("recipe empty", "sft", _recipe("# nothing yet\n"), [], "recipe.yaml: the recipe is empty"),
    ("recipe key given twice", "sft", _recipe(Path(QUICKSTART).read_text() + "seed: 3\n"), [],
     "key 'seed' given twice"),
    ("clients per round above num_clients", "sft", QUICKSTART, ["federation.clients_per_round=11"],
     "federation.clients_per_round: must be <= num_clients (11 > 10)"),
    ("zero rounds", "sft", QUICKSTART, ["federation.rounds=0"], "federation.rounds"),
    ("privacy.delta of at least 1", "sft", QUICKSTART, ["privacy.delta=1.5"], "privacy.delta"),
    ("override into a value", "sft", QUICKSTART, ["seed.x=1"], "seed is a value, not a section"),
    # data files and rows
    ("data file missing", "sft", QUICKSTART, [lambda t: f"data.path={t / 'nope.jsonl'}"],
     "nope.jsonl' does not exist"),
    ("data a hub id offline", "sft", QUICKSTART, ["data.path=databricks/databricks-dolly-15k"],
     "data.path: 'databricks/databricks-dolly-15k' is not a local file and cannot be fetched"),
    ("data file empty", "sft", QUICKSTART, [_data("empty.jsonl", "")],
     "empty.jsonl' (split 'train') has no rows"),
    ("data JSON not a list", "sft", QUICKSTART, [_data("rows.json", '{"rows": []}')],
     "rows.json: expected a JSON list of objects, got dict"),
    ("data row missing its completion", "sft", QUICKSTART,
     [_data("rows.jsonl", _dolly(lambda row: row.pop("response")))],
     "rows.jsonl:6: missing required field 'response'"),
    ("data field of the wrong type", "sft", QUICKSTART,
     [_data("rows.jsonl", _dolly(lambda row: row.update(response=42)))],
     "rows.jsonl:6: field 'response' must be a string, got int"),
    # models and tokenizers
    ("model folder missing", "sft", QUICKSTART, [lambda t: f"model.name_or_path={t / 'nope'}"],
     "nope' is not a model folder"),
    ("model a hub id offline", "sft", QUICKSTART, ["model.name_or_path=meta-llama/Llama-2-7b-hf"],
     "'meta-llama/Llama-2-7b-hf' is not a local folder and cannot be fetched"),
    ("config.json not JSON", "sft", QUICKSTART, [lambda t: _model_copy(t, _replace("config.json", "{bad"))],
     "config.json: not valid JSON"),
    ("generation_config.json not JSON", "sft", QUICKSTART,
     [lambda t: _model_copy(t, _replace("generation_config.json", "{bad"))],
     "generation_config.json: not valid JSON"),
    ("no tokenizer files", "sft", QUICKSTART,
     [lambda t: _model_copy(t, _remove("tokenizer.json", "tokenizer_config.json"))], "has no tokenizer"),
    ("tokenizer_config.json not JSON", "sft", QUICKSTART,
     [lambda t: _model_copy(t, _truncate("tokenizer_config.json", 50))],
     "tokenizer_config.json: not valid JSON"),
    ("model's own chat template broken", "sft", QUICKSTART,
     [lambda t: _model_copy(t, _replace("chat_template.jinja", _BROKEN_TEMPLATE))],
     "model/chat_template.jinja: line 1: unexpected '}'"),
    ("model's own chat template not UTF-8", "sft", QUICKSTART,
     [lambda t: _model_copy(t, _replace("chat_template.jinja", b"{{ bos_token }}caf\xe9"))],
     "chat_template.jinja: line 1: not UTF-8"),
    ("sft on a vision-language model", "sft", QUICKSTART,
     [f"model.name_or_path={REPO / 'data' / 'tiny-llava'}"], "vision-language SFT is not supported"),
    ("processor_config.json not JSON", "dpo", DPO,
     [lambda t: _model_copy(t, _replace("processor_config.json", "{bad"), "tiny-llava")],
     "processor_config.json: not valid JSON"),
    # a start adapter
    ("adapter folder missing", "sft", QUICKSTART, [lambda t: f"model.adapter={t / 'nope'}"],
     "nope' is not a PEFT adapter folder"),
    ("adapter_config.json not JSON", "sft", QUICKSTART, [_adapter({"adapter_config.json": "{bad"})],
     "adapter/adapter_config.json: not valid JSON"),
    ("adapter without weights", "sft", QUICKSTART, [_adapter({"adapter_config.json": _LORA})],
     "has no adapter weights"),
    # images of a vision-language DPO recipe (the pair on line 3)
    ("image missing", "dpo", DPO, _pairs("gone.png"), "pairs.jsonl:3: image "),
    ("image not an image", "dpo", DPO, _pairs("notes.png", {"notes.png": b"not a picture\n"}),
     "notes.png': not a readable image"),
    ("image a truncated JPEG", "dpo", DPO, _pairs("cut.jpg", {"cut.jpg": _image("JPEG", 256)[:1500]}),
     "cut.jpg': not a readable image"),
    ("image a decompression bomb", "dpo", DPO, _pairs("huge.png", {"huge.png": _huge_png()}),
     "huge.png': too large to decode"),
    ("image field a number", "dpo", DPO, _pairs(42), "pairs.jsonl:3: field 'image' holds no image"),
    ("image field two images", "dpo", DPO, _pairs(["ok.png", "ok.png"]), "field 'image' holds 2 images"),
    # fedalign resume RUN_DIR of a missing, foreign or damaged run
    ("resume: no such run", "resume", lambda t: str(t / "runs" / "gone"), [], "no such run directory"),
    ("resume: not a run", "resume", lambda t: str(_write(t / "runs" / "x", "notes.txt", "x").parent), [],
     "not a fedalign run"),
    ("resume: a run without run state", "resume", _run_dir(None), [], "without resumable run state"),
    ("resume: an older run-state format", "resume", _run_dir('{"format_version": 1, "task": "sft"}'), [],
     "run-state format 1 is older than this fedalign reads (2)"),
    ("resume: a newer fedalign's run", "resume", _run_dir('{"format_version": 3, "task": "sft"}'), [],
     "upgrade fedalign"),
    ("resume: run.json damaged", "resume", _run_dir('{"format_'), [], "run.json: damaged"),
    ("resume: an override that changes the run", "resume", _run_dir(), ["train.learning_rate=0.1"],
     "train.learning_rate cannot change on resume"),
    ("resume: a bad schedule value", "resume", _run_dir(), ["federation.rounds=0"], "federation.rounds"),
    ("resume: finished, no rounds added", "resume",
     _run_dir(extra={"adapter/adapter_config.json": "{}", "checkpoints/round-00002/server.json": "{}"}), [],
     "finished after 2 rounds"),
    ("resume: DP keys missing", "resume", _run_dir(dp=True), [], "secrets.json: missing or damaged"),
    ("resume: the data partitions otherwise", "resume", _run_dir(extra={"partition.json": '{"clients": []}'}),
     [], "the data no longer partitions as when the run started"),
    ("resume: the model files changed", "resume", _run_dir(changed="model.name_or_path"), [],
     "model.name_or_path: the files changed since the run started"),
    # fedalign flower: refused before any Flower engine starts
    ("flower: no node", "flower simulate", QUICKSTART, ["--nodes", "0"], "--nodes 0: between 1 and"),
    ("flower: more nodes than clients", "flower simulate", QUICKSTART, ["--nodes", "11"],
     "federation.num_clients=10"),
    ("flower: FRLoRA", "flower simulate", QUICKSTART, ["algorithm.name=frlora"], "moves the base weights"),
    ("flower: unknown task", "flower run-config", QUICKSTART, ["--task", "x"], "--task 'x': sft or dpo"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "recipe", "overrides", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_and_writes_nothing(command, recipe, overrides, names, tmp_path):
    recipe = recipe(tmp_path) if callable(recipe) else recipe
    overrides = [o(tmp_path) if callable(o) else o for o in overrides]
    if command != "resume" and not any(o.startswith("output_dir=") for o in overrides):
        overrides.append(f"output_dir={tmp_path / 'runs'}")
    before = sorted(tmp_path.rglob("*"))  # what the case set up (a damaged model, a data file)
    if command == "resume":  # as the entry point does for a run: no library chatter on the terminal
        from fedalign.cli import _quiet_libraries

        _quiet_libraries()
    result = CliRunner().invoke(app, [*command.split(), recipe, *overrides], env={"COLUMNS": "300"})
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
