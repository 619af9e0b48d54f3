"""End-to-end rounds against a real server on loopback, with scripted Socket.IO devices."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

from client.weights import StateDict
from server.rounds import Round

pytestmark = pytest.mark.timeout(60)


def perturbed(state: StateDict, delta: float) -> StateDict:
    return {k: (v + np.float32(delta)).astype(v.dtype) for k, v in state.items()}


async def start_of(dev: ScriptedDevice, n: int = 1, timeout: float = 10.0) -> dict[str, Any]:
    await dev.until(lambda: len(dev.starts) >= n, timeout, f"training:start #{n}")
    return dev.starts[n - 1]


async def joined(srv: ServerHandle, *names: str, **kwargs: Any) -> list[ScriptedDevice]:
    devices = [ScriptedDevice(srv.url, name=name, **kwargs) for name in names]
    for dev in devices:
        ack = await dev.join()
        assert ack["ok"] is True
    return devices


def test_full_round_is_the_weighted_fedavg(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        devs = await joined(srv, "a", "b", "c")
        # Each device received version 0 at registration.
        for dev in devs:
            await dev.until(lambda d=dev: 0 in d.weights, what="version 0")
        base = devs[0].weights[0]
        for dev in devs[1:]:
            for name in base:
                np.testing.assert_array_equal(dev.weights[0][name], base[name])
        starts = [await start_of(dev) for dev in devs]
        round_id = starts[0]["roundId"]
        assert {s["roundId"] for s in starts} == {round_id}
        assert sorted(s["partition"]["index"] for s in starts) == [0, 1, 2]
        assert all(s["partition"]["count"] == 3 and s["baseVersion"] == 0 for s in starts)
        samples = {"a": 10, "b": 30, "c": 60}
        deltas = {"a": 1.0, "b": -2.0, "c": 0.5}
        for i, dev in enumerate(devs):
            ack = await dev.submit(
                round_id,
                0,
                perturbed(base, deltas[dev.name]),
                num_samples=samples[dev.name],
                metrics={"trainLoss": float(i + 1)},
            )
            assert ack == {"ok": True, "roundId": round_id, "received": i + 1}
        status = await srv.await_status(lambda s: s["globalVersion"] == 1, what="version 1")
        for dev in devs:
            await dev.until(lambda d=dev: 1 in d.weights, what="version 1 broadcast")
        expected_shift = sum(samples[n] * deltas[n] for n in samples) / sum(samples.values())
        for name, arr in devs[0].weights[1].items():
            np.testing.assert_allclose(arr, base[name] + expected_shift, rtol=1e-6, atol=1e-6)
        record = status["history"][-1]
        train_loss = (1 * 10 + 2 * 30 + 3 * 60) / 100
        assert record["outcome"] == "completed" and record["version"] == 1
        assert record["clientsSelected"] == 3 and record["clientsReported"] == 3
        assert record["trainLoss"] == pytest.approx(train_loss)
        # The version is published first; its evaluation lands in its record when ready.
        status = await srv.await_status(
            lambda s: s["history"][-1]["evalAccuracy"] is not None, what="version 1 evaluated"
        )
        record = status["history"][-1]
        assert 0.0 <= record["evalAccuracy"] <= 1.0 and record["evalLoss"] > 0
        # weights:global carries what was known when it was sent: at least the round's
        # trainLoss (and the evaluation, had it been recorded by then).
        meta = devs[0].globals_meta[-1]
        assert meta["version"] == 1 and meta["metrics"]["trainLoss"] == pytest.approx(train_loss)
        assert set(meta["metrics"]) <= {"trainLoss", "evalLoss", "evalAccuracy"}
        assert {d["roundsCompleted"] for d in status["devices"]} == {1}

    with running_server(tmp_path, min_clients=3) as srv:
        run_devices(scenario(srv))


def test_paused_refusal_lets_the_round_proceed_with_others(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        a, b, paused = await joined(srv, "a", "b", "paused")
        paused.start_reply = {"accepted": False, "reason": "user_paused", "detail": "by the user"}
        starts = {dev.name: await start_of(dev) for dev in (a, b, paused)}
        round_id = starts["a"]["roundId"]
        base = a.weights[0]
        status = await srv.await_status(
            lambda s: any(d["state"] == "paused" for d in s["devices"]), what="paused device"
        )
        shown = next(d for d in status["devices"] if d["name"] == "paused")
        assert shown["pauseReason"] == "user_paused" and shown["pauseDetail"] == "by the user"
        assert (await a.submit(round_id, 0, perturbed(base, 1.0), num_samples=5))["ok"]
        refused = await paused.submit(round_id, 0, perturbed(base, 9.0), num_samples=5)
        assert refused["code"] == "not_selected"  # a refusal gives up the slot
        assert (await b.submit(round_id, 0, perturbed(base, 1.0), num_samples=5))["ok"]
        status = await srv.await_status(lambda s: s["globalVersion"] == 1, what="version 1")
        assert status["history"][-1]["clientsReported"] == 2
        await a.until(lambda: 1 in a.weights, what="version 1")
        for name, arr in a.weights[1].items():
            np.testing.assert_allclose(arr, base[name] + 1.0, rtol=1e-6)

    with running_server(tmp_path, min_clients=3, min_completion=0.5) as srv:
        run_devices(scenario(srv))


def test_dropout_frees_the_slot_and_the_round_succeeds(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        a, b, c = await joined(srv, "a", "b", "c")
        round_id = (await start_of(a))["roundId"]
        await start_of(b)
        await start_of(c)
        await c.disconnect()
        for dev in (a, b):
            ack = await dev.submit(round_id, 0, perturbed(a.weights[0], 0.1), num_samples=3)
            assert ack["ok"] is True
        # Settles as soon as the two remaining report, well before the 10 s deadline.
        status = await srv.await_status(lambda s: s["globalVersion"] == 1, 5, "version 1")
        record = status["history"][-1]
        assert (record["clientsSelected"], record["clientsReported"]) == (3, 2)
        gone = next(d for d in status["devices"] if d["name"] == "c")
        assert gone["connected"] is False

    with running_server(tmp_path, min_clients=3, min_completion=0.5) as srv:
        run_devices(scenario(srv))


def test_a_device_that_reconnects_is_offered_its_part_of_the_open_round_again(
    tmp_path: Path,
) -> None:
    async def scenario(srv: ServerHandle) -> None:
        a, b = await joined(srv, "a", "b")
        first = await start_of(b)
        await start_of(a)
        await b.disconnect()
        await srv.await_status(
            lambda s: not next(d for d in s["devices"] if d["name"] == "b")["connected"],
            what="b disconnected",
        )
        back = ScriptedDevice(srv.url, name="b", device_id=b.device_id)
        assert (await back.join(weights_version=0))["ok"] is True
        again = await start_of(back)
        # The same work: same round, partition and deadline, so it can resume.
        for key in ("roundId", "partition", "deadline", "baseVersion", "config"):
            assert again[key] == first[key], key
        ack = await back.submit(first["roundId"], 0, perturbed(a.weights[0], 0.5), num_samples=2)
        assert ack["ok"] is True

    with running_server(tmp_path, min_clients=2, min_completion=0.5) as srv:
        run_devices(scenario(srv))


def test_a_device_that_registers_paused_is_never_selected(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        paused = ScriptedDevice(srv.url, name="paused")
        await paused.connect()
        ack = await paused.register(
            state="paused", pauseReason="battery_low", pauseDetail="On battery at 12 %"
        )
        assert ack["ok"] is True
        status = await srv.await_status(
            lambda s: any(d["pauseReason"] == "battery_low" for d in s["devices"]),
            what="the paused registration",
        )
        [record] = status["devices"]
        assert (record["state"], record["pauseDetail"]) == ("paused", "On battery at 12 %")
        (ready,) = await joined(srv, "ready")
        await start_of(ready)
        status = await srv.await_status(lambda s: s["currentRound"] is not None, what="a round")
        assert status["currentRound"]["selected"] == [ready.device_id]
        assert paused.starts == []

    with running_server(tmp_path, min_clients=1) as srv:
        run_devices(scenario(srv))


def test_a_completed_round_records_when_it_reached_each_step(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> tuple[dict[str, Any], float, float]:
        a, b = await joined(srv, "a", "b")
        for dev in (a, b):
            await dev.until(lambda d=dev: 0 in d.weights, what="version 0")
        round_id = (await start_of(a))["roundId"]
        await start_of(b)
        started_seen = time.time()
        await a.submit(round_id, 0, a.weights[0], num_samples=1)
        before_last = time.time()
        await b.submit(round_id, 0, b.weights[0], num_samples=1)
        status = await srv.await_status(
            lambda s: s["globalVersion"] == 1 and s["history"][-1]["timing"]["publishedAt"],
            what="version 1 published",
        )
        return status["history"][-1], started_seen, before_last

    with running_server(tmp_path) as srv:
        record, started_seen, before_last = run_devices(scenario(srv))
        after = time.time()
    timing = record["timing"]
    assert timing["openedAt"] <= started_seen <= before_last <= timing["collectedAt"]
    assert timing["collectedAt"] <= timing["aggregatedAt"] <= timing["publishedAt"] <= after
    assert timing["aggregatedAt"] == record["finishedAt"]
    assert timing["openedAt"] == pytest.approx(record["finishedAt"] - record["seconds"], abs=0.01)
    # The record is first saved before publishing; the evaluation's later write may add it.
    saved = json.loads((tmp_path / "server-state" / "history.json").read_text())
    assert saved["history"][-1]["timing"]["publishedAt"] in (None, timing["publishedAt"])
    assert saved["history"][-1]["timing"]["collectedAt"] == timing["collectedAt"]


def test_round_timeout_abandons_cancels_and_retries(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        a, b = await joined(srv, "a", "b")
        beats = [asyncio.create_task(d.heartbeat_forever("training")) for d in (a, b)]
        first = (await start_of(a))["roundId"]
        await start_of(b)
        # Nobody reports: the round times out, devices are told to stop, a new attempt starts.
        await a.until(lambda: len(a.cancels) >= 1, 10, "training:cancel")
        assert a.cancels[0]["roundId"] == first
        second = (await start_of(a, 2))["roundId"]
        assert second != first
        status = await srv.await_status(lambda s: len(s["history"]) >= 1, what="history")
        record = status["history"][0]
        assert record["outcome"] == "abandoned" and record["version"] == 0
        assert record["timing"] is None
        assert "timed out" in record["detail"]
        assert status["globalVersion"] == 0
        assert status["currentRound"]["number"] == 1  # a retried round keeps its number
        late = await a.submit(first, 0, a.weights[0], num_samples=1)
        assert late["code"] == "round_closed"
        for task in beats:
            task.cancel()

    with running_server(tmp_path, round_timeout=1.0, retry_delay=0.1) as srv:
        run_devices(scenario(srv))


def test_submission_refusals_are_not_double_counted(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        devs = await joined(srv, "a", "b", "c")
        status = await srv.await_status(
            lambda s: (s["currentRound"] or {}).get("phase") == "training", what="a round"
        )
        selected = set(status["currentRound"]["selected"])
        a, b = (d for d in devs if d.device_id in selected)
        round_id = (await start_of(a))["roundId"]
        await start_of(b)
        base = a.weights[0]
        update = perturbed(base, 1.0)
        first = await a.submit(round_id, 0, update, num_samples=4)
        assert first["received"] == 1
        duplicate = await a.submit(round_id, 0, perturbed(base, 50.0), num_samples=400)
        assert duplicate["code"] == "duplicate"
        stale = await b.submit(round_id, 7, update, num_samples=4)
        assert stale["code"] == "stale_base"
        wrong_round = await b.submit("r99-1-xx", 0, update, num_samples=4)
        assert wrong_round["code"] == "round_closed"
        bad_layout = await b.submit(round_id, 0, {"w": np.zeros(3, np.float32)}, num_samples=4)
        assert bad_layout["code"] == "layout_mismatch"
        # After all those refusals b's good update is only the second one counted.
        assert (await b.submit(round_id, 0, update, num_samples=4))["received"] == 2
        status = await srv.await_status(lambda s: s["globalVersion"] == 1, what="version 1")
        assert status["history"][-1]["clientsReported"] == 2
        await a.until(lambda: 1 in a.weights, what="version 1")
        for name, arr in a.weights[1].items():
            np.testing.assert_allclose(arr, base[name] + 1.0, rtol=1e-6)
        # A resend after the round closed (its ack lost in a connection cut) learns that
        # the update was counted; an update that was never counted is simply late.
        resent = await a.submit(round_id, 0, update, num_samples=4)
        assert resent["code"] == "duplicate"
        (c,) = (d for d in devs if d.device_id not in selected)
        late = await c.submit(round_id, 0, update, num_samples=4)
        assert late["code"] == "round_closed"
        status = srv.status()
        assert status["history"][-1]["clientsReported"] == 2

    # c is connected but not selected: clients_per_round=2 with 3 eligible.
    with running_server(tmp_path, min_clients=2, clients_per_round=2, min_completion=1.0) as srv:
        run_devices(scenario(srv))


def test_not_selected_device_is_refused(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        devs = await joined(srv, "a", "b", "c")
        await srv.await_status(
            lambda s: (s["currentRound"] or {}).get("phase") == "training", what="a round"
        )
        status = srv.status()
        selected = set(status["currentRound"]["selected"])
        outsider = next(d for d in devs if d.device_id not in selected)
        insider = next(d for d in devs if d.device_id in selected)
        round_id = (await start_of(insider))["roundId"]
        # The outsider is sent v0 in the background, as the round starts.
        await outsider.until(lambda: 0 in outsider.weights, 20, "global v0")
        ack = await outsider.submit(round_id, 0, outsider.weights[0], num_samples=1)
        assert ack["code"] == "not_selected"
        status = srv.status()
        assert status["currentRound"]["reported"] == []

    with running_server(tmp_path, min_clients=2, clients_per_round=2) as srv:
        run_devices(scenario(srv))


def test_waiting_reason_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(srv: ServerHandle) -> None:
        (b,) = await joined(srv, "b")
        ack = await b.heartbeat(
            "paused", pauseReason="battery_low", pauseDetail="On battery at 12 %"
        )
        assert ack == {"ok": True}
        await joined(srv, "a")
        status = await srv.await_status(
            lambda s: "paused" in ((s["currentRound"] or {}).get("waitingReason") or ""),
            what="waiting reason",
        )
        assert status["currentRound"]["waitingReason"] == (
            "1 of 2 eligible devices (1 paused: battery_low)"
        )
        assert status["currentRound"]["phase"] == "waiting"
        shown = next(d for d in status["devices"] if d["name"] == "b")
        assert shown["pauseDetail"] == "On battery at 12 %"

    caplog.set_level(logging.INFO, logger="server")
    with running_server(tmp_path, min_clients=2, heartbeat_interval=5.0) as srv:
        run_devices(scenario(srv))
    messages = [r.getMessage() for r in caplog.records]
    assert "round 1 waiting: 0 of 2 eligible devices (none registered yet)" in messages
    assert "round 1 waiting: 1 of 2 eligible devices (1 paused: battery_low)" in messages


def _round_four(round_id: str, attempt: int, selected: list[str]) -> Round:
    """Round 4 of version 3, opened at t=100 with a 60 s deadline, 2 reports needed."""
    return Round.open(
        round_id=round_id,
        number=4,
        attempt=attempt,
        base_version=3,
        selected=selected,
        now=100.0,
        timeout=60.0,
        required=2,
    )


def test_the_record_of_an_abandoned_round() -> None:
    from server.status import abandoned_record

    rnd = _round_four("r4-2-x", 2, ["a", "b", "c"])
    rnd.record_report("a", 10, {})
    record = abandoned_record(rnd, 3, "b dropped (disconnected)", 112.3456, 1_800_000_000.0)
    assert record.model_dump() == {
        **record.model_dump(),
        "round_id": "r4-2-x",
        "number": 4,
        "outcome": "abandoned",
        "version": 3,
        "clients_selected": 3,
        "clients_reported": 1,
        "train_loss": None,
        "seconds": 12.346,
        "finished_at": 1_800_000_000.0,
        "detail": "b dropped (disconnected)",
        "timing": None,
    }


def test_the_record_of_a_completed_round() -> None:
    from server.status import completed_record

    rnd = _round_four("r4-1-x", 1, ["a", "b"])
    rnd.record_report("a", 10, {})
    rnd.record_report("b", 5, {})
    record = completed_record(rnd, 4, 0.25, 1_800_000_001.5, 102.5, 1_800_000_002.0)
    assert record.timing is not None
    assert record.timing.model_dump() == {
        "opened_at": 1_799_999_999.5,  # 2.5 s before now
        "collected_at": 1_800_000_001.5,
        "aggregated_at": 1_800_000_002.0,
        "published_at": None,
    }
    assert record.model_dump() == {
        **record.model_dump(),
        "round_id": "r4-1-x",
        "number": 4,
        "outcome": "completed",
        "version": 4,
        "clients_selected": 2,
        "clients_reported": 2,
        "train_loss": 0.25,
        "seconds": 2.5,
        "finished_at": 1_800_000_002.0,
        "detail": None,
    }
