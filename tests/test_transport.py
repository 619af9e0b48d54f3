"""The server's transport (server/transport.py): Engine.IO's ping derived from the heartbeat
interval, heartbeats handled inline, long handlers still in their own task."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest
from server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

from client.protocol import SubmitAccepted, WeightsSubmit
from server.registry import DeviceRecord
from server.serving import GC_THRESHOLDS
from server.transport import TransportTiming, transport_timing
from tests.waiting import scaled


@pytest.mark.parametrize(
    ("heartbeat", "interval", "timeout"),
    [
        (0.1, 25.0, 20.0),  # tests' short intervals: Engine.IO's defaults
        (4.0, 25.0, 20.0),
        (5.0, 30.0, 20.0),
        (10.0, 60.0, 20.0),  # the default heartbeat
        (15.0, 90.0, 30.0),
        (30.0, 120.0, 60.0),  # capped
        (3600.0, 120.0, 60.0),
    ],
)
def test_transport_timing(heartbeat: float, interval: float, timeout: float) -> None:
    timing = transport_timing(heartbeat)
    assert timing == TransportTiming(interval, timeout)
    assert timing.dead_peer_bound == interval + timeout <= 180.0


def test_heartbeats_run_inline_and_never_wait_for_a_long_handler(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        sio = srv.server.sio
        dev = ScriptedDevice(srv.url, name="a")
        assert (await dev.join())["ok"] is True
        # The handshake announced the derived ping (the client keeps its read deadline by it).
        timing = transport_timing(srv.config.heartbeat_interval)
        assert dev.sio.eio.ping_interval == timing.ping_interval
        assert dev.sio.eio.ping_timeout == timing.ping_timeout
        before = sio.inline_handled
        for _ in range(5):
            assert await dev.heartbeat() == {"ok": True}
        assert sio.inline_handled == before + 5

        # A weights:submit that takes long (held here) runs in its own task: the same
        # connection's heartbeats are still answered meanwhile.
        entered, release = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        async def slow_accept(record: DeviceRecord, sub: WeightsSubmit) -> SubmitAccepted:
            loop.call_soon_threadsafe(entered.set)
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(release.wait(), loop))
            raise AssertionError("released: refused on purpose")

        srv.server.coordinator.accept_update = slow_accept  # type: ignore[method-assign]
        payload: dict[str, Any] = {
            "roundId": "r-none",
            "baseVersion": 0,
            "numSamples": 1,
            "metrics": {},
            "weights": {"format": "safetensors", "sha256": "0" * 64, "size": 1, "data": b"\0"},
        }
        submit = asyncio.create_task(dev.call("weights:submit", payload))
        await asyncio.wait_for(entered.wait(), scaled(10))
        inline = sio.inline_handled
        assert await dev.heartbeat() == {"ok": True}
        assert sio.inline_handled == inline + 1
        assert not submit.done()
        release.set()
        answer = await submit
        assert answer["ok"] is False and answer["code"] == "internal_error"
        assert sio.inline_handled == inline + 1  # the submit was not inline

    with running_server(tmp_path, min_clients=5) as srv:
        run_devices(scenario(srv))


def test_a_serving_server_raises_the_collector_thresholds(tmp_path: Path) -> None:
    """Full collections over many connections' objects stall the loop: serving raises the
    thresholds (process-wide; server.serving.GC_THRESHOLDS)."""
    default = (700, 10, 10)
    gc.set_threshold(*default)
    try:
        with running_server(tmp_path):
            assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > default[0]
    finally:
        gc.set_threshold(*default)
