"""What a run records, split by who may see it.

``metrics.jsonl`` is what the run publishes: everything the server sees in a deployment and that DP
leaves safe to release. One record per round (``"round"``: the round, its cohort unless client-level DP
makes the cohort secret, bytes up and down, wall time, ε), per held-out evaluation (``"eval"``; round 0 is
the model before training), the privacy plan (``"privacy"``) and the ``"summary"``.

``private/client_metrics.jsonl`` holds client-private facts, kept for the operator of an in-process run
and never covered by ε: per visit (``"client"``) the losses, realised batch sizes (examples, tokens,
empty Poisson draws), unclipped update norms, the client's own ε and sampling rate (which reveal its row
count), wall time and peak memory; per round (``"round"``) the clients' mean loss and the cohort.
In a deployment these stay on the clients (and the server's secret cohort on the server).

Each line is flushed as written, so a killed run keeps its history.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch

PRIVATE_DIR = "private"
CLIENT_METRICS = "client_metrics.jsonl"

_TIMING = frozenset({"wall_s", "rounds_wall_s"})


def public_fields(unit: str) -> dict[str, frozenset[str]]:
    """Every field a public record may carry, by record type, for a run whose ``privacy.unit`` is ``unit``.

    README "What ε covers" lists the same. Under any DP, timing is client-private (a visit's time follows
    its realised Poisson batches, a round's its cohort); under client-level DP so is who took part, and how
    many. ``eval`` records carry the task's held-out metrics, measured on the operator's held-out rows,
    not on any client's. :meth:`MetricsLog.write` refuses anything else.
    """
    round_fields = {"type", "round"}
    if unit == "client":
        round_fields |= {"epsilon"}
    else:
        round_fields |= {"clients", "bytes_up", "bytes_down", "skipped"}
    if unit in ("example", "pair"):
        round_fields |= {"epsilon_max", "out_of_budget", "cohort_short"}
    summary = {"type", "rounds", "epsilon", "eval_before", "eval_after", "metrics_before", "metrics_after"}
    summary |= {"guarantee"}
    if unit == "none":
        round_fields |= {"wall_s", "dropped"}
        summary |= _TIMING
    privacy = {"type", "unit", "accountant", "delta", "target_epsilon", "clip_norm", "randomness"}
    privacy |= {"guarantee", "sigma", "q", "q_max", "planned_steps"}
    return {"round": frozenset(round_fields), "privacy": frozenset(privacy), "summary": frozenset(summary)}


class PeakMemory:
    """Peak memory of a span of work (a client visit, a round), and a field name saying what it measures.

    - CUDA: ``peak_cuda_allocated_mib``, tensors allocated on the device (``max_memory_allocated``, reset
      at the start of the span);
    - CPU on Linux: ``peak_rss_mib``, the process's resident-set high-water mark (``VmHWM``), reset at the
      start of the span through ``/proc/self/clear_refs``; it includes everything the process holds
      (the model, the interpreter), not only what the span allocated;
    - elsewhere: ``peak_rss_since_start_mib``, the process's peak since it started (``ru_maxrss``, which
      cannot be reset).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.field = "peak_cuda_allocated_mib"
        elif _can_reset_rss():
            self.field = "peak_rss_mib"
        else:
            self.field = "peak_rss_since_start_mib"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.field == "peak_rss_mib":
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.field == "peak_rss_mib":
            return _vm_hwm_kib() / 2**10
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _vm_hwm_kib() -> int:
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _can_reset_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _vm_hwm_kib() > 0


class MetricsLog:
    """The public ``metrics.jsonl`` and the client-private ``private/client_metrics.jsonl`` of one run."""

    def __init__(self, path: Path, private_path: Path, unit: str = "none") -> None:
        self.path, self.private_path = path, private_path
        self.public_fields = public_fields(unit)
        self.records: list[dict[str, Any]] = []
        self.private_records: list[dict[str, Any]] = []
        self._handle = path.open("a")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        self._private = os.fdopen(os.open(private_path, flags, 0o600), "a")

    @classmethod
    def resume(
        cls, path: Path, private_path: Path, unit: str, rounds_done: int, drop_eval_at: int | None = None
    ) -> MetricsLog:
        """The logs of a run resumed after ``rounds_done`` rounds: records of later rounds (which the resumed
        run writes again), summaries and a torn last line are dropped, then both files are appended to.
        ``rounds_done < 0`` empties them (the run restarts from its beginning); ``drop_eval_at``: the round
        of a finished run's final evaluation, which an extended run does not have there."""
        from fedalign.runtime.state import write_text_atomic

        kept: dict[Path, list[dict[str, Any]]] = {}
        for file, private in ((path, False), (private_path, True)):
            records = []
            lines = file.read_text(encoding="utf-8", errors="replace").splitlines() if file.is_file() else []
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line torn by the kill
                if record.get("type") == "summary" or record.get("round", 0) > rounds_done or rounds_done < 0:
                    continue
                if record.get("type") == "eval" and record["round"] == drop_eval_at:
                    continue
                records.append(record)
            write_text_atomic("".join(json.dumps(r) + "\n" for r in records), file, private=private)
            kept[file] = records
        log = cls(path, private_path, unit)
        log.records, log.private_records = kept[path], kept[private_path]
        return log

    def write(self, record: dict[str, Any]) -> None:
        """A record anyone holding the run's outputs may read (only :func:`public_fields`)."""
        allowed = self.public_fields.get(record["type"])
        if allowed is not None and not record.keys() <= allowed:
            raise ValueError(f"not a public field of a {record['type']!r} record: {record.keys() - allowed}")
        if allowed is None and record["type"] != "eval":
            raise ValueError(f"not a public record type: {record['type']!r}")
        self.records.append(record)
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def write_private(self, record: dict[str, Any]) -> None:
        """A client-private record (not covered by ε; for the operator only)."""
        self.private_records.append(record)
        self._private.write(json.dumps(record) + "\n")
        self._private.flush()

    def of_type(self, kind: str, private: bool = False) -> list[dict[str, Any]]:
        return [r for r in (self.private_records if private else self.records) if r["type"] == kind]

    def close(self) -> None:
        self._handle.close()
        self._private.close()
