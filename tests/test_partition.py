"""Data partitioning: disjoint, complete, deterministic, and skewed when asked.

Every scheme is checked by table for disjoint, covering, sorted int64 parts; the same
seed gives the same parts; ``label_skew`` gives two labels per device; ``dirichlet``
gets more skewed as alpha shrinks (measured on fixed seeds), never leaves a device empty
(tiny data: single-row parts), and ignores alpha in the other schemes.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from client.errors import FedtrayError
from client.protocol import Partition
from client.tasks.partition import partition_indices

LABELS_100 = np.repeat(np.arange(10), 10)  # 10 labels x 10 samples, sorted
LABELS_ODD = np.random.default_rng(5).integers(0, 7, size=103)


LABELS_600 = np.repeat(np.arange(10), 60)


def _parts(
    labels: np.ndarray, count: int, scheme: str, seed: int = 0, alpha: float = 0.5
) -> list[np.ndarray]:
    return [
        partition_indices(
            labels,
            Partition.model_validate(
                {"index": i, "count": count, "seed": seed, "scheme": scheme, "alpha": alpha}
            ),
        )
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
        (LABELS_100, 1, "dirichlet", [100]),
        (LABELS_100, 5, "dirichlet", None),
        (LABELS_ODD, 4, "dirichlet", None),
        (LABELS_ODD, 10, "dirichlet", None),
        (np.arange(5.0), 5, "dirichlet", [1, 1, 1, 1, 1]),  # tiny: one row each
        (np.zeros(3, dtype=np.int64), 3, "dirichlet", [1, 1, 1]),  # one class, tiny
        (np.array([2.5, np.nan, 2.5, np.nan, 0.0]), 2, "dirichlet", None),  # NaN is a label
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
    elif scheme == "dirichlet":  # sizes are drawn; none is empty
        assert all(len(p) >= 1 for p in parts)
    else:  # each part holds two shards of near-equal size
        shard = len(labels) / (2 * count)
        assert all(2 * int(shard) <= len(p) <= 2 * (int(shard) + 1) for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "label_skew", "dirichlet"])
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
        (np.zeros(4), Partition(index=0, count=5, scheme="dirichlet"), "cannot split 4"),
        (np.zeros(0), Partition(index=0, count=1, scheme="dirichlet"), "cannot split 0"),
        (np.zeros((3, 3)), Partition(index=0, count=1, scheme="dirichlet"), "one-dimensional"),
    ],
)
def test_unusable_inputs_raise_bad_request(
    labels: np.ndarray, partition: Partition, words: str
) -> None:
    with pytest.raises(FedtrayError) as info:
        partition_indices(labels, partition)
    assert info.value.code == "bad_request"
    assert words in info.value.message


def _skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of the parts' label mix from the whole data's."""
    classes = int(labels.max()) + 1
    whole = np.bincount(labels, minlength=classes) / len(labels)
    mixes = [np.bincount(labels[p], minlength=classes) / len(p) for p in parts]
    return float(np.mean([0.5 * np.abs(mix - whole).sum() for mix in mixes]))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    seeds = range(5)
    skews = [
        np.mean([_skew(LABELS_600, _parts(LABELS_600, 5, "dirichlet", s, alpha)) for s in seeds])
        for alpha in (1000.0, 10.0, 1.0, 0.5, 0.1, 0.01)
    ]
    assert skews == sorted(skews), skews
    assert skews[0] < 0.05  # alpha 1000: close to IID
    assert skews[-1] > 0.7  # alpha 0.01: most parts hold about one class


def test_dirichlet_labels_per_device_shrink_with_alpha() -> None:
    def labels_seen(alpha: float) -> int:  # summed over the 5 devices
        parts = _parts(LABELS_600, 5, "dirichlet", 3, alpha)
        return sum(len(set(LABELS_600[p].tolist())) for p in parts)

    # alpha 1000: every device sees all 10; alpha 0.01: nearly each class on one device.
    assert labels_seen(1000.0) == 50
    assert labels_seen(0.01) < labels_seen(1.0) < 50
    assert labels_seen(0.01) <= 13


@pytest.mark.parametrize("scheme", ["iid", "label_skew"])
def test_alpha_changes_nothing_outside_dirichlet(scheme: str) -> None:
    a = _parts(LABELS_ODD, 3, scheme, seed=4, alpha=0.5)
    b = _parts(LABELS_ODD, 3, scheme, seed=4, alpha=50.0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_dirichlet_alpha_is_part_of_the_split() -> None:
    a = _parts(LABELS_600, 4, "dirichlet", seed=1, alpha=0.5)
    b = _parts(LABELS_600, 4, "dirichlet", seed=1, alpha=5.0)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_dirichlet_fills_empty_parts_from_the_largest() -> None:
    # alpha tiny: the draw gives each class to one part, so most of the 8 parts start
    # empty; each then takes one row from the largest, and nothing is lost.
    labels = np.repeat(np.arange(2), 6)
    parts = _parts(labels, 8, "dirichlet", seed=0, alpha=1e-6)
    sizes = sorted(len(p) for p in parts)
    assert sizes[:6] == [1] * 6 and sum(sizes) == 12
    assert sorted(np.concatenate(parts).tolist()) == list(range(12))


@pytest.mark.parametrize(
    ("alpha", "ok"),
    [
        (0.5, True),
        (1e-6, True),
        (1_000_000.0, True),
        (0.0, False),
        (-1.0, False),
        (float("nan"), False),
        (float("inf"), False),
        (2_000_000.0, False),
    ],
)
def test_partition_alpha_range(alpha: float, ok: bool) -> None:
    data = {"index": 0, "count": 2, "scheme": "dirichlet", "alpha": alpha}
    if ok:
        assert Partition.model_validate(data).alpha == alpha
    else:
        with pytest.raises(ValidationError):
            Partition.model_validate(data)
