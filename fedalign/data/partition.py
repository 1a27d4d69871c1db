"""Split training rows across simulated clients: IID shards or a per-label Dirichlet (label skew).

The result is a :class:`Partition` of row ids, saved as a JSON manifest next to the run so a result can be
traced to exactly which rows each client held. Both partitioners take their randomness from one
``numpy.random.default_rng(seed)`` and sort their inputs first, so the same rows and seed give the same
partition whatever order the rows arrive in, and no global RNG state is read or changed.

Two deliberate differences from the papers' code (see the algorithms reference, §1.7 and §3.5): IID keeps
the remainder rows (shard sizes differ by at most one) instead of dropping them, and Dirichlet is the
standard FedML/LDA draw, ``Dir(alpha * 1_N)`` per label, not FedASK's size-balanced variant.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedalign.errors import DataError

if TYPE_CHECKING:
    from fedalign.data.examples import Example
    from fedalign.recipe import PartitionSection

MANIFEST_VERSION = 1


@dataclass
class Partition:
    """Row ids per client (each list sorted) and how they were drawn."""

    clients: list[list[int]]
    kind: str
    alpha: float | None
    seed: int
    label_counts: list[dict[str, int]] | None = None

    def sizes(self) -> list[int]:
        return [len(rows) for rows in self.clients]

    def to_manifest(self) -> dict[str, Any]:
        """A JSON-able record of the partition: enough to rebuild it exactly with :meth:`from_manifest`."""
        return {
            "version": MANIFEST_VERSION,
            "kind": self.kind,
            "alpha": self.alpha,
            "seed": self.seed,
            "num_clients": len(self.clients),
            "sizes": self.sizes(),
            "clients": [
                {
                    "client": index,
                    "num_rows": len(rows),
                    "row_ids": list(rows),
                    "label_counts": None if self.label_counts is None else dict(self.label_counts[index]),
                }
                for index, rows in enumerate(self.clients)
            ],
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Partition:
        clients = manifest["clients"]
        counts = [c["label_counts"] for c in clients]
        return cls(
            clients=[[int(r) for r in c["row_ids"]] for c in clients],
            kind=manifest["kind"],
            alpha=manifest["alpha"],
            seed=int(manifest["seed"]),
            label_counts=None if any(c is None for c in counts) else [dict(c) for c in counts],
        )

    def save(self, path: str | Path) -> Path:
        """Write the manifest atomically, so a crash never leaves a half-written file a resume would read."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.to_manifest(), handle, indent=1)
                handle.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        return cls.from_manifest(json.loads(Path(path).read_text(encoding="utf-8")))


def _sorted_inputs(
    row_ids: Sequence[int], labels: Sequence[str | None] | None
) -> tuple[list[int], list[str | None] | None]:
    if len(set(row_ids)) != len(row_ids):
        raise ValueError("row_ids must be unique")
    if labels is not None and len(labels) != len(row_ids):
        raise ValueError(f"{len(labels)} labels for {len(row_ids)} row ids")
    order = sorted(range(len(row_ids)), key=lambda i: row_ids[i])
    return [int(row_ids[i]) for i in order], None if labels is None else [labels[i] for i in order]


def _check_enough(rows: int, num_clients: int, min_rows: int, kind: str) -> None:
    if num_clients < 1:
        raise DataError(f"federation.num_clients: must be at least 1, got {num_clients}")
    if rows < num_clients * min_rows:
        raise DataError(
            f"partition: {rows} training rows cannot give {num_clients} clients at least {min_rows} row(s) "
            f"each ({kind}); lower federation.num_clients or partition.min_rows_per_client, "
            "or load more rows (data.max_rows, data.holdout)"
        )


def _label_counts(
    clients: list[list[int]], label_of: dict[int, str | None] | None
) -> list[dict[str, int]] | None:
    if label_of is None or any(label is None for label in label_of.values()):
        return None
    return [dict(sorted(Counter(str(label_of[r]) for r in rows).items())) for rows in clients]


def partition_iid(
    row_ids: Sequence[int],
    num_clients: int,
    seed: int,
    labels: Sequence[str | None] | None = None,
    *,
    min_rows_per_client: int = 1,
) -> Partition:
    """Shuffle and cut into ``num_clients`` shards whose sizes differ by at most one; every row is used."""
    ids, labs = _sorted_inputs(row_ids, labels)
    _check_enough(len(ids), num_clients, min_rows_per_client, "iid")
    shuffled = np.random.default_rng(seed).permutation(np.asarray(ids, dtype=np.int64))
    clients = [sorted(int(r) for r in shard) for shard in np.array_split(shuffled, num_clients)]
    label_of = None if labs is None else dict(zip(ids, labs, strict=True))
    return Partition(clients, "iid", None, seed, _label_counts(clients, label_of))


def partition_dirichlet(
    row_ids: Sequence[int],
    labels: Sequence[str | None],
    num_clients: int,
    alpha: float,
    seed: int,
    min_rows_per_client: int = 1,
    max_tries: int = 1000,
) -> Partition:
    """Per label, draw client shares ~ Dir(alpha * 1_N) and cut that label's shuffled rows by them.

    Small alpha concentrates each label on few clients (strong skew); large alpha approaches IID. Draws are
    repeated, from the same generator, until every client has ``min_rows_per_client`` rows.
    """
    ids, sorted_labels = _sorted_inputs(row_ids, labels)
    labs = sorted_labels or []
    missing = [r for r, label in zip(ids, labs, strict=True) if label is None]
    if missing:
        raise DataError(
            f"partition.kind=dirichlet needs a label for every row, but {len(missing)} of {len(ids)} rows "
            f"have none (first: row {missing[0]}); set data.label_column to the column to partition over "
            "(dolly has category, metamathqa has type, gsm8k has none) or use partition.kind=iid"
        )
    if not alpha > 0:
        raise DataError(f"partition.alpha: must be > 0, got {alpha}")
    _check_enough(len(ids), num_clients, min_rows_per_client, "dirichlet")
    by_label: dict[str, list[int]] = {}
    for r, label in zip(ids, labs, strict=True):
        by_label.setdefault(str(label), []).append(r)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for label in sorted(by_label):
            rows = rng.permutation(np.asarray(by_label[label], dtype=np.int64))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares) * len(rows)).astype(int)[:-1]
            for shard, part in zip(shards, np.split(rows, cuts), strict=True):
                shard.extend(int(r) for r in part)
        if min(len(shard) for shard in shards) >= min_rows_per_client:
            clients = [sorted(shard) for shard in shards]
            label_of = dict(zip(ids, (str(label) for label in labs), strict=True))
            return Partition(clients, "dirichlet", alpha, seed, _label_counts(clients, label_of))
    raise DataError(
        f"partition: {max_tries} Dirichlet draws (alpha={alpha}, {num_clients} clients, {len(ids)} rows, "
        f"{len(by_label)} labels) never gave every client at least {min_rows_per_client} row(s); raise "
        "partition.alpha, lower federation.num_clients or partition.min_rows_per_client, "
        "or use partition.kind=iid"
    )


def make_partition(
    examples: Sequence[Example], section: PartitionSection, num_clients: int, seed: int
) -> Partition:
    """Partition ``examples`` as the recipe's ``partition`` section says, over each Example's ``label``."""
    row_ids = [e.row_id for e in examples]
    labels = [e.label for e in examples]
    if section.kind == "iid":
        return partition_iid(
            row_ids, num_clients, seed, labels, min_rows_per_client=section.min_rows_per_client
        )
    if section.kind == "dirichlet":
        return partition_dirichlet(
            row_ids, labels, num_clients, section.alpha, seed, section.min_rows_per_client
        )
    raise DataError(f"partition.kind: unknown kind {section.kind!r} (expected iid or dirichlet)")
