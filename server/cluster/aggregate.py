"""How a closing cluster round's updates become the next version, for every strategy.

Contract: :class:`RoundAggregator` runs the strategy the operator chose
(:func:`server.strategies.build_strategy`, the single-process server's own code) over a
closing round's recorded updates, in one of two ways, chosen once by
:func:`reads_every_update`:

* **summed where they arrive** -- FedAvg, FedProx, FedAvgM and FedAdam without
  ``--clip-norm``: the workers' partial sums are merged and the updates no partial covers
  are folded (:func:`server.cluster.readback.gather_round`); the float64 mean goes
  through the strategy's server optimizer (:meth:`ServerOptimizer.step`). With FedAvg's
  plain optimizer the mean is made block by block in the model's dtypes
  (:meth:`PartialSum.mean`) and the base version is not even read.
* **read back** -- median, trimmed mean, and any strategy with ``--clip-norm`` (clipping
  needs each update's distance from the base, which a sum no longer has): every recorded
  update is fetched from shared storage into ``tmp`` (SHA-256 verified), mapped read-only,
  and the strategy runs over them exactly as the single-process server does (``begin``,
  ``add`` per update in device-id order, ``result`` with the mapped files as its
  :class:`~server.strategies.UpdateSource`); the partial sums are not used. Memory is the
  single server's: the base, the result and one block per update, the updates themselves
  mapped files (on disk: one model per update, as the single server's round folder).

The server optimizer's state (FedAvgM's momentum, FedAdam's moments) is read before each
round from the blob the base version's row names (:attr:`VersionRow.optimizer_key`; none:
a fresh state, as for version 0; one that does not fit the model or optimizer: a fresh
state, logged, as the single server does) and the new state is returned with the weights
(:class:`Outcome`): the coordinator saves it beside the new version, in the same row, so a
coordinator that takes over goes on with the same state. Nothing is kept between rounds.

Raises :class:`ClusterError` when shared storage fails for the base version or its state
(the coordinator retries the close); an update that cannot be read back is left out with an
error naming the device; returns None when no update could be read. Blocking work runs in
threads. :func:`encode_state` / :func:`decode_state` are the one spelling of a saved
optimizer state (float64 safetensors, as the single server's ``optimizer-v<N>``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from client.weights import Layout, StateDict, WeightsError, decode, encode
from server.cluster.contracts import (
    ClusterError,
    PartialRow,
    SharedBlobs,
    UpdateRow,
    VersionRow,
)
from server.cluster.partial import PartialSum
from server.cluster.readback import MappedFiles, fetch_updates, gather_round, mapped_update
from server.strategies import Added, Strategy, StrategySettings, build_strategy
from server.strategies.fedavg import WeightedMean
from server.strategies.optimizers import Plain

__all__ = [
    "Outcome",
    "RoundAggregator",
    "decode_state",
    "encode_state",
    "reads_every_update",
]

log = logging.getLogger(__name__)

Float64 = npt.NDArray[np.float64]


def reads_every_update(settings: StrategySettings) -> bool:
    """Whether the coordinator reads every update back (robust rules, clipping) rather
    than combining the workers' partial sums (a weighted mean without clipping)."""
    summed = isinstance(build_strategy(settings), WeightedMean)
    return not summed or settings.clip_norm is not None


def encode_state(state: dict[str, Float64]) -> bytes:
    """An optimizer state as a float64 safetensors document."""
    return encode(dict(state), "safetensors")


def decode_state(data: bytes) -> StateDict:
    """A saved optimizer state back (ValueError when it is not a safetensors document)."""
    try:
        return decode(data, "safetensors", max_bytes=len(data) + 1)
    except WeightsError as exc:
        raise ValueError(f"{exc.code}: {exc.message}") from None


@dataclass(frozen=True)
class Outcome:
    """A round's result: the new weights, the optimizer state that goes with them (empty:
    none), the devices whose updates it counts, and the updates clipping scaled back."""

    weights: StateDict
    optimizer_state: dict[str, Float64]
    counted: frozenset[str]
    clipped: dict[str, float] = field(default_factory=dict)  # device id -> norm


class RoundAggregator:
    """One federation's aggregation in a cluster (see the module docstring)."""

    def __init__(
        self,
        settings: StrategySettings,
        blobs: SharedBlobs,
        layout: Layout,
        max_update_bytes: int,
    ) -> None:
        self.strategy: Strategy = build_strategy(settings)
        self.reads_every_update = reads_every_update(settings)
        self._plain = isinstance(self.strategy.optimizer, Plain)
        self._blobs = blobs
        self._layout = dict(layout)
        self._max_bytes = max_update_bytes

    @property
    def uses_partials(self) -> bool:
        """Whether the workers' partial sums are used (worth waiting for)."""
        return not self.reads_every_update

    async def aggregate(
        self,
        round_id: str,
        base: VersionRow,
        updates: list[UpdateRow],
        partials: list[PartialRow],
        tmp: Path,
    ) -> Outcome | None:
        """The round's new weights from ``base`` (the version it started from)."""
        if self.reads_every_update:
            return await self._read_back(round_id, base, updates, tmp)
        total = await gather_round(
            self._blobs, self._layout, self._max_bytes, round_id, updates, partials, tmp
        )
        if total is None:
            return None
        counted = frozenset(total.device_ids)
        if self._plain:
            return Outcome(await asyncio.to_thread(total.mean), {}, counted)
        base_state = await self._base(base, tmp)
        weights, state = await asyncio.to_thread(_step, self.strategy, base_state, total)
        return Outcome(weights, state, counted)

    async def _read_back(
        self, round_id: str, base: VersionRow, updates: list[UpdateRow], tmp: Path
    ) -> Outcome | None:
        base_state = await self._base(base, tmp)
        ordered = sorted(updates, key=lambda u: u.device_id)
        fetched = await fetch_updates(self._blobs, round_id, ordered, tmp)
        try:
            return await asyncio.to_thread(self._run, round_id, base_state, fetched)
        finally:
            for _, path in fetched:
                path.unlink(missing_ok=True)

    def _run(
        self, round_id: str, base: StateDict, fetched: list[tuple[UpdateRow, Path]]
    ) -> Outcome | None:
        strategy = self.strategy
        strategy.begin(base)
        kept: list[tuple[Path, int]] = []
        counted: list[str] = []
        clipped: dict[str, float] = {}
        for update, path in fetched:
            try:
                with mapped_update(path, self._layout, self._max_bytes) as views:
                    added: Added = strategy.add(views, update.num_samples)
            except ValueError as exc:
                log.error(
                    "round %s: the update of %s cannot be read back (%s); left out",
                    round_id,
                    update.device_id,
                    exc,
                )
                continue
            kept.append((path, update.num_samples))
            counted.append(update.device_id)
            if added.clipped and added.norm is not None:
                clipped[update.device_id] = added.norm
        if not kept:
            return None
        aggregate = strategy.result(MappedFiles(self._layout, self._max_bytes, kept))
        return Outcome(aggregate.weights, aggregate.optimizer_state, frozenset(counted), clipped)

    async def _base(self, base: VersionRow, tmp: Path) -> StateDict:
        """The base version's weights, and the optimizer state saved with it loaded into
        the strategy (a fresh one when none or when it does not fit)."""
        weights = await self._fetch(base.blob_key, base.sha256, tmp / "base.safetensors")
        try:
            state = await asyncio.to_thread(
                decode, weights, "safetensors", expected=self._layout, max_bytes=len(weights) + 1
            )
        except WeightsError as exc:
            raise ClusterError(
                f"version {base.version} does not fit the model ({exc.code}: {exc.message})"
            ) from None
        saved: StateDict = {}
        if base.optimizer_key is not None and base.optimizer_sha256 is not None:
            data = await self._fetch(
                base.optimizer_key, base.optimizer_sha256, tmp / "optimizer.safetensors"
            )
            try:
                saved = decode_state(data)
            except ValueError as exc:
                log.warning("optimizer state of version %d unreadable: %s", base.version, exc)
        try:
            self.strategy.load_optimizer_state(saved, state)
        except ValueError as exc:
            log.warning("%s; %s starts with a fresh optimizer state", exc, self.strategy.name)
            self.strategy.load_optimizer_state({}, state)
        return state

    async def _fetch(self, key: str, sha256: str, dest: Path) -> bytes:
        try:
            await self._blobs.get_file(key, sha256, dest)
            return await asyncio.to_thread(dest.read_bytes)
        finally:
            dest.unlink(missing_ok=True)


def _step(
    strategy: Strategy, base: StateDict, total: PartialSum
) -> tuple[StateDict, dict[str, Float64]]:
    """The server optimizer's step from ``base`` over the partial sums' float64 mean."""
    return strategy.optimizer.step(base, total.means())
