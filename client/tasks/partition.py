"""Which samples of a data set belong to one device: the data partition schemes.

Contract (pure functions, no I/O, no torch):

* :func:`partition_indices` returns the sorted row indices of part ``partition.index``
  of ``partition.count``. The parts of one ``(count, seed, scheme)`` are disjoint and
  together cover every row exactly once; the same inputs always give the same parts.
* ``iid``: a permutation seeded by ``partition.seed`` split into ``count`` parts whose
  sizes differ by at most one.
* ``label_skew`` (non-IID, McMahan et al. 2017, "Communication-Efficient Learning of
  Deep Networks from Decentralized Data"): rows sorted by label (ties in a seeded random
  order), cut into ``2 * count`` contiguous shards of near-equal size, and each part gets
  two shards chosen by a seeded permutation, so each device sees only a few labels.
* Raises :class:`client.errors.FedtrayError` ``bad_request`` when ``labels`` is not
  one-dimensional or is too short to give every part at least one row per shard.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from client.errors import FedtrayError
from client.protocol import Partition

__all__ = ["partition_indices"]


def partition_indices(labels: npt.NDArray[Any], partition: Partition) -> npt.NDArray[np.int64]:
    """Sorted indices (int64) of the rows of ``labels`` that form ``partition``."""
    if labels.ndim != 1:
        raise FedtrayError("bad_request", f"labels must be one-dimensional, got {labels.shape}")
    n = int(labels.shape[0])
    count = partition.count
    rng = np.random.default_rng(partition.seed)
    if partition.scheme == "iid":
        if n < count:
            raise FedtrayError("bad_request", f"cannot split {n} samples into {count} parts")
        part = np.array_split(rng.permutation(n), count)[partition.index]
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
