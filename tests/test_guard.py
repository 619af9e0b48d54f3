"""The shared handler guard (client.protocol.guard): a table of inputs and handler
behaviours against the answer python-socketio gets, then both wrappers over a real
Socket.IO server and client on loopback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import socketio
from aiohttp import web

from client import protocol as p
from client.errors import FedtrayError
from client.protocol import events
from client.protocol.guard import answer, guard, guard_sid
from server.protocol_examples import EXAMPLES

HEARTBEAT = EXAMPLES[p.Heartbeat]
CANCEL = EXAMPLES[p.TrainingCancel]


class BoomError(RuntimeError):
    pass


def returns(value: object) -> Callable[[Any], Awaitable[Any]]:
    async def handler(model: Any) -> Any:
        return value

    return handler


def raises(exc: Exception) -> Callable[[Any], Awaitable[Any]]:
    async def handler(model: Any) -> Any:
        raise exc

    return handler


OK = returns(p.OkAck())
# (case, spec, args, handler, expected answer: None, the ok wire dict, or an error code)
CASES: list[tuple[str, events.EventSpec[Any, Any], tuple[Any, ...], Any, Any]] = [
    ("acked-ok", events.HEARTBEAT, (HEARTBEAT,), OK, {"ok": True}),
    ("no-payload", events.HEARTBEAT, (), OK, "bad_request"),
    ("two-payloads", events.HEARTBEAT, (HEARTBEAT, HEARTBEAT), OK, "bad_request"),
    ("not-an-object", events.HEARTBEAT, ("hello",), OK, "bad_request"),
    ("invalid-field", events.HEARTBEAT, ({**HEARTBEAT, "state": "asleep"},), OK, "bad_request"),
    ("refusal", events.HEARTBEAT, (HEARTBEAT,), raises(FedtrayError("paused", "x")), "paused"),
    ("bug", events.HEARTBEAT, (HEARTBEAT,), raises(BoomError("secret detail")), "internal_error"),
    ("returns-none", events.HEARTBEAT, (HEARTBEAT,), returns(None), "internal_error"),
    ("wrong-ack", events.HEARTBEAT, (HEARTBEAT,), returns(p.BlobProgress(received=0)),
     "internal_error"),
    ("returns-dict", events.HEARTBEAT, (HEARTBEAT,), returns({"ok": True}), "internal_error"),
    (
        "protocol-string",
        events.REGISTER,
        ({**EXAMPLES[p.DeviceRegister], "protocol": "1"},),
        returns(None),
        "unsupported_protocol",
    ),
    ("unacked-ok", events.TRAINING_CANCEL, (CANCEL,), returns(None), None),
    ("unacked-bad", events.TRAINING_CANCEL, ({"roundId": 5},), returns(None), None),
    ("unacked-refusal", events.TRAINING_CANCEL, (CANCEL,), raises(FedtrayError("busy", "x")), None),
    ("unacked-bug", events.TRAINING_CANCEL, (CANCEL,), raises(BoomError("x")), None),
    ("unacked-returns", events.TRAINING_CANCEL, (CANCEL,), returns(p.OkAck()), None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "args", "handler", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_answer(
    spec: events.EventSpec[Any, Any],
    args: tuple[Any, ...],
    handler: Any,
    expected: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="client.protocol.guard")
    got = asyncio.run(answer(spec, args, handler, who="dev-1"))
    if expected is None or isinstance(expected, dict):
        assert got == expected
    else:
        assert got is not None and got["ok"] is False and got["code"] == expected
        assert isinstance(got["message"], str) and got["message"]
        assert "secret" not in got["message"]  # a bug's text stays in the log
        p.parse(p.ErrorAck, got)
    if expected is not None and not isinstance(expected, dict):
        assert f"{spec.name} from dev-1" in caplog.text or "bug" in caplog.text


def test_unacked_refusals_and_bugs_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="client.protocol.guard")
    asyncio.run(answer(events.TRAINING_CANCEL, ({"roundId": 5},), returns(None), who="srv"))
    assert "training:cancel from srv ignored: bad_request" in caplog.text
    asyncio.run(answer(events.TRAINING_CANCEL, (CANCEL,), returns(p.OkAck()), who="srv"))
    assert "it is not acked" in caplog.text


def test_the_handler_gets_the_parsed_model() -> None:
    seen: list[p.Heartbeat] = []

    async def handler(model: p.Heartbeat) -> p.OkAck:
        seen.append(model)
        return p.OkAck()

    asyncio.run(answer(events.HEARTBEAT, (HEARTBEAT,), handler))
    assert seen == [p.parse(p.Heartbeat, HEARTBEAT)]


def test_check_runs_first_and_its_refusal_wins_over_a_bad_payload() -> None:
    called: list[object] = []

    def check() -> None:
        raise FedtrayError("not_registered", "send device:register first")

    async def handler(model: p.BlobStatus) -> p.BlobProgress:
        called.append(model)
        return p.BlobProgress(received=0)

    for payload in ({"blobId": "b"}, "not even an object"):
        got = asyncio.run(answer(events.BLOB_STATUS, (payload,), handler, check=check))
        assert got is not None and got["code"] == "not_registered"
    assert called == []


# ------------------------------------------------------------------ over a real Socket.IO link


@asynccontextmanager
async def socketio_server(sio: socketio.AsyncServer) -> AsyncIterator[str]:
    """``sio`` served by aiohttp on a free loopback port; yields its URL."""
    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_both_wrappers_over_a_real_link() -> None:
    async def scenario() -> None:
        server = socketio.AsyncServer(async_mode="aiohttp")
        registered: set[str] = set()

        def require(sid: str) -> None:
            if sid not in registered:
                raise FedtrayError("not_registered", "send device:register first")

        async def on_heartbeat(sid: str, hb: p.Heartbeat) -> p.OkAck:
            assert hb.state == HEARTBEAT["state"]
            return p.OkAck()

        async def on_register(sid: str, reg: p.DeviceRegister) -> p.DeviceRegistered:
            registered.add(sid)
            return p.DeviceRegistered(
                device_id=reg.device_id,
                heartbeat_interval_sec=10,
                server_version="test",
                limits=p.Limits(),
            )

        server.on(events.HEARTBEAT.name, guard_sid(events.HEARTBEAT, on_heartbeat, check=require))
        server.on(events.REGISTER.name, guard_sid(events.REGISTER, on_register))

        client = socketio.AsyncClient(reconnection=False)
        starts: list[p.TrainingStart] = []

        async def on_start(start: p.TrainingStart) -> p.TrainingStartAck:
            starts.append(start)
            return p.TrainingStartAck(accepted=False, reason="busy", detail="test")

        client.on(events.TRAINING_START.name, guard(events.TRAINING_START, on_start))
        async with socketio_server(server) as url:
            await client.connect(url, transports=["websocket"])
            try:
                early = await client.call(events.HEARTBEAT.name, HEARTBEAT, timeout=30)
                assert early["code"] == "not_registered"
                reg = await client.call(events.REGISTER.name, EXAMPLES[p.DeviceRegister])
                assert reg["ok"] is True and reg["limits"]["maxChunkBytes"] == 512 * 1024
                assert await client.call(events.HEARTBEAT.name, HEARTBEAT) == {"ok": True}
                bad = await client.call(events.HEARTBEAT.name, {"state": 1})
                assert bad["code"] == "bad_request"
                sid = client.get_sid()
                ack = await server.call(
                    events.TRAINING_START.name, EXAMPLES[p.TrainingStart], to=sid
                )
                assert ack == {"accepted": False, "reason": "busy", "detail": "test"}
                refused = await server.call(events.TRAINING_START.name, {"roundId": "r"}, to=sid)
                assert refused["code"] == "bad_request"
                assert [s.round_id for s in starts] == ["r12"]
            finally:
                await client.disconnect()

    asyncio.run(scenario())


def test_a_default_chunk_reaches_a_server_built_with_library_defaults() -> None:
    """The 512 KiB default chunk fits socket.io's default maxHttpBufferSize (1,000,000
    bytes) over WebSocket (the transport fedtray uses); the old 1 MiB did not."""

    async def scenario() -> None:
        server = socketio.AsyncServer(async_mode="aiohttp")  # library defaults
        gone = asyncio.Event()

        async def on_chunk(sid: str, chunk: p.BlobChunk) -> p.BlobProgress:
            return p.BlobProgress(received=len(chunk.data))

        async def on_disconnect(sid: str, *args: object) -> None:
            gone.set()

        server.on(events.BLOB_CHUNK.name, guard_sid(events.BLOB_CHUNK, on_chunk))
        server.on("disconnect", on_disconnect)

        def chunk(size: int) -> dict[str, Any]:
            return p.BlobChunk(
                blob_id="b", offset=0, total=size, sha256="0" * 64, data=b"\x01" * size
            ).to_wire()

        client = socketio.AsyncClient(reconnection=False)
        async with socketio_server(server) as url:
            await client.connect(url, transports=["websocket"])
            try:
                size = p.DEFAULT_CHUNK_BYTES
                ack = await client.call(events.BLOB_CHUNK.name, chunk(size), timeout=60)
                assert ack == {"ok": True, "received": size, "complete": False}
                # The old default is over the limit: the server drops the connection.
                await client.emit(events.BLOB_CHUNK.name, chunk(1024 * 1024))
                await asyncio.wait_for(gone.wait(), timeout=60)
            finally:
                await client.disconnect()

    asyncio.run(scenario())
