"""Run state on disk: idle clients' state, per-round checkpoints, atomic writes.

Idle clients cost no memory: a client's state (algorithm tensors and, when persisted, optimizer moments)
lives in one safetensors file that is read when the client is sampled and written back when it is done.
Every write goes to a temporary name in the same folder and is renamed into place, so a crash never
leaves a half-written file where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedalign.algorithms.base import ClientState, Tensors

_OPT = "optimizer::"


def save_tensors_atomic(tensors: Tensors, path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


class ClientStateStore:
    """Per-client state files under ``root``; nothing is cached in memory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, client: int) -> Path:
        return self.root / f"client-{client:05d}.safetensors"

    def load(self, client: int) -> ClientState:
        path = self._path(client)
        if not path.is_file():
            return ClientState()
        flat = load_file(path)
        return ClientState(
            tensors={k: v for k, v in flat.items() if not k.startswith(_OPT)},
            optimizer={k.removeprefix(_OPT): v for k, v in flat.items() if k.startswith(_OPT)},
        )

    def save(self, client: int, state: ClientState) -> None:
        path = self._path(client)
        if state.is_empty():
            path.unlink(missing_ok=True)
            return
        flat = {**state.tensors, **{_OPT + k: v for k, v in state.optimizer.items()}}
        save_tensors_atomic(flat, path)


def save_checkpoint(root: Path, round_idx: int, glob: Tensors, server: dict, keep_last: int | None) -> Path:
    """Write ``round-NNNNN/`` (global adapter in safetensors + server state in JSON) atomically."""
    final = root / f"round-{round_idx:05d}"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    save_file({k: v.contiguous() for k, v in glob.items()}, staging / "global_adapter.safetensors")
    (staging / "server.json").write_text(json.dumps(server, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    if keep_last is not None:
        rounds = sorted(p for p in root.glob("round-*") if p.is_dir())
        for old in rounds[:-keep_last]:
            shutil.rmtree(old)
    return final
