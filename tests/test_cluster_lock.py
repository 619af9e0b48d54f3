"""server/cluster/lock.py against a real PostgreSQL: one holder at a time, and the lock
moves to another candidate within seconds when the holder's connection or process dies."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from server.cluster.lock import LOCK_APPLICATION, PgCoordinatorLock
from tests.engines import PostgresServer
from tests.waiting import scaled

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
#: Seconds (reference) within which a freed lock must be taken by a retrying candidate.
TAKEOVER_S = 5.0


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), scaled(60.0)))


async def acquire_within(lock: PgCoordinatorLock, seconds: float, retry: float = 0.1) -> float:
    """Retry like a candidate; the seconds it took. AssertionError when it never got it."""
    start = time.monotonic()
    while not await lock.try_acquire():
        assert time.monotonic() - start < scaled(seconds), "the lock was never taken over"
        await asyncio.sleep(retry)
    return time.monotonic() - start


def test_one_holder_at_a_time_and_release_frees_it(postgres_url: str) -> None:
    async def body() -> None:
        a, b = PgCoordinatorLock(postgres_url), PgCoordinatorLock(postgres_url)
        try:
            assert await a.try_acquire() is True
            assert a.held
            assert await a.try_acquire() is True  # holding already
            assert await b.try_acquire() is False
            assert not b.held
            await a.release()
            assert not a.held
            assert await b.try_acquire() is True
            assert await a.try_acquire() is False
        finally:
            await a.release()
            await b.release()

    run(body)


def test_lock_moves_when_the_holders_session_is_ended(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    dbname = postgres_url.rsplit("/", 1)[1]

    async def body() -> None:
        a = PgCoordinatorLock(postgres_url, probe_interval=0.5)
        b = PgCoordinatorLock(postgres_url)
        try:
            assert await a.try_acquire()
            ended = await asyncio.to_thread(
                postgres_server.sql,
                dbname,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                f"WHERE application_name = '{LOCK_APPLICATION}' AND datname = '{dbname}'",
            )
            assert ended.strip() == "1"
            await acquire_within(b, TAKEOVER_S)
            deadline = time.monotonic() + scaled(TAKEOVER_S)
            while a.held:
                assert time.monotonic() < deadline, "the old holder still thinks it holds"
                await asyncio.sleep(0.05)
            assert await a.try_acquire() is False
        finally:
            await a.release()
            await b.release()

    run(body)


HOLDER = """
import asyncio, sys
from server.cluster.lock import PgCoordinatorLock
async def main():
    lock = PgCoordinatorLock(sys.argv[1])
    assert await lock.try_acquire()
    print("held", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_lock_moves_within_seconds_when_the_holder_process_is_killed(postgres_url: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, postgres_url], stdout=subprocess.PIPE, env=env
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"

        async def body() -> None:
            b = PgCoordinatorLock(postgres_url)
            try:
                assert await b.try_acquire() is False
                holder.kill()
                await asyncio.to_thread(holder.wait)
                took = await acquire_within(b, TAKEOVER_S)
                assert took < scaled(TAKEOVER_S)
            finally:
                await b.release()

        run(body)
    finally:
        holder.kill()
        holder.wait()
