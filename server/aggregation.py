"""The running sample-weighted mean (FedAvg's accumulator) and the dtype rule of aggregates.

Contract: a :class:`FedAvg` accumulator is used once per round as ``begin(global_state)``,
then ``add(update, num_samples)`` for each accepted update as it arrives, then ``result()``
(the mean in the global model's dtypes) or :meth:`FedAvg.means` (the mean in float64, for
a server optimizer). The strategies the server runs (:mod:`server.strategies`) are built
on it; ``add(..., scale=s)`` folds the *clipped* update ``base + s * (update - base)``
instead of the update (float tensors only; :mod:`server.strategies.clipping`).
``add`` only reads the update: its arrays may be read-only, zero-copy views over the
received document (any byte order, any alignment), and nothing of them is kept.
Updates must have the global model's layout (the server checks it with the codec before
calling ``add``); ``add`` raises ``ValueError`` otherwise and ``result`` raises
``ValueError`` when nothing was added. Pure numpy, no I/O.

:class:`FedAvg` (McMahan et al. 2017) is the mean of the updates weighted by their sample
counts. It keeps one float64 running sum per tensor, so its memory is O(model), not
O(clients x model): the accumulator count never grows with the number of updates, and an
update is read block by block into one reused float64 buffer (never copied whole). The
result has the global model's dtypes (integer tensors are rounded). Other strategies
(FedProx's server side is FedAvg; FedAdam keeps optimizer moments next to the sums) fit
the same three calls. :func:`cast_like` is the one rule turning a float64 aggregate into a
tensor's dtype (integers rounded, booleans by majority).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import numpy.typing as npt

StateDict = dict[str, npt.NDArray[Any]]
#: Elements per step of the blockwise loops (bounds temporaries to ~0.5 MB).
BLOCK = 1 << 16


class Accumulator(ABC):
    """One round's aggregation: ``begin``, then ``add`` per update, then ``result``."""

    @abstractmethod
    def begin(self, global_state: StateDict) -> None:
        """Start a round from the current global weights (forgets any previous round)."""

    @abstractmethod
    def add(self, update: StateDict, num_samples: int, *, scale: float = 1.0) -> None:
        """Fold in one client's weights, trained on ``num_samples`` samples (float tensors
        scaled towards the base by ``scale``: ``base + scale * (update - base)``)."""

    @abstractmethod
    def result(self) -> StateDict:
        """The new global weights."""

    @property
    @abstractmethod
    def count(self) -> int:
        """Updates added since ``begin``."""


class FedAvg(Accumulator):
    """Sample-weighted mean of client weights, accumulated in float64 as updates arrive."""

    def __init__(self) -> None:
        self._sums: dict[str, npt.NDArray[np.float64]] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._weight = 0.0
        self._count = 0
        self._block = np.empty(BLOCK, dtype=np.float64)
        self._base: StateDict = {}

    def begin(self, global_state: StateDict) -> None:
        self._base = global_state
        self._dtypes = {k: v.dtype for k, v in global_state.items()}
        self._shapes = {k: tuple(v.shape) for k, v in global_state.items()}
        self._sums = {}
        self._weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def accumulators(self) -> int:
        """Number of arrays held (one per tensor, whatever the number of updates)."""
        return len(self._sums)

    def add(self, update: StateDict, num_samples: int, *, scale: float = 1.0) -> None:
        if not (np.isfinite(scale) and 0 <= scale <= 1):
            raise ValueError(f"scale must be in [0, 1], got {scale}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if set(update) != set(self._shapes):
            raise ValueError("the update's tensor names differ from the global model's")
        for name, shape in self._shapes.items():
            if tuple(update[name].shape) != shape:
                raise ValueError(f"tensor {name} has shape {update[name].shape}, not {shape}")
        weight = float(num_samples)
        block = self._block
        for name, arr in update.items():
            acc = self._sums.get(name)
            first = acc is None
            if acc is None:
                acc = self._sums[name] = np.empty(arr.shape, dtype=np.float64)
            flat_acc = acc.reshape(-1)
            flat_in = arr.reshape(-1)  # a view for contiguous input (a copy only otherwise)
            clip = scale != 1.0 and np.issubdtype(self._dtypes[name], np.floating)
            flat_base = self._base[name].reshape(-1) if clip else flat_in
            # In blocks: the float64 temporary is BLOCK elements, reused, not a whole tensor.
            for start in range(0, flat_acc.size, BLOCK):
                end = min(start + BLOCK, flat_acc.size)
                if clip:
                    # weight * (base + scale * (update - base)), in float64
                    tmp = block[: end - start]
                    np.subtract(flat_in[start:end], flat_base[start:end], out=tmp)
                    tmp *= scale
                    tmp += flat_base[start:end]
                    tmp *= weight
                    if first:
                        flat_acc[start:end] = tmp
                    else:
                        flat_acc[start:end] += tmp
                elif first:
                    np.multiply(flat_in[start:end], weight, out=flat_acc[start:end])
                else:
                    tmp = block[: end - start]
                    np.multiply(flat_in[start:end], weight, out=tmp)
                    flat_acc[start:end] += tmp
        self._weight += weight
        self._count += 1

    def result(self, out: StateDict | None = None) -> StateDict:
        """The weighted mean, each tensor cast to its base's dtype; written into ``out``'s
        arrays (C-contiguous, of the base's shapes and dtypes; ``out`` is returned) when
        given, else into new ones."""
        if self._count == 0:
            raise ValueError("no update was added in this round")
        if out is None:
            out = {
                name: np.empty(acc.shape, dtype=self._dtypes[name])
                for name, acc in self._sums.items()
            }
        for name, acc in self._sums.items():
            dtype = self._dtypes[name]
            result = out[name]
            if result.shape != acc.shape or result.dtype != dtype or not result.flags.c_contiguous:
                raise ValueError(f"tensor {name!r}: the output does not fit the aggregate")
            flat_out, flat_acc = result.reshape(-1), acc.reshape(-1)
            floating = np.issubdtype(dtype, np.floating)
            for start in range(0, flat_acc.size, BLOCK):
                end = min(start + BLOCK, flat_acc.size)
                if floating:  # the reused block, no temporaries: the same values as a cast
                    mean = np.divide(
                        flat_acc[start:end], self._weight, out=self._block[: end - start]
                    )
                    flat_out[start:end] = mean
                else:
                    mean = flat_acc[start:end] / self._weight
                    flat_out[start:end] = cast_like(mean, dtype)
        return out

    def means(self) -> dict[str, npt.NDArray[np.float64]]:
        """The weighted mean of each tensor in float64 (new arrays; O(model) float64)."""
        if self._count == 0:
            raise ValueError("no update was added in this round")
        return {name: acc / self._weight for name, acc in self._sums.items()}


def cast_like(values: npt.NDArray[np.float64], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """A float64 aggregate as ``dtype``: booleans by majority (>= 0.5), integers rounded to
    the nearest (half to even), floats cast."""
    if dtype == np.bool_:
        return values >= 0.5
    if np.issubdtype(dtype, np.integer):
        return np.rint(values).astype(dtype)
    return values.astype(dtype)


def weighted_mean(values: list[tuple[float, int]]) -> float | None:
    """Mean of ``(value, weight)`` pairs weighted by the weights; None when empty."""
    total = sum(w for _, w in values)
    if total <= 0:
        return None
    return sum(v * w for v, w in values) / total
