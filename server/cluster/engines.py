"""Opening the shared engines of a cluster worker, and where they are.

Contract: :class:`ClusterSettings` says where Redis, PostgreSQL and the shared storage are
and who the worker is; :func:`open_engines` opens the real engines --
:class:`server.cluster.db.PgClusterDB`, :class:`server.cluster.blobs.DirectoryBlobs`
(``shared_dir``) or :class:`server.cluster.blobs.PostgresBlobs` (large objects),
:class:`server.cluster.presence.RedisPresence` and
:class:`server.cluster.lock.PgCoordinatorLock` -- or raises
:class:`~server.cluster.contracts.ClusterError` (one line) having closed what it opened.
The engine modules (asyncpg, redis) are imported only when called, so importing this module
needs neither. Never: keeps state of its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.cluster.contracts import ClusterDB, CoordinatorLock, Presence, SharedBlobs

__all__ = [
    "ALIVE_EVERY_S",
    "LOCK_RETRY_S",
    "ClusterSettings",
    "Engines",
    "connect_db",
    "connect_presence",
    "open_engines",
]

#: Seconds between a worker's tries for the coordinator lock (a killed holder's successor
#: takes it within one period of its connection ending).
LOCK_RETRY_S = 1.0
#: Seconds between refreshes of a worker's liveness key (it expires after three).
ALIVE_EVERY_S = 2.0


@dataclass(frozen=True)
class ClusterSettings:
    """Where the shared engines are, and who this worker is."""

    redis_url: str
    database_url: str
    worker_id: str
    #: A shared directory for blobs (one machine); None: PostgreSQL large objects.
    shared_dir: Path | None = None
    lock_retry: float = LOCK_RETRY_S
    alive_every: float = ALIVE_EVERY_S
    poll: float = 1.0


@dataclass
class Engines:
    db: ClusterDB
    blobs: SharedBlobs
    presence: Presence
    lock: CoordinatorLock
    closers: list[Any]


async def connect_db(url: str) -> ClusterDB:
    """The PostgreSQL ClusterDB (server.cluster.db); raises ClusterError."""
    from server.cluster import db

    return await db.connect(url)


async def connect_presence(
    url: str, worker_id: str, *, device_ttl: float = 60.0, worker_ttl: float = 6.0
) -> Presence:
    """The Redis Presence of ``worker_id`` (server.cluster.presence); raises ClusterError."""
    from server.cluster import presence

    return await presence.connect(url, worker_id, device_ttl=device_ttl, worker_ttl=worker_ttl)


async def open_engines(settings: ClusterSettings, device_ttl: float) -> Engines:
    """The real engines (server.cluster.db/blobs/presence/lock); raises ClusterError.
    ``device_ttl``: seconds a device's presence lasts without news (the server's
    ``stale_after``); a worker's lasts three ``alive_every`` periods."""
    from server.cluster import blobs, lock

    database = await connect_db(settings.database_url)
    closers: list[Any] = [database]
    try:
        shared: SharedBlobs
        if settings.shared_dir is not None:
            shared = blobs.DirectoryBlobs(settings.shared_dir)
        else:
            shared = await blobs.connect_postgres(settings.database_url)
            closers.insert(0, shared)
        here = await connect_presence(
            settings.redis_url,
            settings.worker_id,
            device_ttl=device_ttl,
            worker_ttl=3 * settings.alive_every,
        )
        closers.insert(0, here)
        held = lock.PgCoordinatorLock(settings.database_url, probe_interval=settings.lock_retry)
    except BaseException:
        for closer in closers:
            with contextlib.suppress(Exception):
                await closer.close()
        raise
    return Engines(database, shared, here, held, [held, *closers])
