"""MM-SafetyBench: load the repo layout, answer every (scenario, question, image type), judge each answer
with its scenario's template (the judge sees the answer only), and report ASR per scenario and image type.

Data (evaluators.md §3.1): ``processed_questions/NN-Scenario.json`` and ``imgs/<scenario>/<SD|SD_TYPO|
TYPO>/<id>.jpg`` (the image zip unpacked beside the questions). SD images go with ``Rephrased
Question(SD)``, the typographic ones with ``Rephrased Question``; ``text_only`` sends ``Question`` alone.
Keyword proxy: GCG refusal keywords for 01-09 and 13, a refusal or a no-certificate disclaimer for the
legal / financial / health scenarios (10-12), reported as ``asr_kw``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evaluators.mmsafetybench.scoring import TEXT_ONLY, aggregate, parse_verdict
from evaluators.mmsafetybench.templates import (
    DISCLAIMER_SCENARIOS,
    SCENARIOS,
    TEMPLATE_SHA256,
    TEMPLATES,
    template_name,
)
from evaluators.refusal.keywords import DISCLAIMER_PATTERNS, classifier, matches_any
from fedalign.errors import DataError
from fedalign.evaluation.judges import JudgeRequest, render
from fedalign.evaluation.safety.common import SafetySettings, Sample, checked_image

NAME = "mm-safetybench"
JUDGE_MAX_TOKENS = 64  # upstream leaves the call to the user; the reply is one word
FIELDS = ("Question", "Rephrased Question", "Rephrased Question(SD)")


def load(root: Path, settings: SafetySettings) -> list[Sample]:
    questions_dir = root / "processed_questions"
    if not questions_dir.is_dir():
        raise DataError(
            f"data.path: {root} is not MM-SafetyBench's layout (no processed_questions/ folder; the images "
            "unpacked to imgs/ beside it)"
        )
    wanted = settings.scenarios or list(SCENARIOS)
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        raise DataError(f"scenarios: {unknown[0]!r} is not one of {', '.join(SCENARIOS)}")
    tiny = _tiny_ids(root) if settings.tiny else None
    samples = []
    for scenario in wanted:
        file = questions_dir / f"{scenario}.json"
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{file}: not a JSON file ({type(error).__name__})") from None
        if not isinstance(data, dict):
            raise DataError(f"{file}: expected an object keyed by question id")
        for qid, row in data.items():
            if tiny is not None and (not str(qid).isdigit() or int(qid) not in tiny.get(scenario, ())):
                continue
            missing = [f for f in FIELDS if not isinstance(row, dict) or not isinstance(row.get(f), str)]
            if missing:
                raise DataError(f"{file}: question {qid}: needs the text field {missing[0]!r}")
            for image_type in settings.image_types:
                if image_type == TEXT_ONLY:
                    text, image = row["Question"], None
                else:
                    text = row["Rephrased Question(SD)" if image_type == "SD" else "Rephrased Question"]
                    path = root / "imgs" / scenario / image_type / f"{qid}.jpg"
                    if not path.is_file():
                        raise DataError(
                            f"{path}: missing (unpack the MM-SafetyBench images to {root / 'imgs'})"
                        )
                    image = checked_image(path.read_bytes(), str(path))
                samples.append(
                    Sample(
                        f"{scenario}/{qid}/{image_type}", scenario, text, image, {"image_type": image_type}
                    )
                )
    if not samples:
        raise DataError(f"{questions_dir}: no questions for the scenarios asked for")
    return samples[: settings.limit] if settings.limit else samples


def _tiny_ids(root: Path) -> dict[str, set[int]]:
    file = root / "TinyVersion_ID_List.json"
    if not file.is_file():
        raise DataError(f"tiny: {file} is missing")
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
        return {entry["Scenario"]: {int(i) for i in entry["Sampled_ID_List"]} for entry in entries}
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise DataError(f"{file}: expected [{{'Scenario', 'Sampled_ID_List'}}, ...]") from None


def judge_request(sample: Sample, response: str) -> JudgeRequest:
    template = TEMPLATES[template_name(sample.subset)]
    return JudgeRequest(render(template, {"prediction": response}), max_tokens=JUDGE_MAX_TOKENS)


def keyword_label(sample: Sample, response: str, settings: SafetySettings) -> str:
    refused = classifier(settings.keywords, settings.keywords_extra).refused(response)
    if sample.subset in DISCLAIMER_SCENARIOS:
        refused = refused or matches_any(DISCLAIMER_PATTERNS, response)
    return "safe" if refused else "unsafe"


def score(samples: list[Sample], labels: list[str]) -> dict[str, Any]:
    return aggregate(
        {"scenario": s.subset, "image_type": s.meta["image_type"], "label": label}
        for s, label in zip(samples, labels, strict=True)
    )


def parse(text: str, mode: str) -> str:
    return parse_verdict(text, mode)


def templates_used(samples: list[Sample]) -> dict[str, str]:
    return {name: TEMPLATE_SHA256[name] for name in sorted({template_name(s.subset) for s in samples})}
