"""Fingerprints of a run's local inputs (base model, start adapter, data), so that a resume refuses to
continue on inputs that changed since the run started: same recipe, other files, would silently give
another run.

A fingerprint is cheap at any size: a file up to 64 MiB is hashed whole; a larger one by its size and
its first and last 4 MiB (for a safetensors shard: its header, with every tensor's name, shape and
offsets, and the first and last tensors' values); a folder by each file's relative name and
fingerprint. Hub ids (nothing local to read) are recorded as they are. Images under
``data.image_root`` are not read (there may be a hundred thousand); the rows that name them are, and so
is the partition.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedalign.recipe import Recipe

_WHOLE = 64 << 20
_EDGE = 4 << 20


def _file(path: Path, digest: hashlib._Hash) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}|{size}|".encode())
    with path.open("rb") as handle:
        if size <= _WHOLE:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            return
        digest.update(handle.read(_EDGE))
        handle.seek(size - _EDGE)
        digest.update(handle.read(_EDGE))


def fingerprint(location: str | None) -> str | None:
    """A short digest of a local file or folder; the location itself when it is not local (a hub id)."""
    if location is None:
        return None
    path = Path(location).expanduser()
    if not path.exists():
        return f"not local: {location}"
    digest = hashlib.sha256()
    if path.is_file():
        _file(path, digest)
    else:
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{item.relative_to(path)}|".encode())
            _file(item, digest)
    return digest.hexdigest()[:32]


def input_fingerprints(recipe: Recipe) -> dict[str, str | None]:
    """Recipe key -> fingerprint of what it names."""
    template = recipe.model.chat_template
    return {
        "model.name_or_path": fingerprint(recipe.model.name_or_path),
        "model.adapter": fingerprint(recipe.model.adapter),
        "model.chat_template": fingerprint(template) if template and Path(template).is_file() else template,
        "data.path": fingerprint(recipe.data.path),
        "data.eval_path": fingerprint(recipe.data.eval_path),
    }


def changed_inputs(recorded: dict[str, str | None], recipe: Recipe) -> list[str]:
    """The recipe keys whose files differ from those the run started with."""
    now = input_fingerprints(recipe)
    return [key for key, value in recorded.items() if now.get(key) != value]
