"""``fedalign eval gsm8k``: a run directory's base and tuned model side by side, the output folder, the
per-sample cache that makes an interrupted evaluation continue, and batched = one-at-a-time generation."""

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedalign.evaluation import generation
from fedalign.evaluation.generation import GenerationSettings, generate_batch
from fedalign.evaluation.math import evaluate_math, parse_overrides
from fedalign.recipe import validate_recipe
from fedalign.runtime.sft import run_sft
from tests.conftest import small_recipe

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO / "tests" / "fixtures" / "gsm8k" / "train.jsonl"
TINY = REPO / "data" / "tiny-llama"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished SFT quickstart-style run on the embedded tiny model (one round)."""
    raw = small_recipe(tmp_path_factory.mktemp("runs"))
    raw["federation"]["rounds"] = 1
    return run_sft(validate_recipe(raw), Console(file=io.StringIO())).run_dir


def _settings(**extra):
    overrides = [f"data.path={GSM8K}", "limit=6", "max_new_tokens=12", "batch_size=2"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return parse_overrides(overrides)


def test_a_run_is_evaluated_base_and_tuned_and_an_interrupted_evaluation_continues(run_dir, monkeypatch):
    calls: list[int] = []
    real = generation.generate_batch

    def counting(model, tokenizer, prompts, settings, stop_after=None):
        calls.append(len(prompts))
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return real(model, tokenizer, prompts, settings)

    monkeypatch.setattr(generation, "generate_batch", lambda *a: counting(*a, stop_after=2))
    with pytest.raises(KeyboardInterrupt):  # killed after two batches of the base model
        evaluate_math("gsm8k", str(run_dir), None, _settings(), Console(file=io.StringIO()))
    assert sum(calls[:2]) == 4
    cached = (run_dir / "eval" / "gsm8k-gsm8k_cot" / "responses.jsonl").read_text().splitlines()
    assert len(cached) == 4

    calls.clear()
    monkeypatch.setattr(generation, "generate_batch", lambda *a: counting(*a))
    shown = Console(file=io.StringIO(), width=200)
    metrics = evaluate_math("gsm8k", str(run_dir), None, _settings(), shown)
    assert sum(calls) == 2 + 6  # the base's two missing samples, then every tuned sample
    assert [c["label"] for c in metrics["checkpoints"]] == ["base", "tuned"]
    assert metrics["checkpoints"][1]["adapter"].endswith("adapter")
    table = shown.file.getvalue()
    assert "base" in table and "tuned" in table and "exact_match,strict-match" in table

    folder = run_dir / "eval" / "gsm8k-gsm8k_cot"
    for name in ("metrics.json", "samples.jsonl", "responses.jsonl", "gsm8k.png"):
        assert (folder / name).is_file(), name
    written = json.loads((folder / "metrics.json").read_text())
    assert written["variant"] == "gsm8k_cot" and written["mode"] == "faithful" and written["shots"] == 8
    assert written["template_sha256"] and written["versions"]["transformers"]
    assert written["generation"]["do_sample"] is False and written["data"]["samples"] == 6
    assert written["generation"]["seed"] == 0 and written["generation"]["batch_size"] == 2
    samples = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and {"prompt", "response", "strict-match", "gold"} <= samples[0].keys()

    calls.clear()
    evaluate_math("gsm8k", str(run_dir), None, _settings(), Console(file=io.StringIO()))
    assert calls == []  # a finished evaluation reruns from its cache


def test_batched_generation_equals_one_at_a_time() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY).eval()
    prompts = [
        "Question: Mara has 3 kites and buys 4 more. How many kites?\nAnswer:",
        "Q: 2 + 2?\nA:",
        "Tell me about the capital of the made-up country in two sentences, please, as you were taught.",
        "Hi",
    ]
    settings = GenerationSettings(max_new_tokens=16, batch_size=4, stop=("Q:",))
    batched = generate_batch(model, tokenizer, prompts, settings)
    single = [generate_batch(model, tokenizer, [p], settings)[0] for p in prompts]
    assert batched == single
    assert any(len(r.strip()) > 0 for r in batched)


def test_batched_generation_equals_one_at_a_time_on_the_tiny_llava() -> None:
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(REPO / "data" / "tiny-llava")
    model = LlavaForConditionalGeneration.from_pretrained(REPO / "data" / "tiny-llava").eval()
    questions = ["What is in the picture?", "Describe it.", "Which colour is the square in this drawing?"]
    colours = ["red", "blue", "green"]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in questions
    ]
    images = [Image.new("RGB", (32, 32), c) for c in colours]
    settings = GenerationSettings(max_new_tokens=12, batch_size=3)
    batched = generate_batch(model, processor, prompts, settings, images)
    single = [
        generate_batch(model, processor, [p], settings, [i])[0] for p, i in zip(prompts, images, strict=True)
    ]
    assert batched == single
    assert any(r.strip() for r in batched)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["limit=6"], "data.path: gsm8k data is not bundled"),
        (["data.path=/nonexistent/test.jsonl"], "does not exist"),
        ([f"data.path={GSM8K}", "variant=cot"], "variant: 'cot' is not one of"),
        ([f"data.path={GSM8K}", "lmit=3"], "eval: lmit"),
        ([f"data.path={GSM8K}", "--adapter", "/nonexistent/adapter"], "not a PEFT adapter folder"),
    ],
)
def test_bad_eval_inputs_fail_in_one_line(args: list[str], message: str, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from fedalign.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["eval", "gsm8k", str(TINY), *args])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and message in " ".join(result.output.split()), result.output
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_missing_model_fails_before_anything_is_written(tmp_path, monkeypatch) -> None:
    from fedalign.errors import ModelError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="not a model folder"):
        evaluate_math("gsm8k", str(tmp_path / "nope"), None, _settings(), Console(file=io.StringIO()))
    assert list(tmp_path.iterdir()) == []


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens_as_lm_eval_does() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY).eval()
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    long = "The capital of Montaland is Dakqui. " * 40 + "Q: Where does Mara live?\nA:"
    ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    limit = model.config.max_position_embeddings - settings.max_new_tokens
    assert len(ids) > limit
    kept = torch.tensor([ids[-limit:]])
    expected = model.generate(kept, attention_mask=torch.ones_like(kept), max_new_tokens=8, do_sample=False)
    want = tokenizer.decode(expected[0, limit:], skip_special_tokens=True)
    assert generate_batch(model, tokenizer, [long, "Q: Hi\nA:"], settings)[0] == want


def test_a_torn_cache_line_is_dropped_and_the_next_answer_survives(tmp_path) -> None:
    from fedalign.evaluation.generation import ResponseCache

    path = tmp_path / "responses.jsonl"
    path.write_text('{"key": "a", "response": "1"}\n{"key": "b", "resp')  # killed mid-line
    cache = ResponseCache(path)
    assert cache.entries == {"a": "1"}
    cache.add([("c", "3")])
    assert ResponseCache(path).entries == {"a": "1", "c": "3"}


def test_run_adapters_and_recipes_that_cannot_be_evaluated_as_given_fail_in_one_line(
    run_dir, tmp_path
) -> None:
    import shutil

    from fedalign.errors import ModelError
    from fedalign.evaluation.checkpoint import resolve

    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    (adapter / "residual_base.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="give the run directory as TARGET"):
        resolve(str(TINY), str(adapter))
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("eval", "checkpoints", "clients"))
    (broken / "recipe.yaml").write_text("model: [unclosed")
    with pytest.raises(ModelError, match="not a readable fedalign recipe"):
        resolve(str(broken))


def test_a_retrained_adapter_in_the_same_folder_is_not_answered_from_the_cache(run_dir, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from fedalign.evaluation.checkpoint import resolve

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval"))
    before = resolve(str(copy))[1].id
    weights = copy / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 1 for k, v in tensors.items()}, weights)
    assert resolve(str(copy))[1].id != before
    assert resolve(str(copy))[0].id == resolve(str(run_dir))[0].id  # the base is the same base
