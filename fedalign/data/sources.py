"""Turn a recipe's ``data`` section into conversational prompt/completion :class:`Example` rows.

Every source (Dolly, MetaMathQA, GSM8K, or any local file with a column mapping) goes through one row
converter, so the rules are the same everywhere: a row lacking a required field stops the run with
``<file>:<line>: ...`` instead of being dropped, labels become strings, and ``row_id`` is the row's
position in the loaded order (what partition manifests record, so it must not depend on anything else).
Files are read locally (.jsonl, .json, .parquet, or a folder of them); a hub id is tried only when the hub
can answer, so an offline run fails in one line that says how to point the recipe at a local copy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedalign.data.examples import Example, Message
from fedalign.errors import DataError
from fedalign.hub import hub_unreachable_reason, looks_local

if TYPE_CHECKING:
    from fedalign.recipe import DataSection

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = ("prompt", "completion", "context", "label", "system")


@dataclass(frozen=True)
class _Fields:
    """Which column feeds each role; ``None`` means the role is not read for this source."""

    prompt: str
    completion: str
    context: str | None = None
    label: str | None = None
    system: str | None = None


# Each named source's native column names; ``data.columns`` may rename them (by native or role name).
SOURCE_FIELDS: dict[str, _Fields] = {
    "dolly": _Fields("instruction", "response", context="context", label="category"),
    "metamathqa": _Fields("query", "response", label="type"),
    "gsm8k": _Fields("question", "answer"),
}


def resolve_fields(section: DataSection) -> tuple[_Fields, bool]:
    """The column for each role, and whether the label column was chosen explicitly by the user.

    An explicitly chosen label column must be present in every row (a typo would otherwise silently
    leave every label empty and only surface later as a partition error).
    """
    columns = dict(section.columns)
    if section.source == "local":
        missing = [role for role in ("prompt", "completion") if role not in columns]
        if missing:
            raise DataError(
                f"data.columns: source 'local' needs a column for {' and '.join(missing)} "
                "(e.g. data.columns={prompt: question, completion: answer}; optional: context, label, system)"
            )
        native = _Fields("prompt", "completion")
    else:
        native = SOURCE_FIELDS[section.source]
    aliases = {role: getattr(native, role) for role in ROLES}  # role -> native name (may be None)
    known = set(ROLES) | {name for name in aliases.values() if name}
    unknown = sorted(set(columns) - known)
    if unknown:
        raise DataError(
            f"data.columns: unknown field {unknown[0]!r} for source {section.source!r}; "
            f"known fields: {', '.join(sorted(known))}"
        )
    chosen: dict[str, str | None] = {}
    for role in ROLES:
        name = aliases[role]
        chosen[role] = columns.get(role) or (columns.get(name) if name else None) or name
    explicit_label = (
        section.label_column is not None
        or "label" in columns
        or (aliases["label"] is not None and aliases["label"] in columns)
    )
    if section.label_column is not None:
        chosen["label"] = section.label_column
    return _Fields(**chosen), explicit_label  # type: ignore[arg-type]


def _text(row: Mapping[str, Any], column: str, origin: str, required: bool, need: str) -> str:
    value = row.get(column)
    if value is None:
        if required:
            raise DataError(f"{origin}: missing required field {column!r} ({need})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {column!r} must be a string, got {type(value).__name__} ({need})")
    if required and not value.strip():
        raise DataError(f"{origin}: required field {column!r} is empty ({need})")
    return value


def row_to_example(
    row: Any, row_id: int, origin: str, fields: _Fields, section: DataSection, explicit_label: bool
) -> Example:
    """One source row to an :class:`Example`; Dolly-style context is appended to the user turn."""
    if not isinstance(row, Mapping):
        raise DataError(f"{origin}: expected a JSON object (a row of named fields), got {type(row).__name__}")
    need = f"{section.source} rows need {fields.prompt}, {fields.completion}"
    user = _text(row, fields.prompt, origin, True, need)
    completion = _text(row, fields.completion, origin, True, need)
    if fields.context:
        context = _text(row, fields.context, origin, False, need).strip()
        if context:
            user = f"{user}\n\nContext:\n{context}"
    system = section.system_prompt or ""
    if fields.system:  # only set when data.columns maps a per-row system column
        system = _text(row, fields.system, origin, False, need) or system
    label = None
    if fields.label:
        value = row.get(fields.label)
        if value is None and explicit_label:
            raise DataError(
                f"{origin}: missing label column {fields.label!r} (set by data.label_column / data.columns)"
            )
        label = None if value is None else str(value)
    prompt: list[Message] = [{"role": "system", "content": system}] if system else []
    prompt.append({"role": "user", "content": user})
    return Example(row_id, origin, prompt, [{"role": "assistant", "content": completion}], label)


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:  # bytes, so that a line that is not UTF-8 is named by its number
        for number, raw in enumerate(handle, start=1):
            origin = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{origin}: not UTF-8 text (byte {raw[error.start]:#04x}, "
                    f"the line's byte {error.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{origin}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{origin}: expected a JSON object per line, got {type(row).__name__}")
            yield origin, row


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        yield f"{path}:row {index}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a damaged file: report, don't trace
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    index = 0
    for batch in reader.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}:row {index}", row
            index += 1


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def local_files(path: str, split: str, key: str) -> list[Path]:
    """The data files a local ``path`` (a file, or a folder holding ``split``'s files) stands for."""
    local = Path(path).expanduser()
    if not local.exists():
        raise DataError(f"{key}: {path!r} does not exist")
    if local.is_dir():
        return data_files(local, split, key)
    if local.suffix in _READERS:
        return [local]
    raise DataError(f"{key}: {path!r} is not a {', '.join(DATA_SUFFIXES)} file or a folder of them")


def read_rows(file: Path) -> Iterator[tuple[str, Any]]:
    """(origin, row) for every row of one local data file; ``origin`` is ``file:line`` or ``file:row N``."""
    return _READERS[file.suffix](file)


def data_files(folder: Path, split: str, key: str) -> list[Path]:
    """The files in ``folder`` for ``split``: those named after it (``train.jsonl``, ``train-0000.parquet``),
    else the only data file there. Hub snapshots keep theirs in ``data/``, so that is looked at too."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not found and (folder / "data").is_dir():
        found = sorted(p for p in (folder / "data").iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    pattern = re.compile(rf"{re.escape(split)}([-_.]|$)")
    matching = [p for p in found if pattern.match(p.name)]
    if matching:
        return matching
    if len(found) == 1:
        return found
    listing = ", ".join(p.name for p in found) or f"no {'/'.join(DATA_SUFFIXES)} files"
    raise DataError(
        f"{key}: folder '{folder}' has no file for split {split!r} (found: {listing}); "
        f"name the file {split}.jsonl or point {key} at the file itself"
    )


def _rows_from_hub(path: str, config: str | None, split: str, key: str) -> Iterator[tuple[str, Any]]:
    reason = hub_unreachable_reason(path, "dataset")
    if reason:
        raise DataError(
            f"{key}: {path!r} is not a local file and cannot be fetched: {reason}. "
            f"Download it and point the recipe at the copy: {key}=/path/to/{path.rsplit('/', 1)[-1]}.jsonl"
        )
    import datasets

    try:
        dataset = datasets.load_dataset(path, config, split=split)
    except Exception as error:  # any loader failure is a data problem the user fixes, not a crash
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise DataError(f"{key}: could not load {path!r} split {split!r} from the hub: {first}") from None
    for index, row in enumerate(dataset):
        yield f"{path}[{split}]:row {index}", row


def _key_for(section: DataSection, path: str | None) -> str:
    if path is None or path == section.path:
        return "data.path"
    return "data.eval_path" if path == section.eval_path else "path"


def load_examples(
    section: DataSection,
    *,
    path: str | None = None,
    split: str | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> list[Example]:
    """Load ``section``'s dataset (or ``path``/``split`` instead, for the evaluation set) as Examples.

    ``data.max_rows`` keeps the first rows in file order, so a small run always sees the same rows. With
    ``data.on_bad_row: skip`` a bad row is left out and its ``{origin, reason}`` appended to ``skipped``;
    row ids stay the rows' positions in the source either way.
    """
    if section.source in ("spavl", "preference"):
        raise DataError(
            f"data.source: {section.source!r} is a preference dataset; train on it with fedalign dpo"
        )
    key = _key_for(section, path)
    path = path if path is not None else section.path
    split = split if split is not None else section.split
    fields, explicit_label = resolve_fields(section)
    if looks_local(path):
        files = local_files(path, split, key)
        rows: Iterator[tuple[str, Any]] = (item for file in files for item in _READERS[file.suffix](file))
    else:
        rows = _rows_from_hub(path, section.config, split, key)
    examples: list[Example] = []
    for row_id, (origin, row) in enumerate(rows):
        if section.max_rows is not None and len(examples) >= section.max_rows:
            break
        try:
            examples.append(row_to_example(row, row_id, origin, fields, section, explicit_label))
        except DataError as error:
            if section.on_bad_row == "stop" or skipped is None:
                raise
            skipped.append({"origin": origin, "reason": str(error).removeprefix(f"{origin}: ")})
    if not examples:
        raise DataError(f"{key}: {path!r} (split {split!r}) has no rows")
    return examples


def holdout_size(total: int, holdout: float) -> int:
    """Rows to hold out: a fraction (< 1, rounded half up, at least 1 when > 0) or a whole count (>= 1)."""
    if holdout < 0 or not math.isfinite(holdout):
        raise DataError(f"data.holdout: must be a fraction in [0, 1) or a whole count, got {holdout}")
    if holdout >= 1:
        if holdout != int(holdout):
            raise DataError(f"data.holdout: a count (>= 1) must be a whole number, got {holdout}")
        return int(holdout)
    return 0 if holdout == 0 else max(1, int(holdout * total + 0.5))


def split_holdout(examples: list[Example], holdout: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split into (train, eval), each in row_id order, with a seeded shuffle of its own generator."""
    size = holdout_size(len(examples), holdout)
    if size == 0:
        return sorted(examples, key=lambda e: e.row_id), []
    if size >= len(examples):
        raise DataError(
            f"data.holdout: holding out {size} of {len(examples)} rows would leave no training rows; "
            "lower data.holdout or load more rows (data.max_rows)"
        )
    order = np.random.default_rng(seed).permutation(len(examples))
    held = {int(i) for i in order[:size]}
    train = [e for i, e in enumerate(examples) if i not in held]
    evaluation = [e for i, e in enumerate(examples) if i in held]
    return sorted(train, key=lambda e: e.row_id), sorted(evaluation, key=lambda e: e.row_id)
