"""server.cluster.coordinator on a real PostgreSQL (server/cluster/db.py, lock.py): the lock
holder dies mid-round, the other candidate takes the lock and finishes the SAME round.

Shared storage and presence are the in-memory ones (tests/cluster_memory.py): what is under
test is the round's life in the real database across two coordinators.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from client.weights import decode
from server.cluster import db as cdb
from server.cluster.contracts import RoundRow
from server.cluster.coordinator import ClusterCoordinator
from server.cluster.lock import PgCoordinatorLock
from tests.cluster_memory import MemoryBlobs, MemoryPresence
from tests.test_cluster_coordinator import INITIAL, LAYOUT, Cluster, Worker, _fedavg, _update
from tests.waiting import scaled

T = TypeVar("T")


async def _until(fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str) -> T:
    deadline = time.monotonic() + scaled(10)
    while True:
        value = await fetch()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waiting for {what}; last: {value!r}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
def test_another_candidate_takes_the_lock_and_finishes_the_open_round(
    postgres_url: str, tmp_path: Path
) -> None:
    async def body() -> None:
        db_a = await cdb.connect(postgres_url, max_size=3)
        db_b = await cdb.connect(postgres_url, max_size=3)
        lock_a = PgCoordinatorLock(postgres_url, probe_interval=0.5)
        lock_b = PgCoordinatorLock(postgres_url, probe_interval=0.5)
        c = Cluster(tmp_path, clients_per_round=3, min_clients=3)
        c.blobs, c.presence = MemoryBlobs(), MemoryPresence()
        c.db = db_b  # type: ignore[assignment]  # the workers record through the real one
        worker = Worker(c, "w1")
        worker.connect("a", "b", "c")

        def coordinator(db: cdb.PgClusterDB) -> ClusterCoordinator:
            return ClusterCoordinator(
                config=c.config,
                db=db,
                presence=c.presence,
                blobs=c.blobs,
                layout=LAYOUT,
                initial_weights=lambda: dict(INITIAL),
                work_dir=tmp_path,
                poll_interval=0.05,
                partial_wait=scaled(10),
            )

        try:
            assert await lock_a.try_acquire()
            assert not await lock_b.try_acquire()
            first = asyncio.create_task(coordinator(db_a).run())
            row: RoundRow | None = await _until(
                db_b.current_round, lambda r: r is not None, "round 1 to open"
            )
            assert row is not None
            parts = await db_b.assignments(row.round_id)
            sent = [(_update(1), 4)]
            await worker.report(row.round_id, parts[0].device_id, *sent[0], 1.0)

            # The holder dies: its coordinator stops and its lock connection ends.
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await lock_a.release()
            took = time.monotonic()
            await _until(lock_b.try_acquire, bool, "the lock to pass to the other candidate")
            assert time.monotonic() - took < scaled(5)
            second = asyncio.create_task(coordinator(db_b).run())
            for i, part in enumerate(parts[1:], start=2):
                sent.append((_update(i), 4 + i))
                await worker.report(row.round_id, part.device_id, *sent[-1], 1.0)
            await _until(
                db_b.current_round,
                lambda r: r is not None and r.state == "closing",
                "the round to close",
            )
            await worker.write_partial(row.round_id)
            await asyncio.wait_for(second, timeout=scaled(20))

            latest = await db_b.latest_version()
            assert latest is not None and latest.version == 1
            assert latest.round_id == row.round_id  # the same round, finished by the other
            state = decode(c.blobs.data[latest.blob_key], "safetensors", expected=LAYOUT)
            for name, arr in _fedavg(sent).items():
                np.testing.assert_array_equal(state[name], arr)
            assert await db_b.current_round() is None
        finally:
            await lock_a.release()
            await lock_b.release()
            await db_a.close()
            await db_b.close()

    asyncio.run(asyncio.wait_for(body(), timeout=scaled(60)))
