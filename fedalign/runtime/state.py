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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable(path: Path) -> Path:
    """Give a file or folder made by ``mkstemp``/``mkdtemp`` (owner-only) the permissions an ordinary
    ``open``/``mkdir`` would have given it: what a run publishes must be readable like any output."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
    return path


def save_tensors_atomic(tensors: Tensors, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Owner-only (0600): used for client state, which is client-private."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: Path, private: bool = False) -> None:
    """Write ``text`` under a temporary name, then rename it into place: owner-only with ``private``, else
    with the usual permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    if not private:
        shareable(Path(tmp))
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


def save_checkpoint(
    root: Path,
    round_idx: int,
    glob: Tensors,
    server: dict,
    keep_last: int | None,
    private: tuple[Path, dict] | None = None,
) -> Path:
    """Write ``round-NNNNN/`` (global adapter in safetensors + the server's public state in JSON)
    atomically; ``private`` = (folder, state) writes the server's private state of the same round (the
    privacy ledgers) owner-only as ``<folder>/round-NNNNN.json``, pruned alike."""
    final = root / f"round-{round_idx:05d}"
    root.mkdir(parents=True, exist_ok=True)
    if private is not None:
        write_text_atomic(json.dumps(private[1]), private[0] / f"{final.name}.json", private=True)
    staging = shareable(Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.")))
    save_file({k: v.contiguous() for k, v in glob.items()}, staging / "global_adapter.safetensors")
    (staging / "server.json").write_text(json.dumps(server, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    if keep_last is not None:
        rounds = sorted(p for p in root.glob("round-*") if p.is_dir())
        for old in rounds[:-keep_last]:
            shutil.rmtree(old)
            if private is not None:
                (private[0] / f"{old.name}.json").unlink(missing_ok=True)
    return final
