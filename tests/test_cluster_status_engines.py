"""The cluster's status document on real engines: the history queries on PostgreSQL
(server/cluster/db.py), the device snapshots on Redis (server/cluster/status_board.py), and
``fedtray-server --workers 2`` serving the dashboard and the single-process
``/api/status`` through either worker, with real devices."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from server.cluster import db as cdb
from server.cluster.contracts import Assignment, RoundRow, UpdateRow, VersionRow
from server.cluster.status_board import WANTED_S, connect_board
from server.status import DeviceStatus, ServerStatus
from tests.cluster_harness import cluster, cluster_flags, latest_version
from tests.engines import RedisServer
from tests.waiting import poll, scaled

pytestmark = pytest.mark.slow

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), scaled(60.0)))


def round_row(rid: str, number: int, devices: int = 3) -> RoundRow:
    now = time.time()
    return RoundRow(rid, number, 1, number - 1, "open", devices, now + 60, now)


def assign(rid: str, devices: tuple[str, ...]) -> list[Assignment]:
    return [Assignment(rid, d, i, len(devices)) for i, d in enumerate(devices)]


def update(rid: str, device: str, loss: float) -> UpdateRow:
    return UpdateRow(rid, device, 10, "w1", f"u-{rid}-{device}", "b" * 64, {"trainLoss": loss})


def test_round_history_and_reports_by_device(postgres_url: str) -> None:
    async def body() -> None:
        db = await cdb.connect(postgres_url)
        try:
            await db.create_version_zero(VersionRow(0, "k0", "a" * 64, 10, None, time.time()))
            assert await db.round_history() == []
            await db.open_round(round_row("r1", 1), assign("r1", ("d1", "d2", "d3")))
            for device, loss in (("d1", 0.5), ("d2", 0.7)):
                assert await db.record_update(update("r1", device, loss))
            await db.publish_version(
                VersionRow(1, "k1", "c" * 64, 10, "r1", time.time(), {"trainLoss": 0.6})
            )
            await db.open_round(round_row("r2", 2, 2), assign("r2", ("d1", "d2")))
            assert await db.record_update(update("r2", "d1", 0.4))
            await db.set_round_state("r2", "abandoned")
            await db.open_round(round_row("r3", 2), assign("r3", ("d1", "d2", "d3")))

            first, second = await db.round_history()  # the open r3 is not history
            assert (first.round.round_id, first.round.state) == ("r1", "completed")
            assert (first.selected, first.reported) == (3, 2)
            assert first.version is not None and first.version.version == 1
            assert first.version.metrics == {"trainLoss": 0.6}
            assert first.last_update_at is not None
            assert first.round.opened_at <= first.last_update_at <= first.version.created_at
            assert (second.round.round_id, second.round.state) == ("r2", "abandoned")
            assert (second.selected, second.reported, second.version) == (2, 1, None)

            assert await db.reports_by_device(["r1"]) == {"d1": 1, "d2": 1}
            assert await db.reports_by_device(["r1", "r2"]) == {"d1": 2, "d2": 1}
            assert await db.reports_by_device(["r3", "nope"]) == {}
            assert await db.reports_by_device([]) == {}
        finally:
            await db.close()

    run(body)


def _device(ident: str, connected: bool = True) -> DeviceStatus:
    return DeviceStatus(
        id=ident,
        name=ident,
        type="laptop",
        state="idle",
        cpu_percent=1.0,
        last_seen=time.time(),
        rounds_completed=0,
        connected=connected,
        stale=False,
        client_version="1.0",
    )


def test_status_board_flag_snapshots_and_a_bad_snapshot(redis_url: str) -> None:
    async def body() -> None:
        one = await connect_board(redis_url, "w1", ttl=5)
        two = await connect_board(redis_url, "w2", ttl=5)
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            assert not await one.wanted()
            assert await two.want()  # nobody read the status before
            assert not await one.want()  # someone did, just now
            assert await one.wanted()
            assert 0 < await raw.ttl("fedtray:status:wanted") <= WANTED_S

            assert await two.snapshots(["w1", "w2"]) == {}
            mine = [_device("a"), _device("b", connected=False)]
            await one.publish(mine)
            await two.publish([_device("c")])
            got = await two.snapshots(["w1", "w2", "w3"])
            assert got == {"w1": mine, "w2": [got["w2"][0]]}
            assert [d.id for d in got["w2"]] == ["c"]
            assert 0 < await raw.ttl("fedtray:status:devices:w1") <= 5

            await raw.set("fedtray:status:devices:w3", '[{"id": "x"}]')
            assert set(await one.snapshots(["w1", "w3"])) == {"w1"}  # w3's is left out
        finally:
            await one.close()
            await two.close()
            await raw.aclose()

    run(body)


# ------------------------------------------------------------------ end to end


def _get(url: str) -> tuple[str, str, str]:
    """``(worker id header, content type, body)`` of one GET (a new connection each)."""
    with urllib.request.urlopen(url, timeout=scaled(10)) as resp:
        return (
            resp.headers.get("X-Fedtray-Worker", ""),
            resp.headers.get("Content-Type", ""),
            resp.read().decode("utf-8"),
        )


def _by_worker(
    url: str, workers: set[str], want: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, dict[str, Any]]:
    """GET ``url`` (new connections, so the kernel spreads them) until a document that
    satisfies ``want`` came from every worker in ``workers``; those documents."""
    seen: dict[str, dict[str, Any]] = {}

    def probe() -> dict[str, dict[str, Any]]:
        worker, _kind, text = _get(url)
        doc = json.loads(text)
        ServerStatus.model_validate(doc)  # the single-process schema, whichever worker
        assert set(doc) == set(ServerStatus.model_json_schema(by_alias=True)["properties"])
        if want(doc):
            seen[worker] = doc
        return seen

    found: dict[str, dict[str, Any]] = poll(probe, lambda s: set(s) >= workers, 120, what)
    return found


def _finished(doc: dict[str, Any]) -> bool:
    devices = doc["devices"]
    return (
        doc["phase"] == "finished"
        and doc["globalVersion"] == 1
        # The server's evaluation of version 1 is recorded (off the round's path, after it).
        and [r["evalLoss"] is not None for r in doc["history"]] == [True]
        and len(devices) == 3
        and all(d["connected"] and d["roundsCompleted"] == 1 for d in devices)
    )


def test_two_workers_serve_the_dashboard_and_the_same_status(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    redis = private_redis.url(0)
    flags = cluster_flags(tmp_path, redis, postgres_url, "--rounds", "1")
    with cluster(tmp_path, redis, postgres_url, *flags) as fed:
        status = f"{fed.srv.url}/api/status"
        workers = set(poll(fed.worker_pids, lambda p: len(p) == 2, 60, "two workers"))
        waiting = _by_worker(
            status,
            workers,
            lambda d: (
                d["phase"] == "waiting"
                and d["currentRound"]["waitingReason"] == "0 of 3 eligible devices (2 live workers)"
            ),
            "both workers waiting for round 1",
        )
        for doc in waiting.values():
            assert (doc["globalVersion"], doc["history"], doc["devices"]) == (0, [], [])
            assert doc["currentRound"]["number"] == 1
            assert doc["roundsTarget"] == 1 and doc["task"] == "synthetic"

        where = fed.spread(3)
        assert len(set(where.values())) == 2, where
        poll(
            lambda: latest_version(postgres_url),
            lambda v: v is not None and v["version"] >= 1,
            120,
            "round 1",
        )
        done = _by_worker(status, workers, _finished, "both workers showing the finished round")
        for doc in done.values():
            [record] = doc["history"]
            assert (record["outcome"], record["number"], record["version"]) == ("completed", 1, 1)
            assert (record["clientsSelected"], record["clientsReported"]) == (3, 3)
            assert isinstance(record["trainLoss"], float)
            assert record["timing"]["publishedAt"] == record["finishedAt"]
            assert sorted(d["name"] for d in doc["devices"]) == ["d0", "d1", "d2"]
            assert {d["id"] for d in doc["devices"]} == set(where)
        # Every worker shows the same fleet and the same history.
        first, second = done.values()
        assert first["history"] == second["history"]
        assert [d["id"] for d in first["devices"]] == [d["id"] for d in second["devices"]]

        _worker, kind, page = _get(f"{fed.srv.url}/")
        assert kind.startswith("text/html") and 'fetch("api/status"' in page
        cluster_facts = json.loads(_get(f"{fed.srv.url}/api/cluster")[2])
        assert cluster_facts["mode"] == "cluster" and cluster_facts["workerId"] in workers
        assert cluster_facts["globalVersion"] == 1
