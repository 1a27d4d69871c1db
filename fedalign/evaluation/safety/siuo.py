"""SIUO: ``samples`` sampled responses per question (upstream draws n=3), each judged for safety and for
effectiveness with the image; per-question majority; safe, effective and safe&effective rates × 100. The
multiple-choice part (``siuo_mcqa.json``) is greedy, 5 new tokens, parsed by upstream's letter parser with
a seeded fallback, and needs no judge.

Data (evaluators.md §4.1): ``siuo_gen.json``, ``siuo_mcqa.json`` and the images under ``images/`` (the
``SIUO-images.zip`` unpacked there) in one folder. Keyword proxy: ``effective_kw_upper`` (not refused: an
upper bound, since the judge rates any non-refusal it finds useless as ineffective too) and
``safe_proxy_kw`` (refused, or a safety cue); SIUO's "safe" is not refusal, so no keyword measures it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from evaluators.refusal.keywords import SAFETY_CUE_PATTERNS, classifier, matches_any
from evaluators.siuo.scoring import (
    aggregate,
    extract_effectiveness,
    extract_safety,
    mcqa_prompt,
    parse_choice,
    question_scores,
)
from evaluators.siuo.templates import (
    EFFECTIVE_PROMPT,
    EMPTY_RESPONSE_VERDICT,
    JUDGE_MAX_TOKENS,
    SAFETY_PROMPT,
    TEMPLATE_SHA256,
)
from fedalign.errors import DataError
from fedalign.evaluation.judges import JudgeRequest, render
from fedalign.evaluation.safety.common import SafetySettings, Sample, checked_image, nonempty

NAME = "siuo"
GEN_FIELDS = ("question_id", "image", "question", "category", "safety_warning", "reference_answer")
MCQA_FIELDS = ("question_id", "image", "question", "category", "options", "correct_option")


def _items(path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(
            f"data.path: {path} is missing (SIUO's data folder holds siuo_gen.json and siuo_mcqa.json)"
        )
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a JSON file ({type(error).__name__})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list of items")
    for number, item in enumerate(items):
        missing = [f for f in fields if not isinstance(item, dict) or f not in item]
        if missing:
            raise DataError(f"{path}: item {number}: needs the field {missing[0]!r}")
    return items


def _image(root: Path, name: str, where: str) -> bytes:
    path = root / "images" / name
    if not path.is_file():
        raise DataError(f"{where}: image {path} is missing (unpack SIUO-images.zip to {root / 'images'})")
    return checked_image(path.read_bytes(), f"{where}: {path}")


def load(root: Path, settings: SafetySettings) -> tuple[list[Sample], list[Sample]]:
    """(generation samples, multiple-choice samples)."""
    gen = _items(root / "siuo_gen.json", GEN_FIELDS)[: settings.limit]
    mcqa = _items(root / "siuo_mcqa.json", MCQA_FIELDS)[: settings.limit]
    samples = [
        Sample(
            str(i["question_id"]),
            str(i["category"]),
            str(i["question"]),
            _image(root, str(i["image"]), f"siuo_gen.json {i['question_id']}"),
            dict(i),
        )
        for i in gen
    ]
    choices = []
    for item in mcqa:
        options = item["options"]
        correct = item["correct_option"]
        if not isinstance(options, dict) or not isinstance(correct, str) or correct not in options:
            raise DataError(
                f"siuo_mcqa.json {item['question_id']}: options must map letters to text and hold "
                "correct_option"
            )
        image = _image(root, str(item["image"]), f"siuo_mcqa.json {item['question_id']}")
        text = mcqa_prompt(str(item["question"]), options)
        choices.append(Sample(str(item["question_id"]), str(item["category"]), text, image, dict(item)))
    return nonempty(samples, "siuo_gen.json"), nonempty(choices, "siuo_mcqa.json")


def judge_requests(sample: Sample, response: str, images: bool) -> tuple[JudgeRequest | None, JudgeRequest]:
    """(safety request, or None for an empty response, which upstream scores safe without asking; the
    effectiveness request)."""
    attached = (sample.image,) if images and sample.image else ()
    slots = {
        "question": sample.text,
        "explanation": str(sample.meta["safety_warning"]),
        "response": response,
        "reference": str(sample.meta["reference_answer"]),
    }
    safety = None
    if response:
        safety = JudgeRequest(render(SAFETY_PROMPT, slots), attached, max_tokens=JUDGE_MAX_TOKENS)
    effective = JudgeRequest(
        render(EFFECTIVE_PROMPT, {"question": sample.text, "response": response}),
        attached,
        max_tokens=JUDGE_MAX_TOKENS,
    )
    return safety, effective


def safety_score(text: str | None, mode: str) -> int | None:
    """None for a judge error (never a vote); the empty-response verdict parses as upstream's."""
    return None if text is None else extract_safety(text, mode)


def effective_score(text: str | None, mode: str) -> int | None:
    return None if text is None else extract_effectiveness(text, mode)


EMPTY_VERDICT = EMPTY_RESPONSE_VERDICT


def score_generation(
    samples: list[Sample], per_response: list[list[tuple[int | None, int | None]]], mode: str
):
    rows = []
    for sample, scores in zip(samples, per_response, strict=True):
        safety = [s for s, _ in scores]
        effective = [e for _, e in scores]
        rows.append({"category": sample.subset, **question_scores(safety, effective, mode)})
    return aggregate(rows), rows


def keyword_scores(samples: list[Sample], responses: list[list[str]], settings: SafetySettings):
    words = classifier(settings.keywords, settings.keywords_extra)
    rows = []
    for sample, answers in zip(samples, responses, strict=True):
        refused = [words.refused(a) for a in answers]
        effective = [0 if r else 1 for r in refused]
        safe = [
            1 if r or matches_any(SAFETY_CUE_PATTERNS, a) else 0
            for r, a in zip(refused, answers, strict=True)
        ]
        rows.append(
            {
                "category": sample.subset,
                "effective_kw_upper": max(set(effective), key=effective.count),
                "safe_proxy_kw": max(set(safe), key=safe.count),
            }
        )
    return aggregate(rows, keys=("effective_kw_upper", "safe_proxy_kw")), rows


def score_mcqa(choices: list[Sample], responses: list[str], seed: int) -> tuple[dict[str, Any], list[dict]]:
    rng = random.Random(seed)
    rows = []
    for sample, response in zip(choices, responses, strict=True):
        letters = tuple(sample.meta["options"])
        predicted, fallback = parse_choice(response, rng, letters)
        rows.append(
            {
                "sample_id": sample.sample_id,
                "response": response,
                "predicted": predicted,
                "correct": predicted == sample.meta["correct_option"],
                "random_fallback": fallback,
            }
        )
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")
    return {
        "mcqa_accuracy": 100 * accuracy,
        "mcqa_n": len(rows),
        "n_random_fallback": sum(r["random_fallback"] for r in rows),
    }, rows


TEMPLATES = {k: TEMPLATE_SHA256[k] for k in ("safety", "effective", "safety_regex", "mcqa")}
