"""The multi-process server end to end: ``fedtray-server --workers 2`` on real Redis and
PostgreSQL (tests/engines.py) with real ``python -m client`` devices.

What is asserted comes from the shared engines themselves (the update rows' worker ids in
PostgreSQL, presence in Redis), never from one process's memory: a federation of three
devices spread over both workers completes two rounds, each update recorded once, and the
updates arrived through both workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.cluster.contracts import RoundRow, UpdateRow, VersionRow
from server.cluster.worker import connect_db, connect_presence
from tests.engines import RedisServer
from tests.server_harness import REPO_ROOT, server_process, subprocess_env
from tests.waiting import poll, scaled

pytestmark = pytest.mark.slow

TINY = ("features=8", "classes=3", "hidden=8", "samples=300")


def _cluster_flags(tmp_path: Path, redis: str, database: str, *extra: str) -> list[str]:
    params = [arg for p in TINY for arg in ("--task-param", p)]
    return [
        "--workers",
        "2",
        "--redis",
        redis,
        "--database",
        database,
        "--shared-dir",
        str(tmp_path / "shared"),
        "--min-clients",
        "3",
        "--clients-per-round",
        "3",
        "--min-completion",
        "1.0",
        "--round-timeout",
        "60",
        *params,
        *extra,
    ]


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _placement(redis: str) -> dict[str, str]:
    presence = connect_presence(redis, "test-observer")
    return dict(await presence.eligible_devices())


async def _state(database: str) -> tuple[RoundRow | None, VersionRow | None]:
    db = await connect_db(database)
    try:
        return await db.current_round(), await db.latest_version()
    finally:
        with contextlib.suppress(Exception):
            await db.close()  # type: ignore[attr-defined]


async def _updates(database: str, round_ids: set[str]) -> list[UpdateRow]:
    db = await connect_db(database)
    try:
        rows: list[UpdateRow] = []
        for round_id in sorted(round_ids):
            rows += await db.updates(round_id)
        return rows
    finally:
        with contextlib.suppress(Exception):
            await db.close()  # type: ignore[attr-defined]


def _start(tmp_path: Path, url: str, name: str) -> subprocess.Popen[bytes]:
    """A real ``python -m client`` device with config dirs of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "client", "--server", url, "--name", name],
        cwd=REPO_ROOT,
        env=subprocess_env(tmp_path / name),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(scaled(20))
    if proc.poll() is None:
        proc.kill()
        proc.wait(scaled(20))


def test_two_workers_complete_two_rounds_with_updates_through_both(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    redis = private_redis.url(0)
    flags = _cluster_flags(tmp_path, redis, postgres_url, "--rounds", "2")
    with (
        server_process(tmp_path, *flags, start_timeout=120) as srv,
        contextlib.ExitStack() as stack,
    ):
        # Devices join one at a time (fewer than --min-clients: no round opens yet); the
        # second is reconnected until the kernel put it on the other worker.
        def client(name: str) -> subprocess.Popen[bytes]:
            proc = _start(tmp_path, srv.url, name)
            stack.callback(_stop, proc)
            return proc

        def placed(count: int, what: str) -> dict[str, str]:
            found: dict[str, str] = poll(
                lambda: _run(_placement(redis)), lambda p: len(p) == count, scaled(90), what
            )
            return found

        first = client("c0")
        placed(1, "c0 registered")
        for attempt in range(12):
            second = client(f"c1-{attempt}")
            where = placed(2, "c1 registered")
            if len(set(where.values())) == 2:
                break
            _stop(second)
            placed(1, "c1 gone")
        else:
            pytest.fail(f"12 connections all landed on one worker: {where}")
        assert first.poll() is None
        client("c2")
        seen_rounds: set[str] = set()

        def look() -> VersionRow | None:
            current, latest = _run(_state(postgres_url))
            if current is not None:
                seen_rounds.add(current.round_id)
            if latest is not None and latest.round_id is not None:
                seen_rounds.add(latest.round_id)
            return latest

        latest = poll(look, lambda v: v is not None and v.version >= 2, scaled(240), "2 rounds")
        assert latest is not None and latest.version == 2
        updates = _run(_updates(postgres_url, seen_rounds))
        per_round: dict[str, list[str]] = {}
        for row in updates:
            per_round.setdefault(row.round_id, []).append(row.device_id)
        completed = [r for r, devices in per_round.items() if len(devices) == 3]
        assert len(completed) >= 2, per_round
        for devices in per_round.values():
            assert len(devices) == len(set(devices)), f"an update counted twice: {per_round}"
        workers = {row.worker_id for row in updates}
        assert len(workers) == 2, f"updates came through {workers} only"
