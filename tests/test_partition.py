"""Partitioners: IID shard sizes, seeded determinism, Dirichlet skew against alpha, errors, manifests."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedalign.data.examples import Example
from fedalign.data.partition import Partition, make_partition, partition_dirichlet, partition_iid
from fedalign.errors import DataError
from fedalign.recipe import PartitionSection

LABELS = [f"type{i % 5}" for i in range(1000)]
ROW_IDS = list(range(1000))


def assert_covers_exactly(partition: Partition, row_ids: list[int]) -> None:
    used = [r for rows in partition.clients for r in rows]
    assert sorted(used) == sorted(row_ids)  # every row once, none twice
    assert all(rows == sorted(rows) for rows in partition.clients)


def mean_tv_distance(partition: Partition, labels: list[str]) -> float:
    """Mean total-variation distance between each client's label mix and the global one (0 = IID)."""
    names = sorted(set(labels))
    overall = np.array([Counter(labels)[n] for n in names], dtype=float) / len(labels)
    distances = []
    for rows in partition.clients:
        counts = Counter(labels[r] for r in rows)
        local = np.array([counts[n] for n in names], dtype=float) / len(rows)
        distances.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(distances))


@pytest.mark.parametrize(("rows", "clients"), [(10, 3), (103, 10), (7, 7), (1000, 1)])
def test_iid_sizes_differ_by_at_most_one_and_use_every_row(rows: int, clients: int) -> None:
    partition = partition_iid(list(range(rows)), clients, seed=0)
    sizes = partition.sizes()
    assert len(sizes) == clients and max(sizes) - min(sizes) <= 1
    assert_covers_exactly(partition, list(range(rows)))
    assert (partition.kind, partition.alpha, partition.label_counts) == ("iid", None, None)


def test_iid_is_deterministic_under_seed_and_input_order() -> None:
    first = partition_iid(ROW_IDS, 7, seed=11, labels=LABELS)
    assert first == partition_iid(ROW_IDS, 7, seed=11, labels=LABELS)
    assert first == partition_iid(ROW_IDS[::-1], 7, seed=11, labels=LABELS[::-1])
    assert first.clients != partition_iid(ROW_IDS, 7, seed=12).clients
    assert first.label_counts is not None
    assert sum(sum(c.values()) for c in first.label_counts) == 1000


def test_iid_with_fewer_rows_than_clients_is_an_error() -> None:
    with pytest.raises(DataError, match=r"3 training rows cannot give 5 clients at least 1 row.*num_clients"):
        partition_iid([0, 1, 2], 5, seed=0)


def test_partitioners_leave_global_numpy_rng_alone() -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    partition_iid(ROW_IDS, 4, seed=0)
    partition_dirichlet(ROW_IDS, LABELS, 4, 0.5, seed=0)
    assert np.random.random() == expected


def test_dirichlet_is_deterministic_and_covers_every_row() -> None:
    first = partition_dirichlet(ROW_IDS, LABELS, 10, 0.5, seed=4)
    assert first == partition_dirichlet(ROW_IDS, LABELS, 10, 0.5, seed=4)
    assert first.clients != partition_dirichlet(ROW_IDS, LABELS, 10, 0.5, seed=5).clients
    assert_covers_exactly(first, ROW_IDS)
    assert first.label_counts is not None
    for rows, counts in zip(first.clients, first.label_counts, strict=True):
        assert counts == dict(sorted(Counter(LABELS[r] for r in rows).items()))


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    def skew(alpha: float) -> float:
        return float(
            np.mean(
                [
                    mean_tv_distance(partition_dirichlet(ROW_IDS, LABELS, 10, alpha, s), LABELS)
                    for s in range(5)
                ]
            )
        )

    strong, medium, weak = skew(0.1), skew(1.0), skew(100.0)
    assert strong > medium > weak
    assert strong > 0.4 and weak < 0.1  # alpha=0.1 is far from IID, alpha=100 close to it


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_dirichlet_gives_every_client_the_minimum(alpha: float) -> None:
    for seed in range(3):
        partition = partition_dirichlet(ROW_IDS, LABELS, 20, alpha, seed, min_rows_per_client=5)
        assert min(partition.sizes()) >= 5
        assert_covers_exactly(partition, ROW_IDS)


def test_impossible_dirichlet_requests_explain_what_to_change() -> None:
    with pytest.raises(DataError, match=r"10 training rows cannot give 4 clients at least 3 row"):
        partition_dirichlet(list(range(10)), ["a"] * 10, 4, 0.5, seed=0, min_rows_per_client=3)
    # One label and a tiny alpha put nearly everything on one client, draw after draw.
    with pytest.raises(DataError) as info:
        partition_dirichlet(
            list(range(100)), ["a"] * 100, 10, 0.001, seed=0, min_rows_per_client=5, max_tries=50
        )
    text = str(info.value)
    assert "50 Dirichlet draws" in text and "partition.alpha" in text and "partition.kind=iid" in text


def test_dirichlet_without_labels_names_the_label_column() -> None:
    labels: list[str | None] = ["a", None, "b", None]
    with pytest.raises(DataError, match=r"2 of 4 rows have none \(first: row 1\); set data.label_column"):
        partition_dirichlet([0, 1, 2, 3], labels, 2, 0.5, seed=0)


def example(row_id: int, label: str | None) -> Example:
    return Example(row_id, f"f.jsonl:{row_id + 1}", [{"role": "user", "content": "q"}], [], label)


def test_make_partition_dispatches_on_kind() -> None:
    examples = [example(r, LABELS[r]) for r in range(200)]
    iid = make_partition(examples, PartitionSection(kind="iid"), 4, seed=1)
    assert iid == partition_iid(list(range(200)), 4, 1, LABELS[:200])
    section = PartitionSection(kind="dirichlet", alpha=0.3, min_rows_per_client=2)
    dirichlet = make_partition(examples, section, 4, seed=1)
    assert dirichlet == partition_dirichlet(list(range(200)), LABELS[:200], 4, 0.3, 1, 2)
    assert (dirichlet.kind, dirichlet.alpha) == ("dirichlet", 0.3)
    with pytest.raises(DataError, match=r"data\.label_column"):
        make_partition([example(r, None) for r in range(10)], section, 2, seed=1)


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    partition = partition_dirichlet(ROW_IDS, LABELS, 6, 0.5, seed=2)
    path = partition.save(tmp_path / "run" / "partition.json")
    manifest = json.loads(path.read_text())
    assert manifest["kind"] == "dirichlet" and manifest["alpha"] == 0.5 and manifest["seed"] == 2
    assert manifest["num_clients"] == 6 and manifest["sizes"] == partition.sizes()
    assert manifest["clients"][3]["row_ids"] == partition.clients[3]
    assert Partition.load(path) == partition
    assert [p.name for p in path.parent.iterdir()] == ["partition.json"]  # no temp file left behind
    iid = partition_iid(list(range(9)), 2, seed=0)
    assert Partition.from_manifest(json.loads(json.dumps(iid.to_manifest()))) == iid
