"""server/cluster/db.py against a real PostgreSQL: schema, rounds, exactly-once updates,
notifications that survive a dropped connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from server.cluster import db as cdb
from server.cluster.contracts import (
    Assignment,
    ClusterError,
    PartialRow,
    RoundRow,
    UpdateRow,
    VersionRow,
)
from tests.engines import PostgresServer, free_port
from tests.waiting import scaled

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), scaled(60.0)))


def v0(key: str = "k0") -> VersionRow:
    return VersionRow(0, key, "a" * 64, 10, None, time.time())


def round_row(rid: str = "r1", state: str = "open") -> RoundRow:
    return RoundRow(rid, 1, 0, 0, state, 2, time.time() + 60, time.time())  # type: ignore[arg-type]


def parts(rid: str = "r1", devices: tuple[str, ...] = ("d1", "d2", "d3")) -> list[Assignment]:
    return [Assignment(rid, d, i, len(devices)) for i, d in enumerate(devices)]


def update(device: str, rid: str = "r1", worker: str = "w1") -> UpdateRow:
    return UpdateRow(rid, device, 5, worker, f"u-{device}", "b" * 64, {"loss": 0.5})


def test_schema_is_created_once_even_by_concurrent_connects(postgres_url: str) -> None:
    async def body() -> None:
        dbs = await asyncio.gather(*(cdb.connect(postgres_url, max_size=2) for _ in range(4)))
        try:
            assert await dbs[0].latest_version() is None
            recorded = await dbs[1].create_version_zero(v0("first"))
            again = await dbs[2].create_version_zero(v0("second"))
            assert recorded.blob_key == again.blob_key == "first"
            latest = await dbs[3].latest_version()
            assert latest is not None and latest.version == 0
        finally:
            await asyncio.gather(*(d.close() for d in dbs))

    run(body)


def test_unreachable_postgres_is_one_clear_error() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(ClusterError, match=r"PostgreSQL at 127\.0\.0\.1:\d+/nothing unreachable"):
        run(lambda: cdb.connect(url))


def test_round_lifecycle_and_one_current_round(postgres_url: str) -> None:
    async def body() -> None:
        db = await cdb.connect(postgres_url)
        try:
            await db.create_version_zero(v0())
            await db.open_round(round_row("r1"), parts("r1"))
            current = await db.current_round()
            assert current is not None and current.round_id == "r1" and current.state == "open"
            assert [(a.device_id, a.index, a.count) for a in await db.assignments("r1")] == [
                ("d1", 0, 3),
                ("d2", 1, 3),
                ("d3", 2, 3),
            ]
            with pytest.raises(ClusterError, match="another round is open"):
                await db.open_round(round_row("r2"), parts("r2"))
            await db.set_assignment("r1", "d3", "refused", "busy")
            refused = await db.assignment_of("r1", "d3")
            assert refused is not None and (refused.state, refused.detail) == ("refused", "busy")
            assert await db.assignment_of("r1", "nobody") is None
            with pytest.raises(ClusterError, match="no assignment"):
                await db.set_assignment("r1", "nobody", "failed")

            await db.set_round_state("r1", "closing")
            closing = await db.current_round()
            assert closing is not None and closing.state == "closing"
            with pytest.raises(ClusterError, match="cannot become open"):
                await db.set_round_state("r1", "open")
            await db.publish_version(VersionRow(1, "k1", "c" * 64, 10, "r1", time.time()))
            assert await db.current_round() is None
            latest = await db.latest_version()
            assert latest is not None and (latest.version, latest.round_id) == (1, "r1")
            # Publishing the same version again is a no-op; other weights are refused.
            await db.publish_version(VersionRow(1, "k1", "c" * 64, 10, "r1", time.time()))
            with pytest.raises(ClusterError, match="exists already"):
                await db.publish_version(VersionRow(1, "k9", "d" * 64, 10, "r1", time.time()))
            with pytest.raises(ClusterError, match="completed: cannot become abandoned"):
                await db.set_round_state("r1", "abandoned")
            # A new round may open now.
            await db.open_round(round_row("r2"), parts("r2"))
        finally:
            await db.close()

    run(body)


def test_an_update_counts_once_and_only_while_the_round_is_open(postgres_url: str) -> None:
    async def body() -> None:
        db = await cdb.connect(postgres_url)
        try:
            await db.open_round(round_row("r1"), parts("r1"))
            assert await db.record_update(update("d1")) is True
            assert await db.record_update(update("d1", worker="w2")) is False
            rows = await db.updates("r1")
            assert [(u.device_id, u.worker_id, u.metrics) for u in rows] == [
                ("d1", "w1", {"loss": 0.5})
            ]
            reported = await db.assignment_of("r1", "d1")
            assert reported is not None and reported.state == "reported"
            await db.set_assignment("r1", "d1", "failed", "late")  # reported stays reported
            still = await db.assignment_of("r1", "d1")
            assert still is not None and still.state == "reported"
            with pytest.raises(ClusterError, match="not assigned"):
                await db.record_update(update("stranger"))

            await db.set_round_state("r1", "closing")
            with pytest.raises(ClusterError, match="closing"):
                await db.record_update(update("d2"))
            # A duplicate after closing still gets the same answer (its ack was lost).
            assert await db.record_update(update("d1")) is False
            assert len(await db.updates("r1")) == 1
        finally:
            await db.close()

    run(body)


def test_concurrent_duplicates_from_two_workers_count_once(postgres_url: str) -> None:
    async def body() -> None:
        a = await cdb.connect(postgres_url)
        b = await cdb.connect(postgres_url)
        try:
            await a.open_round(round_row("r1"), parts("r1"))
            results = await asyncio.gather(
                *(
                    (a if i % 2 else b).record_update(update("d2", worker=f"w{i % 2}"))
                    for i in range(10)
                )
            )
            assert sorted(results) == [False] * 9 + [True]
            assert len(await a.updates("r1")) == 1
        finally:
            await a.close()
            await b.close()

    run(body)


def test_count_updates_is_the_number_of_update_rows(postgres_url: str) -> None:
    async def body() -> None:
        db = await cdb.connect(postgres_url)
        try:
            assert await db.count_updates("r1") == 0  # an unknown round
            await db.open_round(round_row("r1"), parts("r1"))
            assert await db.count_updates("r1") == 0
            assert await db.record_update(update("d1")) is True
            assert await db.count_updates("r1") == 1
            # A duplicate (another worker, the ack was lost) is counted once.
            assert await db.record_update(update("d1", worker="w2")) is False
            assert await db.count_updates("r1") == 1
            assert await db.record_update(update("d3")) is True
            assert await db.count_updates("r1") == len(await db.updates("r1")) == 2
            # Another round's updates are not counted in this one.
            await db.set_round_state("r1", "abandoned")
            await db.open_round(round_row("r2"), parts("r2"))
            assert await db.record_update(update("d2", rid="r2")) is True
            assert (await db.count_updates("r1"), await db.count_updates("r2")) == (2, 1)
        finally:
            await db.close()

    run(body)


def test_partials_are_idempotent_by_worker(postgres_url: str) -> None:
    async def body() -> None:
        db = await cdb.connect(postgres_url)
        try:
            await db.open_round(round_row("r1"), parts("r1"))
            row = PartialRow("r1", "w1", ("d1", "d2"), 10, "p1", "e" * 64)
            await db.record_partial(row)
            await db.record_partial(PartialRow("r1", "w1", ("d1",), 5, "p2", "f" * 64))
            await db.record_partial(PartialRow("r1", "w2", ("d3",), 5, "p3", "f" * 64))
            assert await db.partials("r1") == [
                row,
                PartialRow("r1", "w2", ("d3",), 5, "p3", "f" * 64),
            ]
        finally:
            await db.close()

    run(body)


def test_notifications_arrive_and_survive_a_dropped_connection(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    dbname = postgres_url.rsplit("/", 1)[1]

    async def body() -> None:
        db = await cdb.connect(postgres_url, max_size=2)
        stream = db.notifications()
        try:
            nxt = asyncio.ensure_future(anext(stream))
            await _until_listening(postgres_server, dbname)
            await db.open_round(round_row("r1"), parts("r1"))
            assert await asyncio.wait_for(nxt, scaled(10)) == "round:r1"

            # Every session of the database is ended (the listener's and the pool's).
            ended = await asyncio.to_thread(postgres_server.terminate_backends, dbname)
            assert ended >= 2
            nxt = asyncio.ensure_future(anext(stream))
            await _until_listening(postgres_server, dbname)
            # The pool's connections were ended too: its first use may fail, then recovers.
            for _ in range(3):
                try:
                    await db.set_round_state("r1", "closing")
                    break
                except ClusterError:
                    continue
            assert await asyncio.wait_for(nxt, scaled(10)) == "round:r1"
        finally:
            await stream.aclose()
            await db.close()

    run(body)


async def _until_listening(server: PostgresServer, dbname: str) -> None:
    deadline = time.monotonic() + scaled(10)
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
        f"'{dbname}' AND application_name = '{cdb.NOTIFY_APPLICATION}' "
        "AND (query LIKE 'LISTEN%' OR query = 'SELECT 1')"
    )
    while (await asyncio.to_thread(server.sql, dbname, query)).strip() == "0":
        assert time.monotonic() < deadline, "the notification stream never listened"
        await asyncio.sleep(0.05)
