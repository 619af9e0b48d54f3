"""The multi-process server survives its parts dying: ``kill -9`` of a worker, of the
coordinator lock's holder, and a restart of Redis, mid-federation (real ``redis-server``,
PostgreSQL, ``fedtray-server --workers 2`` and ``python -m client`` devices).

Every test asserts from PostgreSQL's rows that the round completed with an update from
each selected device, recorded once (no update lost or counted twice).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.cluster.engines import LOCK_RETRY_S
from tests.cluster_harness import (
    Cluster,
    cluster,
    cluster_flags,
    fetch,
    latest_version,
    lock_holder_pid,
    lock_session,
    pid_of_local_port,
    update_rows,
)
from tests.engines import RedisServer
from tests.waiting import poll, scaled

pytestmark = pytest.mark.slow

DEVICES = 3


def _training(fed: Cluster) -> dict[str, Any]:
    """Wait until a round is open and every selected device has started training on it
    (and none has reported yet: the round is in the middle); its row."""

    def look() -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        rows = fetch(fed.database, "SELECT * FROM fedtray_rounds WHERE state = 'open'")
        if not rows:
            return None, []
        parts = fetch(
            fed.database,
            "SELECT device_id, state FROM fedtray_assignments WHERE round_id = $1",
            rows[0]["round_id"],
        )
        return rows[0], parts

    row, _parts = poll(
        look,
        lambda found: (
            found[0] is not None
            and len(found[1]) == DEVICES
            and all(p["state"] == "started" for p in found[1])
        ),
        60,
        "a round with every device training",
    )
    assert row is not None
    return row


def _completed(fed: Cluster, version: int) -> dict[str, Any]:
    latest = poll(
        lambda: latest_version(fed.database),
        lambda v: v is not None and v["version"] >= version,
        90,
        f"version {version}",
    )
    assert latest is not None and latest["version"] == version
    return latest


def _assert_each_device_once(fed: Cluster, round_id: str) -> list[dict[str, Any]]:
    rows = [r for r in update_rows(fed.database) if r["round_id"] == round_id]
    per_device = Counter(r["device_id"] for r in rows)
    assert len(per_device) == DEVICES, f"updates lost in {round_id}: {rows}"
    assert max(per_device.values()) == 1, f"an update counted twice: {rows}"
    return rows


def test_a_killed_worker_s_devices_finish_the_round_on_another(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    redis = private_redis.url(0)
    flags = cluster_flags(tmp_path, redis, postgres_url, "--rounds", "1")
    with cluster(tmp_path, redis, postgres_url, *flags) as fed:
        where = fed.spread(DEVICES)
        row = _training(fed)
        holder = lock_holder_pid(postgres_url)
        pids = fed.worker_pids()
        victim = next(w for w in sorted(set(where.values())) if pids[w] != holder)
        moved = {d for d, w in where.items() if w == victim}
        assert moved and not update_rows(postgres_url), "not mid-round"

        os.kill(pids[victim], signal.SIGKILL)

        latest = _completed(fed, 1)
        assert latest["round_id"] == row["round_id"]
        rows = _assert_each_device_once(fed, row["round_id"])
        for r in rows:
            if r["device_id"] in moved:
                assert r["worker_id"] != victim, f"an update through the dead worker: {r}"


def test_the_lock_is_taken_over_and_the_open_round_finished(
    tmp_path: Path,
    private_redis: RedisServer,
    postgres_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    redis = private_redis.url(0)
    flags = cluster_flags(tmp_path, redis, postgres_url, "--rounds", "1", shared_dir=False)
    with cluster(tmp_path, redis, postgres_url, *flags) as fed:
        fed.spread(DEVICES)
        row = _training(fed)
        session = lock_session(postgres_url)
        holder = lock_holder_pid(postgres_url)
        assert session is not None and holder in fed.worker_pids().values()

        killed_at = time.monotonic()
        os.kill(holder, signal.SIGKILL)
        # PostgreSQL ends the killed session (and frees its lock) as its socket closes; a
        # candidate tries every LOCK_RETRY_S, and its try (connect, query) takes well under
        # another period: a successor within two periods.
        bound = scaled(2 * LOCK_RETRY_S)
        successor = poll(
            lambda: lock_session(postgres_url),
            lambda found: found is not None and found[0] != session[0],
            2 * LOCK_RETRY_S + 10,
            "a successor holding the lock",
        )
        took = time.monotonic() - killed_at
        record_property("lock_takeover_s", round(took, 2))
        print(f"lock taken over {took:.2f} s after the kill (bound {bound:.1f} s)")
        assert took <= bound, f"the lock was taken over after {took:.1f} s (bound {bound:.1f} s)"
        assert successor is not None
        owner = pid_of_local_port(successor[1])
        assert owner is None or owner != holder

        latest = _completed(fed, 1)
        assert latest["round_id"] == row["round_id"], "the open round was not finished"
        _assert_each_device_once(fed, row["round_id"])


def test_workers_recover_from_a_redis_restart(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    redis = private_redis.url(0)
    flags = cluster_flags(tmp_path, redis, postgres_url, "--rounds", "2")
    with cluster(tmp_path, redis, postgres_url, *flags) as fed:
        fed.spread(DEVICES)
        first = _completed(fed, 1)

        private_redis.stop()
        poll(
            fed.srv.output,
            lambda out: "cannot write presence" in out,
            30,
            "a worker noticing that Redis is gone",
        )
        private_redis.start()
        fed.placed(DEVICES, "presence back in the restarted Redis")

        second = _completed(fed, 2)
        assert second["round_id"] != first["round_id"]
        _assert_each_device_once(fed, first["round_id"])
        _assert_each_device_once(fed, second["round_id"])
