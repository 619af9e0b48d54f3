"""The server's event handlers over real Socket.IO on loopback: registration, heartbeats,
malformed input, auth and the chunked transfer, with scripted devices (no mocks)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import socketio
from safetensors.numpy import save as st_save
from server_harness import (
    ScriptedDevice,
    ServerHandle,
    register_payload,
    resources,
    run_devices,
    running_server,
)

from client.protocol import (
    EV_BLOB_CHUNK,
    EV_BLOB_STATUS,
    EV_HEARTBEAT,
    EV_REGISTER,
    EV_TRAINING_ERROR,
    EV_TRAINING_PROGRESS,
    EV_WEIGHTS_SUBMIT,
    Limits,
    events,
)
from client.transfer import send_blob
from client.weights import encode, sha256_hex

pytestmark = pytest.mark.timeout(60)

# Rounds need 5 devices here, so handler tests are not disturbed by training:start.
QUIET = {"min_clients": 5, "clients_per_round": 5}


def test_registration_ack_event_and_reconnect_keep_one_entry(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        dev = ScriptedDevice(srv.url, name="laptop-1")
        ack = await dev.join()
        assert ack["ok"] is True and ack["deviceId"] == dev.device_id
        assert ack["heartbeatIntervalSec"] == srv.config.heartbeat_interval
        assert ack["task"] == "synthetic" and ack["globalVersion"] == 0
        assert ack["limits"] == srv.config.limits.to_wire()
        await dev.until(lambda: len(dev.registered_events) == 1, what="device:registered")
        assert dev.registered_events[0] == ack
        await dev.until(lambda: 0 in dev.weights, what="version 0 sent after registration")
        assert dev.globals_meta[0]["inline"] is True
        old_sid = dev.sio.get_sid()
        # The same device reconnects on a new connection while the old one lingers.
        again = ScriptedDevice(srv.url, name="laptop-1b", device_id=dev.device_id)
        assert (await again.join(weights_version=0))["ok"] is True
        await dev.until(lambda: not dev.sio.connected, what="old connection dropped")
        status = await srv.await_status(
            lambda s: len(s["devices"]) == 1 and s["devices"][0]["name"] == "laptop-1b"
        )
        entry = status["devices"][0]
        assert entry["connected"] is True and entry["id"] == dev.device_id
        assert entry["weightsVersion"] == 0
        assert again.weights == {}  # it said it holds version 0: nothing resent
        assert old_sid != again.sio.get_sid()

    with running_server(tmp_path, **QUIET) as srv:
        run_devices(scenario(srv))


def test_heartbeat_is_acked_and_status_shows_resources(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        dev = ScriptedDevice(srv.url, name="desk")
        await dev.join()
        ack = await dev.call(
            EV_HEARTBEAT,
            {
                "state": "idle",
                "resources": resources(cpu=33.0, battery={"percent": 55.0, "pluggedIn": False}),
            },
        )
        assert ack == {"ok": True}
        status = await srv.await_status(lambda s: s["devices"][0]["cpuPercent"] == 33.0)
        entry = status["devices"][0]
        assert entry["batteryPercent"] == 55.0 and entry["pluggedIn"] is False
        assert entry["state"] == "idle" and entry["stale"] is False

    with running_server(tmp_path, **QUIET) as srv:
        run_devices(scenario(srv))


#: Every politeness pause the status API must show, with the words a device sends.
POLITENESS_PAUSES = {
    "in_use": "Paused while you use the computer",
    "step_aside": "Other programs are using 73 % of the CPU — training resumes below 40 %",
    "too_hot": "The CPU is at 88 °C (limit 85 °C) — training resumes at 75 °C",
    "fullscreen": "Paused while a full-screen app is in front",
    "schedule": "Outside your schedule (22:00–07:00) — training starts at 22:00",
}
BUDGET = {"cores": 1, "cpuPercent": 50, "why": "you are using the computer", "applied": False}


@pytest.mark.parametrize(("reason", "detail"), sorted(POLITENESS_PAUSES.items()))
def test_status_shows_each_politeness_pause_and_the_budget(
    tmp_path: Path, reason: str, detail: str
) -> None:
    async def scenario(srv: ServerHandle) -> None:
        dev = ScriptedDevice(srv.url, name="desk")
        await dev.join()
        beat = {"pauseReason": reason, "pauseDetail": detail, "budget": BUDGET}
        assert await dev.heartbeat("paused", **beat) == {"ok": True}
        status = await srv.await_status(lambda s: s["devices"][0]["state"] == "paused")
        entry = status["devices"][0]
        assert (entry["pauseReason"], entry["pauseDetail"]) == (reason, detail)
        assert entry["budget"] == BUDGET
        # back to training: the pause goes, the budget stays what the device says
        idle = {**BUDGET, "cores": 3, "cpuPercent": 100, "why": "the computer is idle"}
        assert await dev.heartbeat("idle", budget=idle) == {"ok": True}
        status = await srv.await_status(lambda s: s["devices"][0]["state"] == "idle")
        entry = status["devices"][0]
        assert entry["pauseReason"] is None and entry["budget"] == idle
        # an older device sends no budget: none shown
        assert await dev.heartbeat("idle") == {"ok": True}
        await srv.await_status(lambda s: s["devices"][0]["budget"] is None)

    with running_server(tmp_path, **QUIET) as srv:
        run_devices(scenario(srv))


def test_heartbeat_hardware_updates_the_registration(tmp_path: Path) -> None:
    """The registration update: a heartbeat with ``hardware`` replaces the registered
    hardware (the GPU shows in the status); one without it changes nothing."""
    gpu = {"kind": "cuda", "name": "NVIDIA H200", "memoryMb": 143771}

    async def scenario(srv: ServerHandle) -> None:
        dev = ScriptedDevice(srv.url, name="late-gpu")
        await dev.join()
        assert srv.status()["devices"][0]["gpu"] is None
        hardware = {"cpuCores": 4, "ramTotalMb": 8192, "gpu": gpu, "batteryPresent": True}
        for _ in range(2):  # idempotent
            assert await dev.heartbeat(hardware=hardware) == {"ok": True}
            status = await srv.await_status(lambda s: s["devices"][0]["gpu"] is not None)
            assert status["devices"][0]["gpu"] == gpu
            assert status["devices"][0]["connected"]
        assert await dev.heartbeat() == {"ok": True}
        assert srv.status()["devices"][0]["gpu"] == gpu
        bad = {**hardware, "gpu": {"kind": "tpu"}}
        assert (await dev.heartbeat(hardware=bad))["code"] == "bad_request"
        assert srv.status()["devices"][0]["gpu"] == gpu

    with running_server(tmp_path, **QUIET) as srv:
        run_devices(scenario(srv))


def test_device_goes_stale_after_three_missed_heartbeats(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        dev = ScriptedDevice(srv.url, name="quiet")
        await dev.join()
        # Stale after 3 heartbeat intervals; the round loop re-checks who is eligible at
        # least once per interval, so the waiting reason says so within one more.
        await srv.await_status(
            lambda s: (
                bool(s["devices"])
                and s["devices"][0]["stale"]
                and "1 stale" in ((s["currentRound"] or {}).get("waitingReason") or "")
            ),
            timeout=5 * srv.config.heartbeat_interval + 5,
            what="stale, and said so in the waiting reason",
        )
        beating = asyncio.create_task(dev.heartbeat_forever(period=0.1))
        await srv.await_status(lambda s: not s["devices"][0]["stale"], what="fresh again")
        beating.cancel()

    with running_server(tmp_path, heartbeat_interval=0.3, **QUIET) as srv:
        run_devices(scenario(srv))


#: Every event the server receives, register first (from the event table).
EVENTS = [spec.name for spec in events.handled_by("server")]
assert EVENTS[0] == EV_REGISTER
BAD_PAYLOADS: list[tuple[str, tuple[Any, ...]]] = [
    ("no payload", ()),
    ("null", (None,)),
    ("string", ("hello",)),
    ("number", (42,)),
    ("list", ([1, 2, 3],)),
    ("garbage binary", (b"\x00\xff\x93garbage",)),
    ("empty object", ({},)),
    ("wrong field types", ({"state": 5, "deviceId": 7, "blobId": [], "roundId": {}},)),
    ("two payloads", ({}, {})),
]


@pytest.mark.parametrize("event", EVENTS)
def test_malformed_payloads_are_answered_with_bad_request(
    tmp_path: Path, event: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An acknowledged event is answered ``bad_request``; an unacknowledged one is not
    answered (python-socketio's ack carries nothing) and the refusal is logged."""
    acked = events.BY_NAME[event].acked

    async def scenario(srv: ServerHandle) -> None:
        dev = ScriptedDevice(srv.url, name="fuzzer")
        await dev.join()
        for label, payload in BAD_PAYLOADS:
            ack = await dev.call(event, *payload)
            if not acked:
                assert ack is None, (label, ack)
                continue
            assert isinstance(ack, dict), label
            assert ack["ok"] is False and ack["code"] == "bad_request", (label, ack)
            assert ack["message"], label
        # The connection and the server are still fine.
        assert await dev.heartbeat() == {"ok": True}

    caplog.set_level(logging.INFO, logger="server")
    with running_server(tmp_path, **QUIET) as srv:
        run_devices(scenario(srv))
    if not acked:
        ignored = f"{event} from fuzzer ignored: bad_request"
        assert sum(ignored in r.getMessage() for r in caplog.records) == len(BAD_PAYLOADS)


def test_unknown_event_unregistered_and_wrong_protocol(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(srv: ServerHandle) -> None:
        dev = ScriptedDevice(srv.url, name="early")
        await dev.connect()
        ack = await dev.call("no:such-event", {"x": 1})
        assert ack["code"] == "bad_request" and "no:such-event" in ack["message"]
        for event in EVENTS[1:]:
            early = await dev.call(event, {})
            if events.BY_NAME[event].acked:
                assert early["code"] == "not_registered", event
            else:
                assert early is None, event  # never answered; the refusal is logged
        wrong = await dev.call(EV_REGISTER, {**register_payload(dev.device_id), "protocol": 2})
        assert wrong["code"] == "unsupported_protocol"
        assert (await dev.register())["ok"] is True
        assert (await dev.call("still:unknown"))["code"] == "bad_request"

    caplog.set_level(logging.INFO, logger="server")
    with running_server(tmp_path, **QUIET) as srv:
        run_devices(scenario(srv))
    assert any("unknown event 'no:such-event'" in r.getMessage() for r in caplog.records)
    for event in (EV_TRAINING_PROGRESS, EV_TRAINING_ERROR):
        assert any(
            f"{event} from sid" in r.getMessage() and "not_registered" in r.getMessage()
            for r in caplog.records
        ), event


def test_tokens_refuse_and_accept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-token-value"

    async def scenario(srv: ServerHandle) -> None:
        for auth in (None, {"token": "wrong"}, {"token": ""}, {"nothing": 1}):
            dev = ScriptedDevice(srv.url, name="intruder")
            with pytest.raises(socketio.exceptions.ConnectionError):
                await dev.connect(auth=auth)  # type: ignore[arg-type]
            # The refusal reason reaches the device in plain words.
            assert "unauthorized" in str(dev.connect_errors), dev.connect_errors
        good = ScriptedDevice(srv.url, name="member", token=secret)
        assert (await good.join())["ok"] is True
        status = await asyncio.to_thread(srv.status)
        assert len(status["devices"]) == 1

    caplog.set_level(logging.DEBUG)
    with running_server(tmp_path, tokens=("other-token", secret), **QUIET) as srv:
        run_devices(scenario(srv))
        with urllib.request.urlopen(f"{srv.url}/api/status") as resp:
            assert secret not in resp.read().decode()
    assert "refused a connection" in caplog.text
    assert secret not in caplog.text


def test_http_routes(tmp_path: Path) -> None:
    with running_server(tmp_path, **QUIET) as srv:
        with urllib.request.urlopen(f"{srv.url}/healthz") as resp:
            assert resp.status == 200 and resp.read() == b"ok"
        with urllib.request.urlopen(f"{srv.url}/") as resp:
            assert resp.headers["Content-Type"].startswith("text/html")
            assert b"api/status" in resp.read()
        status = srv.status()
        assert status["protocol"] == 1 and status["globalVersion"] == 0
        assert status["currentRound"]["phase"] == "waiting"


SMALL = {
    "model_params": {"features": 8, "classes": 3, "hidden": 512, "samples": 300},
    "limits": Limits(max_chunk_bytes=4096, max_blob_bytes=1 << 20),
}


def test_chunked_upload_resumes_after_reconnect(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        a = ScriptedDevice(srv.url, name="a", max_chunk_bytes=4096)
        b = ScriptedDevice(srv.url, name="b", max_chunk_bytes=4096)
        for dev in (a, b):
            await dev.join()
        await a.until(lambda: len(a.starts) == 1 and len(b.starts) == 1, what="round start")
        assert a.globals_meta[0]["inline"] is False  # version 0 itself came in chunks
        start = a.starts[0]
        update = {k: v * np.float32(0.5) for k, v in a.weights[0].items()}
        data = encode(update)
        assert len(data) > 5 * 4096
        digest = sha256_hex(data)
        half = (len(data) // 4096 // 2) * 4096
        for offset in range(0, half, 4096):
            chunk = {
                "blobId": digest,
                "offset": offset,
                "total": len(data),
                "sha256": digest,
                "data": data[offset : offset + 4096],
            }
            assert (await a.call(EV_BLOB_CHUNK, chunk))["received"] == offset + 4096
        await a.disconnect()
        await a.join(weights_version=0)
        status = await a.call(EV_BLOB_STATUS, {"blobId": digest})
        assert status == {"ok": True, "received": half, "complete": False}
        sent_offsets: list[int] = []

        async def counting_call(event: str, payload: dict[str, Any]) -> Any:
            if event == EV_BLOB_CHUNK:
                sent_offsets.append(payload["offset"])
            return await a.call(event, payload)

        await send_blob(counting_call, data, blob_id=digest, chunk_bytes=4096)
        assert sent_offsets[0] == half  # resumed, not restarted
        ack = await a.call(
            EV_WEIGHTS_SUBMIT,
            {
                "roundId": start["roundId"],
                "baseVersion": 0,
                "numSamples": 8,
                "weights": {
                    "format": "safetensors",
                    "size": len(data),
                    "sha256": digest,
                    "blobId": digest,
                },
            },
        )
        assert ack == {"ok": True, "roundId": start["roundId"], "received": 1}
        assert srv.server.blobs.bytes_held() == 0  # taken blobs are forgotten

    with running_server(tmp_path, min_clients=2, min_completion=0.5, **SMALL) as srv:
        run_devices(scenario(srv))


def test_oversized_chunks_and_blobs_are_refused_before_buffering(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        dev = ScriptedDevice(srv.url, name="big")
        await dev.join()
        digest = hashlib.sha256(b"x").hexdigest()
        too_big_chunk = {
            "blobId": "b1",
            "offset": 0,
            "total": 10_000,
            "sha256": digest,
            "data": b"\x01" * 4097,
        }
        assert (await dev.call(EV_BLOB_CHUNK, too_big_chunk))["code"] == "chunk_too_large"
        too_big_total = {**too_big_chunk, "total": (1 << 20) + 1, "data": b"\x01" * 10}
        assert (await dev.call(EV_BLOB_CHUNK, too_big_total))["code"] == "blob_too_large"
        assert srv.server.blobs.bytes_held() == 0
        gap = {**too_big_chunk, "offset": 4096, "data": b"\x01" * 10}
        assert (await dev.call(EV_BLOB_CHUNK, gap))["code"] == "offset_gap"
        # A message far over one chunk plus margin is cut by Engine.IO: connection closed.
        huge = {**too_big_chunk, "data": b"\x01" * (200 * 1024)}
        with pytest.raises(socketio.exceptions.SocketIOError):
            await dev.call(EV_BLOB_CHUNK, huge, timeout=5)
        await dev.until(lambda: not dev.sio.connected, what="connection cut")
        assert srv.server.blobs.bytes_held() == 0
        other = ScriptedDevice(srv.url, name="still-served")
        assert (await other.join())["ok"] is True

    with running_server(tmp_path, **QUIET, **SMALL) as srv:
        run_devices(scenario(srv))


def test_bad_weights_documents_are_refused_with_codec_codes(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        a, b = ScriptedDevice(srv.url, name="a"), ScriptedDevice(srv.url, name="b")
        for dev in (a, b):
            await dev.join()
        await a.until(lambda: len(a.starts) == 1, what="round start")
        round_id = a.starts[0]["roundId"]
        base = a.weights[0]

        def inline(data: bytes, fmt: str = "safetensors") -> dict[str, Any]:
            return {
                "roundId": round_id,
                "baseVersion": 0,
                "numSamples": 3,
                "weights": {
                    "format": fmt,
                    "size": len(data),
                    "sha256": sha256_hex(data),
                    "data": data,
                },
            }

        nan_state = {k: np.full_like(v, np.nan) for k, v in base.items()}
        wrong_shape = {k: np.zeros((2, *v.shape), v.dtype) for k, v in base.items()}
        wrong_dtype = {k: v.astype(np.float64) for k, v in base.items()}
        cases = [
            (st_save(nan_state), "non_finite"),
            (encode(wrong_shape), "shape_mismatch"),
            (encode(wrong_dtype), "dtype_mismatch"),
            (b"\x80\x04\x95 a pickle", "malformed"),
        ]
        for data, code in cases:
            ack = await a.call(EV_WEIGHTS_SUBMIT, inline(data))
            assert ack["code"] == code, (code, ack)
        lying = inline(encode(base))
        lying["weights"]["sha256"] = "0" * 64
        assert (await a.call(EV_WEIGHTS_SUBMIT, lying))["code"] == "checksum_mismatch"
        missing = inline(encode(base))
        del missing["weights"]["data"]
        missing["weights"]["blobId"] = "never-sent"
        assert (await a.call(EV_WEIGHTS_SUBMIT, missing))["code"] == "blob_unknown"
        # None of those counted: a good update from the same device is still the first.
        ok = await a.call(EV_WEIGHTS_SUBMIT, inline(encode(base), "safetensors"))
        assert ok["received"] == 1
        ok_json = await b.call(EV_WEIGHTS_SUBMIT, inline(encode(base, "json"), "json"))
        assert ok_json["received"] == 2

    with running_server(tmp_path, min_clients=2, min_completion=1.0) as srv:
        run_devices(scenario(srv))
