"""Cluster rounds with a server optimizer and with a robust strategy on the real engines
(PostgreSQL rows and large objects, Redis presence: server/cluster/engines.py): each
published version equals the single-process strategy code (server.strategies) over the
same updates, and FedAdam's state saved beside version 1 in PostgreSQL carries round 2
across a change of coordinator.

Workers are simulated at the seams (tests/test_cluster_coordinator.py's ``Worker``: blob in
shared storage, ``record_update``, partial sum), as in tests/test_cluster_coordinator_pg.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from client.weights import StateDict, decode
from server.cluster.aggregate import decode_state
from server.cluster.contracts import DeviceSeen, SharedBlobs
from server.cluster.coordinator import ClusterCoordinator
from server.cluster.engines import ClusterSettings, Engines, open_engines
from server.config import ServerConfig
from server.strategies import MemoryUpdates, StrategySettings, build_strategy
from tests.test_cluster_coordinator import INITIAL, LAYOUT, Cluster, Worker
from tests.waiting import scaled

DEVICES = ("a", "b", "c", "d")
SAMPLES = {"a": 3, "b": 5, "c": 1, "d": 7}


def _update(seed: int, spread: int = 20) -> StateDict:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.integers(-spread, spread, (3, 2)).astype(np.float32),
        "n": rng.integers(0, 9, 2).astype(np.int64),
    }


def _expected(settings: StrategySettings, rounds: list[dict[str, StateDict]]) -> StateDict:
    strategy = build_strategy(settings)
    current = dict(INITIAL)
    for updates in rounds:
        strategy.begin(current)
        kept = [(updates[d], SAMPLES[d]) for d in sorted(updates)]
        for state, samples in kept:
            strategy.add(state, samples)
        aggregate = strategy.result(MemoryUpdates(kept))
        strategy.commit(aggregate)
        current = aggregate.weights
    return current


async def _read(blobs: SharedBlobs, key: str, sha: str, dest: Path) -> bytes:
    await blobs.get_file(key, sha, dest)
    try:
        return dest.read_bytes()
    finally:
        dest.unlink()


async def _one_round(
    engines: Engines, config: ServerConfig, worker: Worker, number: int, tmp: Path
) -> dict[str, StateDict]:
    """A coordinator (a new one each round, as after a takeover) runs round ``number``
    while the worker reports every device; the updates sent."""
    db = engines.db
    coordinator = ClusterCoordinator(
        config=dataclasses.replace(config, rounds=number),
        db=db,
        presence=engines.presence,
        blobs=engines.blobs,
        layout=LAYOUT,
        initial_weights=lambda: dict(INITIAL),
        work_dir=tmp,
        poll_interval=0.05,
        partial_wait=scaled(10),
    )
    task = asyncio.create_task(coordinator.run())
    try:
        row = None

        async def opened() -> bool:
            nonlocal row
            row = await db.current_round()
            return row is not None and row.number == number

        await _until(opened, f"round {number} to open")
        assert row is not None
        sent: dict[str, StateDict] = {}
        for part in await db.assignments(row.round_id):
            sent[part.device_id] = _update(10 * number + part.index, spread=20 + 200 * part.index)
            samples = SAMPLES[part.device_id]
            await worker.report(row.round_id, part.device_id, sent[part.device_id], samples, 1.0)

        async def closed() -> bool:
            current = await db.current_round()
            return current is None or current.state == "closing"

        await _until(closed, f"round {number} to close")
        await worker.write_partial(row.round_id)  # read or not, as the strategy needs
        await asyncio.wait_for(task, timeout=scaled(20))
        return sent
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + scaled(15)
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "clip"), [("fedadam", None), ("median", None), ("trimmed-mean", 40.0)]
)
def test_cluster_versions_equal_the_strategy_code(
    redis_url: str, postgres_url: str, tmp_path: Path, name: str, clip: float | None
) -> None:
    settings = StrategySettings(name=name, clip_norm=clip)
    c = Cluster(tmp_path, clients_per_round=4, min_clients=4, strategy=settings)

    async def body() -> None:
        engines = await open_engines(
            ClusterSettings(redis_url, postgres_url, "w1"), device_ttl=scaled(30)
        )
        try:
            # The simulated worker records through the real database and storage.
            c.db, c.blobs = engines.db, engines.blobs  # type: ignore[assignment]
            worker = Worker(c, "w1")
            await engines.presence.worker_alive()
            await engines.presence.devices_changed([DeviceSeen(d, True, 0) for d in DEVICES], [])
            rounds = [await _one_round(engines, c.config, worker, n, tmp_path) for n in (1, 2)]

            latest = await engines.db.latest_version()
            assert latest is not None and latest.version == 2
            got = decode(
                await _read(engines.blobs, latest.blob_key, latest.sha256, tmp_path / "v2"),
                "safetensors",
                expected=LAYOUT,
            )
            want = _expected(settings, rounds)
            for tensor, arr in want.items():
                assert got[tensor].dtype == arr.dtype
                np.testing.assert_array_equal(got[tensor], arr, err_msg=tensor)
            # The optimizer's state is named by the version's row in PostgreSQL.
            if name == "fedadam":
                assert latest.optimizer_key is not None and latest.optimizer_sha256 is not None
                state = decode_state(
                    await _read(
                        engines.blobs,
                        latest.optimizer_key,
                        latest.optimizer_sha256,
                        tmp_path / "opt",
                    )
                )
                assert set(state) == {"adam.m/w", "adam.v/w"}
            else:
                assert latest.optimizer_key is None
        finally:
            await engines.lock.release()
            for closer in engines.closers:
                close = getattr(closer, "close", None)  # the lock has none
                if close is not None:
                    await close()

    asyncio.run(asyncio.wait_for(body(), timeout=scaled(90)))
