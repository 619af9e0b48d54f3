"""Aggregation strategies: what the server does with a round's updates.

Contract: :func:`build_strategy` is the one place a :class:`StrategySettings` (the
``--strategy`` flag and its parameters, :mod:`server.strategies.settings`) becomes a
:class:`Strategy` (:mod:`server.strategies.base`): FedAvg and FedProx (plain weighted
mean), FedAvgM (server momentum), FedAdam (server Adam), median and trimmed mean
(robust, block by block over the kept update files), each with optional clipping. It
raises ``ValueError`` with the settings' one-line problem when they are invalid.
``docs/strategies.md`` says when to pick which.
"""

from __future__ import annotations

from server.strategies.base import (
    Aggregate,
    FileUpdates,
    MemoryUpdates,
    Strategy,
    UpdateSource,
)
from server.strategies.clipping import Added
from server.strategies.fedavg import WeightedMean
from server.strategies.optimizers import Adam, Momentum, Plain, ServerOptimizer
from server.strategies.robust import CoordinateMedian, TrimmedMean
from server.strategies.settings import STRATEGIES, StrategyName, StrategySettings

__all__ = [
    "STRATEGIES",
    "Added",
    "Aggregate",
    "FileUpdates",
    "MemoryUpdates",
    "Strategy",
    "StrategyName",
    "StrategySettings",
    "UpdateSource",
    "build_strategy",
]


def build_strategy(settings: StrategySettings | None = None) -> Strategy:
    """The strategy ``settings`` describe (FedAvg when None)."""
    settings = settings if settings is not None else StrategySettings()
    problem = settings.problem()
    if problem is not None:
        raise ValueError(problem)
    params = settings.parameters()
    name = settings.strategy
    optimizer: ServerOptimizer = Plain()
    if name == "fedavgm":
        optimizer = Momentum(params["server_lr"], params["server_momentum"])
    elif name == "fedadam":
        optimizer = Adam(params["server_lr"], params["beta1"], params["beta2"], params["tau"])
    if name == "median":
        return CoordinateMedian(settings, optimizer)
    if name == "trimmed-mean":
        return TrimmedMean(settings, optimizer)
    return WeightedMean(settings, optimizer)
