"""``fedalign eval <benchmark>`` and ``fedalign eval safety``: generate on each checkpoint, judge, score,
write ``<folder>/<judge>-<mode>/{metrics.json, samples.jsonl, *.png}``, print a table.

One function per benchmark turns a :class:`Context` into per-checkpoint metrics and per-sample records;
:func:`evaluate` runs any of them; :func:`evaluate_suite` runs all on one checkpoint (a run directory: base
and tuned side by side) and ends with one table and the plots.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from evaluators.beavertailsv.scoring import keyword_calibration, preferred_response
from evaluators.siuo.templates import MCQA_MAX_TOKENS
from fedalign.errors import DataError, ModelError, RecipeError
from fedalign.evaluation.checkpoint import Checkpoint, resolve
from fedalign.evaluation.generation import GenerationSettings, ResponseCache
from fedalign.evaluation.judges import CachedJudge, JudgeReply
from fedalign.evaluation.safety import mmsafetybench, pairwise, siuo
from fedalign.evaluation.safety.common import (
    SafetySettings,
    Sample,
    build_judge,
    comparability,
    data_root,
    default_folder,
    generate,
    judge_record,
    judge_requests,
    judge_slug,
    nonempty,
    proxy_names,
    versions,
    write_results,
)
from fedalign.models.loading import resolve_device

BENCHMARKS = ("mm-safetybench", "siuo", "beavertails-v", "spa-vl", "benign")


@dataclass
class Context:
    benchmark: str
    checkpoints: list[Checkpoint]
    judge: CachedJudge | None
    settings: SafetySettings
    folder: Path
    console: Console
    device: torch.device
    data: Path
    fixture: bool

    @property
    def greedy(self) -> GenerationSettings:
        return GenerationSettings(
            self.settings.max_new_tokens, self.settings.batch_size, seed=self.settings.seed
        )

    @property
    def images(self) -> bool:
        """Whether the judge gets the benchmark's images: asked for, and a judge that can see them."""
        return self.judge is not None and self.settings.judge.images and self.judge.supports_images

    def cache(self) -> ResponseCache:
        return ResponseCache(self.folder / "responses.jsonl")

    def answers(
        self, samples: list[Sample], checkpoint: Checkpoint, settings=None, n=1, label=""
    ) -> list[list[str]]:
        return generate(
            samples,
            checkpoint,
            settings or self.greedy,
            self.cache(),
            self.device,
            self.console,
            n,
            label or f"{self.benchmark}: generating",
        )

    def judged(self, requests, label: str) -> list[JudgeReply]:
        assert self.judge is not None
        return judge_requests(requests, self.judge, self.settings, self.console, f"{self.benchmark}: {label}")

    def reference_checkpoint(self) -> Checkpoint:
        """The model before fine-tuning: a run's base, or the base model under ``--adapter``."""
        tuned = self.checkpoints[-1]
        if tuned.adapter is None:
            raise ModelError(
                f"{self.benchmark}: win rates compare a fine-tuned model with its base; give a run "
                "directory, "
                "a base model with --adapter, or reference=<folder with the reference answers>"
            )
        return Checkpoint("base", tuned.model)


Result = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # per checkpoint metrics, per sample records


def _labels(ctx: Context, texts: list[str | None], parse: Callable[[str, str], str]) -> list[str]:
    return ["error" if t is None else parse(t, ctx.settings.mode) for t in texts]


def run_mmsafetybench(ctx: Context) -> Result:
    samples = mmsafetybench.load(ctx.data, ctx.settings)
    results, records = [], []
    for checkpoint in ctx.checkpoints:
        responses = [r[0] for r in ctx.answers(samples, checkpoint)]
        if ctx.judge is None:
            labels = [
                mmsafetybench.keyword_label(s, r, ctx.settings)
                for s, r in zip(samples, responses, strict=True)
            ]
            replies: list[JudgeReply] = []
        else:
            replies = ctx.judged(
                [mmsafetybench.judge_request(s, r) for s, r in zip(samples, responses, strict=True)],
                checkpoint.label,
            )
            labels = _labels(ctx, [r.text for r in replies], mmsafetybench.parse)
        metrics = mmsafetybench.score(samples, labels)
        results.append(_checkpoint_result(ctx, checkpoint, metrics, replies))
        records += [
            {
                "checkpoint": checkpoint.label,
                "sample_id": s.sample_id,
                "prompt": s.text,
                "response": r,
                "judge_reply": rep.text if rep else None,
                "judge_error": rep.error if rep else None,
                "label": lab,
            }
            for s, r, lab, rep in zip(
                samples, responses, labels, replies or [None] * len(samples), strict=True
            )
        ]
    return results, records


def run_siuo(ctx: Context) -> Result:
    samples, choices = siuo.load(ctx.data, ctx.settings)
    sampled = GenerationSettings(
        ctx.settings.max_new_tokens,
        ctx.settings.batch_size,
        do_sample=True,
        seed=ctx.settings.seed,
        temperature=ctx.settings.temperature,
    )
    mcqa = GenerationSettings(MCQA_MAX_TOKENS, ctx.settings.batch_size, seed=ctx.settings.seed)
    results, records = [], []
    for checkpoint in ctx.checkpoints:
        n = ctx.settings.samples
        responses = ctx.answers(samples, checkpoint, sampled, n, "siuo: generating")
        choice_answers = [r[0] for r in ctx.answers(choices, checkpoint, mcqa, 1, "siuo: multiple choice")]
        mcqa_metrics, mcqa_rows = siuo.score_mcqa(choices, choice_answers, ctx.settings.seed)
        replies: list[JudgeReply] = []
        if ctx.judge is None:
            metrics, rows = siuo.keyword_scores(samples, responses, ctx.settings)
        else:
            pairs = [
                siuo.judge_requests(s, a, ctx.images)
                for s, ans in zip(samples, responses, strict=True)
                for a in ans
            ]
            asked = [p for pair in pairs for p in pair if p is not None]
            replies = ctx.judged(asked, checkpoint.label)
            by_request = iter(replies)
            per_response, traces = [], []
            for safety_request, _ in pairs:
                safety = None if safety_request is None else next(by_request)
                effective = next(by_request)
                safety_text = siuo.EMPTY_VERDICT if safety is None else safety.text
                scores = (
                    siuo.safety_score(safety_text, ctx.settings.mode),
                    siuo.effective_score(effective.text, ctx.settings.mode),
                )
                per_response.append(scores)
                traces.append(
                    {
                        "safety_reply": safety_text,
                        "safety_score": scores[0],
                        "effective_reply": effective.text,
                    }
                    | {
                        "effective_score": scores[1],
                        "errors": [r.error for r in (safety, effective) if r and r.error],
                    }
                )
            grouped = [per_response[i * n : (i + 1) * n] for i in range(len(samples))]
            metrics, rows = siuo.score_generation(samples, grouped, ctx.settings.mode)
            # every reply that parsed to no verdict, counted once per reply (either mode)
            metrics["unknown_replies"] = sum(score == -1 for pair in per_response for score in pair)
            for row, start in zip(rows, range(0, len(traces), n), strict=True):
                row["judged"] = traces[start : start + n]
        metrics = {
            **metrics,
            **mcqa_metrics,
            "samples_per_question": n,
            "image_withheld": ctx.judge is not None and not ctx.images,
        }
        results.append(_checkpoint_result(ctx, checkpoint, metrics, replies))
        records += [
            {
                "checkpoint": checkpoint.label,
                "sample_id": s.sample_id,
                "prompt": s.text,
                "responses": ans,
                **row,
            }
            for s, ans, row in zip(samples, responses, rows, strict=True)
        ] + [{"checkpoint": checkpoint.label, "mcqa": True, **row} for row in mcqa_rows]
    return results, records


def _references(ctx: Context, samples: list[Sample], split: str | None) -> tuple[list[str], str]:
    """The reference answers and what gave them. The base model's are also written to
    ``reference-<digest>.jsonl`` (the digest names the base checkpoint and the decoding): a versioned
    artefact a later evaluation of another fine-tune can be compared against."""
    if ctx.settings.reference != "base":
        folder = Path(ctx.settings.reference).expanduser()
        if split is None:
            raise RecipeError("reference: BeaverTails-V's reference is the base model (reference=base)")
        return pairwise.reference_answers(folder, split, samples, ctx.settings.mode), f"file:{folder}"
    reference = ctx.reference_checkpoint()
    answers = [r[0] for r in ctx.answers(samples, reference, label=f"{ctx.benchmark}: reference")]
    material = f"{reference.id}|{ctx.greedy.key()}|{ctx.data.resolve()}|{ctx.settings.limit}"
    version = hashlib.sha256(material.encode()).hexdigest()[:12]
    artefact = ctx.folder / f"reference-{version}{'-' + split if split else ''}.jsonl"
    rows = [
        {"reference": reference.id, "generation": ctx.greedy.key(), "sample_id": s.sample_id}
        | {"prompt": s.text, "response": a}
        for s, a in zip(samples, answers, strict=True)
    ]
    artefact.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return answers, f"{reference.id} ({artefact.name})"


def _pairwise(
    ctx: Context,
    samples: list[Sample],
    policy: list[str],
    reference: list[str],
    kinds,
    both: bool,
    image: bool,
):
    """{kind: (per-item outcomes, replies)} for the policy against the reference."""
    from evaluators.spavl.scoring import pairwise_metrics

    out = {}
    for kind, subset in kinds:
        chosen = [i for i, s in enumerate(samples) if subset is None or s.subset == subset]
        asked = [pairwise.requests(samples[i], policy[i], reference[i], kind, both, image) for i in chosen]
        flat = [req for item in asked for req, _ in item]
        replies = ctx.judged(flat, f"{kind} judge")
        positions = [pos for item in asked for _, pos in item]
        results = pairwise.outcomes([r.text for r in replies], positions, kind)
        width = 2 if both else 1
        items = [results[k * width : (k + 1) * width] for k in range(len(chosen))]
        out[kind] = (pairwise_metrics(items), items, replies, chosen)
    return out


def run_beavertails(ctx: Context) -> Result:
    samples = pairwise.load_beavertails(ctx.data, ctx.settings.limit)
    tuned = ctx.checkpoints[-1]
    policy = [r[0] for r in ctx.answers(samples, tuned)]
    reference, reference_id = _references(ctx, samples, None)
    metrics: dict[str, Any] = {"reference": reference_id, "position_swap": True}
    records = [
        {"checkpoint": tuned.label, "sample_id": s.sample_id, "prompt": s.text, "response": p, "reference": r}
        for s, p, r in zip(samples, policy, reference, strict=True)
    ]
    replies: list[JudgeReply] = []
    if ctx.judge is None:
        from evaluators.refusal.keywords import classifier

        words = classifier(ctx.settings.keywords, ctx.settings.keywords_extra)
        refused_policy = [words.refused(p) for p in policy]
        refused_reference = [words.refused(r) for r in reference]
        n = len(samples)
        metrics |= {
            "refusal_rate_kw": sum(refused_policy) / n,
            "reference_refusal_rate_kw": sum(refused_reference) / n,
            "harmless_proxy_kw": (sum(refused_policy) - sum(refused_reference)) / n,
            "keyword_wins": sum(p and not r for p, r in zip(refused_policy, refused_reference, strict=True)),
            "keyword_losses": sum(
                r and not p for p, r in zip(refused_policy, refused_reference, strict=True)
            ),
        }
        metrics["keyword_calibration"] = keyword_calibration([s.meta for s in samples], words.refused)
    else:
        judged = _pairwise(
            ctx, samples, policy, reference, [("harm", None), ("help", None)], True, ctx.images
        )
        for kind, (kind_metrics, items, kind_replies, _) in judged.items():
            name = "harmlessness" if kind == "harm" else "helpfulness"
            metrics[name] = kind_metrics
            replies += kind_replies
            for record, item in zip(records, items, strict=True):
                record[f"{name}_outcomes"] = item
        if ctx.settings.sanity_check:
            metrics["judge_sanity"], sanity_replies = _sanity(ctx, samples)
            replies += sanity_replies
    return [_checkpoint_result(ctx, tuned, metrics, replies)], records


def _sanity(ctx: Context, samples: list[Sample]) -> tuple[dict[str, Any], list[JudgeReply]]:
    from evaluators.spavl.scoring import agreement

    report, all_replies = {}, []
    for kind, label_key in (("harm", "safer_response_id"), ("help", "more_helpful_response_id")):
        asked = [pairwise.sanity_requests(s, kind, ctx.images) for s in samples]
        replies = ctx.judged([r for item in asked for r, _ in item], f"sanity {kind}")
        all_replies += replies
        results = pairwise.outcomes([r.text for r in replies], [p for item in asked for _, p in item], kind)
        predictions = [preferred_response(results[2 * k : 2 * k + 2]) for k in range(len(samples))]
        report[label_key] = agreement(
            {"predicted": p, "label": str(s.meta[label_key])}
            for p, s in zip(predictions, samples, strict=True)
        )
    return report, all_replies


def run_spavl(ctx: Context) -> Result:
    both = ctx.settings.mode == "corrected"
    tuned = ctx.checkpoints[-1]
    metrics: dict[str, Any] = {"position_swap": both}
    records, replies = [], []
    for split in ("harm", "help"):
        samples = pairwise.load_spavl(ctx.data, split, ctx.settings.limit)
        policy = [r[0] for r in ctx.answers(samples, tuned)]
        reference, reference_id = _references(ctx, samples, split)
        metrics["reference"] = reference_id
        split_records = [
            {
                "checkpoint": tuned.label,
                "split": split,
                "sample_id": s.sample_id,
                "prompt": s.text,
                "response": p,
                "reference": r,
            }
            for s, p, r in zip(samples, policy, reference, strict=True)
        ]
        if ctx.judge is None:
            from evaluators.refusal.keywords import classifier

            words = classifier(ctx.settings.keywords, ctx.settings.keywords_extra)
            metrics[f"{split}_refusal_rate_kw"] = sum(map(words.refused, policy)) / len(policy)
            metrics[f"{split}_reference_refusal_rate_kw"] = sum(map(words.refused, reference)) / len(
                reference
            )
        else:
            # the judge is sent text only, as upstream (the prompt mentions an image it never gets)
            kind_metrics, items, kind_replies, _ = _pairwise(
                ctx, samples, policy, reference, [(split, None)], both, False
            )[split]
            replies += kind_replies
            key = "harm_eval" if split == "harm" else "help_eval"
            metrics[key] = kind_metrics
            metrics[f"{key}_headline"] = (
                {"harm_score": kind_metrics["harm_score_first_order"], "lower_is_better": True}
                if split == "harm"
                else {"win_rate": kind_metrics["help_win_rate_first_order"]}
            )
            for record, item in zip(split_records, items, strict=True):
                record["outcomes"] = item
        records += split_records
    return [_checkpoint_result(ctx, tuned, metrics, replies)], records


def run_benign(ctx: Context) -> Result:
    """The over-refusal control: requests any model should answer; the share refused (keywords)."""
    from evaluators.refusal.keywords import classifier

    files = sorted(ctx.data.rglob("*.parquet")) if ctx.data.is_dir() else [ctx.data]
    samples = []
    for file in files:
        for number, row in enumerate(pairwise._rows(file)):
            where = f"{file} row {number}"
            if "question" not in row:
                raise DataError(f"{where}: needs the field 'question' (and optionally 'image')")
            image = pairwise._image(row["image"], file.parent, where) if row.get("image") else None
            samples.append(Sample(f"benign/{len(samples)}", "benign", str(row["question"]), image))
    samples = nonempty(samples[: ctx.settings.limit] if ctx.settings.limit else samples, str(ctx.data))
    words = classifier(ctx.settings.keywords, ctx.settings.keywords_extra)
    results, records = [], []
    for checkpoint in ctx.checkpoints:
        responses = [r[0] for r in ctx.answers(samples, checkpoint)]
        refused = [words.refused(r) for r in responses]
        metrics = {"over_refusal_rate_kw": sum(refused) / len(refused), "n": len(refused)}
        results.append(_checkpoint_result(ctx, checkpoint, metrics, []))
        records += [
            {
                "checkpoint": checkpoint.label,
                "sample_id": s.sample_id,
                "prompt": s.text,
                "response": r,
                "refused_kw": f,
            }
            for s, r, f in zip(samples, responses, refused, strict=True)
        ]
    return results, records


RUNNERS: dict[str, Callable[[Context], Result]] = {
    "mm-safetybench": run_mmsafetybench,
    "siuo": run_siuo,
    "beavertails-v": run_beavertails,
    "spa-vl": run_spavl,
    "benign": run_benign,
}
TEMPLATES = {
    "mm-safetybench": "mmsb",
    "siuo": siuo.TEMPLATES,
    "beavertails-v": pairwise.TEMPLATES,
    "spa-vl": pairwise.TEMPLATES,
    "benign": {},
}


def _checkpoint_result(
    ctx: Context, checkpoint: Checkpoint, metrics: dict[str, Any], replies: list[JudgeReply]
):
    unknown = _count_unknown(metrics)
    return {
        **checkpoint.describe(),
        "metrics": proxy_names(metrics) if ctx.judge is None else metrics,
        "judge_requests": len(replies),
        "judge_errors": sum(r.status != "ok" for r in replies),
        "unknown_verdicts": unknown,
        "_replies": replies,
    }


def _count_unknown(metrics: dict[str, Any]) -> int:
    """Replies that parsed to no verdict, counted once each: ``unknown_count`` (MM-SafetyBench, the
    pairwise benchmarks, where each judged order is one reply) and ``unknown_replies`` (SIUO); not again
    in the per-scenario or per-category breakdowns. The sanity check's own count is in its report."""
    total = 0
    for key, value in metrics.items():
        if isinstance(value, dict) and not key.startswith("per_") and key != "judge_sanity":
            total += _count_unknown(value)
        elif isinstance(value, int) and key in ("unknown_count", "unknown_replies"):
            total += value
    return total


def evaluate(
    benchmark: str,
    target: str,
    adapter: str | None,
    judge_spec: str,
    settings: SafetySettings,
    console: Console | None = None,
    single: bool = True,
    checkpoints: list[Checkpoint] | None = None,
) -> dict[str, Any]:
    """Run one benchmark; returns what its ``metrics.json`` holds."""
    console = console or Console()
    checkpoints = checkpoints or resolve(target, adapter, text_only=False)
    data, fixture = data_root(settings, benchmark, single)
    try:
        device = resolve_device(settings.device)
    except RuntimeError as error:
        raise RecipeError(f"eval: device: {settings.device!r} is not a device ({error})") from None
    folder = default_folder(target, adapter, benchmark, settings)
    judge = None if benchmark == "benign" else build_judge(judge_spec, folder, settings)
    ctx = Context(benchmark, checkpoints, judge, settings, folder, console, device, data, fixture)
    results, records = RUNNERS[benchmark](ctx)
    replies = [r for result in results for r in result.pop("_replies")]
    templates = (
        mmsafetybench.templates_used(mmsafetybench.load(data, settings))
        if benchmark == "mm-safetybench"
        else TEMPLATES[benchmark]
    )
    metrics = {
        "benchmark": benchmark,
        "mode": settings.mode,
        "judge": judge_record(judge, replies, settings),
        "template_sha256": templates,
        "data": {"path": str(data), "synthetic_fixture": fixture},
        "generation": {"max_new_tokens": settings.max_new_tokens, "decoding": "greedy", "seed": settings.seed}
        | (
            {"siuo_samples": settings.samples, "siuo_temperature": settings.temperature}
            if benchmark == "siuo"
            else {}
        ),
        "comparable": comparability(benchmark, judge, fixture, settings),
        "checkpoints": results,
        "errors": sum(r["judge_errors"] for r in results),
        "unknown": sum(r["unknown_verdicts"] for r in results),
        "versions": versions(),
    }
    out = folder / f"{'keyword' if judge is None else judge_slug(judge_spec)}-{settings.mode}"
    write_results(out, metrics, records)
    metrics["_folder"] = str(out)
    if single:
        print_table(console, {benchmark: metrics})
        _warn(console, metrics)
        console.print(f"written to {out}")
    return metrics


def _warn(console: Console, metrics: dict[str, Any]) -> None:
    if metrics["errors"]:
        console.print(
            f"[yellow]{metrics['benchmark']}: {metrics['errors']} judge requests failed (counted as errors, "
            "never as verdicts); rerun the same command to retry only those[/yellow]"
        )
    console.print(f"{metrics['benchmark']}: {metrics['comparable']}", highlight=False)


HEADLINES: dict[str, list[tuple[str, str]]] = {
    "mm-safetybench": [
        ("asr_micro", "ASR (micro)"),
        ("asr_macro", "ASR (macro)"),
        ("asr_judged", "ASR over judged"),
        ("asr_micro_kw", "ASR_kw (micro, proxy)"),
        ("asr_macro_kw", "ASR_kw (macro, proxy)"),
    ],
    "siuo": [
        ("safe", "safe %"),
        ("effective", "effective %"),
        ("safe_effective", "safe & effective %"),
        ("effective_kw_upper", "effective_kw % (upper bound)"),
        ("safe_proxy_kw", "safe_proxy_kw %"),
        ("mcqa_accuracy", "MCQA accuracy %"),
    ],
    "beavertails-v": [
        ("harmlessness.win_rate", "harmlessness win rate"),
        ("helpfulness.win_rate", "helpfulness win rate"),
        ("refusal_rate_kw", "refusal_kw (proxy)"),
        ("reference_refusal_rate_kw", "reference refusal_kw"),
    ],
    "spa-vl": [
        ("harm_eval.harm_score_first_order", "HarmEval harm score (lower better)"),
        ("help_eval.help_win_rate_first_order", "HelpEval win rate"),
        ("harm_eval.win_rate", "HarmEval win rate (both orders)"),
        ("harm_refusal_rate_kw", "harm refusal_kw (proxy)"),
        ("help_refusal_rate_kw", "help refusal_kw (proxy)"),
    ],
    "benign": [("over_refusal_rate_kw", "over-refusal_kw (benign prompts)")],
}


def lookup(metrics: dict[str, Any], dotted: str) -> Any:
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def print_table(console: Console, all_metrics: dict[str, dict[str, Any]]) -> None:
    labels = sorted(
        {r["label"] for m in all_metrics.values() for r in m["checkpoints"]},
        key=["base", "model", "tuned"].index,
    )
    table = Table(title="safety suite", show_edge=False)
    table.add_column("benchmark")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("judge")
    table.add_column("errors/unknown", justify="right")
    for benchmark, metrics in all_metrics.items():
        for key, title in HEADLINES[benchmark]:
            values = {r["label"]: lookup(r["metrics"], key) for r in metrics["checkpoints"]}
            if all(v is None for v in values.values()):
                continue
            cells = [_cell(values.get(label)) for label in labels]
            table.add_row(
                benchmark, title, *cells, metrics["judge"]["id"], f"{metrics['errors']}/{metrics['unknown']}"
            )
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def evaluate_suite(
    target: str,
    adapter: str | None,
    judge_spec: str,
    settings: SafetySettings,
    console: Console | None = None,
) -> dict[str, Any]:
    """Every benchmark on ``target`` (a run directory: base and tuned), one table, the plots."""
    from fedalign.evaluation.safety.plots import plot_suite

    console = console or Console()
    if settings.data.path is not None:
        raise RecipeError(
            "eval safety: data.path names one benchmark's data; use data.mm_safetybench=..., "
            "data.siuo=..., data.beavertails_v=..., data.spa_vl=..., data.benign=..."
        )
    checkpoints = resolve(target, adapter, text_only=False)
    skipped = {}
    if all(c.adapter is None for c in checkpoints):  # checked before anything is generated
        reason = "a single model has no base to compare with (give a run directory or --adapter)"
        skipped["beavertails-v"] = reason
        if settings.reference == "base":
            skipped["spa-vl"] = reason + ", or reference=<folder with base_model_*_QA.json>"
    all_metrics = {}
    for benchmark in BENCHMARKS:
        if benchmark in skipped:
            console.print(f"[yellow]{benchmark}: skipped: {skipped[benchmark]}[/yellow]")
            continue
        console.rule(benchmark)
        all_metrics[benchmark] = evaluate(
            benchmark, target, adapter, judge_spec, settings, console, False, checkpoints
        )
    base = default_folder(target, adapter, "safety", settings)
    folder = base / f"{'keyword' if judge_spec == 'keyword' else judge_slug(judge_spec)}-{settings.mode}"
    summary = {
        "target": target,
        "judge": judge_spec if judge_spec == "keyword" else all_metrics["mm-safetybench"]["judge"]["id"],
        "mode": settings.mode,
        "benchmarks": {
            name: {
                "folder": m.pop("_folder"),
                "comparable": m["comparable"],
                "errors": m["errors"],
                "unknown": m["unknown"],
                "checkpoints": {r["label"]: r["metrics"] for r in m["checkpoints"]},
            }
            for name, m in all_metrics.items()
        },
        "skipped": skipped,
    }
    write_results(folder, summary, [])
    (folder / "samples.jsonl").unlink(missing_ok=True)
    (folder / "metrics.json").replace(folder / "summary.json")
    plots = plot_suite(summary, folder)
    console.rule("safety suite")
    print_table(console, all_metrics)
    for metrics in all_metrics.values():
        _warn(console, metrics)
    console.print(f"written to {folder} (summary.json, {', '.join(p.name for p in plots)})")
    return summary
