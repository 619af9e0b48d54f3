"""Robust aggregation: coordinate-wise median and trimmed mean of the round's updates.

Contract: :class:`CoordinateMedian` (Yin et al. 2018, arXiv:1803.01498) and
:class:`TrimmedMean` (same paper; ``trim_fraction`` b drops ``floor(b * n)`` of the n
values at each end of every coordinate and averages the rest, as Flower's
``FedTrimmedAvg``) compute each coordinate of the new global from that coordinate of the
round's n updates, **unweighted** by sample counts (a weight is a device's own claim; a
robust rule must not let one device buy influence with it). Even n: the median is the
mean of the two middle values.

Nothing is accumulated while updates arrive (``add`` only checks an update and measures
its clipping). At the end of the round the updates are read again where they lie (the
round store's files, mapped read-only: :class:`server.strategies.base.FileUpdates`),
block by block: one float64 buffer of n x (:data:`server.aggregation.BLOCK` / n, at least
:data:`MIN_COLUMNS`) elements is filled with one block of every update (clipped updates
rescaled towards the base on the way), sorted or partitioned in place along the devices,
and reduced into the output. Memory is O(block x devices) on top of the O(model) result,
never O(model x devices) (measured by ``benchmarks/robust_aggregation.py``). Every tensor
goes through the same rule, integer and boolean tensors included (then rounded, booleans
by majority: :func:`server.aggregation.cast_like`).
"""

from __future__ import annotations

import math

import numpy as np

from server.aggregation import BLOCK, StateDict
from server.strategies.base import Float64, Strategy, UpdateSource, check_layout
from server.strategies.clipping import is_float

#: The fewest coordinates per block, however many devices (bounds per-block overhead).
MIN_COLUMNS = 1024


class _Robust(Strategy):
    """Shared block loop of the coordinate-wise rules."""

    reads_kept_updates = True

    def _begin(self, base: StateDict) -> None:
        pass

    def _add(self, update: StateDict, num_samples: int, scale: float) -> None:
        pass  # read again at the end of the round, from where it is kept

    def _reduce(self, block: Float64, out: Float64) -> None:
        """Reduce ``block`` (devices x columns; may be reordered in place) into ``out``."""
        raise NotImplementedError

    def _aggregate(self, source: UpdateSource) -> dict[str, Float64]:
        base = self._base
        with source.open_all() as kept:
            n = len(kept)
            if n != self.count:
                raise ValueError(f"{n} updates kept, but {self.count} were added this round")
            updates = [update for update, _ in kept]
            for update in updates:
                check_layout(update, base)
            scales = [self.measure(update).scale for update in updates]
            columns = max(MIN_COLUMNS, BLOCK // n)
            buffer = np.empty((n, columns), dtype=np.float64)
            out: dict[str, Float64] = {}
            for name, ref in base.items():
                clip = is_float(ref.dtype)
                flat_base = ref.reshape(-1)
                flats = [update[name].reshape(-1) for update in updates]
                result = np.empty(flat_base.size, dtype=np.float64)
                for start in range(0, flat_base.size, columns):
                    end = min(start + columns, flat_base.size)
                    block = buffer[:, : end - start]
                    for row, (flat, scale) in enumerate(zip(flats, scales, strict=True)):
                        block[row] = flat[start:end]
                        if clip and scale != 1.0:
                            block[row] -= flat_base[start:end]
                            block[row] *= scale
                            block[row] += flat_base[start:end]
                    self._reduce(block, result[start:end])
                out[name] = result.reshape(ref.shape)
                del flats
            del updates
        return out


class CoordinateMedian(_Robust):
    """Coordinate-wise median."""

    def _reduce(self, block: Float64, out: Float64) -> None:
        n = block.shape[0]
        lo, hi = (n - 1) // 2, n // 2
        block.partition(sorted({lo, hi}), axis=0)
        np.add(block[lo], block[hi], out=out)
        out *= 0.5


class TrimmedMean(_Robust):
    """Coordinate-wise trimmed mean (``trim_fraction`` dropped at each end)."""

    def _begin(self, base: StateDict) -> None:
        self._fraction = self.settings.parameters()["trim_fraction"]

    def _reduce(self, block: Float64, out: Float64) -> None:
        n = block.shape[0]
        k = trimmed_count(self._fraction, n)
        block.sort(axis=0)
        np.mean(block[k : n - k], axis=0, out=out)


def trimmed_count(fraction: float, n: int) -> int:
    """Values dropped at each end of a coordinate: ``floor(fraction * n)`` (float noise
    such as ``0.29 * 100 = 28.999...`` does not lose one), always leaving at least one."""
    return min(math.floor(fraction * n + 1e-9), (n - 1) // 2)
