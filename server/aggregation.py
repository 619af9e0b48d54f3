"""Aggregation strategies: how a round's client updates become the next global model.

Contract: a :class:`Strategy` is used once per round as ``begin(global_state)``, then
``add(update, num_samples)`` for each accepted update as it arrives, then ``result()``.
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
the same three calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import numpy.typing as npt

StateDict = dict[str, npt.NDArray[Any]]
#: Elements per step of the blockwise loops (bounds temporaries to ~0.5 MB).
BLOCK = 1 << 16


class Strategy(ABC):
    """One round's aggregation: ``begin``, then ``add`` per update, then ``result``."""

    @abstractmethod
    def begin(self, global_state: StateDict) -> None:
        """Start a round from the current global weights (forgets any previous round)."""

    @abstractmethod
    def add(self, update: StateDict, num_samples: int) -> None:
        """Fold in one client's weights, trained on ``num_samples`` samples."""

    @abstractmethod
    def result(self) -> StateDict:
        """The new global weights."""

    @property
    @abstractmethod
    def count(self) -> int:
        """Updates added since ``begin``."""


class FedAvg(Strategy):
    """Sample-weighted mean of client weights, accumulated in float64 as updates arrive."""

    def __init__(self) -> None:
        self._sums: dict[str, npt.NDArray[np.float64]] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._weight = 0.0
        self._count = 0
        self._block = np.empty(BLOCK, dtype=np.float64)

    def begin(self, global_state: StateDict) -> None:
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

    def add(self, update: StateDict, num_samples: int) -> None:
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
            # In blocks: the float64 temporary is BLOCK elements, reused, not a whole tensor.
            for start in range(0, flat_acc.size, BLOCK):
                end = min(start + BLOCK, flat_acc.size)
                if first:
                    np.multiply(flat_in[start:end], weight, out=flat_acc[start:end])
                else:
                    tmp = block[: end - start]
                    np.multiply(flat_in[start:end], weight, out=tmp)
                    flat_acc[start:end] += tmp
        self._weight += weight
        self._count += 1

    def result(self) -> StateDict:
        if self._count == 0:
            raise ValueError("no update was added in this round")
        out: StateDict = {}
        for name, acc in self._sums.items():
            dtype = self._dtypes[name]
            result = np.empty(acc.shape, dtype=dtype)
            flat_out, flat_acc = result.reshape(-1), acc.reshape(-1)
            for start in range(0, flat_acc.size, BLOCK):
                mean = flat_acc[start : start + BLOCK] / self._weight
                if dtype == np.bool_:
                    flat_out[start : start + BLOCK] = mean >= 0.5
                elif np.issubdtype(dtype, np.integer):
                    flat_out[start : start + BLOCK] = np.rint(mean)
                else:
                    flat_out[start : start + BLOCK] = mean
            out[name] = result
        return out


def weighted_mean(values: list[tuple[float, int]]) -> float | None:
    """Mean of ``(value, weight)`` pairs weighted by the weights; None when empty."""
    total = sum(w for _, w in values)
    if total <= 0:
        return None
    return sum(v * w for v, w in values) / total
