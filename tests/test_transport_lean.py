"""The lean heartbeat path of server/transport.py on a real server: the same bytes as the
library's path for every input (good, bad, unregistered, not a heartbeat), acks written
straight to an idle websocket and queued otherwise, the library's path when a private name
it relies on is missing."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from server_harness import (
    ScriptedDevice,
    ServerHandle,
    register_payload,
    resources,
    run_devices,
    running_server,
)

import server.transport
from server.transport import DeviceServer, WriterQueue, transport_timing
from tests.waiting import scaled, wait_until_async

DEVICE_ID = str(uuid.UUID(int=17))
HB = {"state": "idle", "resources": resources()}
SENTINEL = '4299["device:heartbeat",' + json.dumps(HB) + "]"


def _event(ack: str, *args: Any) -> str:
    return "42" + ack + json.dumps(list(args), separators=(",", ":"))


#: Engine.IO messages a device sends (after its Socket.IO CONNECT), in order.
INPUTS = [
    _event("1", "device:heartbeat", HB),  # before device:register: not_registered
    _event("2", "device:register", register_payload(DEVICE_ID, "lean")),
    _event("3", "device:heartbeat", HB),
    _event("004", "device:heartbeat", HB),  # the ack id python-socketio reads: 4
    _event("5", "device:heartbeat", {**HB, "state": 5}),  # wrong type
    _event("6", "device:heartbeat", {**HB, "extra": True}),  # ignored (newer clients)
    _event("7", "device:heartbeat", "idle"),  # not an object
    _event("8", "device:heartbeat"),  # no payload
    _event("9", "device:heartbeat", HB, HB),  # two payloads
    '4210["device:heartbeat",{"state":',  # malformed JSON: logged, never answered
    _event("", "device:heartbeat", HB),  # no ack id: handled, not answered
    '4211[ "device:heartbeat",' + json.dumps(HB) + "]",  # spelt otherwise: the library's
    _event("1" * 30, "device:heartbeat", HB),  # a huge ack id: the library's
    "42/elsewhere,12" + json.dumps(["device:heartbeat", HB]),  # a namespace never joined
    _event("13", "device:heartbeat", {**HB, "state": "paused", "pauseReason": "user"}),
    _event("14", "training:progress", {"roundId": "r", "epoch": 1, "progress": 0.5}),
    _event("15", "no:such-event", {}),
    _event("16", "device:heartbeat", HB),
]

_RES = json.dumps(HB["resources"])
_HW = {"cpuCores": 4, "ramTotalMb": 8192, "gpu": None, "batteryPresent": True}
_GPU = {"kind": "cuda", "name": "RTX", "memoryMb": 8192}

#: Heartbeats at the edges of validation and of JSON, answered (or not) the same way by
#: both paths; appended to :data:`INPUTS` (after its last, so its indexes hold).
EDGES = [
    _event("17", "device:heartbeat", {**HB, "weightsVersion": True}),  # a bool as an int
    '4218["device:heartbeat",{"state":"idle","resources":' + _RES.replace("12.5", "NaN") + "}]",
    '4219["device:heartbeat",{"state":"idle","resources":' + _RES.replace("12.5", "1e400") + "}]",
    '4220["device:heartbeat",{"state":"idle","resources":'
    + _RES.replace("4096", "4096.0")  # a float for an int
    + "}]",
    '4221["device:heartbeat",{"state":"idle","resources":'  # an int JSON reads as too large
    + _RES.replace("4096", "9" * 150)
    + "}]",
    _event("22", "device:heartbeat", {**HB, "weightsVersion": 10**30}),  # large, fine
    _event("23", "device:heartbeat", {**HB, "weightsVersion": -1}),
    _event("24", "device:heartbeat", {**HB, "hardware": {**_HW, "gpu": _GPU}}),  # nested
    _event("25", "device:heartbeat", {**HB, "hardware": {**_HW, "gpu": {"kind": "tpu"}}}),
    _event("26", "device:heartbeat", {**HB, "hardware": {**_HW, "cpuCores": "4"}}),
    _event("27", "device:heartbeat", {**HB, "budget": {"cores": 2, "cpuPercent": 50, "why": "x"}}),
    _event("28", "device:heartbeat", {**HB, "budget": {"cores": 2, "cpuPercent": 0, "why": "x"}}),
    _event(
        "29",
        "device:heartbeat",
        {**HB, "state": "paused", "pauseReason": "battery_low", "pauseDetail": "on battery"},
    ),
    _event("30", "device:heartbeat", {**HB, "resources": {**HB["resources"], "cpuPercent": 101}}),
    _event("31", "device:heartbeat", {**HB, "resources": None}),
    _event("32", "device:heartbeat", {"resources": HB["resources"]}),  # no state
    _event("33", "device:heartbeat", {**HB, "state": "idle", "roundId": "bad id!"}),
    _event("34", "device:heartbeat", {**HB, "pauseDetail": "x" * 1001}),
    _event("35", "device:heartbeat", [HB]),  # an array, not an object
    _event("36", "device:heartbeat", None),
    _event("37", "device:heartbeat", HB, None),
    _event("38", "device:heartbeat", {**HB, "Extra": {"nested": [1, 2, {"x": None}]}}),
]
#: The edges that are never answered (JSON the library's decoder refuses).
EDGES_UNANSWERED = {EDGES[4]}
INPUTS += EDGES

#: The inputs never answered (no ack id, malformed, a namespace never joined).
UNANSWERED = {INPUTS[9], INPUTS[10], INPUTS[13], *EDGES_UNANSWERED}


async def _exchange(url: str) -> list[tuple[str, list[str]]]:
    """Send each of :data:`INPUTS` on a raw websocket, then a sentinel heartbeat; return
    the acks that came back before the sentinel's, for each."""
    ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:

        async def frame() -> str:
            while True:
                msg = await asyncio.wait_for(ws.receive(), scaled(10))
                if msg.type == aiohttp.WSMsgType.BINARY:  # weights:global's attachment
                    return f"<{len(msg.data)} bytes>"
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                if msg.data == "2":  # Engine.IO ping
                    await ws.send_str("3")
                    continue
                text: str = msg.data
                return text

        assert (await frame()).startswith("0{")
        await ws.send_str("40")
        assert (await frame()).startswith('40{"sid":')
        seen = []
        for data in INPUTS:
            await ws.send_str(data)
            await ws.send_str(SENTINEL)
            got: list[str] = []
            sentinel = False
            # A device:register runs in its own task: its ack may come after the sentinel's.
            while not sentinel or len(got) < (data not in UNANSWERED):
                text = await frame()
                if text.startswith("4399["):
                    sentinel = True
                elif text.startswith("43"):  # acks; not the server's own events (welcome)
                    got.append(text)
            seen.append((data, got))
        return seen


def _off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make python-socketio lack one name the lean path relies on."""
    gone = (socketio.AsyncServer, "_renamed_in_a_later_release")
    monkeypatch.setattr(server.transport, "_LEAN_HOOKS", (*server.transport._LEAN_HOOKS, gone))


def test_the_lean_path_answers_byte_for_byte_as_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with running_server(tmp_path / "on", min_clients=5) as srv:
        lean: DeviceServer = srv.server.sio
        on = run_devices(_exchange(srv.url))
        handled, written, inline = lean.lean_handled, lean.acks_written, lean.inline_handled
        read_inline = lean.read_inline
    _off(monkeypatch)
    with (
        caplog.at_level(logging.WARNING, logger="server.transport"),
        running_server(tmp_path / "off", min_clients=5) as srv,
    ):
        library: DeviceServer = srv.server.sio
        off = run_devices(_exchange(srv.url))
    warnings = [r.getMessage() for r in caplog.records if r.name == "server.transport"]
    assert len(warnings) == 1 and "_renamed_in_a_later_release" in warnings[0]

    assert on == off
    answers = dict(on)
    # The answers are the protocol's (so the comparison compared something).
    assert answers[INPUTS[0]][0].startswith('431[{"ok":false,"code":"not_registered"')
    assert answers[INPUTS[2]] == ['433[{"ok":true}]']
    assert answers[INPUTS[3]] == ['434[{"ok":true}]']
    assert answers[INPUTS[5]] == ['436[{"ok":true}]']
    for i in (4, 6, 7, 8):
        assert answers[INPUTS[i]][0].startswith(f'43{i + 1}[{{"ok":false,"code":"bad_request"')
    assert "got 0" in answers[INPUTS[7]][0]
    assert "got 2" in answers[INPUTS[8]][0]
    for i in (9, 10, 13):
        assert answers[INPUTS[i]] == []
    assert answers[INPUTS[15]] == ["4314[]"]  # an unacked event's handler returns None
    assert answers[INPUTS[11]] == ['4311[{"ok":true}]']
    assert answers[INPUTS[12]] == ["43" + "1" * 30 + '[{"ok":true}]']
    assert answers[INPUTS[16]][0].startswith('4315[{"ok":false,"code":"bad_request"')
    edges = {int(data[2:4]): got for data, got in on if data in EDGES}
    assert [n for n, got in edges.items() if got == [f'43{n}[{{"ok":true}}]']] == [
        22,
        24,
        27,
        29,
        38,
    ]
    assert edges[21] == []
    for n in set(edges) - {21, 22, 24, 27, 29, 38}:
        assert edges[n][0].startswith(f'43{n}[{{"ok":false,"code":"bad_request"'), (n, edges[n])

    # Heartbeats 1, 3-9, 13, 16 and the sentinels took the lean path; the unacked,
    # spelt-otherwise and huge-id ones the library's (inline too); the malformed one and
    # the other namespace's were never handled.
    sentinels = len(INPUTS)
    assert handled == 10 + len(EDGES) - len(EDGES_UNANSWERED) + sentinels
    assert 0 < written <= handled
    assert inline == handled + 3
    # All of them inside the driver's read (the window is half of a 45 s deadline).
    assert read_inline == handled
    assert library.read_inline == 0
    assert library.lean_handled == 0 and library.acks_written == 0
    assert library.inline_handled == inline


def test_without_a_websocket_the_lean_path_queues_its_acks(tmp_path: Path) -> None:
    """A polling connection (no websocket to write to): the lean path still handles its
    heartbeats and queues the acks the library's way."""

    async def scenario(url: str) -> list[Any]:
        sio = socketio.AsyncClient(reconnection=False)
        await sio.connect(url, transports=["polling"], wait_timeout=round(scaled(10)))
        try:
            reg = await sio.call("device:register", register_payload(DEVICE_ID, "p"))
            assert reg["ok"] is True
            return [await sio.call("device:heartbeat", HB, timeout=scaled(10)) for _ in range(3)]
        finally:
            # Without waiting for the client's pending long-poll (python-socketio's
            # disconnect would: up to the ping interval).
            await sio.eio.disconnect(abort=True)

    with running_server(tmp_path, min_clients=5) as srv:
        lean: DeviceServer = srv.server.sio
        assert run_devices(scenario(srv.url)) == [{"ok": True}] * 3
        assert lean.lean_handled == 3 and lean.acks_written == 0

        # And on a websocket the same heartbeats are written straight.
        async def on_websocket() -> None:
            dev = ScriptedDevice(srv.url, name="w")
            assert (await dev.join())["ok"] is True
            for _ in range(3):
                assert await dev.heartbeat() == {"ok": True}

        run_devices(on_websocket())
        assert lean.lean_handled == 6 and lean.acks_written >= 1


def test_the_writer_queue_is_idle_only_while_its_reader_waits_on_it_empty() -> None:
    async def scenario() -> None:
        queue = WriterQueue()
        assert not queue.writer_idle()  # nobody reads: an ack would pass no writer
        reader = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        assert queue.writer_idle()
        queue.put_nowait("ack")  # queued, not yet taken: not idle
        assert not queue.writer_idle()
        assert await reader == "ack"
        assert not queue.writer_idle()  # taken, being written
        reader = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        assert queue.writer_idle()
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert not queue.writer_idle()

    asyncio.run(scenario())


def test_an_ack_never_overtakes_what_the_connection_has_queued(tmp_path: Path) -> None:
    """An emit queued for the connection just before its heartbeat is handled (the writer
    has not taken it yet) goes out first: the ack is queued behind it, not written."""

    async def scenario(srv: ServerHandle) -> list[str]:
        sio: DeviceServer = srv.server.sio
        ws_url = srv.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:

            async def frame() -> str:
                msg = await asyncio.wait_for(ws.receive(), scaled(10))
                text: str = msg.data if msg.type == aiohttp.WSMsgType.TEXT else "<binary>"
                return text

            eio_sid = json.loads((await frame())[1:])["sid"]
            await ws.send_str("40")
            assert (await frame()).startswith('40{"sid":')
            # Not registered (so nothing else is sent to it): each heartbeat is refused
            # with not_registered, through the same path.

            async def emit_then_heartbeat() -> tuple[int, int]:
                before = sio.acks_written
                # Queued without a pause (python-socketio's emit may pause, letting the
                # writer take it first): the writer has not taken it yet.
                await sio.eio.send(eio_sid, '2["test:first",{"n":1}]')
                # python-engineio hands python-socketio the message without its "4"
                message = _event("77", "device:heartbeat", HB)[1:]
                await sio._handle_eio_message(eio_sid, message)
                return before, sio.acks_written

            before, after = await asyncio.to_thread(srv.run, emit_then_heartbeat())
            assert after == before  # queued, not written
            order = []
            while not (text := await frame()).startswith("4377["):
                order.append(text)
            order.append(text)
            # Once the writer is idle again, an ack is written straight.
            queue = sio.eio.sockets[eio_sid].queue
            await wait_until_async(queue.writer_idle, 10, "the connection's writer idle")
            written = sio.acks_written
            await ws.send_str(_event("78", "device:heartbeat", HB))
            while not (await frame()).startswith("4378["):
                pass
            # (counted on the server's loop once the write returns: maybe after we read it)
            await wait_until_async(lambda: sio.acks_written == written + 1, 10, "the count")
            return order

    with running_server(tmp_path, min_clients=5) as srv:
        order = run_devices(scenario(srv))
    assert order[0] == '42["test:first",{"n":1}]'
    assert order[1].startswith('4377[{"ok":false,"code":"not_registered"')


def test_past_the_window_a_message_goes_to_engineios_read_loop(tmp_path: Path) -> None:
    """Read inline only within the window (half of Engine.IO's read deadline) of each read:
    past it, the next message goes through Engine.IO's loop (restarting its deadline), by
    the same lean path."""

    async def scenario(url: str) -> None:
        dev = ScriptedDevice(url, name="w")
        assert (await dev.join())["ok"] is True
        for _ in range(3):
            assert await dev.heartbeat() == {"ok": True}

    with running_server(tmp_path, min_clients=5) as srv:
        lean: DeviceServer = srv.server.sio
        timing = transport_timing(srv.config.heartbeat_interval)
        assert lean._inline_window == timing.dead_peer_bound / 2
        lean._inline_window = 0.0  # every read is past it
        run_devices(scenario(srv.url))
        assert lean.lean_handled == 3 and lean.read_inline == 0
        assert lean.acks_written >= 1


@pytest.mark.parametrize(
    ("namespace", "event", "takes_heartbeat"),
    [
        (None, None, False),
        ("/", "device:heartbeat", True),
        ("/", "*", True),
        ("*", "device:heartbeat", True),
        ("*", "*", True),
        ("/", "device:register", False),
        ("/other", "device:heartbeat", False),
    ],
)
def test_a_handler_registered_with_on_keeps_its_precedence(
    namespace: str | None, event: str | None, takes_heartbeat: bool
) -> None:
    # python-socketio's order: a handler registered with ``on`` (for the event, or ``*``,
    # in the namespace or in every namespace) before the namespace class.
    sio = DeviceServer(inline_events={"device:heartbeat"})

    async def handler(*args: Any) -> None:
        return None

    if namespace is not None and event is not None:
        sio.on(event, handler, namespace=namespace)
    assert sio._event_handler_for("device:heartbeat") is takes_heartbeat


@pytest.mark.parametrize("missed", [False, True])
def test_an_ack_checks_an_outstanding_ping_as_engineios_send(tmp_path: Path, missed: bool) -> None:
    """A peer with a ping outstanding past ``ping_timeout`` is closed when an ack would be
    written to it (as Engine.IO's send does), not answered; one within it is answered."""

    async def scenario(srv: ServerHandle) -> tuple[list[str], int]:
        sio: DeviceServer = srv.server.sio
        ws_url = srv.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:

            async def frame() -> str | None:
                msg = await asyncio.wait_for(ws.receive(), scaled(10))
                return msg.data if msg.type == aiohttp.WSMsgType.TEXT else None

            eio_sid = json.loads((await frame() or "")[1:])["sid"]
            await ws.send_str("40")
            assert (await frame() or "").startswith('40{"sid":')
            socket = sio.eio.sockets[eio_sid]
            queue = socket.queue
            await wait_until_async(queue.writer_idle, 10, "the connection's writer idle")
            ago = sio.eio.ping_timeout + 5 if missed else 1.0

            async def outstanding() -> None:
                socket.last_ping = time.time() - ago

            await asyncio.to_thread(srv.run, outstanding())
            written = sio.acks_written
            await ws.send_str(_event("5", "device:heartbeat", HB))
            seen: list[str] = []
            if missed:  # Engine.IO closes it: no need to wait for the close to finish
                await wait_until_async(lambda: socket.closing or socket.closed, 10, "closing")
                return seen, sio.acks_written - written
            while (text := await frame()) is not None:
                seen.append(text)
                if text.startswith("435["):
                    break
            return seen, sio.acks_written - written

    with running_server(tmp_path, min_clients=5) as srv:
        seen, written = run_devices(scenario(srv))
    if missed:
        assert written == 0  # closed (reason: ping timeout), not answered
    else:
        assert seen[-1].startswith('435[{"ok":false,"code":"not_registered"')


def test_a_ping_is_written_straight_only_to_an_idle_writer(tmp_path: Path) -> None:
    """The ping sweeper's straight writer (lean path) never overtakes a packet queued for
    the connection: with one queued, it declines (the PING is queued behind it); with the
    writer idle, the PING is written straight."""

    async def scenario(srv: ServerHandle) -> tuple[bool, bool, list[str]]:
        sio: DeviceServer = srv.server.sio
        assert sio.ping_sweeper is not None and sio.ping_sweeper.write is not None
        ws_url = srv.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:

            async def frame() -> str:
                msg = await asyncio.wait_for(ws.receive(), scaled(10))
                text: str = msg.data if msg.type == aiohttp.WSMsgType.TEXT else "<binary>"
                return text

            eio_sid = json.loads((await frame())[1:])["sid"]
            await ws.send_str("40")
            assert (await frame()).startswith('40{"sid":')
            socket = sio.eio.sockets[eio_sid]
            await wait_until_async(socket.queue.writer_idle, 10, "the connection's writer idle")

            async def queued_then_ping() -> bool:
                await sio.eio.send(eio_sid, '2["test:first",{"n":1}]')
                straight: bool = await sio._ping_straight(socket, "2")
                return straight

            behind = await asyncio.to_thread(srv.run, queued_then_ping())
            first = await frame()
            await wait_until_async(socket.queue.writer_idle, 10, "the connection's writer idle")
            written = sio.pings_written

            async def ping() -> bool:
                straight: bool = await sio._ping_straight(socket, "2")
                return straight

            idle = await asyncio.to_thread(srv.run, ping())
            second = await frame()
            assert sio.pings_written == written + 1
            return behind, idle, [first, second]

    with running_server(tmp_path, min_clients=5) as srv:
        behind, idle, frames = run_devices(scenario(srv))
    assert behind is False  # declined: the sweeper queues the PING through Engine.IO
    assert idle is True
    assert frames == ['42["test:first",{"n":1}]', "2"]


def test_packets_of_one_frame_the_library_sends_are_written_straight(tmp_path: Path) -> None:
    """``blob:status`` goes the library's way (not an inline event): its ack (one frame) is
    written straight to the idle websocket, and arrives as the library would send it; on
    a polling connection (no websocket) it is queued."""

    async def scenario(url: str, transports: list[str]) -> list[Any]:
        dev = ScriptedDevice(url, name="straight")
        if transports == ["polling"]:
            dev.sio = socketio.AsyncClient(reconnection=False)
            await dev.sio.connect(url, transports=transports, wait_timeout=round(scaled(10)))
            assert (await dev.register())["ok"] is True
        else:
            assert (await dev.join())["ok"] is True
        try:
            return [await dev.call("blob:status", {"blobId": f"b{i}"}) for i in range(3)]
        finally:
            await dev.sio.eio.disconnect(abort=True)

    with running_server(tmp_path, min_clients=5) as srv:
        sio: DeviceServer = srv.server.sio
        before = sio.frames_written
        answers = run_devices(scenario(srv.url, ["websocket"]))
        assert answers == [{"ok": True, "received": 0, "complete": False}] * 3
        assert sio.frames_written >= before + 3
        assert sio.lean_handled == 0  # none of them is a lean ack
        before = sio.frames_written
        answers = run_devices(scenario(srv.url, ["polling"]))
        assert answers == [{"ok": True, "received": 0, "complete": False}] * 3
        assert sio.frames_written == before


class _Unsent:
    """A transport that reports unsent bytes (a peer that stopped reading); the rest is
    the real transport's."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def get_write_buffer_size(self) -> int:
        return 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_a_frame_is_queued_not_written_straight_while_its_transport_holds_unsent_bytes(
    tmp_path: Path,
) -> None:
    """A straight write could wait for a peer that stopped reading; the library's queue
    never makes the sender wait: with bytes unsent, the ack goes the library's way."""

    def writers(sio: DeviceServer) -> list[Any]:
        return [s.fedtray_websocket._sock._writer for s in sio.eio.sockets.values()]

    async def scenario(srv: ServerHandle) -> tuple[list[Any], int, int]:
        sio: DeviceServer = srv.server.sio
        dev = ScriptedDevice(srv.url, name="unread")
        assert (await dev.join())["ok"] is True
        try:

            async def unsent() -> None:
                for writer in writers(sio):
                    writer.transport = _Unsent(writer.transport)

            async def sent() -> None:
                for writer in writers(sio):
                    writer.transport = writer.transport._real

            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(unsent(), srv.loop))
            before = sio.frames_written
            answers = [await dev.call("blob:status", {"blobId": f"b{i}"}) for i in range(3)]
            queued = sio.frames_written - before
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(sent(), srv.loop))
            # Nothing unsent: straight again, once the writer is idle (the queued acks may
            # still be on their way).
            before = sio.frames_written
            for i in range(20):
                answers.append(await dev.call("blob:status", {"blobId": f"c{i}"}))
                if sio.frames_written > before:
                    break
            return answers, queued, sio.frames_written - before
        finally:
            await dev.sio.eio.disconnect(abort=True)

    with running_server(tmp_path, min_clients=5) as srv:
        answers, while_unsent, after = run_devices(scenario(srv))
    assert answers == [{"ok": True, "received": 0, "complete": False}] * len(answers)
    assert while_unsent == 0  # every ack queued, and each still arrived
    assert after >= 1  # nothing unsent: written straight again
