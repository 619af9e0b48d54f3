"""Evaluation of new versions and the end of a federation in cluster mode, end to end:
``fedtray-server --workers 2`` on real Redis and PostgreSQL with scripted Socket.IO devices
(websocket, as real devices; they answer ``training:start`` with an update and record what
they are sent).

Asserted from the engines and the wire: each version's evaluation on the server's test split
lands in its PostgreSQL row and in ``/api/cluster``; after ``--rounds`` rounds every device
gets the final ``weights:global`` and then ``federation:finished`` exactly once, carrying
the final version's evaluation; a device that registers later gets both and is never
started; with ``--exit-when-done`` the workers and the supervisor exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from client.protocol import FederationFinished, parse
from tests.cluster_harness import cluster, cluster_flags, fetch
from tests.engines import RedisServer
from tests.server_harness import ProcessHandle, ScriptedDevice, run_devices
from tests.waiting import poll, scaled

pytestmark = pytest.mark.slow

DEVICES = 3


async def train_round(dev: ScriptedDevice, number: int) -> None:
    """Answer the device's ``number``-th training:start with an update."""
    await dev.until(lambda: len(dev.starts) >= number, 90, f"start #{number}")
    start = dev.starts[number - 1]
    base = start["baseVersion"]
    await dev.until(lambda: base in dev.weights, 30, f"version {base}")
    update = {k: v + np.float32(0.25) for k, v in dev.weights[base].items()}
    ack = await dev.submit(
        start["roundId"], base, update, num_samples=20, metrics={"trainLoss": 0.5}
    )
    assert ack["ok"] is True, ack


async def train_rounds(dev: ScriptedDevice, rounds: int) -> None:
    """Answer the device's first ``rounds`` training:starts with an update each."""
    for number in range(1, rounds + 1):
        await train_round(dev, number)


async def federation(url: str, rounds: int) -> list[ScriptedDevice]:
    """``DEVICES`` devices train ``rounds`` rounds and are told the federation finished."""
    devices = [ScriptedDevice(url, name=f"s{i}") for i in range(DEVICES)]
    beats = []
    try:
        for dev in devices:
            ack = await dev.join()
            assert ack["ok"] is True, ack
            beats.append(asyncio.create_task(dev.heartbeat_forever(period=0.2)))
        await asyncio.gather(*(train_rounds(dev, rounds) for dev in devices))
        for dev in devices:
            await dev.until(lambda d=dev: bool(d.finished), 60, "federation:finished")
    finally:
        for beat in beats:
            beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*beats)
    return devices


def versions(database: str) -> dict[int, dict[str, float]]:
    rows = fetch(database, "SELECT version, metrics FROM fedtray_versions ORDER BY version")
    return {int(r["version"]): json.loads(r["metrics"]) for r in rows}


def assert_told_once(devices: list[ScriptedDevice], final: int, accuracy: float) -> None:
    for dev in devices:
        [told] = dev.finished  # exactly once
        assert told["heldVersion"] == final and final in dev.weights  # the final global first
        message = parse(FederationFinished, {k: v for k, v in told.items() if k != "heldVersion"})
        assert message.task == "synthetic"
        assert message.rounds_completed == final and message.version == final
        assert message.metrics["evalAccuracy"] == pytest.approx(accuracy)


def test_versions_are_evaluated_and_devices_are_told_the_end(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    redis = private_redis.url(0)
    flags = cluster_flags(tmp_path, redis, postgres_url, "--rounds", "2", devices=DEVICES)
    with cluster(tmp_path, redis, postgres_url, *flags) as fed:
        devices = run_devices(federation(fed.srv.url, 2))
        # Each new version's evaluation is in its row (version 0 is never evaluated).
        evaluated = poll(
            lambda: versions(postgres_url),
            lambda v: all("evalAccuracy" in v.get(n, {}) for n in (1, 2)),
            30,
            "versions 1 and 2 evaluated",
        )
        assert sorted(evaluated) == [0, 1, 2]
        for n in (1, 2):
            assert set(evaluated[n]) == {"trainLoss", "evalLoss", "evalAccuracy"}, evaluated
            assert 0.0 <= evaluated[n]["evalAccuracy"] <= 1.0
            assert np.isfinite(evaluated[n]["evalLoss"])
        # The end waited for the final evaluation: federation:finished carries it.
        assert_told_once(devices, 2, evaluated[2]["evalAccuracy"])
        assert fetch(postgres_url, "SELECT version FROM fedtray_finished") == [{"version": 2}]
        # Any worker's status shows the end and the versions' evaluation.
        status = poll(
            lambda: fed.srv.get_json("/api/cluster"),
            lambda s: s["finished"] is True,
            30,
            "finished",
        )
        newest = status["versions"][0]
        assert newest["version"] == 2
        assert newest["evalAccuracy"] == pytest.approx(evaluated[2]["evalAccuracy"])
        assert newest["evalLoss"] == pytest.approx(evaluated[2]["evalLoss"])
        assert newest["trainLoss"] == pytest.approx(0.5)
        assert [v["version"] for v in status["versions"]] == [2, 1, 0]
        assert status["versions"][2]["evalLoss"] is None
        # Still serving: a device that registers now gets the final global and the news.
        late = run_devices(_late(fed.srv.url))
        assert late.finished[0]["heldVersion"] == 2 and late.starts == []
        assert late.finished[0]["roundsCompleted"] == 2
        assert fed.srv.proc.poll() is None  # without --exit-when-done it keeps serving


async def _late(url: str) -> ScriptedDevice:
    late = ScriptedDevice(url, name="late")
    ack = await late.join()
    assert ack["ok"] is True and ack["globalVersion"] == 2, ack
    await late.until(lambda: bool(late.finished), 30, "federation:finished for late")
    await late.disconnect()
    return late


def test_exit_when_done_stops_the_workers_and_the_supervisor(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    redis = private_redis.url(0)
    flags = cluster_flags(
        tmp_path, redis, postgres_url, "--rounds", "1", "--exit-when-done", devices=DEVICES
    )
    with cluster(tmp_path, redis, postgres_url, *flags) as fed:
        devices = run_devices(federation(fed.srv.url, 1))
        code = _exit_code(fed.srv)
        assert code == 0, fed.srv.output()
        evaluated = versions(postgres_url)
        assert_told_once(devices, 1, evaluated[1]["evalAccuracy"])
        output = fed.srv.output()
        assert output.count("the federation is finished; exiting (--exit-when-done)") == 2
        assert "every worker exited at the end of the federation" in output
        assert "restarting" not in output


def _exit_code(srv: ProcessHandle) -> int | None:
    with contextlib.suppress(Exception):
        srv.proc.wait(scaled(60))
    return srv.proc.poll()
