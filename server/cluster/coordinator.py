"""The cluster's round coordinator: run only by the process holding the CoordinatorLock.

Contract: :class:`ClusterCoordinator` drives the federation's rounds through the shared
engines (:mod:`server.cluster.contracts`) and keeps no state of its own that matters:
everything it decides is written to :class:`ClusterDB` first, so a coordinator that starts
-- or takes over after the previous lock holder died -- reads the round that is ``open``
or ``closing`` and goes on with it under the SAME round id.

* :meth:`run` first makes sure version 0 exists (the task's initial weights, encoded as
  safetensors, put in :class:`SharedBlobs`, then ``create_version_zero``; the weights
  are computed only when no version exists). Then, until ``config.rounds`` versions
  after 0 exist (0: forever), one round at a time:
* **waiting** -- polls ``Presence.eligible_count()`` every ``poll_interval`` until it
  reaches ``min_clients``, logging why it waits (when that changes, and at least every
  ``wait_log_interval``);
* **open** -- selects up to ``clients_per_round`` of ``eligible_devices()`` (sorted by
  device id) with :func:`server.rounds.select_devices` and one ``random.Random(seed)``
  kept for the coordinator's life, so selection is reproducible with the seed;
  ``open_round`` with parts ``0..n-1`` of ``n`` in selection order,
  ``config.required_reports(n)`` and a wall-clock deadline ``round_timeout`` away;
* **training** -- polls ``updates()``/``assignments()`` until every selected device has
  settled (reported, refused, failed or dropped) or too few can still report, or the
  deadline. A working device absent from Presence for ``config.stale_after`` is marked
  ``dropped`` (its worker died and it did not come back elsewhere);
* a round with fewer reports than required is set ``abandoned`` and the next attempt
  (a new round id) opens after ``config.effective_retry_delay``;
* **closing** -- the round is set ``closing`` (no update is recorded after that), and the
  coordinator waits up to ``partial_wait`` seconds for a partial sum from each LIVE worker
  that received updates. It merges every valid partial and folds every update no partial
  covers (a dead or slow worker's) itself from shared storage
  (:func:`server.cluster.readback.gather_round`), so each recorded update counts once.
  The strategy's result (:mod:`server.cluster.aggregate`: every strategy of the
  single-process server; robust rules and ``--clip-norm`` read every update back from
  shared storage instead, without waiting for partial sums) is encoded as safetensors,
  put in shared storage with the server optimizer's new state (if any), and
  ``publish_version`` records both with the round id and ``trainLoss``, the
  sample-weighted mean of the counted updates' reported losses; then the
  ``published(version, weights)`` hook, if given, is awaited with the new version (it
  starts its evaluation off the round's path, :mod:`server.cluster.evaluation`, and
  returns once a federated evaluation of it is settled, :mod:`server.cluster.fedeval`).

An engine failure (:class:`ClusterError`) while a round runs is logged and retried
after ``poll_interval``; the round is then read back from the database. An update whose
blob cannot be read back (missing, or failing its SHA-256 or the layout) is left out of the
mean with an error naming the device; a round left with no readable update is abandoned.
:func:`task_initial_weights` is how the worker gets version 0's weights from its task.
Memory: one float64 copy of the model (the running sum) plus the blob being read, or what
the single-process server holds for the strategy (:mod:`server.cluster.aggregate`); blobs
are fetched into a temporary folder under ``work_dir``, removed after the round.
Cancelling :meth:`run` (the lock was lost) is safe at any await. Blocking work (folding,
encoding, the initial weights) runs in threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.tasks import Task
from client.weights import Layout, StateDict, encode, layout_of
from server.aggregation import weighted_mean
from server.cluster.aggregate import RoundAggregator, encode_state
from server.cluster.contracts import (
    Assignment,
    ClusterDB,
    ClusterError,
    PartialRow,
    Presence,
    RoundRow,
    SharedBlobs,
    UpdateRow,
    VersionRow,
)
from server.config import ServerConfig
from server.model import initial_state
from server.rounds import select_devices
from server.taskfile import PackageTask

__all__ = [
    "ClusterCoordinator",
    "Progress",
    "progress_of",
    "task_initial_weights",
]

log = logging.getLogger(__name__)

WORKING = frozenset({"assigned", "started"})


@dataclass(frozen=True)
class Progress:
    """Where an open round stands (pure: from its rows)."""

    reported: frozenset[str]
    working: frozenset[str]
    selected: int
    required: int

    @property
    def settled(self) -> bool:
        return not self.working

    @property
    def succeeded(self) -> bool:
        return len(self.reported) >= self.required

    @property
    def can_still_succeed(self) -> bool:
        return len(self.reported) + len(self.working) >= self.required

    @property
    def done(self) -> bool:
        """No reason to wait longer (the deadline aside)."""
        return self.settled or not self.can_still_succeed


def progress_of(row: RoundRow, assignments: list[Assignment], updates: list[UpdateRow]) -> Progress:
    """A round's progress: an update row counts as a report whatever its assignment says."""
    assigned = {a.device_id for a in assignments}
    reported = {u.device_id for u in updates if u.device_id in assigned}
    reported |= {a.device_id for a in assignments if a.state == "reported"}
    working = {a.device_id for a in assignments if a.state in WORKING} - reported
    return Progress(frozenset(reported), frozenset(working), len(assigned), row.required)


def task_initial_weights(task: Task, seed: int) -> Callable[[], StateDict]:
    """Version 0's weights of ``task``: a package's own weights, else the task's model
    initialised with ``seed`` (torch, in the thread the coordinator calls it from; as
    ``fedtray-server`` does, :mod:`server.app`)."""
    if isinstance(task, PackageTask):
        package = task.package
        return lambda: package.weights
    return lambda: initial_state(task, task.params, seed)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ClusterCoordinator:
    """Runs the rounds of one federation from the shared engines (see the module doc)."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        db: ClusterDB,
        presence: Presence,
        blobs: SharedBlobs,
        layout: Layout,
        initial_weights: Callable[[], StateDict],
        work_dir: Path,
        poll_interval: float = 0.5,
        partial_wait: float = 5.0,
        published: Callable[[int, StateDict], Awaitable[None]] | None = None,
    ) -> None:
        if not layout:
            raise ValueError("the model layout is empty")
        self._config = config
        self._db = db
        self._presence = presence
        self._blobs = blobs
        self._layout = dict(layout)
        self._initial_weights = initial_weights
        self._work_dir = work_dir
        self._poll = poll_interval
        self._partial_wait = partial_wait
        self._published = published
        self._rng = random.Random(config.seed)
        # Tells this coordinator's round ids from a previous holder's.
        self._tag = secrets.token_hex(4)
        self._attempts: dict[int, int] = {}
        model_bytes = sum(math.prod(spec.shape) * _itemsize(spec.dtype) for spec in layout.values())
        self._max_update_bytes = config.transfer_budget(model_bytes).update_bytes
        self._aggregator = RoundAggregator(
            config.strategy, blobs, self._layout, self._max_update_bytes
        )

    # ============================================================ the loop

    async def run(self) -> None:
        """Version 0, then rounds until ``config.rounds`` are complete (forever with 0)."""
        driven: str | None = None  # the round this coordinator last drove
        while True:
            try:
                latest = await self.ensure_version_zero()
                current = await self._db.current_round()
                if current is None:
                    if self._config.rounds and latest.version >= self._config.rounds:
                        log.info(
                            "all %d rounds are complete (version %d); the federation is finished",
                            self._config.rounds,
                            latest.version,
                        )
                        return
                    current = await self._open_next(latest)
                elif current.round_id != driven:
                    log.info(
                        "round %d (%s) is %s: going on with it",
                        current.number,
                        current.round_id,
                        current.state,
                    )
                driven = current.round_id
                self._attempts = {current.number: current.attempt}
                completed = await self._drive(current)
            except ClusterError as exc:
                # The round is read back from the database on the next pass.
                log.error("coordinator: %s; retrying", exc)
                await asyncio.sleep(max(self._poll, 0.01))
                continue
            if not completed:
                await asyncio.sleep(self._config.effective_retry_delay)

    async def ensure_version_zero(self) -> VersionRow:
        """The latest version, creating version 0 from the initial weights if none."""
        latest = await self._db.latest_version()
        if latest is not None:
            return latest
        state = await asyncio.to_thread(self._initial_weights)
        got = layout_of(state)
        if got != self._layout:
            raise ValueError("the initial weights do not have the model's layout")
        data = await asyncio.to_thread(encode, state, "safetensors")
        sha = _sha256(data)
        key = await self._blobs.put_bytes(data, sha)
        mine = VersionRow(0, key, sha, len(data), round_id=None, created_at=time.time())
        row = await self._db.create_version_zero(mine)
        if row.blob_key != key:
            await self._blobs.delete(key)  # another coordinator's version 0 was first
        log.info("version 0 is %s (%d bytes)", row.sha256[:12], row.size)
        return row

    async def _open_next(self, latest: VersionRow) -> RoundRow:
        cfg = self._config
        number = latest.version + 1
        chosen = await self._wait_and_select(number)
        attempt = self._attempts.get(number, 0) + 1
        now = time.time()
        row = RoundRow(
            round_id=f"r{number}-{attempt}-{self._tag}",
            number=number,
            attempt=attempt,
            base_version=latest.version,
            state="open",
            required=cfg.required_reports(len(chosen)),
            deadline=now + cfg.round_timeout,
            opened_at=now,
        )
        parts = [
            Assignment(row.round_id, device_id, index=i, count=len(chosen))
            for i, device_id in enumerate(chosen)
        ]
        await self._db.open_round(row, parts)
        log.info(
            "round %d started (%s): %d selected [%s], %d reports needed, deadline in %.0f s",
            number,
            row.round_id,
            len(chosen),
            ", ".join(chosen),
            row.required,
            cfg.round_timeout,
        )
        return row

    async def _wait_and_select(self, number: int) -> list[str]:
        """Devices for round ``number`` once enough are eligible; logs why it waits."""
        cfg = self._config
        last_reason: str | None = None
        last_logged = 0.0
        while True:
            try:
                count = await self._presence.eligible_count()
                if count >= cfg.min_clients:
                    eligible = await self._presence.eligible_devices()
                    if len(eligible) >= cfg.min_clients:
                        ids = [device_id for device_id, _ in eligible]
                        return select_devices(ids, cfg.clients_per_round, self._rng)
                    count = len(eligible)
                workers = len(await self._presence.live_workers())
                reason = (
                    f"{count} of {cfg.min_clients} eligible devices "
                    f"({workers} live worker{'s' if workers != 1 else ''})"
                )
            except ClusterError as exc:
                reason = f"presence unavailable: {exc}"
            now = time.monotonic()
            if reason != last_reason or now - last_logged >= cfg.wait_log_interval:
                log.info("round %d waiting: %s", number, reason)
                last_reason, last_logged = reason, now
            await asyncio.sleep(self._poll)

    # ============================================================ one round

    async def _drive(self, row: RoundRow) -> bool:
        """Take a round from ``open`` (or ``closing``) to its end; True when completed."""
        if row.state == "open":
            if not await self._train(row):
                return False
            await self._db.set_round_state(row.round_id, "closing")
        return await self._close(row)

    async def _train(self, row: RoundRow) -> bool:
        """Wait for reports; True when the round may close with enough of them (else it
        is abandoned here)."""
        absent_since: dict[str, float] = {}
        while True:
            assignments = await self._db.assignments(row.round_id)
            updates = await self._db.updates(row.round_id)
            progress = progress_of(row, assignments, updates)
            if progress.done or time.time() >= row.deadline:
                break
            await self._drop_absent(row, progress.working, absent_since)
            await asyncio.sleep(max(0.0, min(self._poll, row.deadline - time.time())))
        if progress.succeeded:
            return True
        log.warning(
            "round %d abandoned (%s): %d of %d reported, %d needed; retrying in %.1f s",
            row.number,
            row.round_id,
            len(progress.reported),
            progress.selected,
            row.required,
            self._config.effective_retry_delay,
        )
        await self._db.set_round_state(row.round_id, "abandoned")
        return False

    async def _drop_absent(
        self, row: RoundRow, working: frozenset[str], absent_since: dict[str, float]
    ) -> None:
        """Mark ``dropped`` a working device gone from Presence for ``stale_after``."""
        now = time.monotonic()
        for device_id in sorted(working):
            if await self._presence.worker_of(device_id) is not None:
                absent_since.pop(device_id, None)
                continue
            since = absent_since.setdefault(device_id, now)
            if now - since >= self._config.stale_after:
                log.info("round %s: slot of %s freed (gone)", row.round_id, device_id)
                await self._db.set_assignment(row.round_id, device_id, "dropped", "disconnected")
                absent_since.pop(device_id, None)

    async def _close(self, row: RoundRow) -> bool:
        """Combine the closing round's updates and publish its version."""
        updates = await self._db.updates(row.round_id)
        base = await self._db.latest_version()
        if base is None or base.version != row.base_version:
            raise ClusterError(
                f"round {row.round_id} starts from version {row.base_version}, but the "
                f"latest is {None if base is None else base.version}"
            )
        aggregator = self._aggregator
        partials = await self._await_partials(row, updates) if aggregator.uses_partials else []
        with tempfile.TemporaryDirectory(prefix="fedtray-round-", dir=self._work_dir) as tmp:
            outcome = await aggregator.aggregate(row.round_id, base, updates, partials, Path(tmp))
        if outcome is None:
            log.error("round %d (%s): no update could be read; abandoned", row.number, row.round_id)
            await self._db.set_round_state(row.round_id, "abandoned")
            return False
        for device_id, norm in sorted(outcome.clipped.items()):
            log.warning(
                "round %s: the update of %s was %.4g from the global; clipped to %g",
                row.round_id,
                device_id,
                norm,
                self._config.strategy.clip_norm,
            )
        counted = [u for u in updates if u.device_id in outcome.counted]
        data = await asyncio.to_thread(encode, outcome.weights, "safetensors")
        sha = _sha256(data)
        key = await self._blobs.put_bytes(data, sha)
        optimizer_key = optimizer_sha = None
        if outcome.optimizer_state:
            state_data = await asyncio.to_thread(encode_state, outcome.optimizer_state)
            optimizer_sha = _sha256(state_data)
            optimizer_key = await self._blobs.put_bytes(state_data, optimizer_sha)
            del state_data
        weights = outcome.weights
        del outcome
        train_loss = weighted_mean(
            [(u.metrics["trainLoss"], u.num_samples) for u in counted if "trainLoss" in u.metrics]
        )
        version = row.base_version + 1
        await self._db.publish_version(
            VersionRow(
                version=version,
                blob_key=key,
                sha256=sha,
                size=len(data),
                round_id=row.round_id,
                created_at=time.time(),
                metrics={} if train_loss is None else {"trainLoss": train_loss},
                optimizer_key=optimizer_key,
                optimizer_sha256=optimizer_sha,
            )
        )
        if self._published is not None:
            await self._published(version, weights)
        del weights
        log.info(
            "round %d (%s): %d reported, train loss %s, %.1f s (version %d)",
            row.number,
            row.round_id,
            len(counted),
            "n/a" if train_loss is None else f"{train_loss:.4f}",
            time.time() - row.opened_at,
            version,
        )
        return True

    async def _await_partials(self, row: RoundRow, updates: list[UpdateRow]) -> list[PartialRow]:
        """The round's partial rows once every live worker that received updates wrote
        one, or after ``partial_wait`` seconds."""
        folders = {u.worker_id for u in updates}
        give_up = time.monotonic() + self._partial_wait
        while True:
            partials = await self._db.partials(row.round_id)
            live = await self._presence.live_workers()
            pending = (folders & live) - {p.worker_id for p in partials}
            if not pending or time.monotonic() >= give_up:
                if pending:
                    log.warning(
                        "round %s: no partial sum from %s; folding their updates here",
                        row.round_id,
                        ", ".join(sorted(pending)),
                    )
                return partials
            await asyncio.sleep(min(self._poll, max(0.0, give_up - time.monotonic())))


def _itemsize(dtype: str) -> int:
    return int(np.dtype(dtype).itemsize)
