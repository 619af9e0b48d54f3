"""The strategy interface: how one round's updates become the next global version.

Contract: a :class:`Strategy` is used once per round as ``begin(base)``, then
``add(update, num_samples)`` for each accepted update as it arrives (read-only views,
possibly over a mapped file: nothing of them is kept; returns :class:`Added`, the
update's clipping), then ``result(source)`` -- the new weights and the optimizer state
that goes with them (:class:`Aggregate`), computed without changing the strategy -- and,
once that version is saved and published, ``commit(aggregate)`` (``result(source, out)``
may write the new weights into ``out``'s arrays, e.g. a document's own bytes,
:mod:`server.document`: then ``Aggregate.weights is out``). ``source`` gives the
round's kept updates again (:class:`UpdateSource`: the files in the round store, or
arrays in memory) for strategies that need every update at once (median, trimmed mean);
the others ignore it. ``add`` raises ``ValueError`` for an update whose tensor names or
shapes differ from the base's, ``result`` raises ``ValueError`` when nothing was added.

Every strategy is an aggregator (running weighted mean, or robust over the kept files)
plus optional clipping (:mod:`server.strategies.clipping`) plus a server optimizer
(:mod:`server.strategies.optimizers`), whose state :meth:`Strategy.optimizer_state` and
:meth:`Strategy.load_optimizer_state` save and restore beside each global version.
Pure numpy; the only I/O is reading the round's update files through ``source``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from client.weights import Layout
from server.aggregation import StateDict
from server.strategies.clipping import Added, clip_scale, update_norm
from server.strategies.optimizers import ServerOptimizer
from server.strategies.settings import StrategySettings

if TYPE_CHECKING:  # the round store imports the status models, which import the settings
    from server.roundstore import RoundStore

Float64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Aggregate:
    """A round's outcome: the new weights and the optimizer state that goes with them."""

    weights: StateDict
    optimizer_state: dict[str, Float64]


class UpdateSource(Protocol):
    """The round's kept updates, to be read again at the end of the round."""

    def open_all(self) -> contextlib.AbstractContextManager[list[tuple[StateDict, int]]]:
        """Every kept update as read-only views with its sample count, while open."""
        ...


@dataclass(frozen=True)
class MemoryUpdates:
    """Updates held in memory (tests, benchmarks, a restored round)."""

    updates: Sequence[tuple[StateDict, int]]

    @contextlib.contextmanager
    def open_all(self) -> Iterator[list[tuple[StateDict, int]]]:
        yield list(self.updates)


@dataclass(frozen=True)
class FileUpdates:
    """The round's update files in the round store, mapped read-only (one open file each
    while open), never copied whole."""

    store: RoundStore
    layout: Layout
    files: Sequence[tuple[str, int]]  # (update file name, num_samples)

    @contextlib.contextmanager
    def open_all(self) -> Iterator[list[tuple[StateDict, int]]]:
        with contextlib.ExitStack() as stack:
            yield [
                (stack.enter_context(self.store.mapped_update(name, self.layout)), samples)
                for name, samples in self.files
            ]


class Strategy(ABC):
    """One federation's aggregation (see the module docstring)."""

    #: Whether :meth:`result` reads every kept update again (its work grows with their
    #: number), rather than only what :meth:`add` accumulated.
    reads_kept_updates: ClassVar[bool] = False

    def __init__(self, settings: StrategySettings, optimizer: ServerOptimizer) -> None:
        self.settings = settings
        self.optimizer = optimizer
        self._base: StateDict = {}
        self._count = 0

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def count(self) -> int:
        """Updates added since ``begin``."""
        return self._count

    def begin(self, base: StateDict) -> None:
        """Start a round from the current global weights (forgets any previous round)."""
        self._base = base
        self._count = 0
        self._begin(base)

    def add(self, update: StateDict, num_samples: int) -> Added:
        """Take one device's weights, trained on ``num_samples`` samples."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        check_layout(update, self._base)
        added = self.measure(update)
        self._add(update, num_samples, added.scale)
        self._count += 1
        return added

    def measure(self, update: StateDict) -> Added:
        """The update's clipping: its norm and scale (not measured without clipping)."""
        clip = self.settings.clip_norm
        if clip is None:
            return Added()
        norm = update_norm(update, self._base)
        return Added(norm=norm, scale=clip_scale(norm, clip))

    def result(self, source: UpdateSource, out: StateDict | None = None) -> Aggregate:
        """The new weights and optimizer state (the strategy is unchanged). ``out``: arrays
        of the base's layout a strategy may write the new weights into (then
        ``Aggregate.weights`` is ``out`` itself; the others ignore it)."""
        if self._count == 0:
            raise ValueError("no update was added in this round")
        weights, state = self.optimizer.step(self._base, self._aggregate(source))
        return Aggregate(weights, state)

    def commit(self, aggregate: Aggregate) -> None:
        """``aggregate``'s version is saved and published: its optimizer state is current."""
        self.optimizer.adopt(aggregate.optimizer_state)

    def optimizer_state(self) -> dict[str, Float64]:
        return self.optimizer.state()

    def load_optimizer_state(self, state: StateDict, base: StateDict) -> None:
        """The state saved with the current global (ValueError when it does not fit)."""
        self.optimizer.load(state, base)

    @abstractmethod
    def _begin(self, base: StateDict) -> None: ...

    @abstractmethod
    def _add(self, update: StateDict, num_samples: int, scale: float) -> None: ...

    @abstractmethod
    def _aggregate(self, source: UpdateSource) -> dict[str, Float64]:
        """The round's aggregate of every tensor in float64 (clipped updates)."""


def check_layout(update: StateDict, base: StateDict) -> None:
    """ValueError when ``update``'s tensor names or shapes differ from ``base``'s."""
    if set(update) != set(base):
        raise ValueError("the update's tensor names differ from the global model's")
    for name, ref in base.items():
        if tuple(update[name].shape) != tuple(ref.shape):
            raise ValueError(f"tensor {name} has shape {update[name].shape}, not {ref.shape}")
