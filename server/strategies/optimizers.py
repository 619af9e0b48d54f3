"""Server optimizers: the step from the round's aggregate to the next global weights.

Contract: a :class:`ServerOptimizer` turns the base (the global the round started from)
and the round's float64 aggregate into the new weights, treating ``delta = aggregate -
base`` as the pseudo-gradient of Reddi et al., "Adaptive Federated Optimization" (ICLR
2021, arXiv:2003.00295), Algorithm 2; all arithmetic in float64, the result cast to each
tensor's dtype (:func:`server.aggregation.cast_like`). Only float tensors are stepped;
every other tensor (integer counters, booleans) takes the aggregate as it is.

:meth:`ServerOptimizer.step` is pure: it returns the new weights and the new optimizer
state without changing the optimizer; :meth:`ServerOptimizer.adopt` makes a state the
current one (after the version it belongs to is saved). :meth:`ServerOptimizer.state`
is the state as a flat state dict of float64 arrays (saved beside each global version as
``optimizer-v<N>.safetensors``) and :meth:`ServerOptimizer.load` takes one back, raising
``ValueError`` when it does not fit (another optimizer, another model). Float64 state
saved and loaded byte for byte is what makes a restarted server compute the same weights
as one that never stopped.

* :class:`Plain` (FedAvg, FedProx, median, trimmed mean): the aggregate is the new global.
* :class:`Momentum` (FedAvgM, Hsu et al. 2019, arXiv:1909.06335, as Flower's ``FedAvgM``):
  ``m = momentum * m + delta``; ``w = base + server_lr * m`` (m starts at 0).
* :class:`Adam` (FedAdam, Reddi et al. Algorithm 2, as Flower's ``FedAdam``):
  ``m = beta1 * m + (1 - beta1) * delta``; ``v = beta2 * v + (1 - beta2) * delta**2``;
  ``w = base + server_lr * m / (sqrt(v) + tau)`` (m, v start at 0; no bias correction).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import numpy.typing as npt

from server.aggregation import StateDict, cast_like
from server.strategies.clipping import is_float

Float64 = npt.NDArray[np.float64]


def _cast(values: dict[str, Float64], base: StateDict) -> StateDict:
    return {name: cast_like(values[name], ref.dtype) for name, ref in base.items()}


class ServerOptimizer(ABC):
    """The server's step (see the module docstring)."""

    #: Prefix of this optimizer's tensors in its saved state ("" for no state).
    kind = ""

    def __init__(self) -> None:
        self._state: dict[str, Float64] = {}

    def state(self) -> dict[str, Float64]:
        """The current state (float64 arrays; empty before the first step)."""
        return dict(self._state)

    def adopt(self, state: dict[str, Float64]) -> None:
        """Make ``state`` (from :meth:`step`) the current one."""
        self._state = state

    def load(self, state: StateDict, base: StateDict) -> None:
        """Take a saved state back; ValueError when it is not this optimizer's for a model
        like ``base``."""
        expected = {
            f"{self.kind}.{slot}/{name}": ref.shape
            for slot in self.slots
            for name, ref in base.items()
            if is_float(ref.dtype)
        }
        if not state:
            self._state = {}
            return
        if set(state) != set(expected):
            raise ValueError(f"the saved optimizer state is not {self.kind}'s for this model")
        for key, arr in state.items():
            if arr.dtype != np.float64 or arr.shape != expected[key]:
                raise ValueError(f"the saved optimizer tensor {key} does not fit the model")
        self._state = {key: np.array(arr, dtype=np.float64) for key, arr in state.items()}

    @property
    def slots(self) -> tuple[str, ...]:
        return ()

    def _slot(self, slot: str, name: str, like: Float64) -> Float64:
        got = self._state.get(f"{self.kind}.{slot}/{name}")
        return np.zeros_like(like) if got is None else got

    @abstractmethod
    def step(
        self, base: StateDict, aggregate: dict[str, Float64]
    ) -> tuple[StateDict, dict[str, Float64]]:
        """The new weights and the new state (the optimizer itself is unchanged)."""


class Plain(ServerOptimizer):
    """The aggregate is the new global (no state)."""

    def step(
        self, base: StateDict, aggregate: dict[str, Float64]
    ) -> tuple[StateDict, dict[str, Float64]]:
        return _cast(aggregate, base), {}


class Momentum(ServerOptimizer):
    """FedAvgM: server momentum over the rounds' pseudo-gradients."""

    kind = "momentum"

    def __init__(self, server_lr: float, momentum: float) -> None:
        super().__init__()
        self.server_lr, self.momentum = server_lr, momentum

    @property
    def slots(self) -> tuple[str, ...]:
        return ("m",)

    def step(
        self, base: StateDict, aggregate: dict[str, Float64]
    ) -> tuple[StateDict, dict[str, Float64]]:
        new: dict[str, Float64] = {}
        state: dict[str, Float64] = {}
        for name, ref in base.items():
            if not is_float(ref.dtype):
                new[name] = aggregate[name]
                continue
            start: Float64 = ref.astype(np.float64)
            delta = aggregate[name] - start
            m = self.momentum * self._slot("m", name, delta) + delta
            state[f"{self.kind}.m/{name}"] = m
            new[name] = start + self.server_lr * m
        return _cast(new, base), state


class Adam(ServerOptimizer):
    """FedAdam: Adam moments over the rounds' pseudo-gradients."""

    kind = "adam"

    def __init__(self, server_lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__()
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau

    @property
    def slots(self) -> tuple[str, ...]:
        return ("m", "v")

    def step(
        self, base: StateDict, aggregate: dict[str, Float64]
    ) -> tuple[StateDict, dict[str, Float64]]:
        new: dict[str, Float64] = {}
        state: dict[str, Float64] = {}
        for name, ref in base.items():
            if not is_float(ref.dtype):
                new[name] = aggregate[name]
                continue
            start: Float64 = ref.astype(np.float64)
            delta = aggregate[name] - start
            m = self.beta1 * self._slot("m", name, delta) + (1 - self.beta1) * delta
            v = self.beta2 * self._slot("v", name, delta) + (1 - self.beta2) * delta * delta
            state[f"{self.kind}.m/{name}"] = m
            state[f"{self.kind}.v/{name}"] = v
            new[name] = start + self.server_lr * m / (np.sqrt(v) + self.tau)
        return _cast(new, base), state
