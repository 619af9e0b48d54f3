"""The server's transport (server/transport.py): Engine.IO's ping derived from the heartbeat
interval, heartbeats handled inline (and Engine.IO's message dispatch in the read loop), long
handlers still in their own task; the servers' event loop (server/serving.py run_server)."""

from __future__ import annotations

import asyncio
import gc
import sys
from pathlib import Path
from typing import Any

import pytest
from server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

from client.protocol import SubmitAccepted, WeightsSubmit
from server.registry import DeviceRecord
from server.serving import GC_THRESHOLDS, loop_factory, run_server
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
        # Engine.IO hands each message to python-socketio in the read loop, no task each:
        # so a slow non-inline handler below would hold back the heartbeat if python-socketio
        # did not give it its own task.
        assert sio.eio.async_handlers is False
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


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_the_servers_run_on_uvloop_where_it_is_installed() -> None:
    import uvloop  # a dependency on every platform but Windows (pyproject.toml)

    assert loop_factory() is uvloop.new_event_loop
    assert issubclass(run_server(_loop_type()), uvloop.Loop)


def test_without_uvloop_the_servers_run_on_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert loop_factory() is asyncio.new_event_loop
    loop_type = run_server(_loop_type())
    assert loop_type.__module__.startswith("asyncio")
