"""server/cluster/presence.py against a real redis-server: counts per live worker, a device
counted once when it moves, a dead worker's keys expiring after its TTL, recovery after a
Redis restart."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio as aioredis

from server.cluster import presence as pres
from server.cluster.contracts import ClusterError, DeviceSeen
from tests.engines import RedisServer, free_port
from tests.waiting import scaled

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), scaled(60.0)))


async def worker(url: str, wid: str, ttl: float = 30.0) -> pres.RedisPresence:
    p = await pres.connect(url, wid, device_ttl=ttl, worker_ttl=ttl)
    await p.worker_alive()
    return p


async def until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    deadline = time.monotonic() + scaled(seconds)
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_counts_and_lists_eligible_devices_of_live_workers(redis_url: str) -> None:
    async def body() -> None:
        a, b = await worker(redis_url, "wa"), await worker(redis_url, "wb")
        try:
            for d in ("d3", "d1"):
                await a.device_seen(DeviceSeen(d, True, 0))
            await a.device_seen(DeviceSeen("d9", False, None))
            await b.device_seen(DeviceSeen("d2", True, 1))
            assert await a.live_workers() == {"wa", "wb"}
            assert await b.eligible_count() == 3
            assert await a.eligible_devices() == [("d1", "wa"), ("d2", "wb"), ("d3", "wa")]
            assert await b.worker_of("d9") == "wa"
            assert await b.worker_of("nobody") is None
            # Eligible -> not eligible -> gone.
            await a.device_seen(DeviceSeen("d1", False, 0))
            assert await a.eligible_count() == 2
            await a.device_gone("d3")
            assert await a.eligible_devices() == [("d2", "wb")]
            assert await a.worker_of("d3") is None
        finally:
            await a.close()
            await b.close()

    run(body)


def test_a_device_that_moves_is_counted_once(redis_url: str) -> None:
    async def body() -> None:
        a, b = await worker(redis_url, "wa"), await worker(redis_url, "wb")
        try:
            await a.device_seen(DeviceSeen("d1", True, 0))
            await b.device_seen(DeviceSeen("d1", True, 0))  # reconnected to b
            assert await a.eligible_count() == 1
            assert await a.worker_of("d1") == "wb"
            await a.device_gone("d1")  # a learns of the old connection's end late
            assert await a.worker_of("d1") == "wb"
            assert await b.eligible_devices() == [("d1", "wb")]
        finally:
            await a.close()
            await b.close()

    run(body)


def test_a_dead_workers_keys_expire_after_its_ttl(redis_url: str) -> None:
    ttl = 1.0

    async def body() -> None:
        dead = await worker(redis_url, "dead", ttl=ttl)
        live = await worker(redis_url, "live", ttl=30.0)
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await dead.device_seen(DeviceSeen("d1", True, 0))
            await dead.device_seen(DeviceSeen("d2", True, 0))
            await live.device_seen(DeviceSeen("d3", True, 0))
            assert await live.eligible_count() == 3
            # "dead" stops refreshing (a killed process): everything of it goes by itself.

            async def gone() -> bool:
                return not [
                    k
                    async for k in raw.scan_iter("fedtray:*")
                    if "d3" not in k and "live" not in k and k != "fedtray:workers"
                ]

            await until(gone, ttl * 3 + 2, "the dead worker's keys to expire")
            assert await live.live_workers() == {"live"}
            assert await live.eligible_count() == 1
            assert await live.eligible_devices() == [("d3", "live")]
            assert await live.worker_of("d1") is None
            assert await raw.smembers("fedtray:workers") == {"live"}
        finally:
            await raw.aclose()
            await dead.close()
            await live.close()

    run(body)


def test_a_dead_workers_set_is_ignored_at_once_and_removable(redis_url: str) -> None:
    async def body() -> None:
        a, b = await worker(redis_url, "wa"), await worker(redis_url, "wb")
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await a.device_seen(DeviceSeen("d1", True, 0))
            await b.device_seen(DeviceSeen("d2", True, 0))
            await raw.delete("fedtray:worker:wa")  # its liveness key expired
            assert await b.eligible_count() == 1
            assert await b.worker_of("d1") is None
            assert await raw.exists("fedtray:elig:wa") == 1
            await b.forget_worker("wa")
            assert await raw.exists("fedtray:elig:wa") == 0
        finally:
            await raw.aclose()
            await a.close()
            await b.close()

    run(body)


def test_an_unseen_device_expires_and_is_not_offered(redis_url: str) -> None:
    async def body() -> None:
        p = await pres.connect(redis_url, "wa", device_ttl=1.0, worker_ttl=30.0)
        try:
            await p.worker_alive()
            await p.device_seen(DeviceSeen("d1", True, 0))

            async def expired() -> bool:
                return await p.worker_of("d1") is None

            await until(expired, 5, "the device key to expire")
            assert await p.eligible_devices() == []
            assert await p.eligible_count() == 0  # dropped from the set by the listing
        finally:
            await p.close()

    run(body)


def test_presence_recovers_after_a_redis_restart(private_redis: RedisServer) -> None:
    async def body() -> None:
        p = await worker(private_redis.url(), "wa")
        try:
            await p.device_seen(DeviceSeen("d1", True, 0))
            await asyncio.to_thread(private_redis.kill)
            with pytest.raises(ClusterError, match=r"^Redis "):
                await p.device_seen(DeviceSeen("d1", True, 0))
            await asyncio.to_thread(private_redis.start)
            assert await p.eligible_count() == 0  # nothing persisted
            await p.worker_alive()
            await p.device_seen(DeviceSeen("d1", True, 0))
            assert await p.eligible_devices() == [("d1", "wa")]
        finally:
            await p.close()

    run(body)


def test_unreachable_redis_is_one_clear_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(ClusterError, match=r"^Redis at 127\.0\.0\.1:\d+/0 unreachable"):
        run(lambda: pres.connect(url, "w", device_ttl=5, worker_ttl=5))


def test_many_devices_change_in_one_call(redis_url: str) -> None:
    async def body() -> None:
        a, b = await worker(redis_url, "wa"), await worker(redis_url, "wb")
        try:
            await b.device_seen(DeviceSeen("d2", True, 0))
            await a.devices_changed([], [])  # nothing to write: no error
            await a.devices_changed(
                [DeviceSeen("d1", True, 0), DeviceSeen("d2", True, 1), DeviceSeen("d3", False, 1)],
                [],
            )
            # d2 moved to a: counted once, on a.
            assert await a.eligible_devices() == [("d1", "wa"), ("d2", "wa")]
            assert await b.worker_of("d3") == "wa"
            await a.devices_changed([DeviceSeen("d3", True, 1)], ["d1", "d2"])
            assert await b.eligible_devices() == [("d3", "wa")]
            assert await b.worker_of("d1") is None
        finally:
            await a.close()
            await b.close()

    run(body)


def test_worker_alive_says_whether_redis_kept_the_worker(private_redis: RedisServer) -> None:
    async def body() -> None:
        p = await pres.connect(private_redis.url(), "wa", device_ttl=30, worker_ttl=30)
        try:
            assert await p.worker_alive() is False  # first call: announced now
            assert await p.worker_alive() is True
            await asyncio.to_thread(private_redis.kill)
            await asyncio.to_thread(private_redis.start)
            alive = False
            for _ in range(3):  # the first call after the restart may meet the old socket
                with contextlib.suppress(ClusterError):
                    alive = await p.worker_alive()
                    break
            assert alive is False  # restarted empty: the worker must write its devices again
            assert await p.worker_alive() is True
        finally:
            await p.close()

    run(body)
