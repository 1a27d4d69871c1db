"""Run state on disk: what a run needs to continue exactly, written so that a kill at any moment leaves
the last complete checkpoint intact and recognisable.

A run's state after round R is a :class:`RoundState` (global adapter, the algorithm's server state, the
public sampler, the failed-round count, the privacy ledgers) plus two things kept on disk as the run goes:

- idle clients' state (``private/clients/client-NNNNN.safetensors``: algorithm tensors and, when
  persisted, optimizer moments), read when a client is sampled and written back when it is done, so idle
  clients cost no memory; private, since which files exist and when they changed shows who took part. A
  checkpoint snapshots them as hard links (``private/clients/checkpoints/round-R/``): a file is only
  ever replaced by renaming a new one over it, so a link keeps the old contents at no cost;
- the base-weight moves of algorithms that move the base (FRLoRA), one low-rank pair per round
  (``checkpoints/base_moves/round-R.safetensors``), replayed on resume.

Every file is written under a temporary name, fsync'd and renamed into place. A checkpoint folder
``checkpoints/round-R/`` is complete when its ``manifest.json`` (written last) lists a SHA-256 for each
of its files and they match; the private half (ledgers, ``private/checkpoints/round-R.json``) carries its
own digest, so no public file holds a digest of private data. Only safetensors and JSON are read back:
nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedalign.algorithms.base import ClientState, Tensors

FORMAT_VERSION = 2  # of a run directory's state; run.json and every checkpoint manifest carry it
# 2: idle clients' state under private/clients/ (1 kept it in clients/)
RUN_INFO = "run.json"
CHECKPOINTS = "checkpoints"
CLIENT_STATE = "clients"  # under private/
SNAPSHOTS = "checkpoints"  # under private/clients/
BASE_MOVES = "base_moves"  # under checkpoints/

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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: Path | str, path: Path) -> None:
    """fsync the new file, rename it over ``path``, fsync the folder: after this returns, a power cut
    leaves either the old file or the new one, never a torn one."""
    _fsync(Path(tmp))
    os.replace(tmp, path)
    _fsync(path.parent)


def save_tensors_atomic(
    tensors: Tensors, path: Path, metadata: dict[str, str] | None = None, private: bool = True
) -> None:
    """Owner-only (0600) by default: used for client state, which is client-private."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        if not private:
            shareable(Path(tmp))
        _replace_durably(tmp, path)
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
    _replace_durably(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_sha256(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class DamagedState(Exception):
    """A checkpoint (or a file it needs) is missing, torn or does not match its digest."""


class ClientStateStore:
    """Per-client state files under ``root``, snapshotted at each checkpoint; nothing is cached in memory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots = root / SNAPSHOTS

    def _path(self, client: int) -> Path:
        return self.root / f"client-{client:05d}.safetensors"

    def load(self, client: int) -> ClientState:
        path = self._path(client)
        if not path.is_file():
            return ClientState()
        try:
            flat = load_file(path)
        except (SafetensorError, OSError) as error:
            raise DamagedState(f"{path}: unreadable client state ({error})") from None
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

    def _live(self) -> list[Path]:
        return sorted(self.root.glob("client-*.safetensors"))

    def snapshot(self, rounds_done: int) -> None:
        """Hard-link every live client file into ``checkpoints/round-R/`` (a copy where links fail)."""
        self.snapshots.mkdir(parents=True, exist_ok=True)
        final = self.snapshots / f"round-{rounds_done:05d}"
        staging = Path(tempfile.mkdtemp(dir=self.snapshots, prefix=f".{final.name}."))
        for path in self._live():
            try:
                os.link(path, staging / path.name)
            except OSError:
                shutil.copy2(path, staging / path.name)
        _fsync(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync(self.snapshots)

    def has_snapshot(self, rounds_done: int) -> bool:
        return rounds_done == 0 or (self.snapshots / f"round-{rounds_done:05d}").is_dir()

    def rollback(self, rounds_done: int) -> None:
        """Make the live client files those of the checkpoint after ``rounds_done`` rounds (none at 0)."""
        for path in self._live():
            path.unlink()
        if rounds_done:
            for path in sorted((self.snapshots / f"round-{rounds_done:05d}").glob("client-*.safetensors")):
                try:
                    os.link(path, self.root / path.name)
                except OSError:
                    shutil.copy2(path, self.root / path.name)

    def prune(self, kept_rounds: set[int]) -> None:
        if not self.snapshots.is_dir():
            return
        for folder in self.snapshots.iterdir():
            number = folder.name.removeprefix("round-")
            if not number.isdigit() or int(number) not in kept_rounds:
                shutil.rmtree(folder, ignore_errors=True)


def tensor_digest(tensors: Tensors) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class BaseMoves:
    """One low-rank base-weight move per round (FRLoRA), public like the adapter it follows from."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, rounds_done: int) -> Path:
        return self.root / f"round-{rounds_done:05d}.safetensors"

    def save(self, rounds_done: int, factors: Tensors) -> None:
        """The move of one round; an empty one for a round that did not move the base (it failed, or
        nobody trained), so that every round up to a checkpoint has its file."""
        save_tensors_atomic(factors, self._path(rounds_done), {"sha256": tensor_digest(factors)}, False)

    def check(self, rounds_done: int) -> None:
        for done in range(1, rounds_done + 1):
            self._load(done)

    def _load(self, rounds_done: int) -> Tensors:
        path = self._path(rounds_done)
        try:
            with safe_open(path, "pt") as handle:
                expected = (handle.metadata() or {}).get("sha256")
            factors = load_file(path)
        except (SafetensorError, OSError) as error:
            raise DamagedState(f"{path.name}: missing or unreadable ({error})") from None
        if tensor_digest(factors) != expected:
            raise DamagedState(f"{path.name}: contents do not match its digest")
        return factors

    def truncate(self, rounds_done: int) -> None:
        """Delete the moves after round R (rounds that did not reach their checkpoint)."""
        for path in self.root.glob("round-*.safetensors"):
            if int(path.name[6:11]) > rounds_done:
                path.unlink()

    def replay(self, rounds_done: int) -> Iterator[Tensors]:
        """The moves of rounds 1..R in order (after :meth:`truncate`)."""
        self.truncate(rounds_done)
        for done in range(1, rounds_done + 1):
            yield self._load(done)


@dataclass
class RoundState:
    """Everything of a run's state after ``rounds_done`` rounds that is not on disk already."""

    rounds_done: int
    glob: Tensors
    algorithm: Tensors = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)  # numpy bit generator state (public seed)
    failed_in_a_row: int = 0
    privacy: dict[str, Any] | None = None  # private: the ledgers

    def public_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "round": self.rounds_done,
            "sampler": self.sampler,
            "failed_in_a_row": self.failed_in_a_row,
        }


def checkpoint_dir(root: Path, rounds_done: int) -> Path:
    return root / f"round-{rounds_done:05d}"


def private_checkpoint(private_root: Path, rounds_done: int) -> Path:
    return private_root / f"round-{rounds_done:05d}.json"


def save_checkpoint(
    root: Path,
    state: RoundState,
    keep_last: int | None,
    private_root: Path | None = None,
    store: ClientStateStore | None = None,
    before_publish=None,
) -> Path:
    """Write the checkpoint of ``state``: the clients' snapshot, the private half (owner-only, when
    ``private_root`` is given), then ``round-R/`` (global adapter, algorithm state, server.json, and
    manifest.json last) renamed into place; then prune to ``keep_last``. ``before_publish`` runs after the
    files are written and before the rename (a test kills the process there)."""
    final = checkpoint_dir(root, state.rounds_done)
    root.mkdir(parents=True, exist_ok=True)
    if store is not None:
        store.snapshot(state.rounds_done)
    if private_root is not None:
        payload = {"round": state.rounds_done, "privacy": state.privacy}
        record = {"sha256": _json_sha256(payload), **payload}
        path = private_checkpoint(private_root, state.rounds_done)
        write_text_atomic(json.dumps(record), path, private=True)
    staging = shareable(Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.")))
    save_file({k: v.contiguous() for k, v in state.glob.items()}, staging / "global_adapter.safetensors")
    save_file({k: v.contiguous() for k, v in state.algorithm.items()}, staging / "algorithm.safetensors")
    (staging / "server.json").write_text(json.dumps(state.public_json(), indent=1))
    files = sorted(p.name for p in staging.iterdir())
    for name in files:
        _fsync(staging / name)
    manifest = {
        "format_version": FORMAT_VERSION,
        "round": state.rounds_done,
        "sha256": {name: file_sha256(staging / name) for name in files},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync(staging / "manifest.json")
    if before_publish is not None:
        before_publish()
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync(root)
    if keep_last is not None:
        rounds = sorted(checkpoint_rounds(root))
        for old in rounds[:-keep_last]:
            shutil.rmtree(checkpoint_dir(root, old))
            if private_root is not None:
                private_checkpoint(private_root, old).unlink(missing_ok=True)
        if store is not None:
            store.prune(set(rounds[-keep_last:]))
    return final


def checkpoint_rounds(root: Path) -> list[int]:
    """Rounds with a (published) checkpoint folder, newest first."""
    found = []
    for path in root.glob("round-*"):
        if path.is_dir() and path.name[6:].isdigit():
            found.append(int(path.name[6:]))
    return sorted(found, reverse=True)


CHECKPOINT_FILES = frozenset({"global_adapter.safetensors", "algorithm.safetensors", "server.json"})


def load_checkpoint(root: Path, rounds_done: int, private_root: Path | None) -> RoundState:
    """The state of ``round-R/``, every file checked against its digest; raises :class:`DamagedState`."""
    folder = checkpoint_dir(root, rounds_done)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        version, digests = manifest["format_version"], manifest["sha256"]
        if not isinstance(digests, dict) or set(digests) != CHECKPOINT_FILES:
            raise ValueError("it does not list the checkpoint's files")
        if manifest["round"] != rounds_done:
            raise ValueError(f"it is for round {manifest['round']}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedState(f"{folder.name}: no readable manifest.json ({error})") from None
    if version != FORMAT_VERSION:
        raise DamagedState(f"{folder.name}: format version {version}, this fedalign reads {FORMAT_VERSION}")
    for name, expected in digests.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != expected:
            raise DamagedState(f"{folder.name}/{name}: missing, or its contents do not match manifest.json")
    try:  # the digests match what was written: a failure here is a format problem, reported the same way
        server = json.loads((folder / "server.json").read_text())
        state = RoundState(
            rounds_done=rounds_done,
            glob=load_file(folder / "global_adapter.safetensors"),
            algorithm=load_file(folder / "algorithm.safetensors"),
            sampler=server["sampler"],
            failed_in_a_row=int(server["failed_in_a_row"]),
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise DamagedState(f"{folder.name}: unreadable ({error})") from None
    if private_root is not None:
        path = private_checkpoint(private_root, rounds_done)
        try:
            record = json.loads(path.read_text())
            payload = {"round": record["round"], "privacy": record["privacy"]}
            intact = record["sha256"] == _json_sha256(payload) and record["round"] == rounds_done
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if not intact:
            raise DamagedState(f"private/checkpoints/{path.name}: missing, torn or not matching its digest")
        state.privacy = record["privacy"]
    return state
