"""``fedalign eval gsm8k`` and ``fedalign eval gsmhard``: generate on each checkpoint, score with the
benchmark's ``evaluate`` module logic (:mod:`evaluators.gsm8k`), write the output folder, print a table.

The folder (``<run>/eval/<benchmark>-<variant>/`` for a run directory, else ``out=``) holds
``responses.jsonl`` (the per-sample cache), ``samples.jsonl`` (prompt, response, extracted answers, gold,
correct, per checkpoint), ``metrics.json`` and ``<benchmark>.png`` (base vs tuned).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from evaluators.gsm8k import task
from evaluators.gsm8k.extraction import aggregate
from evaluators.gsm8k.extraction import score as score_gsm8k
from evaluators.gsmhard.gsmhard import score as score_gsmhard
from fedalign.errors import DataError, RecipeError
from fedalign.evaluation.checkpoint import Checkpoint, is_run_dir, resolve
from fedalign.evaluation.generation import GenerationSettings, ResponseCache, generate_all
from fedalign.evaluation.settings import parse_settings
from fedalign.models.loading import resolve_device

FIELDS = {"gsm8k": ("question", "answer"), "gsmhard": ("input", "target")}
HEADLINE = {"gsm8k": "exact_match", "gsmhard": "accuracy"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Section):
    path: str | None = Field(default=None, description="local JSONL: GSM8K test.jsonl or gsmhardv2.jsonl")
    train_path: str | None = Field(default=None, description="GSM8K train.jsonl (the 5-shot gsm8k variant)")


class MathEvalSettings(_Section):
    data: DataSettings = Field(default_factory=DataSettings)
    variant: str = task.spec()["default_variant"]
    shots: int | None = Field(default=None, ge=0, description="fewer shots than the variant's own")
    mode: Literal["faithful", "corrected"] = "faithful"
    template: Literal["raw", "chat"] = Field(
        default="raw", description="raw: lm-eval's prompt text (comparable); chat: inside the chat template"
    )
    limit: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1)
    device: str = "auto"
    out: str | None = None


def parse_overrides(overrides: list[str]) -> MathEvalSettings:
    """``key=value`` pairs into validated settings, one line per problem (the variant among bench.yaml's)."""
    settings = parse_settings(overrides, MathEvalSettings)
    if settings.variant not in task.spec()["variants"]:
        raise RecipeError(
            f"eval: variant: {settings.variant!r} is not one of {', '.join(task.spec()['variants'])}"
        )
    return settings


def load_rows(path: str | None, benchmark: str, key: str = "data.path") -> list[dict[str, Any]]:
    """The benchmark's rows from a local JSONL file; a bad row is one line naming the file and row."""
    if path is None:
        source = {
            ("gsm8k", "data.path"): "openai/grade-school-math's test.jsonl",
            ("gsm8k", "data.train_path"): "openai/grade-school-math's train.jsonl (the 5-shot gsm8k shots)",
            ("gsmhard", "data.path"): "PAL's gsmhardv2.jsonl",
        }[(benchmark, key)]
        raise DataError(f"{key}: {benchmark} data is not bundled; point {key} at {source}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{key}: {path!r} does not exist")
    question, gold = FIELDS[benchmark]
    rows = []
    for number, raw in enumerate(file.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}: row {number}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}: row {number}: not valid JSON") from None
        if not isinstance(row, dict) or question not in row or gold not in row:
            raise DataError(f"{path}: row {number}: needs the fields {question!r} and {gold!r}")
        if benchmark == "gsmhard" and not _is_number(row[gold]):
            raise DataError(f"{path}: row {number}: {gold!r} must be a number, got {row[gold]!r}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _prompts(settings: MathEvalSettings, docs: list[dict[str, Any]]) -> list[str]:
    """The benchmark's own prompt text for every document (the chat template, if any, is per checkpoint)."""
    spec = task.variant_spec(settings.variant)
    needs_train = spec.get("fewshot") == "random_train" and settings.shots != 0
    train = load_rows(settings.data.train_path, "gsm8k", "data.train_path") if needs_train else []
    try:
        return task.prompts(docs, settings.variant, train, settings.shots)
    except ValueError as error:
        raise RecipeError(f"eval: {error}") from None


def default_folder(target: str, adapter: str | None, benchmark: str, settings: MathEvalSettings) -> Path:
    if settings.out is not None:
        return Path(settings.out).expanduser()
    name = f"{benchmark}-{settings.variant}" + ("-chat" if settings.template == "chat" else "")
    path = Path(target).expanduser()
    if is_run_dir(path):
        return path / "eval" / name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", target.strip("/"))[-40:]
    which = hashlib.sha256(f"{Path(target).resolve()}|{adapter and Path(adapter).resolve()}".encode())
    return Path("evals") / f"{name}-{slug}-{which.hexdigest()[:8]}"


def evaluate_math(
    benchmark: str,
    target: str,
    adapter: str | None,
    settings: MathEvalSettings,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate every checkpoint of ``target`` on ``benchmark``; returns what ``metrics.json`` holds."""
    console = console or Console()
    checkpoints = resolve(target, adapter)
    docs = load_rows(settings.data.path, benchmark)[: settings.limit]
    question, gold_field = FIELDS[benchmark]
    try:
        device = resolve_device(settings.device)
    except RuntimeError as error:
        raise RecipeError(f"eval: device: {settings.device!r} is not a device ({error})") from None
    raw_prompts = _prompts(settings, [{"question": d[question]} for d in docs])  # checked before any write
    folder = default_folder(target, adapter, benchmark, settings)
    cache = ResponseCache(folder / "responses.jsonl")
    stop = tuple(task.stop_sequences(settings.variant))
    generation = GenerationSettings(settings.max_new_tokens, settings.batch_size, stop)
    results, samples = [], []
    for checkpoint in checkpoints:
        prompts = raw_prompts if settings.template == "raw" else _in_chat_template(checkpoint, raw_prompts)
        responses, stats = generate_all(
            prompts,
            generation,
            cache,
            checkpoint.id,
            lambda c=checkpoint: c.load(device),
            console,
            checkpoint.label,
        )
        rows = []
        for index, (doc, prompt, response) in enumerate(zip(docs, prompts, responses, strict=True)):
            if benchmark == "gsm8k":
                gold = task.reference(doc, settings.variant)
                scored = score_gsm8k(response, gold, settings.variant, settings.mode)
            else:
                gold = float(doc[gold_field])
                scored = score_gsmhard(response, gold, settings.variant, settings.mode)
            rows.append(scored)
            samples.append(
                {"checkpoint": checkpoint.label, "sample": index, "prompt": prompt, "response": response}
                | {"gold": gold, **scored}
            )
        results.append({**checkpoint.describe(), "metrics": aggregate(rows), "generation_stats": stats})
    metrics = _metrics(benchmark, settings, generation, docs, results)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _plot(benchmark, results, folder / f"{benchmark}.png")
    _print_table(console, benchmark, results, folder)
    return metrics


def _in_chat_template(checkpoint: Checkpoint, prompts: list[str]) -> list[str]:
    """Each prompt as the user turn of the checkpoint's chat template (what the run trained with)."""
    from fedalign.models.loading import load_tokenizer

    tokenizer = load_tokenizer(checkpoint.model)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        for text in prompts
    ]


def _metrics(benchmark, settings, generation, docs, results) -> dict[str, Any]:
    versions = {}
    for name in ("fedalign", "torch", "transformers", "peft", "evaluate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    lm_eval_task = settings.variant in ("gsm8k", "gsm8k_cot", "gsm8k_cot_zeroshot")
    comparable = (
        "comparable to lm-evaluation-harness's exact_match for the same model, prompt and decoding"
        if benchmark == "gsm8k" and settings.template == "raw" and lm_eval_task
        else "not comparable to lm-evaluation-harness numbers (a chat template, a variant or benchmark "
        "lm-eval does not have)"
    )
    return {
        "benchmark": benchmark,
        "variant": settings.variant,
        "shots": settings.shots
        if settings.shots is not None
        else task.variant_spec(settings.variant).get("num_fewshot", 0),
        "mode": settings.mode,
        "template": settings.template,
        "template_sha256": task.template_hash(settings.variant),
        "data": {"path": settings.data.path, "samples": len(docs)},
        "generation": {**asdict(generation), "stop": list(generation.stop)},
        "checkpoints": results,
        "comparable": comparable,
        "versions": versions,
    }


def _print_table(console: Console, benchmark: str, results: list[dict[str, Any]], folder: Path) -> None:
    table = Table(title=f"{benchmark} ({results[0]['metrics']['samples']} samples)", show_edge=False)
    table.add_column("metric")
    for result in results:
        table.add_column(result["label"], justify="right")
    for key in results[0]["metrics"]:
        if key == "samples":
            continue
        values = [r["metrics"][key] for r in results]
        table.add_row(key, *(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values))
    console.print(table)
    console.print(f"written to {folder}")


def _plot(benchmark: str, results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    keys = [k for k, v in results[0]["metrics"].items() if isinstance(v, float)]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    width = 0.8 / len(results)
    for offset, result in enumerate(results):
        xs = [i + offset * width for i in range(len(keys))]
        ax.bar(xs, [result["metrics"][k] for k in keys], width, label=result["label"])
    ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels([k.replace(",", "\n") for k in keys], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(HEADLINE[benchmark])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
