"""Data partitioning: disjoint, complete, deterministic, and skewed when asked."""

from __future__ import annotations

import numpy as np
import pytest

from client.errors import FedtrayError
from client.protocol import Partition
from client.tasks.partition import partition_indices

LABELS_100 = np.repeat(np.arange(10), 10)  # 10 labels x 10 samples, sorted
LABELS_ODD = np.random.default_rng(5).integers(0, 7, size=103)


def _parts(labels: np.ndarray, count: int, scheme: str, seed: int = 0) -> list[np.ndarray]:
    return [
        partition_indices(labels, Partition(index=i, count=count, seed=seed, scheme=scheme))  # type: ignore[arg-type]
        for i in range(count)
    ]


@pytest.mark.parametrize(
    ("labels", "count", "scheme", "sizes"),
    [
        (LABELS_100, 1, "iid", [100]),
        (LABELS_100, 3, "iid", [34, 33, 33]),
        (LABELS_100, 7, "iid", [15, 15, 14, 14, 14, 14, 14]),
        (LABELS_ODD, 4, "iid", [26, 26, 26, 25]),
        (LABELS_100, 1, "label_skew", [100]),
        (LABELS_100, 5, "label_skew", [20, 20, 20, 20, 20]),
        (LABELS_ODD, 2, "label_skew", None),
        (LABELS_ODD, 10, "label_skew", None),
        (np.zeros(2, dtype=np.int64), 2, "iid", [1, 1]),
        (np.arange(4), 2, "label_skew", [2, 2]),
    ],
)
def test_parts_are_disjoint_cover_everything_and_have_the_expected_sizes(
    labels: np.ndarray, count: int, scheme: str, sizes: list[int] | None
) -> None:
    parts = _parts(labels, count, scheme)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # disjoint + complete
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    if sizes is not None:
        assert [len(p) for p in parts] == sizes
    else:  # each part holds two shards of near-equal size
        shard = len(labels) / (2 * count)
        assert all(2 * int(shard) <= len(p) <= 2 * (int(shard) + 1) for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "label_skew"])
def test_same_seed_same_parts_other_seed_other_parts(scheme: str) -> None:
    first = _parts(LABELS_ODD, 3, scheme, seed=1)
    again = _parts(LABELS_ODD, 3, scheme, seed=1)
    other = _parts(LABELS_ODD, 3, scheme, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_label_skew_gives_each_device_few_labels_and_iid_gives_all() -> None:
    skewed = _parts(LABELS_100, 5, "label_skew", seed=3)
    # 10 shards of exactly one label each: every device sees exactly 2 labels.
    assert [len(set(LABELS_100[p].tolist())) for p in skewed] == [2, 2, 2, 2, 2]
    iid = _parts(np.tile(np.arange(10), 30), 3, "iid", seed=3)
    assert all(len(set(np.tile(np.arange(10), 30)[p].tolist())) == 10 for p in iid)


@pytest.mark.parametrize(
    ("labels", "partition", "words"),
    [
        (np.zeros((4, 2)), Partition(index=0, count=2), "one-dimensional"),
        (np.zeros(2), Partition(index=0, count=3), "cannot split 2 samples"),
        (np.zeros(5), Partition(index=0, count=3, scheme="label_skew"), "6 label shards"),
        (np.zeros(0), Partition(index=0, count=1), "cannot split 0"),
    ],
)
def test_unusable_inputs_raise_bad_request(
    labels: np.ndarray, partition: Partition, words: str
) -> None:
    with pytest.raises(FedtrayError) as info:
        partition_indices(labels, partition)
    assert info.value.code == "bad_request"
    assert words in info.value.message
