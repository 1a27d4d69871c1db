"""Preference pairs for DPO: SPA-VL (``image, question, chosen, rejected``) and generic
``prompt, chosen, rejected`` data with an optional image, from local files or the hub.

Generic data may be plain strings or TRL's conversational formats: message lists with an explicit prompt
(e.g. trl-lib/ultrafeedback_binarized), whole conversations with an implicit prompt (Anthropic HH: the
prompt is the shared history), or the vision format (structured content with an image placeholder, and an
``images`` column holding the one image).

Rows become TRL's conversational preference format (``prompt`` / ``chosen`` / ``rejected`` message lists);
an image stays an :class:`~fedalign.data.images.ImageRef` until its batch is collated. Whether images are
expected is decided by the model, not guessed from the data: a vision-language recipe refuses a row
without an image, and a text-only model refuses a dataset with an image column, each naming the row.
A bad row stops the run, or with ``data.on_bad_row: skip`` is left out, counted and reported.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedalign.data.examples import Message
from fedalign.data.images import ImageRef, image_bytes_or_path, verify_image
from fedalign.data.sources import local_files, read_rows
from fedalign.errors import DataError
from fedalign.hub import hub_unreachable_reason, looks_local

if TYPE_CHECKING:
    from fedalign.recipe import DataSection

PREFERENCE_SOURCES = ("spavl", "preference")
_ROLES = ("prompt", "chosen", "rejected", "image", "system", "label")
_SPEAKERS = ("system", "user", "assistant")
# Each source's native column per role; data.columns renames them (by role or native name).
_NATIVE: dict[str, dict[str, str | None]] = {
    "spavl": {"prompt": "question", "chosen": "chosen", "rejected": "rejected", "image": "image",
              "system": None, "label": None},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "image": "image",
                   "system": None, "label": None},
}  # fmt: skip


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair; ``row_id`` is the row's position in its source (skipped rows keep theirs)."""

    row_id: int
    origin: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    image: ImageRef | None = None
    label: str | None = None

    def to_record(self, with_image: bool = False) -> dict[str, Any]:
        """The row as TRL's DPOTrainer reads it; the image is decoded only when asked for."""
        record: dict[str, Any] = {
            "row_id": self.row_id,
            "prompt": [dict(m) for m in self.prompt],
            "chosen": [dict(m) for m in self.chosen],
            "rejected": [dict(m) for m in self.rejected],
        }
        if with_image and self.image is not None:
            try:
                record["image"] = self.image.load()
            except DataError as error:
                raise DataError(f"{self.origin}: {error}") from None
        return record


@dataclass
class LoadedPreferences:
    examples: list[PreferenceExample]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"origin", "reason"} of left-out rows


def _columns(section: DataSection) -> dict[str, str | None]:
    native = dict(_NATIVE[section.source])
    known = set(_ROLES) | {n for n in native.values() if n}
    for key, column in section.columns.items():
        if key not in known:
            raise DataError(
                f"data.columns: unknown field {key!r} for source {section.source!r}; "
                f"known fields: {', '.join(sorted(known))}"
            )
        role = key if key in _ROLES else next(r for r, n in native.items() if n == key)
        native[role] = column or None
    if section.label_column is not None:
        native["label"] = section.label_column
    return native


def _required(row: Mapping[str, Any], column: str, role: str) -> Any:
    value = row.get(column)
    if value is None:
        raise ValueError(f"missing required field {column!r} ({role})")
    return value


def _content_text(content: Any, where: str) -> tuple[str, int]:
    """A message's content as text, and how many image placeholders it held.

    Structured content (TRL's vision format: ``[{"type": "image"}, {"type": "text", "text": ...}]``) is
    flattened: the row's image column is the one image, and the collator puts it back in the first user
    turn (TRL's ``prepare_multimodal_messages``), so the placeholder itself carries nothing.
    """
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        kind = type(content).__name__
        raise ValueError(f"{where}: content must be a string or a list of parts, got {kind}")
    texts, images = [], 0
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "image":
            images += 1
        elif kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise ValueError(f"{where}: a content part must be {{type: text, text: ...}} or {{type: image}}")
    return "\n".join(texts), images


def _messages(value: Any, column: str, role: str) -> tuple[list[Message], int]:
    """A column as chat messages, and the image placeholders in them. A string is one turn (the user's
    for the prompt, the assistant's for an answer); a list must be ``{role, content}`` messages."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"required field {column!r} ({role}) is empty")
        return [{"role": "user" if role == "prompt" else "assistant", "content": value}], 0
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"field {column!r} ({role}) must be a string or a non-empty list of messages, "
            f"got {type(value).__name__ if value is not None else 'null'}"
        )
    messages: list[Message] = []
    images = 0
    for index, message in enumerate(value):
        where = f"field {column!r} ({role}) message {index}"
        is_message = isinstance(message, Mapping) and "content" in message
        if not is_message or message.get("role") not in _SPEAKERS:
            raise ValueError(f"{where} is not a message {{role: system|user|assistant, content: ...}}")
        text, found = _content_text(message["content"], where)
        messages.append({"role": message["role"], "content": text})
        images += found
    return messages, images


def _split_shared_prompt(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], ...]:
    """TRL's implicit-prompt format (whole conversations in ``chosen`` and ``rejected``, e.g. Anthropic
    HH): the prompt is their longest shared prefix, cut back to end at a user turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if not shared:
        raise ValueError("has no prompt column and its chosen and rejected conversations share no user turn")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _image_ref(value: Any, column: str, where: _Where) -> ImageRef:
    try:
        data = image_bytes_or_path(value)
    except ValueError as error:
        raise ValueError(f"field {column!r} {error}") from None
    if data is None:
        raise ValueError(
            f"field {column!r} holds no image (need bytes or a path, got {type(value).__name__})"
        )
    if isinstance(data, bytes):
        try:
            verify_image(data)
        except ValueError as error:
            raise ValueError(f"image in column {column!r}: {error}") from None
        if where.hub is not None:
            return ImageRef("dataset", where.name, where.index, column, where.hub)
        if where.file is not None and where.file.suffix == ".parquet":
            return ImageRef("parquet", str(where.file), where.index, column)
        raise ValueError(f"column {column!r}: inline image bytes are only read from parquet files")
    path = Path(data).expanduser()
    if not path.is_absolute() and where.root is not None:
        path = where.root / path
    try:
        verify_image(path)
    except ValueError as error:
        raise ValueError(f"image {str(path)!r}: {error}") from None
    return ImageRef("file", str(path))


@dataclass(frozen=True)
class _Where:
    """Where a row came from, for building its image reference."""

    name: str
    index: int
    file: Path | None = None
    hub: Any = None
    root: Path | None = None


def row_to_preference(
    row: Any,
    row_id: int,
    origin: str,
    columns: dict[str, str | None],
    section: DataSection,
    *,
    vision: bool,
    where: _Where,
) -> PreferenceExample:
    """One source row to a :class:`PreferenceExample`; raises ValueError (the reason, without origin)."""
    if not isinstance(row, Mapping):
        raise ValueError(f"expected an object of named fields, got {type(row).__name__}")
    image_column = columns["image"]
    if image_column == "image" and "image" not in row and "images" in row:
        image_column = "images"  # TRL's vision preference datasets: a list holding the one image
    has_image = image_column is not None and row.get(image_column) not in (None, [])
    if has_image and not vision:
        raise ValueError(
            f"has an image (column {image_column!r}) but the model is text-only; use a vision-language "
            "model, or set data.columns.image: null to train on the text alone"
        )
    if vision and not has_image:
        raise ValueError(
            f"has no image (column {image_column!r}) but the model is a vision-language model, whose "
            "recipe needs an image in every row"
        )
    chosen_value = _required(row, columns["chosen"], "chosen")  # type: ignore[arg-type]
    rejected_value = _required(row, columns["rejected"], "rejected")  # type: ignore[arg-type]
    chosen, _ = _messages(chosen_value, columns["chosen"], "chosen")  # type: ignore[arg-type]
    rejected, _ = _messages(rejected_value, columns["rejected"], "rejected")  # type: ignore[arg-type]
    prompt_value = row.get(columns["prompt"])  # type: ignore[arg-type]
    if prompt_value is None and isinstance(chosen_value, list) and isinstance(rejected_value, list):
        prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
        placeholders = 0
    else:
        prompt_value = _required(row, columns["prompt"], "prompt")  # type: ignore[arg-type]
        prompt, placeholders = _messages(prompt_value, columns["prompt"], "prompt")  # type: ignore[arg-type]
    if prompt[-1]["role"] != "user":
        raise ValueError(f"the prompt must end with a user turn, not {prompt[-1]['role']!r}")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[-1]["role"] != "assistant":
            raise ValueError(f"the {name} answer must end with an assistant turn")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical (no preference to learn)")
    if placeholders > 1 or (placeholders and not has_image):
        raise ValueError(
            f"its prompt shows {placeholders} images and column {image_column!r} holds "
            f"{'one' if has_image else 'none'}; fedalign trains on one image per pair"
        )
    system = section.system_prompt or ""
    if columns["system"]:
        value = row.get(columns["system"])
        system = value if isinstance(value, str) and value else system
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    label = row.get(columns["label"]) if columns["label"] else None
    image = _image_ref(row[image_column], image_column, where) if has_image else None  # type: ignore[index]
    return PreferenceExample(
        row_id,
        origin,
        prompt,
        chosen,
        rejected,
        image,
        None if label is None else str(label),
    )


def _rows(section: DataSection, path: str, split: str, key: str) -> Iterator[tuple[str, Any, _Where]]:
    """(origin, row, where it came from) for every row of the source, in order."""
    if looks_local(path):
        files = local_files(path, split, key)
        root = Path(section.image_root).expanduser() if section.image_root else None
        for file in files:
            for index, (origin, row) in enumerate(read_rows(file)):
                yield origin, row, _Where(str(file), index, file=file, root=root or file.parent)
        return
    reason = hub_unreachable_reason(path, "dataset")
    if reason:
        raise DataError(
            f"{key}: {path!r} is not a local file and cannot be fetched: {reason}. Download it "
            f"(huggingface-cli download --repo-type dataset {path}) and set {key} to the local folder"
        )
    import datasets

    try:
        dataset = datasets.load_dataset(path, section.config, split=split)
        for name, feature in dataset.features.items():  # keep images encoded: decoded per batch only
            if isinstance(feature, datasets.Image):
                dataset = dataset.cast_column(name, datasets.Image(decode=False))
            elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
                dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    except Exception as error:  # any loader failure is a data problem the user fixes, not a crash
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise DataError(f"{key}: could not load {path!r} split {split!r} from the hub: {first}") from None
    root = Path(section.image_root).expanduser() if section.image_root else None
    for index, row in enumerate(dataset):
        yield f"{path}[{split}]:row {index}", row, _Where(f"{path}[{split}]", index, hub=dataset, root=root)


def load_preferences(
    section: DataSection, *, vision: bool, path: str | None = None, split: str | None = None
) -> LoadedPreferences:
    """Load ``section``'s preference pairs (or ``path``/``split`` instead, for a separate evaluation set)."""
    if section.source not in PREFERENCE_SOURCES:
        raise DataError(
            f"data.source: {section.source!r} is an SFT dataset; fedalign dpo reads "
            f"{' or '.join(PREFERENCE_SOURCES)} (prompt/question, chosen, rejected)"
        )
    key = "data.path" if path is None else "data.eval_path"
    path = path or section.path
    split = split or section.split
    columns = _columns(section)
    loaded = LoadedPreferences([])
    for row_id, (origin, row, where) in enumerate(_rows(section, path, split, key)):
        if section.max_rows is not None and len(loaded.examples) >= section.max_rows:
            break
        try:
            example = row_to_preference(row, row_id, origin, columns, section, vision=vision, where=where)
        except ValueError as error:
            if section.on_bad_row == "stop":
                raise DataError(f"{origin}: {error} (data.on_bad_row: skip leaves such rows out)") from None
            loaded.skipped.append({"origin": origin, "reason": str(error)})
            continue
        loaded.examples.append(example)
    if not loaded.examples:
        detail = f" ({len(loaded.skipped)} skipped as bad rows)" if loaded.skipped else ""
        raise DataError(f"{key}: {path!r} (split {split!r}) has no usable rows{detail}")
    return loaded
