"""The coalesced ping sweeper (server/pingsweep.py) wired into server/transport.py's
DeviceServer: due-time bucketing by table; on a real Socket.IO server on loopback (short
test ping settings) a socket is pinged by the sweeper and never by Engine.IO's per-socket
task, a peer that stops answering pings is closed for a ping timeout, socket.io's JavaScript
client (which only counts pings) never times out, and without a private name the sweeper
relies on Engine.IO pings each socket itself."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import engineio.async_socket
import pytest
from aiohttp import web
from server_harness import ScriptedDevice, run_devices, running_server

import server.pingsweep
from server.pingsweep import DueBuckets, sweep_tick
from server.transport import DeviceServer, transport_timing
from tests.test_interop_node import INTEROP_DIR, node  # noqa: F401 (node: a fixture)
from tests.waiting import scaled, wait_until_async

#: Test ping settings (seconds): the tick is PING_TIMEOUT / 20.
PING_INTERVAL = 0.3
PING_TIMEOUT = 1.0


@pytest.mark.parametrize(
    ("tick", "filed", "now", "due", "left"),
    [
        # A key is due at its time rounded UP to the tick, never before.
        (1.0, [("a", 10.2)], 10.9, [], 1),
        (1.0, [("a", 10.2)], 11.0, ["a"], 0),
        (1.0, [("a", 10.0)], 10.0, ["a"], 0),  # on the grid: not rounded further
        # Keys within one tick share a bucket: due together, in filing order.
        (1.0, [("b", 10.7), ("a", 10.1), ("c", 11.0)], 11.0, ["b", "a", "c"], 0),
        # Earlier buckets first; later ones stay filed.
        (0.5, [("late", 12.2), ("early", 10.1), ("mid", 10.6)], 11.0, ["early", "mid"], 1),
        (0.5, [("x", 3.0)], 2.99, [], 1),
        (0.25, [], 100.0, [], 0),
    ],
)
def test_due_buckets(
    tick: float, filed: list[tuple[str, float]], now: float, due: list[str], left: int
) -> None:
    buckets = DueBuckets(tick)
    for key, at in filed:
        rounded = buckets.add(key, at)
        assert at <= rounded < at + tick
    assert buckets.pop_due(now) == due
    assert len(buckets) == left
    assert buckets.pop_due(now) == []  # forgotten once returned
    if left:
        nxt = buckets.next_due()
        assert nxt is not None and nxt > now
    else:
        assert buckets.next_due() is None


@pytest.mark.parametrize(
    ("timeout", "tick"), [(20.0, 1.0), (60.0, 1.0), (10.0, 0.5), (1.0, 0.05), (0.2, 0.01)]
)
def test_sweep_tick(timeout: float, tick: float) -> None:
    assert sweep_tick(timeout) == pytest.approx(tick)


def test_a_tick_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        DueBuckets(0.0)


# --------------------------------------------------------------------------- on loopback


@asynccontextmanager
async def _serving(sio: DeviceServer) -> AsyncIterator[str]:
    """Serve ``sio`` on a free loopback port; its websocket URL."""
    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await sio.shutdown()
        await runner.cleanup()


def _server(
    ping_interval: float = PING_INTERVAL,
    ping_timeout: float = PING_TIMEOUT,
    inline_events: tuple[str, ...] = (),
) -> tuple[DeviceServer, dict[str, Any]]:
    sio = DeviceServer(
        inline_events=inline_events,
        async_mode="aiohttp",
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        logger=False,
        engineio_logger=False,
    )
    seen: dict[str, Any] = {"reasons": []}

    @sio.event  # type: ignore[untyped-decorator]
    async def disconnect(sid: str, reason: str) -> None:
        seen["reasons"].append(reason)

    @sio.on("*")  # type: ignore[untyped-decorator]
    async def anything(event: str, sid: str, *args: Any) -> None:
        return None

    return sio, seen


class _Peer:
    """A raw Engine.IO/Socket.IO peer on a websocket: it records when pings arrive and
    answers them only while ``pong`` is set."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.pong = True
        self.pings: list[float] = []
        self.pongs: list[float] = []
        self.frames: list[str] = []
        self.closed = asyncio.Event()

    async def read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                self.frames.append(msg.data)
                if msg.data == "2":
                    self.pings.append(time.monotonic())
                    if self.pong:
                        await self.ws.send_str("3")
                        self.pongs.append(time.monotonic())
        finally:
            self.closed.set()


@asynccontextmanager
async def _peer(url: str) -> AsyncIterator[_Peer]:
    ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
        opened = await asyncio.wait_for(ws.receive(), scaled(10))
        assert opened.data.startswith("0{"), opened
        await ws.send_str("40")
        joined = await asyncio.wait_for(ws.receive(), scaled(10))
        assert joined.data.startswith("40"), joined
        peer = _Peer(ws)
        reader = asyncio.ensure_future(peer.read())
        try:
            yield peer
        finally:
            await ws.close()
            await reader


@pytest.fixture
def engineio_pings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the pings Engine.IO's own per-socket task sends."""
    sent: list[str] = []
    own = engineio.async_socket.AsyncSocket._send_ping

    async def counted(self: Any) -> None:
        await own(self)
        sent.append(self.sid)

    monkeypatch.setattr(engineio.async_socket.AsyncSocket, "_send_ping", counted)
    return sent


@pytest.mark.parametrize("lean", [False, True])
def test_the_sweeper_pings_each_socket_a_ping_interval_after_its_pong(
    engineio_pings: list[str], lean: bool
) -> None:
    """With the lean path (an inline event), PONGs are handled in its websocket read too."""
    sio, seen = _server(inline_events=("device:heartbeat",) if lean else ())
    sweeper = sio.ping_sweeper
    assert sweeper is not None and sweeper.tick == pytest.approx(PING_TIMEOUT / 20)
    assert sio.eio.start_service_task is False  # the sweeper checks the pings

    async def scenario() -> None:
        async with _serving(sio) as url, _peer(url) as a, _peer(url) as b:
            await wait_until_async(
                lambda: len(a.pings) >= 3 and len(b.pings) >= 3, 20, "three pings each"
            )
            if lean:  # past its window a read returns the next PONG to Engine.IO's loop
                await wait_until_async(lambda: sio.pongs_inline >= 1, 20, "a PONG read inline")
            for peer in (a, b):
                # Never sooner than the ping interval after the pong it answers.
                for pong, ping in zip(peer.pongs, peer.pings[1:], strict=False):
                    assert ping - pong >= PING_INTERVAL
            assert not a.closed.is_set() and not b.closed.is_set()

    asyncio.run(scenario())
    assert sweeper.pings_sent >= 6
    assert 1 <= sweeper.sweeps <= sweeper.pings_sent
    assert engineio_pings == []  # nothing per socket slept
    if lean:  # the PINGs written straight to the idle websockets, as the lean path's acks
        assert 1 <= sio.pings_written <= sweeper.pings_sent
    else:
        assert sio.pongs_inline == 0
        assert sio.pings_written == 0
    assert seen["reasons"] == [sio.reason.TRANSPORT_CLOSE] * 2  # the peers left, not timed out


def test_a_peer_that_stops_answering_pings_is_closed_for_a_ping_timeout(
    engineio_pings: list[str],
) -> None:
    """The peer keeps sending messages (so Engine.IO's read deadline never fires) but
    stops answering pings: the sweeper's check closes it, for the ping-timeout reason."""
    sio, seen = _server()

    async def scenario() -> None:
        async with _serving(sio) as url, _peer(url) as peer:
            await wait_until_async(lambda: len(peer.pings) >= 1, 20, "a ping")
            peer.pong = False
            silent_from = len(peer.pings)

            async def chatter() -> None:
                while not peer.closed.is_set():
                    await peer.ws.send_str('42["chatter"]')
                    await asyncio.sleep(PING_INTERVAL / 4)

            talking = asyncio.ensure_future(chatter())
            try:
                await asyncio.wait_for(peer.closed.wait(), scaled(20))
            finally:
                talking.cancel()
            assert len(peer.pings) > silent_from  # a ping went unanswered

    asyncio.run(scenario())
    assert seen["reasons"] == [sio.reason.PING_TIMEOUT]
    assert sio.eio.sockets == {} or all(s.closed for s in sio.eio.sockets.values())
    assert engineio_pings == []


def test_without_a_private_name_engineio_pings_each_socket_itself(
    engineio_pings: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(
        server.pingsweep,
        "_SOCKET_METHODS",
        (*server.pingsweep._SOCKET_METHODS, "_renamed_in_a_later_release"),
    )
    with caplog.at_level(logging.WARNING, logger="server.transport"):
        sio, seen = _server()
    warnings = [r for r in caplog.records if "_renamed_in_a_later_release" in r.getMessage()]
    assert len(warnings) == 1
    assert sio.ping_sweeper is None and sio.eio.start_service_task is True

    async def scenario() -> None:
        async with _serving(sio) as url, _peer(url) as peer:
            await wait_until_async(lambda: len(peer.pings) >= 2, 20, "two pings")

    asyncio.run(scenario())
    assert len(engineio_pings) >= 2  # Engine.IO's own task sent them
    assert seen["reasons"] == [sio.reason.TRANSPORT_CLOSE]


#: A socket.io-client 4.x device that counts the server's pings (its engine times out when
#: one is late by more than pingInterval + pingTimeout) and leaves after ``want`` of them.
JS_PINGS = """
import { io } from "socket.io-client";
const [url, want] = [process.argv[1], Number(process.argv[2])];
const say = (o) => console.log(JSON.stringify(o));
const s = io(url, { reconnection: false });
let pings = 0;
s.io.on("ping", () => { pings += 1; say({ event: "ping" }); if (pings >= want) s.disconnect(); });
s.on("connect", () => say({ event: "connect" }));
s.on("disconnect", (reason) => { say({ event: "disconnect", reason }); process.exit(0); });
s.on("connect_error", (e) => { say({ event: "error", message: e.message }); process.exit(1); });
"""


def test_the_javascript_client_never_times_out_between_swept_pings(
    node: str,  # noqa: F811 (the fixture)
    engineio_pings: list[str],
) -> None:
    """Engine.IO's pingInterval is announced in whole seconds: 1 s here, with a 1 s timeout,
    so a ping late by more than the tick's rounding would show as a "ping timeout"."""
    sio, seen = _server(ping_interval=1.0, ping_timeout=1.0)
    want = 3

    async def scenario() -> list[dict[str, Any]]:
        async with _serving(sio) as url:
            proc = await asyncio.create_subprocess_exec(
                node,
                "--input-type=module",
                "-e",
                JS_PINGS,
                url,
                str(want),
                cwd=INTEROP_DIR,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), scaled(60))
            assert proc.returncode == 0, (out, err)
            return [json.loads(line) for line in out.decode().splitlines() if line]

    events = asyncio.run(scenario())
    assert [e["event"] for e in events] == ["connect"] + ["ping"] * want + ["disconnect"]
    assert events[-1]["reason"] == "io client disconnect"  # not "ping timeout"
    assert sio.ping_sweeper is not None and sio.ping_sweeper.pings_sent >= want
    assert engineio_pings == []
    (reason,) = seen["reasons"]  # it left (its DISCONNECT or its closing websocket first)
    assert reason in {sio.reason.CLIENT_DISCONNECT, sio.reason.TRANSPORT_CLOSE}


def test_the_fedtray_server_pings_its_devices_through_the_sweeper(tmp_path: Path) -> None:
    """The served DeviceServer (server/serving.py) has the sweeper, at its tick for the
    derived timing, and a joined device's socket is the sweeper's."""
    with running_server(tmp_path, min_clients=5) as srv:
        sio: DeviceServer = srv.server.sio
        timing = transport_timing(srv.config.heartbeat_interval)
        sweeper = sio.ping_sweeper
        assert sweeper is not None and sweeper.tick == sweep_tick(timing.ping_timeout)
        assert sio.eio.start_service_task is False

        async def scenario() -> list[bool]:
            dev = ScriptedDevice(srv.url, name="swept")
            assert (await dev.join())["ok"] is True
            assert await dev.heartbeat() == {"ok": True}
            # Read from this thread while the device is connected (a snapshot).
            return ["schedule_ping" in vars(s) for s in list(sio.eio.sockets.values())]

        assert run_devices(scenario()) == [True]
