"""Message-size limits on both peers, and what happens at each (docs/protocol.md, Transport).

* The device reads messages up to ``DEVICE_MAX_MESSAGE_BYTES`` (16 MiB): a 6 MiB
  ``blob:chunk`` is answered ``chunk_too_large`` and the connection stays (it used to be
  cut by aiohttp's 4 MiB default). Over 16 MiB the transport closes the connection and
  the device reconnects.
* The server reads messages up to its ``maxChunkBytes`` + 64 KiB: a chunk over
  ``maxChunkBytes`` but under that is answered ``chunk_too_large``; a bigger message
  closes that connection (it is never read).
* A packet the device's Socket.IO decoder refuses is counted and dropped; the connection
  stays and later events are answered, and the device still stops at once.
* Stopping never hangs on a lost cancellation: the device's acknowledged call ends
  cancelled even when the answer arrived just before the cancel (python-socketio's own
  ``call`` returned the answer instead on Python 3.11, so the heartbeat loop outlived the
  connection and ``stop`` waited for it forever), and a connection task that does lose
  its cancellation ends once the link says it is no longer connected.
* A server whose port is taken says so and leaves no state directory behind.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import socketio
from aiohttp import web

from client.protocol import DEFAULT_CHUNK_BYTES, EV_BLOB_CHUNK, EV_BLOB_STATUS, BlobChunk
from client.session.link import ServerLink
from client.session.sioclient import DeviceSocketClient, device_client
from client.transfer import (
    DEVICE_MAX_MESSAGE_BYTES,
    MESSAGE_MARGIN_BYTES,
    REFERENCE_CHUNK_BYTES,
    message_limit,
)
from server.config import ServerConfig
from tests.hostile_server import hostile_client
from tests.server_harness import (
    REPO_ROOT,
    ScriptedDevice,
    ServerHandle,
    run_devices,
    running_server,
    server_args,
    subprocess_env,
)
from tests.waiting import scaled, wait_until, wait_until_async

pytestmark = pytest.mark.timeout(120)

SHA = "ab" * 32
MiB = 1024 * 1024


def _chunk(size: int, blob: str = "big") -> dict[str, Any]:
    return BlobChunk(blob_id=blob, offset=0, total=size, sha256=SHA, data=b"q" * size).to_wire()


def test_limits_are_declared_once_and_consistent() -> None:
    assert message_limit(DEFAULT_CHUNK_BYTES) == DEFAULT_CHUNK_BYTES + MESSAGE_MARGIN_BYTES
    # The device reads far more than a conforming server sends it (one chunk + envelope).
    assert 16 * message_limit(DEFAULT_CHUNK_BYTES) <= DEVICE_MAX_MESSAGE_BYTES
    # The reference peers' own chunks are larger, and still far under the device's limit.
    assert DEFAULT_CHUNK_BYTES < REFERENCE_CHUNK_BYTES
    assert 3 * message_limit(REFERENCE_CHUNK_BYTES) <= DEVICE_MAX_MESSAGE_BYTES
    assert ServerConfig().limits.max_chunk_bytes == REFERENCE_CHUNK_BYTES


def test_the_device_answers_a_6_mib_message_instead_of_dropping_the_link(tmp_path: Path) -> None:
    with hostile_client(tmp_path) as (server, client):
        ack = server.call(EV_BLOB_CHUNK, _chunk(6 * MiB))
        assert ack["ok"] is False and ack["code"] == "chunk_too_large"
        assert server.call(EV_BLOB_STATUS, {"blobId": "big"}) == {
            "ok": True,
            "received": 0,
            "complete": False,
        }
        assert server.connects == 1 and client.snapshot().connection == "connected"


def test_over_the_devices_limit_the_transport_closes_and_the_device_reconnects(
    tmp_path: Path,
) -> None:
    with hostile_client(tmp_path) as (server, client):
        with pytest.raises(Exception):  # noqa: B017 -- the call's ack never comes
            server.loop.run(
                asyncio.wait_for(
                    server.acall(EV_BLOB_CHUNK, _chunk(DEVICE_MAX_MESSAGE_BYTES + 1)),
                    scaled(10),
                ),
                30,
            )
        wait_until(lambda: server.registrations >= 2, 30, "the device registered again")
        assert server.connects == 2
        client.wait_for(lambda s: s.connection == "connected", 30)


def test_a_malformed_socketio_packet_is_counted_and_dropped(tmp_path: Path) -> None:
    with hostile_client(tmp_path) as (server, client):
        sio = client._session.link._sio  # read-only peek at the live connection
        assert isinstance(sio, DeviceSocketClient)
        for raw in ('2["blob:status", {', "9nonsense", '5-0["x"]'):
            server.send_raw(raw)
        # A proper event after them is answered on the same connection.
        assert server.call(EV_BLOB_STATUS, {"blobId": "b"})["received"] == 0
        assert sio.malformed_packets == 3
        assert server.connects == 1 and client.snapshot().connection == "connected"


def test_a_cancel_that_meets_the_answer_ends_the_call_cancelled() -> None:
    """The answer to a call arrives, then the calling task is cancelled before it ran
    again (what the link does to the heartbeat loop when the connection ends): the
    call must end cancelled, whichever loop step the cancel lands on."""

    async def scenario() -> list[int]:
        server = socketio.AsyncServer(async_mode="aiohttp")  # no handler: never answers
        app = web.Application()
        server.attach(app)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        sio = device_client()
        accepted: list[int] = []
        try:
            await sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"])
            for steps in range(4):
                call = asyncio.ensure_future(sio.call("unanswered", {}, timeout=scaled(20)))
                await wait_until_async(lambda: len(sio.callbacks.get("/", {})) == 2, 10, "sent")
                ack_id = max(i for i in sio.callbacks["/"] if i)
                await sio._handle_ack("/", ack_id, ["answer"])  # the answer arrives
                for _ in range(steps):
                    await asyncio.sleep(0)  # the cancel lands this many loop steps later
                if call.cancel():
                    accepted.append(steps)
                    with pytest.raises(asyncio.CancelledError):
                        await call  # python-socketio's own call returned "answer" here
                else:
                    assert await call == "answer"  # it had ended before the cancel
        finally:
            await sio.disconnect()
            await runner.cleanup()
        return accepted

    assert 0 in asyncio.run(scenario())  # a cancel right after the answer was accepted


def test_the_device_websocket_is_never_compressed() -> None:
    """A server that accepts permessage-deflate (aiohttp's does by default) gets none: the
    weights in blob chunks do not deflate, so compressing them only burns CPU."""

    async def scenario() -> tuple[int, int]:
        server = socketio.AsyncServer(async_mode="aiohttp")
        app = web.Application()
        server.attach(app)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        sio, other = device_client(), socketio.AsyncClient(websocket_extra_options={"compress": 15})
        try:
            await sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"])
            await other.connect(f"http://127.0.0.1:{port}", transports=["websocket"])
            return sio.eio.ws.compress, other.eio.ws.compress
        finally:
            await sio.disconnect()
            await other.disconnect()
            await runner.cleanup()

    device, offered = asyncio.run(scenario())
    assert offered > 0  # the server would have compressed a connection that asked
    assert device == 0


def test_a_connection_task_that_loses_its_cancel_still_lets_the_device_stop(
    tmp_path: Path,
) -> None:
    """A connection task that swallows its cancellation but loops only while connected
    (as the heartbeat loop does) ends when the connection ends, so ``stop`` returns."""
    lost_cancels: list[int] = []

    async def stubborn(link: ServerLink) -> None:
        while link.connected:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                lost_cancels.append(1)  # swallowed, as asyncio.wait_for (3.11) could

    with hostile_client(tmp_path) as (_server, client):

        async def spawn(session: Any) -> None:
            session.link.spawn(stubborn(session.link))

        client._submit(spawn).result(scaled(10))
    # hostile_client's exit asserted that the client stopped in time.
    assert lost_cancels, "the connection task was never cancelled"


def test_the_server_refuses_an_oversized_chunk_and_closes_over_its_frame_limit(
    tmp_path: Path,
) -> None:
    async def scenario(srv: ServerHandle) -> None:
        limit = srv.config.max_message_bytes
        assert srv.server.sio.eio.max_http_buffer_size == limit
        assert limit == message_limit(srv.config.limits.max_chunk_bytes)
        dev = ScriptedDevice(srv.url, name="big")
        await dev.join()
        ack = await dev.call(EV_BLOB_CHUNK, _chunk(srv.config.limits.max_chunk_bytes + 1))
        assert ack["code"] == "chunk_too_large"
        assert dev.sio.connected
        with pytest.raises(Exception):  # noqa: B017 -- never read, never answered
            await dev.call(EV_BLOB_CHUNK, _chunk(limit + 1), timeout=5)
        await wait_until_async(lambda: not dev.sio.connected, 10, "the server closed it")

    with running_server(tmp_path, min_clients=5, clients_per_round=5) as srv:
        run_devices(scenario(srv))


def test_a_taken_port_fails_before_anything_is_written(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "server", *server_args(tmp_path, "--port", str(port))],
            check=False,
            cwd=REPO_ROOT,
            env=subprocess_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=scaled(60),
        )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedtray-server: error")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"fedtray-server: error: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in errors[0], errors
    assert "new federation" not in proc.stderr  # no model was built, nothing saved
    assert not (tmp_path / "server-state").exists()


def test_the_docs_state_these_limits() -> None:
    protocol = (REPO_ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    security = (REPO_ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    server_limit = f"{message_limit(REFERENCE_CHUNK_BYTES):,} bytes"
    device_limit = f"{DEVICE_MAX_MESSAGE_BYTES // MiB} MiB"
    for text in (protocol, security):
        assert server_limit in text and device_limit in text
        assert "transfers_full" in text and "chunk_too_large" in text
