"""BeaverTails-V win rates and SPA-VL HarmEval/HelpEval: the policy's answer against a reference's, judged
pairwise with align-anything's SPA-VL prompts (evaluators.md §5.2, §5.4).

The reference is the base model (before fine-tuning) answering the same prompts with the same decoding;
its answers are stored as a versioned artefact (``reference-<checkpoint digest>.jsonl`` beside the
responses), or read from a folder given as ``reference=`` (SPA-VL's ``base_model_harm_QA.json`` /
``base_model_help_QA.json``: aligned by index in ``faithful`` mode as upstream, by question in
``corrected``).

Data: BeaverTails-V's HF layout, ``<category>/evaluation-*.parquet`` (or any ``*.parquet``/``*.jsonl``
below the folder) with the 16 preference fields; SPA-VL's test split as ``harm*.parquet`` and
``help*.parquet`` (``image, question, class1, class2, class3``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from evaluators.spavl.scoring import outcome, parse_pairwise
from evaluators.spavl.templates import HARM_PROMPT, HELP_PROMPT, TEMPLATE_SHA256
from fedalign.data.images import image_bytes_or_path
from fedalign.errors import DataError
from fedalign.evaluation.judges import JudgeRequest, render
from fedalign.evaluation.safety.common import Sample, checked_image, nonempty

JUDGE_MAX_TOKENS = 1024  # upstream: the API default; the prompts ask for an explanation first
BTV_FIELDS = (
    "question",
    "image",
    "category",
    "response_1",
    "response_2",
    "safer_response_id",
    "more_helpful_response_id",
)
PROMPTS = {"harm": HARM_PROMPT, "help": HELP_PROMPT}
TEMPLATES = dict(TEMPLATE_SHA256)


def _rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: not a readable parquet file ({str(error)[:120]})") from None
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}: row {number}: not valid JSON") from None
    return rows


def _image(value: Any, base: Path, where: str) -> bytes:
    try:
        data = image_bytes_or_path(value)
    except ValueError as error:
        raise DataError(f"{where}: image {error}") from None
    if data is None:
        raise DataError(f"{where}: no image")
    if isinstance(data, str):
        path = Path(data) if Path(data).is_absolute() else base / data
        if not path.is_file():
            raise DataError(f"{where}: image {path} is missing")
        data = path.read_bytes()
    return checked_image(data, where)


def load_beavertails(root: Path, limit: int | None) -> list[Sample]:
    files = sorted(
        p
        for p in (root.rglob("*") if root.is_dir() else [root])
        if p.suffix in (".parquet", ".jsonl") and "train" not in p.name
    )
    if not files:
        raise DataError(f"data.path: no evaluation parquet or JSONL files under {root}")
    samples = []
    for file in files:
        for number, row in enumerate(_rows(file)):
            where = f"{file} row {number}"
            missing = [f for f in BTV_FIELDS if f not in row]
            if missing:
                raise DataError(f"{where}: needs the BeaverTails-V field {missing[0]!r}")
            for key in ("safer_response_id", "more_helpful_response_id"):
                if str(row[key]) not in ("1", "2"):
                    raise DataError(f"{where}: {key} must be 1 or 2, got {row[key]!r}")
            image = _image(row["image"], file.parent, where)
            meta = {k: v for k, v in row.items() if k != "image"}
            samples.append(
                Sample(f"{row['category']}/{number}", str(row["category"]), str(row["question"]), image, meta)
            )
    return nonempty(samples[:limit] if limit else samples, str(root))


def load_spavl(root: Path, split: str, limit: int | None) -> list[Sample]:
    files = sorted(p for p in root.rglob(f"{split}*.parquet")) if root.is_dir() else []
    if not files:
        raise DataError(f"data.path: no {split}*.parquet under {root} (SPA-VL's test split: harm and help)")
    samples = []
    for file in files:
        for number, row in enumerate(_rows(file)):
            where = f"{file} row {number}"
            if "question" not in row or "image" not in row:
                raise DataError(f"{where}: needs the SPA-VL fields 'image' and 'question'")
            meta = {k: v for k, v in row.items() if k != "image"} | {"index": len(samples)}
            samples.append(
                Sample(
                    f"{split}/{len(samples)}",
                    split,
                    str(row["question"]),
                    _image(row["image"], file.parent, where),
                    meta,
                )
            )
    return nonempty(samples[:limit] if limit else samples, f"{root} ({split})")


def reference_answers(folder: Path, split: str, samples: list[Sample], mode: str) -> list[str]:
    """SPA-VL's ``base_model_<split>_QA.json`` answers, by index (faithful) or by question (corrected)."""
    file = folder / f"base_model_{split}_QA.json"
    if not file.is_file():
        raise DataError(f"reference: {file} is missing (align-anything's base_model_{split}_QA.json)")
    try:
        items = json.loads(file.read_text(encoding="utf-8"))
        answers = [(str(i["question"]), str(i["response"])) for i in items]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{file}: expected a list of {{question, response}}") from None
    if mode == "faithful":
        if len(answers) < len(samples):
            raise DataError(f"{file}: {len(answers)} answers for {len(samples)} questions")
        return [a for _, a in answers[: len(samples)]]
    by_question: dict[str, str] = {}
    for question, answer in answers:
        if by_question.setdefault(question, answer) != answer:
            raise DataError(f"{file}: two different answers to the question {question[:60]!r}")
    missing = [s.text for s in samples if s.text not in by_question]
    if missing:
        raise DataError(f"{file}: no reference answer for the question {missing[0][:60]!r}")
    return [by_question[s.text] for s in samples]


def requests(sample: Sample, policy: str, reference: str, kind: str, both_orders: bool, image: bool):
    """The judge requests for one item: policy as A (and, with ``both_orders``, as B); returns
    [(request, policy position)]."""
    attached = (sample.image,) if image and sample.image else ()
    orders = [("A", policy, reference)] + ([("B", reference, policy)] if both_orders else [])
    return [
        (
            JudgeRequest(
                render(PROMPTS[kind], {"prompt": sample.text, "answer_a": a, "answer_b": b}),
                attached,
                max_tokens=JUDGE_MAX_TOKENS,
            ),
            position,
        )
        for position, a, b in orders
    ]


def outcomes(texts: list[str | None], positions: list[str], kind: str) -> list[str]:
    return [
        "error" if text is None else outcome(parse_pairwise(text, kind), position)
        for text, position in zip(texts, positions, strict=True)
    ]


def sanity_requests(sample: Sample, kind: str, image: bool) -> list[tuple[JudgeRequest, str]]:
    """The dataset's own pair, response_1 as A then as B; the position holds response_1's."""
    first, second = str(sample.meta["response_1"]), str(sample.meta["response_2"])
    return requests(sample, first, second, kind, True, image)
