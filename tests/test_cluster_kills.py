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


def _open_round(fed: Cluster) -> dict[str, Any]:
    """Wait until a round is open with every device assigned; its row."""

    def look() -> list[dict[str, Any]]:
        return fetch(
            fed.database,
            "SELECT r.*, (SELECT count(*) FROM fedtray_assignments a"
            " WHERE a.round_id = r.round_id) AS parts"
            " FROM fedtray_rounds r WHERE r.state = 'open'",
        )

    rows = poll(look, lambda found: bool(found) and found[0]["parts"] == DEVICES, 60, "a round")
    return rows[0]


def _still_open(fed: Cluster, round_id: str) -> None:
    """The round has not ended (and no version came of it): the kill is mid-round."""
    rows = fetch(fed.database, "SELECT state FROM fedtray_rounds WHERE round_id = $1", round_id)
    assert rows and rows[0]["state"] in ("open", "closing"), rows
    latest = latest_version(fed.database)
    assert latest is not None and latest["version"] == 0, latest


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
        row = _open_round(fed)
        holder = lock_holder_pid(postgres_url)
        pids = fed.worker_pids()
        victim = next(w for w in sorted(set(where.values())) if pids[w] != holder)
        moved = {d for d, w in where.items() if w == victim}
        assert moved, where
        with fed.frozen():
            _still_open(fed, row["round_id"])
            os.kill(pids[victim], signal.SIGKILL)

        # Its devices come back on a live worker (the other, or the victim's restart).
        fed.placed(DEVICES, "the killed worker's devices elsewhere", exclude=frozenset({victim}))
        latest = _completed(fed, 1)
        assert latest["round_id"] == row["round_id"]
        # An update the dead worker recorded before it died (its partial sum never written)
        # is read back from shared storage by the coordinator: each device counts once.
        _assert_each_device_once(fed, row["round_id"])


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
        row = _open_round(fed)
        session = lock_session(postgres_url)
        holder = lock_holder_pid(postgres_url)
        assert session is not None and holder in fed.worker_pids().values()

        with fed.frozen():
            _still_open(fed, row["round_id"])
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
