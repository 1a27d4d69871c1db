"""Federated DPO end to end on CPU: real TRL DPOTrainer, real PEFT adapters, a real (tiny, offline) LLaVA
with a CLIP vision tower, real PNG images in SPA-VL-schema parquet, real Opacus accounting."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

from fedalign.algorithms import registry
from fedalign.data.images import ImageRef
from fedalign.data.preferences import load_preferences
from fedalign.models.loading import attach_lora
from fedalign.recipe import LoraSection, validate_recipe
from fedalign.runtime.dpo import GENERATIONS, run_dpo
from fedalign.runtime.rundir import START_ADAPTER

from .conftest import TINY_MODEL
from .dpo_data import dpo_recipe, png, save_tiny_llava, write_spavl_parquet, write_text_pairs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo")
    return {
        "llava": save_tiny_llava(root / "tiny-llava"),
        "spavl": write_spavl_parquet(root / "spavl.parquet"),
        "text": write_text_pairs(root / "text.jsonl"),
    }


@pytest.fixture
def uploads(monkeypatch) -> list[set[str]]:
    """Every upload's tensor names, recorded where the algorithm hands them to the runtime (a spy)."""
    seen: list[set[str]] = []
    fedavg = registry()["fedavg"]
    original = fedavg.client_upload

    def spy(self, stage, round_idx, trained, reply, state):
        upload = original(self, stage, round_idx, trained, reply, state)
        seen.append(set(upload))
        return upload

    monkeypatch.setattr(fedavg, "client_upload", spy)
    return seen


def _run(raw: dict):
    return run_dpo(validate_recipe(raw), Console(file=io.StringIO(), width=120))


def _records(run_dir: Path, kind: str) -> list[dict]:
    """Records of one type; per-visit ("client") records are client-private, in private/."""
    path = run_dir / ("private/client_metrics.jsonl" if kind == "client" else "metrics.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if r["type"] == kind]


def _vision_batch(processor) -> dict[str, torch.Tensor]:
    from PIL import Image

    image = Image.open(io.BytesIO(png("red"))).convert("RGB")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return dict(processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=False))


PRIVACY = {
    "none": {},
    "pair": {"privacy": {"unit": "pair", "noise_multiplier": 0.5, "clip_norm": 1.0, "delta": 1e-3}},
}


@pytest.mark.parametrize("privacy", ["none", "pair"])
def test_federated_llava_dpo(files, tmp_path, uploads, privacy) -> None:
    raw = dpo_recipe(str(files["llava"]), files["spavl"], tmp_path / "runs", **PRIVACY[privacy])
    result = _run(raw)
    run = result.run_dir

    base = LlavaForConditionalGeneration.from_pretrained(files["llava"])
    base_vision = {n: p for n, p in base.named_parameters() if "vision_tower" in n}
    trained_vision = {
        n.removeprefix("base_model.model."): p
        for n, p in result.model.named_parameters()
        if "vision_tower" in n
    }
    assert base_vision.keys() == trained_vision.keys() and base_vision
    assert all(torch.equal(base_vision[n], trained_vision[n]) for n in base_vision)  # bit-identical

    assert len(uploads) == 3 * 2  # 3 clients x 2 rounds, one stage
    assert all(keys and not any("vision_tower" in k for k in keys) for keys in uploads)
    assert all(any("multi_modal_projector" in k for k in keys) for keys in uploads)

    rounds = _records(run, "round")
    assert [r["round"] for r in rounds] == [1, 2]
    clients = _records(run, "client")
    assert all(c["examples"] > 0 or privacy == "pair" for c in clients)
    evals = _records(run, "eval")
    assert evals[0]["reward_accuracy"] == 0.0  # policy == reference before training
    assert {"eval_loss", "reward_accuracy", "reward_margin", "preferred_rate"} <= evals[-1].keys()
    generations = [json.loads(x) for x in (run / GENERATIONS).read_text().splitlines()]
    assert {g["round"] for g in generations} == {0, 2} and len(generations) == 2 * 4
    if privacy == "pair":
        assert _records(run, "privacy")[0]["unit"] == "pair"
        assert 0 < rounds[-1]["epsilon_max"] < float("inf")
    else:
        assert evals[-1]["reward_accuracy"] > 0.5 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    # The saved adapter is a standard PEFT folder: it reloads onto the base and reproduces the logits.
    processor = AutoProcessor.from_pretrained(run / "adapter")
    batch = _vision_batch(processor)
    reloaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch).logits
        got = reloaded(**batch).logits
    assert torch.allclose(expected, got, atol=1e-5)


@pytest.mark.parametrize("privacy", ["none", "pair"])
def test_federated_text_dpo(files, tmp_path, privacy) -> None:
    raw = dpo_recipe(
        str(TINY_MODEL), files["text"], tmp_path / "runs", source="preference", **PRIVACY[privacy]
    )
    result = _run(raw)
    evals = _records(result.run_dir, "eval")
    assert evals[0]["reward_accuracy"] == 0.0 and evals[-1]["eval_loss"] is not None
    if privacy == "none":
        assert evals[-1]["reward_accuracy"] > 0.5
    else:
        assert _records(result.run_dir, "round")[-1]["epsilon_max"] > 0
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    reloaded = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    ids = torch.tensor([[0, 5, 17, 99, 3, 41]])
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)


def test_projector_trained_fully_travels_as_full_tensors(files, tmp_path, uploads) -> None:
    raw = dpo_recipe(str(files["llava"]), files["spavl"], tmp_path / "runs", lora__projector="full")
    raw["federation"]["rounds"] = 1
    result = _run(raw)
    full = {k for k in uploads[0] if ".modules_to_save." in k}
    assert {k.split(".modules_to_save.")[1] for k in full} == {
        "linear_1.weight",
        "linear_1.bias",
        "linear_2.weight",
        "linear_2.bias",
    }
    assert not any("multi_modal_projector" in k and "lora_" in k for k in uploads[0])
    state = dict(result.model.named_parameters())
    expected = sum(
        p.numel() * p.element_size()
        for n, p in state.items()
        if ("lora_" in n or ".modules_to_save." in n) and ".default." in n
    )
    clients = _records(result.run_dir, "client")
    assert all(c["bytes_up"] == expected for c in clients)  # LoRA factors plus the whole projector
    base = LlavaForConditionalGeneration.from_pretrained(files["llava"])
    moved = state["base_model.model.model.multi_modal_projector.modules_to_save.default.linear_1.weight"]
    assert not torch.equal(moved, base.model.multi_modal_projector.linear_1.weight)
    processor = AutoProcessor.from_pretrained(result.run_dir / "adapter")
    batch = _vision_batch(processor)
    reloaded = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(**batch).logits, reloaded(**batch).logits, atol=1e-5)


def test_sft_adapter_start_is_the_reference(files, tmp_path) -> None:
    """Starting from an SFT adapter: it is merged, so the adapter-disabled reference is the SFT model."""
    sft = attach_lora(AutoModelForCausalLM.from_pretrained(TINY_MODEL), LoraSection(r=4, alpha=8), seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    sft.save_pretrained(tmp_path / "sft-adapter")
    raw = dpo_recipe(str(TINY_MODEL), files["text"], tmp_path / "runs", source="preference")
    raw["model"]["adapter"] = str(tmp_path / "sft-adapter")
    result = _run(raw)
    ids = torch.tensor([[0, 5, 17, 99, 3, 41]])
    sft.eval()
    with torch.no_grad(), result.model.disable_adapter():
        reference = result.model(input_ids=ids).logits
    with torch.no_grad():
        assert torch.allclose(reference, sft(input_ids=ids).logits, atol=1e-5)  # not the raw base
        raw_base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)(input_ids=ids).logits
    assert not torch.allclose(reference, raw_base, atol=1e-3)
    # The adapter folder ships the start adapter: merge it, then load the DPO adapter.
    folder = result.run_dir / "adapter"
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(TINY_MODEL), folder / START_ADAPTER
    )
    reloaded = PeftModel.from_pretrained(merged.merge_and_unload(), folder).eval()
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)
    adapter = get_peft_model_state_dict(reloaded)
    assert adapter and all("lora_" in k for k in adapter)


def test_images_are_referenced_not_held(files) -> None:
    section = validate_recipe(dpo_recipe(str(files["llava"]), files["spavl"], Path("unused"))).data
    loaded = load_preferences(section, vision=True)
    refs = [e.image for e in loaded.examples]
    assert all(isinstance(r, ImageRef) and r.kind == "parquet" and r.handle is None for r in refs)
    image = refs[5].load()
    assert image.mode == "RGB" and image.size == (32, 32)


def test_quickstart_dpo_summary_shows_dpo_moving_the_model(tmp_path, monkeypatch) -> None:
    """The whole quickstart (the issue's acceptance, about 35 s): `fedalign dpo recipes/quickstart-dpo.yaml`
    on the embedded tiny LLaVA and pairs. Its summary must show held-out reward accuracy rising above
    chance and the share of greedy held-out answers that refuse as the chosen answers do rising clearly."""
    import re

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from fedalign.cli import app
    from fedalign.embedded import PREFERRED_PATTERN
    from fedalign.recipe import load_recipe

    from .conftest import REPO

    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the repository, as in the README
    recipe = load_recipe(REPO / "recipes" / "quickstart-dpo.yaml", [])
    assert recipe.eval.preferred_pattern == PREFERRED_PATTERN
    table = pq.read_table(REPO / recipe.data.path, columns=["chosen", "rejected"]).to_pylist()
    assert all(re.match(PREFERRED_PATTERN, r["chosen"]) for r in table)
    assert not any(re.match(PREFERRED_PATTERN, r["rejected"]) for r in table)

    result = CliRunner().invoke(
        app, ["dpo", "recipes/quickstart-dpo.yaml", f"output_dir={tmp_path}"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output

    def before_after(label: str) -> tuple[float, float]:
        found = re.search(re.escape(label) + r".*?: ([0-9.]+) -> ([0-9.]+)", result.output)
        assert found, result.output
        return float(found[1]), float(found[2])

    accuracy = before_after("held-out reward accuracy")
    preferred = before_after("preferred behaviour on held-out prompts")
    assert accuracy[0] == 0.0 and accuracy[1] >= 0.9  # 0.5 is chance
    assert preferred[0] <= 0.1 and preferred[1] >= 0.6, preferred
    (run_dir,) = tmp_path.iterdir()
    answers = [json.loads(line) for line in (run_dir / GENERATIONS).read_text().splitlines()]
    final = [a["answer"] for a in answers if a["round"] == recipe.federation.rounds]
    assert len(final) == recipe.data.holdout
    assert sum(bool(re.match(PREFERRED_PATTERN, a)) for a in final) / len(final) == preferred[1]

    # The safety suite on this run (what `make demo-safety` runs): the keyword proxy sees the tuned model
    # refuse the harmful fixtures its base complied with, and reports over-refusal of benign prompts beside
    # it.
    result = CliRunner().invoke(
        app,
        ["eval", "safety", str(run_dir), "keywords_extra=[I would not]", "max_new_tokens=24"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    folder = run_dir / "eval" / "safety" / "keyword-corrected"
    summary = json.loads((folder / "summary.json").read_text())["benchmarks"]
    asr = {k: v["asr_micro_kw"] for k, v in summary["mm-safetybench"]["checkpoints"].items()}
    assert asr["base"] >= 0.8 and asr["tuned"] <= 0.2, asr  # measured: 1.00 -> 0.00
    tuned_btv = summary["beavertails-v"]["checkpoints"]["tuned"]
    assert tuned_btv["refusal_rate_kw"] >= tuned_btv["reference_refusal_rate_kw"] + 0.5
    benign = {k: v["over_refusal_rate_kw"] for k, v in summary["benign"]["checkpoints"].items()}
    assert set(benign) == {"base", "tuned"} and benign["base"] <= benign["tuned"]  # measured: 0.00 -> 0.21
    assert "keyword proxy (gcg list + 1 extra phrases)" in summary["mm-safetybench"]["comparable"]
    for plot in ("mm-safetybench-asr.png", "safety-rates.png"):
        assert (folder / plot).read_bytes().startswith(b"\x89PNG")
    assert "over-refusal_kw" in result.output


def test_pair_level_epsilon_matches_an_independent_accountant(files, tmp_path) -> None:
    """Under ``privacy.unit: pair`` the unit is the preference pair: each client's Poisson rate is the batch
    over its number of *pairs* (not of chosen/rejected sequences), and the ε it reports is what Opacus's
    RDP accountant gives for that rate, σ and every local step it took."""
    from opacus.accountants import RDPAccountant

    privacy = {"unit": "pair", "target_epsilon": 8.0, "delta": 1e-3, "clip_norm": 1.0, "accountant": "rdp"}
    raw = dpo_recipe(str(TINY_MODEL), files["text"], tmp_path / "runs", source="preference", privacy=privacy)
    result = _run(raw)
    plan = _records(result.run_dir, "privacy")[0]
    assert plan["unit"] == "pair"
    private = result.run_dir / "private" / "client_metrics.jsonl"
    rates = next(r for r in map(json.loads, private.read_text().splitlines()) if r["type"] == "privacy")["q"]
    partition = json.loads((result.run_dir / "partition.json").read_text())
    batch, steps = raw["train"]["batch_size"], raw["federation"]["local_steps"]
    visits = _records(result.run_dir, "client")
    assert visits
    for client in {r["client"] for r in visits}:
        pairs = partition["clients"][client]["num_rows"]
        assert rates[client] == pytest.approx(batch / pairs)
        independent = RDPAccountant()
        for _ in range(steps * sum(r["client"] == client for r in visits)):
            independent.step(noise_multiplier=plan["sigma"], sample_rate=rates[client])
        reported = [r["epsilon"] for r in visits if r["client"] == client][-1]
        assert reported == pytest.approx(independent.get_epsilon(delta=1e-3), rel=0.01)
        assert reported <= 8.0
