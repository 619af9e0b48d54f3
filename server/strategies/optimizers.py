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
    #: The per-tensor state it keeps, e.g. ("m", "v"); saved as ``<kind>.<slot>/<tensor>``.
    slots: tuple[str, ...] = ()

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
            self._key(slot, name): ref.shape
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

    def _key(self, slot: str, name: str) -> str:
        """The one spelling of a state tensor's name: ``<kind>.<slot>/<tensor>``."""
        return f"{self.kind}.{slot}/{name}"

    def _slot(self, slot: str, name: str, like: Float64) -> Float64:
        got = self._state.get(self._key(slot, name))
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


class _Adaptive(ServerOptimizer):
    """A step on each float tensor's pseudo-gradient with per-tensor :attr:`slots`:
    ``w = base + move``, where :meth:`_move` gives ``move`` and the slots' new values."""

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
            old = {slot: self._slot(slot, name, delta) for slot in self.slots}
            move, slots = self._move(delta, old)
            for slot in self.slots:
                state[self._key(slot, name)] = slots[slot]
            new[name] = start + move
        return _cast(new, base), state

    @abstractmethod
    def _move(self, delta: Float64, old: dict[str, Float64]) -> tuple[Float64, dict[str, Float64]]:
        """The move from the base and the new value of each slot (``old``: 0 at first)."""


class Momentum(_Adaptive):
    """FedAvgM: server momentum over the rounds' pseudo-gradients."""

    kind = "momentum"
    slots = ("m",)

    def __init__(self, server_lr: float, momentum: float) -> None:
        super().__init__()
        self.server_lr, self.momentum = server_lr, momentum

    def _move(self, delta: Float64, old: dict[str, Float64]) -> tuple[Float64, dict[str, Float64]]:
        m = self.momentum * old["m"] + delta
        return self.server_lr * m, {"m": m}


class Adam(_Adaptive):
    """FedAdam: Adam moments over the rounds' pseudo-gradients."""

    kind = "adam"
    slots = ("m", "v")

    def __init__(self, server_lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__()
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau

    def _move(self, delta: Float64, old: dict[str, Float64]) -> tuple[Float64, dict[str, Float64]]:
        m = self.beta1 * old["m"] + (1 - self.beta1) * delta
        v = self.beta2 * old["v"] + (1 - self.beta2) * delta * delta
        return self.server_lr * m / (np.sqrt(v) + self.tau), {"m": m, "v": v}
