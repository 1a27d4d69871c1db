"""``metrics.jsonl``: one JSON record per client per round, per round, and per held-out evaluation.

Records carry ``"type"``: ``"client"`` (loss, steps, examples, tokens, bytes up/down, wall time, peak memory),
``"round"`` (the aggregate of its clients plus the round's own wall time) and ``"eval"`` (held-out loss;
round 0 is the model before training). Each line is flushed as written, so a killed run keeps its history.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory on CUDA, else this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._handle = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == kind]

    def close(self) -> None:
        self._handle.close()
