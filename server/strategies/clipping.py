"""Update clipping: how far one device may move the model in a round.

Contract: an update's size is the L2 norm of ``w_device - w_base`` over every *float*
tensor together (integer and boolean tensors -- counters such as BatchNorm's
``num_batches_tracked`` -- are neither measured nor clipped). :func:`update_norm`
computes it in float64, block by block (temporaries of :data:`server.aggregation.BLOCK`
elements, whatever the model's size), from read-only views; :func:`clip_scale` is the
factor ``min(1, C / norm)`` that brings an update over ``C`` back to exactly ``C``: the
clipped update is ``w_base + scale * (w_device - w_base)`` (applied by the strategies,
:meth:`server.aggregation.FedAvg.add` and :mod:`server.strategies.robust`). Pure: no I/O.
:class:`Added` is what a strategy reports for each update it takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.aggregation import BLOCK, StateDict


@dataclass(frozen=True)
class Added:
    """One update as a strategy took it: its distance from the base (None when not
    measured: no clipping configured) and the factor it was scaled by (1.0: unchanged)."""

    norm: float | None = None
    scale: float = 1.0

    @property
    def clipped(self) -> bool:
        return self.scale < 1.0


def is_float(dtype: np.dtype[Any]) -> bool:
    """Whether clipping and server optimizers apply to tensors of ``dtype``."""
    return bool(np.issubdtype(dtype, np.floating))


def update_norm(update: StateDict, base: StateDict) -> float:
    """L2 norm of ``update - base`` over every float tensor, in float64 (non-finite
    when the difference overflows)."""
    total = 0.0
    for name, ref in base.items():
        if not is_float(ref.dtype):
            continue
        flat_in, flat_base = update[name].reshape(-1), ref.reshape(-1)
        for start in range(0, flat_base.size, BLOCK):
            diff = flat_in[start : start + BLOCK].astype(np.float64)
            diff -= flat_base[start : start + BLOCK]
            total += float(np.dot(diff, diff))
    return math.sqrt(total)


def clip_scale(norm: float, clip_norm: float | None) -> float:
    """The factor bringing an update of ``norm`` within ``clip_norm`` (1.0: unchanged;
    a non-finite norm is scaled to nothing)."""
    if clip_norm is None or norm <= clip_norm:
        return 1.0
    if not math.isfinite(norm):
        return 0.0
    return clip_norm / norm
