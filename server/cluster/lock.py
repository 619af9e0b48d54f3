"""The coordinator lock: a PostgreSQL session advisory lock on a dedicated connection.

:class:`PgCoordinatorLock` implements :class:`server.cluster.contracts.CoordinatorLock`.

Promises:

* At most one session of the database holds the lock (``pg_try_advisory_lock(key)``,
  :data:`LOCK_KEY` unless given): PostgreSQL grants it to one session and frees it when
  that session ends -- a killed process's connection closes, so another candidate's next
  :meth:`~PgCoordinatorLock.try_acquire` succeeds within its retry period.
* :meth:`~PgCoordinatorLock.try_acquire` never waits for the lock: True when this process
  holds it now (also when it held it already), False when another session does.
* :attr:`~PgCoordinatorLock.held` turns False as soon as the lock's connection is known to
  be lost: asyncpg sees the socket close (server ended the session, server down), and
  while held a probe (``SELECT 1``) every ``probe_interval`` seconds that fails or takes
  longer than ``probe_interval`` ends the connection (a silent network). A holder that
  sees ``held`` False must stop acting as the coordinator: another may hold it already.
* :meth:`~PgCoordinatorLock.release` unlocks and closes the connection (no error when it
  is gone already).

Raises: ClusterError from :meth:`try_acquire` when PostgreSQL is unreachable (callers
retry). Never: waits for the lock, or holds it on a pooled connection (the pool could hand
the session, and the lock with it, to another task).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import asyncpg

from server.cluster.contracts import CoordinatorLock
from server.cluster.pg import connect_one, engine_errors

__all__ = ["LOCK_APPLICATION", "LOCK_KEY", "PgCoordinatorLock"]

#: The advisory lock key of the coordinator ("fedtray" + 0): advisory locks are per database.
LOCK_KEY = 0x66656474_72617900
#: ``application_name`` of the lock's connection (pg_stat_activity).
LOCK_APPLICATION = "fedtray-coordinator-lock"
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PgCoordinatorLock:
    """The coordinator lock (see the module docstring)."""

    def __init__(self, url: str, *, key: int = LOCK_KEY, probe_interval: float = 2.0) -> None:
        self._url = url
        self._key = key
        self._probe_interval = probe_interval
        self._conn: asyncpg.Connection | None = None
        self._holding = False
        self._probe: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return self._holding and self._conn is not None and not self._conn.is_closed()

    async def try_acquire(self) -> bool:
        if self.held:
            return True
        await self._drop()
        conn = await connect_one(self._url, LOCK_APPLICATION)
        try:
            with engine_errors("coordinator lock"):
                got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._key))
        except BaseException:
            conn.terminate()
            raise
        if not got:
            conn.terminate()
            return False
        self._conn = conn
        self._holding = True
        self._probe = asyncio.get_running_loop().create_task(self._watch(conn))
        return True

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """End ``conn`` when the server stops answering (held then reads False)."""
        while not conn.is_closed():
            await asyncio.sleep(self._probe_interval)
            try:
                await conn.fetchval("SELECT 1", timeout=self._probe_interval)
            except _ERRORS:
                conn.terminate()
                return

    async def _stop_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_ERRORS):
                await probe

    async def _drop(self) -> None:
        self._holding = False
        await self._stop_probe()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def release(self) -> None:
        await self._stop_probe()
        conn = self._conn
        if conn is not None and self._holding and not conn.is_closed():
            with contextlib.suppress(*_ERRORS):
                await conn.execute("SELECT pg_advisory_unlock($1)", self._key, timeout=5.0)
            with contextlib.suppress(*_ERRORS):
                await conn.close(timeout=5.0)
        await self._drop()


if TYPE_CHECKING:  # mypy proves the implementation satisfies its contract

    def _conforms(impl: PgCoordinatorLock) -> CoordinatorLock:
        return impl
