"""Which samples of a data set belong to one device: the data partition schemes.

Contract (pure functions, no I/O, no torch):

* :func:`partition_indices` returns the sorted row indices of part ``partition.index``
  of ``partition.count``. The parts of one ``(count, seed, scheme, alpha)`` are disjoint
  and together cover every row exactly once; the same inputs always give the same parts.
* ``iid``: a permutation seeded by ``partition.seed`` split into ``count`` parts whose
  sizes differ by at most one.
* ``label_skew`` (non-IID, McMahan et al. 2017, "Communication-Efficient Learning of
  Deep Networks from Decentralized Data"): rows sorted by label (ties in a seeded random
  order), cut into ``2 * count`` contiguous shards of near-equal size, and each part gets
  two shards chosen by a seeded permutation, so each device sees only a few labels.
* ``dirichlet`` (non-IID, Hsu, Qi & Brown 2019, "Measuring the Effects of Non-Identical
  Data Distribution for Federated Visual Classification"): for each class (each distinct
  label value, in sorted order) its rows are put in a seeded random order, proportions
  ``p ~ Dir(alpha, ..., alpha)`` over the ``count`` parts are drawn from the same seeded
  generator, and the class is cut into consecutive runs of ``round(p_k * n_class)`` rows
  (largest remainders, so the runs add up exactly). Smaller ``partition.alpha`` gives
  more skew (few classes per part, uneven sizes); large alpha approaches IID. Every part
  gets at least one row: after the draw, each empty part (lowest index first) takes the
  highest-numbered row of the currently largest part (lowest index on ties), which holds
  two or more rows whenever a part is empty because ``len(labels) >= count``. So tiny
  data sets give single-row parts rather than empty ones.
* Raises :class:`client.errors.FedtrayError` ``bad_request`` when ``labels`` is not
  one-dimensional or is too short: fewer rows than parts (``iid``, ``dirichlet``) or than
  shards (``label_skew``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from client.errors import FedtrayError
from client.protocol import Partition

__all__ = ["dirichlet_owners", "partition_indices"]


def partition_indices(labels: npt.NDArray[Any], partition: Partition) -> npt.NDArray[np.int64]:
    """Sorted indices (int64) of the rows of ``labels`` that form ``partition``."""
    if labels.ndim != 1:
        raise FedtrayError("bad_request", f"labels must be one-dimensional, got {labels.shape}")
    n = int(labels.shape[0])
    count = partition.count
    rng = np.random.default_rng(partition.seed)
    if partition.scheme in ("iid", "dirichlet") and n < count:
        raise FedtrayError("bad_request", f"cannot split {n} samples into {count} parts")
    if partition.scheme == "iid":
        part = np.array_split(rng.permutation(n), count)[partition.index]
    elif partition.scheme == "dirichlet":
        owners = dirichlet_owners(labels, count, partition.alpha, rng)
        part = np.flatnonzero(owners == partition.index)
    else:
        shards = 2 * count
        if n < shards:
            raise FedtrayError(
                "bad_request",
                f"cannot cut {n} samples into {shards} label shards for {count} parts",
            )
        # lexsort sorts by the last key first: by label, ties broken by a random key.
        order = np.lexsort((rng.random(n), labels))
        pieces = np.array_split(order, shards)
        chosen = rng.permutation(shards)[2 * partition.index : 2 * partition.index + 2]
        part = np.concatenate([pieces[i] for i in chosen])
    return np.sort(part).astype(np.int64)


def dirichlet_owners(
    labels: npt.NDArray[Any], count: int, alpha: float, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """The part (0..count-1) of every row under the ``dirichlet`` scheme (module
    docstring); ``len(labels) >= count >= 1`` and ``alpha > 0`` are the caller's."""
    n = int(labels.shape[0])
    # inverse: each row's class number; a stable sort groups the rows class by class.
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    by_class = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    owners = np.empty(n, dtype=np.int64)
    start = 0
    for size in sizes.tolist():
        rows = rng.permutation(by_class[start : start + size])
        start += size
        shares = rng.dirichlet(np.full(count, alpha))
        owners[rows] = np.repeat(np.arange(count), _apportion(size, shares))
    held = np.bincount(owners, minlength=count)
    for empty in np.flatnonzero(held == 0).tolist():
        donor = int(np.argmax(held))  # lowest index among the largest
        row = int(np.flatnonzero(owners == donor)[-1])
        owners[row] = empty
        held[donor] -= 1
        held[empty] += 1
    return owners


def _apportion(total: int, shares: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Whole counts adding up to ``total`` in proportion to ``shares`` (largest remainder,
    lowest index first on ties)."""
    raw = shares * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts
