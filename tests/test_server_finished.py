"""The end of a federation is a state: the final global, ``federation:finished``, and a
server that keeps serving (real Socket.IO server on loopback)."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

from client.protocol import FederationFinished, parse


async def train_one_round(dev: ScriptedDevice, number: int) -> None:
    """Answer the device's ``number``-th training:start with an update."""
    await dev.until(lambda: len(dev.starts) >= number, 15, f"training:start #{number}")
    start = dev.starts[number - 1]
    base = start["baseVersion"]
    await dev.until(lambda: base in dev.weights, 10, f"version {base}")
    update = {k: v + np.float32(0.5) for k, v in dev.weights[base].items()}
    ack = await dev.submit(start["roundId"], base, update, num_samples=20)
    assert ack["ok"] is True, ack


def test_after_the_last_round_devices_get_the_final_global_then_finished(
    tmp_path: Path,
) -> None:
    async def scenario(srv: ServerHandle) -> None:
        a, b = ScriptedDevice(srv.url, name="a"), ScriptedDevice(srv.url, name="b")
        await a.join()
        await b.join()
        for number in (1, 2):
            await train_one_round(a, number)
            await train_one_round(b, number)
        for dev in (a, b):
            await dev.until(lambda d=dev: bool(d.finished), 15, "federation:finished")
        status = await srv.await_status(lambda s: s["phase"] == "finished", what="finished")
        assert status["globalVersion"] == 2 and status["currentRound"] is None
        # The end waits for the final version's evaluation: it is recorded before then.
        accuracy = status["history"][-1]["evalAccuracy"]
        assert accuracy is not None
        for dev in (a, b):
            [told] = dev.finished  # exactly once
            # The final global came first: the device held version 2 when it was told.
            assert told["heldVersion"] == 2 and 2 in dev.weights
            message = parse(
                FederationFinished, {k: v for k, v in told.items() if k != "heldVersion"}
            )
            assert message.task == "synthetic"
            assert message.rounds_completed == 2 and message.version == 2
            assert message.metrics["evalAccuracy"] == pytest.approx(accuracy)
        assert srv.server.finished.is_set()

        # Still serving: the status, the dashboard and health, and a device that registers
        # now gets the final global and the news too, and is never started.
        late = ScriptedDevice(srv.url, name="late")
        ack = await late.join()
        assert ack["ok"] is True and ack["globalVersion"] == 2
        await late.until(lambda: bool(late.finished), 15, "federation:finished for late")
        assert late.finished[0]["heldVersion"] == 2 and late.finished[0]["roundsCompleted"] == 2
        assert late.starts == []
        for path, expected in (("/healthz", b"ok"), ("/", b"<!doctype html")):
            with urllib.request.urlopen(f"{srv.url}{path}", timeout=5) as resp:
                body: bytes = resp.read()
            assert body.lower().startswith(expected)
        status = await srv.await_status(
            lambda s: any(d["name"] == "late" and d["weightsVersion"] == 2 for d in s["devices"]),
            what="late holds version 2",
        )
        assert status["phase"] == "finished"
        assert [r["outcome"] for r in status["history"]] == ["completed", "completed"]

    with running_server(tmp_path, rounds=2, min_clients=2) as srv:
        run_devices(scenario(srv))


def test_a_restart_after_the_end_is_finished_at_once(tmp_path: Path) -> None:
    async def finish(srv: ServerHandle) -> None:
        dev = ScriptedDevice(srv.url, name="solo")
        await dev.join()
        await train_one_round(dev, 1)
        await dev.until(lambda: bool(dev.finished), 15, "federation:finished")

    async def come_back(srv: ServerHandle) -> dict[str, Any]:
        status = await srv.await_status(lambda s: s["phase"] == "finished", what="finished")
        dev = ScriptedDevice(srv.url, name="solo-again")
        await dev.join()
        await dev.until(lambda: bool(dev.finished), 15, "federation:finished after restart")
        assert dev.finished[0]["heldVersion"] == 1 and dev.starts == []
        return status

    with running_server(tmp_path, rounds=1, min_clients=1) as srv:
        run_devices(finish(srv))
    with running_server(tmp_path, rounds=1, min_clients=1) as srv:
        status = run_devices(come_back(srv))
    assert status["globalVersion"] == 1
    assert status["history"][-1]["outcome"] == "completed"
