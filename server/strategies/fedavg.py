"""The weighted-mean strategies: FedAvg, FedProx, FedAvgM, FedAdam.

Contract: :class:`WeightedMean` folds each (clipped) update into one running
sample-weighted sum as it arrives (:class:`server.aggregation.FedAvg`: O(model) memory
whatever the number of devices, updates read block by block from their views); the
round's mean goes through the server optimizer (:class:`server.strategies.optimizers.
Plain` for FedAvg and FedProx -- FedProx differs only on the device, which adds the
proximal term with the mu each ``training:start`` carries --, ``Momentum`` for FedAvgM,
``Adam`` for FedAdam). With the plain optimizer the result is made block by block from
the sums, as FedAvg always did (no whole-model float64 copy), into ``out`` when given.
``result`` ignores its ``source``: every update was folded when it arrived.
"""

from __future__ import annotations

from server.aggregation import FedAvg, StateDict
from server.strategies.base import Aggregate, Float64, Strategy, UpdateSource
from server.strategies.optimizers import Plain


class WeightedMean(Strategy):
    """Sample-weighted mean of the (clipped) updates, then the server optimizer."""

    def _begin(self, base: StateDict) -> None:
        self._sums = FedAvg()
        self._sums.begin(base)

    def _add(self, update: StateDict, num_samples: int, scale: float) -> None:
        self._sums.add(update, num_samples, scale=scale)

    def _aggregate(self, source: UpdateSource) -> dict[str, Float64]:
        return self._sums.means()

    def result(self, source: UpdateSource, out: StateDict | None = None) -> Aggregate:
        if isinstance(self.optimizer, Plain) and self.count:
            return Aggregate(self._sums.result(out), {})
        return super().result(source, out)
