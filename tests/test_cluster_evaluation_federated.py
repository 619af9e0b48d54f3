"""Federated evaluation in cluster mode (``--evaluate-every N``): the asks and results in a
real PostgreSQL (server/cluster/db.py), the coordinator's side over the in-memory contracts,
and end to end with ``fedtray-server --workers 2`` and scripted devices that evaluate."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from client.protocol import EV_EVALUATION_RESULT, EV_EVALUATION_START
from server.cluster import db as cdb
from server.cluster.contracts import EvalAsk, VersionRow
from server.cluster.fedeval import CoordinatorFederated
from server.config import ServerConfig
from tests.cluster_harness import cluster, cluster_flags, fetch
from tests.cluster_memory import MemoryDB, MemoryPresence
from tests.engines import RedisServer
from tests.server_harness import ScriptedDevice, run_devices
from tests.test_cluster_finish import train_round
from tests.waiting import scaled, wait_until_async

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), scaled(60.0)))


def asks(version: int, *devices: str, deadline: float | None = None) -> list[EvalAsk]:
    when = time.time() + 60 if deadline is None else deadline
    return [EvalAsk(version, d, i, len(devices), when) for i, d in enumerate(devices)]


def test_postgres_counts_each_result_once_and_keeps_the_means(postgres_url: str) -> None:
    async def body() -> None:
        db = await cdb.connect(postgres_url, max_size=4)
        other = await cdb.connect(postgres_url, max_size=4)
        try:
            await db.create_version_zero(VersionRow(0, "k0", "a" * 64, 1, None, time.time()))
            await db.ask_evaluation(asks(0, "a", "b", "c", "d"))
            await db.ask_evaluation(asks(0, "a"))  # again: nothing changes
            assert [(a.device_id, a.index, a.count) for a in await db.evaluation_asks(0)] == [
                ("a", 0, 4),
                ("b", 1, 4),
                ("c", 2, 4),
                ("d", 3, 4),
            ]
            await db.set_ask_state(0, "a", "accepted")
            await db.set_ask_state(0, "d", "done")
            # Two workers count results at once: the means cover both.
            counted = await asyncio.gather(
                db.record_federated_result(0, "a", 1.0, 0.5, 10),
                other.record_federated_result(0, "b", 4.0, 1.0, 30),  # before its acceptance
            )
            assert counted == [True, True]
            assert await db.record_federated_result(0, "a", 9.0, 0.0, 10) is False  # repeat
            assert await db.record_federated_result(0, "d", 9.0, 0.0, 10) is False  # done
            assert await db.record_federated_result(0, "zz", 9.0, 0.0, 10) is False  # not asked
            await db.set_ask_state(0, "b", "accepted")  # late acceptance: stays reported
            await db.set_ask_state(0, "a", "done")  # reported stays reported
            states = {a.device_id: a.state for a in await db.evaluation_asks(0)}
            assert states == {"a": "reported", "b": "reported", "c": "asked", "d": "done"}
            latest = await db.latest_version()
            assert latest is not None
            assert latest.metrics == {
                "federatedEvalLoss": pytest.approx((10 * 1.0 + 30 * 4.0) / 40),
                "federatedEvalAccuracy": pytest.approx((10 * 0.5 + 30 * 1.0) / 40),
                "federatedEvalSamples": 40.0,
                "federatedEvalDevices": 2.0,
            }
        finally:
            await db.close()
            await other.close()

    run(body)


def _config(tmp_path: Path, **kw: Any) -> ServerConfig:
    base: dict[str, Any] = {
        "clients_per_round": 2,
        "round_timeout": scaled(20),
        "heartbeat_interval": 0.1,
        "evaluate_every": 2,
        "state_dir": tmp_path,
    }
    base.update(kw)
    return ServerConfig(**base)


def test_the_coordinator_asks_due_versions_and_waits_until_settled(tmp_path: Path) -> None:
    async def body() -> None:
        db, presence = MemoryDB(), MemoryPresence()
        for device in ("c", "a", "b"):
            presence.connect(device, "w1")
        fed = CoordinatorFederated(config=_config(tmp_path), db=db, presence=presence, poll=0.01)
        await asyncio.wait_for(fed.evaluate(1), scaled(5))  # not due (every 2nd)
        assert db.asks == {}
        waiting = asyncio.create_task(fed.evaluate(2))
        await wait_until_async(lambda: len(db.asks) == 2, 10, "asks of version 2")
        assert sorted((a.device_id, a.index) for a in db.asks.values()) == [("a", 0), ("b", 1)]
        await db.set_ask_state(2, "a", "accepted")
        await db.record_federated_result(2, "a", 1.0, 1.0, 5)
        await asyncio.sleep(0.1)
        assert not waiting.done()  # b has not answered
        presence.kill("w1")  # b's worker died: its ask ends after stale_after
        await asyncio.wait_for(waiting, scaled(10))
        assert db.asks[(2, "b")].state == "done"

    run(body)


def test_the_coordinator_stops_waiting_at_the_deadline(tmp_path: Path) -> None:
    async def body() -> None:
        db, presence = MemoryDB(), MemoryPresence()
        presence.connect("a", "w1")
        fed = CoordinatorFederated(
            config=_config(tmp_path, round_timeout=0.3, evaluate_every=1),
            db=db,
            presence=presence,
            poll=0.01,
        )
        started = time.monotonic()
        await asyncio.wait_for(fed.evaluate(1), scaled(5))
        assert time.monotonic() - started >= 0.3
        assert db.asks[(1, "a")].state == "asked"
        db.fail_next("ask_evaluation")
        await asyncio.wait_for(fed.evaluate(2), scaled(5))  # an engine failure: logged, goes on

    run(body)


def _evaluating(dev: ScriptedDevice, index: int, log: list[tuple[str, int]]) -> None:
    """The device accepts evaluation:start and sends a result at once."""

    async def on_start(payload: dict[str, Any]) -> dict[str, Any]:
        version = int(payload["version"])
        log.append(("eval", version))
        result = {
            "version": version,
            "task": payload["task"],
            "loss": float(index + 1),
            "accuracy": 0.25 * (index + 1),
            "numSamples": 10 * (index + 1),
        }

        async def send() -> None:
            await dev.sio.emit(EV_EVALUATION_RESULT, result)
            await dev.sio.emit(EV_EVALUATION_RESULT, result)  # a repeat: counted once

        asyncio.get_running_loop().create_task(send())
        return {"accepted": True}

    dev.sio.on(EV_EVALUATION_START, on_start)


async def _federation(url: str) -> tuple[list[ScriptedDevice], list[list[tuple[str, int]]]]:
    devices = [ScriptedDevice(url, name=f"e{i}") for i in range(3)]
    logs: list[list[tuple[str, int]]] = [[] for _ in devices]
    beats = []
    try:
        for i, dev in enumerate(devices):
            _evaluating(dev, i, logs[i])
            assert (await dev.join())["ok"] is True
            beats.append(asyncio.create_task(dev.heartbeat_forever(period=0.2)))

        async def rounds(i: int, dev: ScriptedDevice) -> None:
            await train_round(dev, 1)
            await dev.until(lambda: ("eval", 1) in logs[i], 60, "asked to evaluate version 1")
            await dev.until(lambda: len(dev.starts) >= 2, 60, "round 2")
            logs[i].append(("start", 2))
            await train_round(dev, 2)

        await asyncio.gather(*(rounds(i, dev) for i, dev in enumerate(devices)))
        for dev in devices:
            await dev.until(lambda d=dev: bool(d.finished), 60, "federation:finished")
    finally:
        for beat in beats:
            beat.cancel()
        await asyncio.gather(*beats, return_exceptions=True)
    return devices, logs


@pytest.mark.slow
def test_devices_evaluate_each_version_before_the_next_round(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    redis = private_redis.url(0)
    flags = cluster_flags(tmp_path, redis, postgres_url, "--rounds", "2", "--evaluate-every", "1")
    with cluster(tmp_path, redis, postgres_url, *flags) as fed:
        devices, logs = run_devices(_federation(fed.srv.url))
        for log in logs:
            # Version 1 was evaluated before round 2 started (the round waited for it).
            assert log.index(("eval", 1)) < log.index(("start", 2)), log
            assert log.count(("eval", 1)) == 1 and log.count(("eval", 2)) == 1, log
        rows = fetch(postgres_url, "SELECT version, metrics FROM fedtray_versions")
        metrics = {int(r["version"]): json.loads(r["metrics"]) for r in rows}
        for version in (1, 2):
            got = metrics[version]
            assert got["federatedEvalDevices"] == 3 and got["federatedEvalSamples"] == 60
            assert got["federatedEvalLoss"] == pytest.approx((10 * 1 + 20 * 2 + 30 * 3) / 60)
            assert got["federatedEvalAccuracy"] == pytest.approx(
                (10 * 0.25 + 20 * 0.5 + 30 * 0.75) / 60
            )
        parts = fetch(postgres_url, "SELECT version, idx, count, state FROM fedtray_fedeval")
        assert sorted((p["version"], p["idx"], p["count"], p["state"]) for p in parts) == [
            (v, i, 3, "reported") for v in (1, 2) for i in range(3)
        ]
        assert all(len(dev.finished) == 1 for dev in devices)
        status = fed.srv.get_json("/api/cluster")
        newest = status["versions"][0]
        assert newest["version"] == 2 and newest["federatedEvalDevices"] == 3
        assert newest["federatedEvalLoss"] == pytest.approx(metrics[2]["federatedEvalLoss"])
