"""A cluster worker's status document: the single-process ``GET /api/status`` schema,
assembled from the shared engines so every worker answers the same thing.

Contract: :class:`ClusterStatusView` builds :class:`server.status.ServerStatus`
(:func:`server.cluster.status.cluster_document`) from

* PostgreSQL (:class:`StatusQueries`, :class:`server.cluster.db.PgClusterDB`): the latest
  version, the open or closing round and its assignments, the finished rounds
  (:meth:`~StatusQueries.round_history`, one query) and each device's reports in completed
  rounds (its ``roundsCompleted``; counted once per round and kept, so each completed round
  is read once per worker);
* Redis: the live workers, the eligible count (the waiting reason) and the other workers'
  device snapshots (:class:`server.cluster.status_board.StatusBoard`), plus this worker's
  own registry read directly. The device list holds what the single-process document
  holds -- every device the workers' registries know -- no more.

Snapshots are published by :meth:`ClusterStatusView.run` (one loop per worker, the one
writer of its snapshot) every ``period`` seconds, only while someone reads the status
(the board's flag, set by each build); so a first read after a quiet spell waits up to
``2 * period`` for the other live workers' snapshots to appear. A built document is reused
for ``cache_s`` seconds, and concurrent reads share one build, so any number of dashboards
cost the engines at most one build per ``cache_s`` per worker.

Raises: ClusterError (one line) from :meth:`ClusterStatusView.document` when PostgreSQL
fails (the route answers 503); a Redis failure does not fail the document: it then lists
this worker's devices only and waits with reason ``presence unavailable``. Never: writes
to PostgreSQL, or puts tokens in the document.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from client import __version__
from client.protocol import PROTOCOL_VERSION
from server.cluster.contracts import Assignment, ClusterError, Presence, RoundRow, VersionRow
from server.cluster.status import FinishedRound, cluster_document, merge_devices, waiting_reason
from server.cluster.status_board import StatusBoard
from server.config import ServerConfig
from server.registry import Registry
from server.status import DeviceStatus, ServerStatus, device_statuses, strategy_status

__all__ = ["CACHE_S", "SNAPSHOT_S", "ClusterStatusView", "StatusQueries"]

log = logging.getLogger(__name__)

#: Seconds between a worker's snapshots while someone reads the status (the dashboard
#: polls every 2 s).
SNAPSHOT_S = 2.0
#: Seconds a built document is reused.
CACHE_S = 1.0


@runtime_checkable
class StatusQueries(Protocol):
    """The PostgreSQL reads the status needs (:class:`server.cluster.db.PgClusterDB`)."""

    async def latest_version(self) -> VersionRow | None: ...

    async def current_round(self) -> RoundRow | None: ...

    async def assignments(self, round_id: str) -> list[Assignment]: ...

    async def round_history(self) -> list[FinishedRound]: ...

    async def reports_by_device(self, round_ids: Sequence[str]) -> dict[str, int]: ...


class ClusterStatusView:
    """One worker's view of the cluster's status (see the module docstring)."""

    def __init__(
        self,
        *,
        worker_id: str,
        config: ServerConfig,
        registry: Registry,
        db: StatusQueries,
        presence: Presence,
        board: StatusBoard,
        period: float = SNAPSHOT_S,
        cache_s: float = CACHE_S,
    ) -> None:
        self.worker_id = worker_id
        self._config = config
        self._registry = registry
        self._db = db
        self._presence = presence
        self._board = board
        self._period = period
        self._cache_s = cache_s
        self._lock = asyncio.Lock()
        self._cached: tuple[float, ServerStatus, str] | None = None
        #: device id -> reports in the completed rounds of ``_counted``.
        self._reports: dict[str, int] = {}
        self._counted: set[str] = set()

    def own_devices(self) -> list[DeviceStatus]:
        """This worker's registry as the status shows it."""
        return device_statuses(self._registry, time.monotonic(), time.time())

    async def run(self) -> None:
        """Publish this worker's snapshot every ``period`` s while someone reads the status."""
        failing = False
        while True:
            try:
                if await self._board.wanted():
                    await self._board.publish(self.own_devices())
                failing = False
            except ClusterError as exc:
                if not failing:
                    log.warning("cannot publish the status snapshot: %s; retrying", exc)
                failing = True
            await asyncio.sleep(self._period)

    async def document(self) -> ServerStatus:
        """The status document (built at most once per ``cache_s``)."""
        return (await self._current())[0]

    async def document_json(self) -> str:
        """:meth:`document` as the JSON ``GET /api/status`` answers (camelCase)."""
        return (await self._current())[1]

    async def _current(self) -> tuple[ServerStatus, str]:
        async with self._lock:
            cached = self._cached
            if cached is not None and time.monotonic() - cached[0] < self._cache_s:
                return cached[1], cached[2]
            doc = await self._build()
            text = doc.model_dump_json(by_alias=True)
            self._cached = (time.monotonic(), doc, text)
            return doc, text

    async def _build(self) -> ServerStatus:
        lists, eligible, workers = await self._fleet()
        latest = await self._db.latest_version()
        current = await self._db.current_round()
        assignments = await self._db.assignments(current.round_id) if current else []
        history = await self._db.round_history()
        new = [
            h.round.round_id
            for h in history
            if h.round.state == "completed" and h.round.round_id not in self._counted
        ]
        if new:
            for device_id, count in (await self._db.reports_by_device(new)).items():
                self._reports[device_id] = self._reports.get(device_id, 0) + count
            self._counted.update(new)
        cfg = self._config
        return cluster_document(
            server_version=__version__,
            protocol=PROTOCOL_VERSION,
            task=cfg.task,
            latest_version=latest.version if latest is not None else 0,
            rounds_target=cfg.rounds,
            current=current,
            assignments=assignments,
            reason=waiting_reason(eligible, cfg.min_clients, workers),
            history=history,
            devices=merge_devices([self.own_devices(), *lists], self._reports),
            strategy=strategy_status(cfg.strategy),
            now=time.time(),
        )

    async def _fleet(self) -> tuple[list[list[DeviceStatus]], int | None, int | None]:
        """The other live workers' snapshots, the eligible count and the live workers
        (empty and None when Redis fails)."""
        try:
            newly = await self._board.want()
            live = sorted(await self._presence.live_workers())
            others = [w for w in live if w != self.worker_id]
            found = await self._board.snapshots(others)
            if newly:
                give_up = time.monotonic() + 2 * self._period
                while len(found) < len(others) and time.monotonic() < give_up:
                    await asyncio.sleep(self._period / 10)
                    found = await self._board.snapshots(others)
            eligible = await self._presence.eligible_count()
        except ClusterError as exc:
            log.warning("status: %s; listing this worker's devices only", exc)
            return [], None, None
        return [found[w] for w in others if w in found], eligible, len(live)
