"""What crosses between the server and a node: named tensors, checked on arrival, and a few public fields.

A message names its tensors (``ArrayRecord``: adapter key -> array) and its fields (``ConfigRecord``).
A tensor record is accepted whole or not at all: :func:`decode` refuses a record whose keys are not exactly
the expected ones, or whose arrays have another shape or are not floating point, and names the first
culprit; nothing of a refused record is applied.

Tensors travel and arrive as float32 (bfloat16 has no numpy type; the upcast is exact); the receiver
casts them where its own tensors have another dtype (the adapter slots do on write).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedalign.algorithms.base import Tensors
from fedalign.errors import FedalignError

Shapes = Mapping[str, tuple[int, ...]]


class WireError(FedalignError):
    """A message that is not what the protocol expects (a wrong, missing or extra key, a wrong shape)."""


def shapes(tensors: Tensors) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in tensors.items()}


def encode(tensors: Tensors) -> ArrayRecord:
    """Named tensors as a Flower record (float32 on the wire)."""
    return ArrayRecord(
        {
            key: Array(np.ascontiguousarray(value.detach().cpu().float().numpy()))
            for key, value in tensors.items()
        }
    )


def decode(record: ArrayRecord, expected: Shapes, what: str) -> Tensors:
    """The record's tensors if its keys are exactly ``expected``'s and every shape matches; otherwise a
    :class:`WireError` naming ``what`` (e.g. "client 3's stage-1 upload") and the first culprit."""
    missing = sorted(set(expected) - set(record.keys()))
    extra = sorted(set(record.keys()) - set(expected))
    if missing or extra:
        parts = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(extra)}" if extra else ""]
        raise WireError(f"{what}: refused, {'; '.join(p for p in parts if p)}")
    tensors: Tensors = {}
    for key, want in expected.items():
        array = record[key]
        if tuple(array.shape) != tuple(want):
            raise WireError(f"{what}: refused, {key} has shape {tuple(array.shape)}, expected {tuple(want)}")
        values = array.numpy()
        if not np.issubdtype(values.dtype, np.floating):
            raise WireError(f"{what}: refused, {key} is {values.dtype}, expected floating point")
        tensors[key] = torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
    return tensors


def record_bytes(record: ArrayRecord) -> int:
    """The bytes of a tensor record's arrays (what :func:`fedalign.algorithms.base.payload_bytes` counts)."""
    return sum(len(array.data) for array in record.values())


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
