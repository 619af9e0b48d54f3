"""A hostile server for client tests: a real python-socketio ``AsyncServer`` on loopback
that a real :class:`client.session.DistributedClient` registers with, then scripted by
the test (it calls the device with whatever it likes, or writes raw Engine.IO messages).

``hostile_client(tmp_path)`` yields ``(server, client)`` with the client registered;
on exit the client is stopped and the server closed. Every wait is scaled
(tests/waiting.py); nothing sleeps blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import socketio
from aiohttp import web

from client.backoff import Backoff
from client.config import Settings
from client.device import detect_device
from client.protocol import EV_HEARTBEAT, EV_REGISTER, DeviceRegistered, Limits
from client.session import DistributedClient
from tests.server_harness import LoopThread
from tests.waiting import scale_waits, scaled, wait_until

ANSWER_TIMEOUT = 20.0


class HostileServer:
    """Answers ``device:register`` and heartbeats; the test drives the rest."""

    def __init__(self, loop: LoopThread, task: str = "synthetic") -> None:
        self.loop = loop
        self.task = task
        # It reads only small messages; what it sends is not limited by its own settings.
        self.sio = socketio.AsyncServer(async_mode="aiohttp")
        self.app = web.Application()
        self.sio.attach(self.app)
        self.sid: str | None = None
        self.connects = 0
        self.registrations = 0
        self.heartbeats = 0
        self.sio.on("connect", self._on_connect)
        self.sio.on(EV_REGISTER, self._on_register)
        self.sio.on(EV_HEARTBEAT, self._on_heartbeat)
        self.sio.on("*", self._on_other)
        self.runner = web.AppRunner(self.app)
        self.port = loop.run(self._start())

    async def _start(self) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def _on_connect(self, sid: str, environ: Any, auth: Any = None) -> None:
        self.connects += 1

    async def _on_register(self, sid: str, payload: Any) -> dict[str, Any]:
        self.sid = sid
        self.registrations += 1
        return DeviceRegistered(
            device_id=payload["deviceId"],
            heartbeat_interval_sec=0.2,
            server_version="hostile",
            limits=Limits(),
            task=self.task,
            global_version=None,
        ).to_wire()

    async def _on_heartbeat(self, sid: str, payload: Any) -> dict[str, Any]:
        self.heartbeats += 1
        return {"ok": True}

    async def _on_other(self, event: str, sid: str, *args: Any) -> None:
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def acall(self, event: str, payload: Any) -> Any:
        assert self.sid is not None
        return await self.sio.call(event, payload, to=self.sid, timeout=scaled(ANSWER_TIMEOUT))

    def call(self, event: str, payload: Any) -> Any:
        return self.loop.run(self.acall(event, payload), ANSWER_TIMEOUT + 5)

    def send_raw(self, text: str) -> None:
        """One raw Engine.IO message (a Socket.IO packet as text) to the device."""
        assert self.sid is not None
        eio_sid = self.sio.manager.eio_sid_from_sid(self.sid, "/")
        self.loop.run(self.sio.eio.send(eio_sid, text))

    def close(self) -> None:
        self.loop.run(self.runner.cleanup())


@contextlib.contextmanager
def hostile_client(
    tmp_path: Path, task: str = "synthetic"
) -> Iterator[tuple[HostileServer, DistributedClient]]:
    """A real client (data in ``tmp_path / "client-data"``) registered with a
    :class:`HostileServer` that names ``task``."""
    loop = LoopThread()
    server = HostileServer(loop, task)
    client = DistributedClient(
        Settings(server_url=server.url, device_name="victim"),
        device_info=detect_device(probe_gpu=False),
        data_dir=tmp_path / "client-data",
        backoff=Backoff(base=0.05, cap=0.2),
        settings_file=None,
        warm_worker=False,  # nothing trains here: keep torch out of the fast tier
    )
    scale_waits(client)
    client.start()
    try:
        client.wait_for(lambda s: s.connection == "connected", 30)
        wait_until(lambda: server.sid is not None, 10, "registration")
        yield server, client
    finally:
        try:
            stop_within = scaled(30)
            stopped = client.stop(stop_within)
            assert stopped, (
                f"the client did not stop within {stop_within:.0f} s after the test; "
                f"its loop still runs: {still_running(client)}"
            )
        finally:
            server.close()
            loop.close()


def still_running(client: DistributedClient) -> str:
    """The session loop's unfinished tasks, each as ``coroutine (file:line)`` (for a
    failure message; read from another thread, so only a best effort)."""
    where = []
    for task in asyncio.all_tasks(client._loop):
        frames = task.get_stack(limit=1)
        line = f"{frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else "?"
        where.append(f"{task.get_coro().__qualname__} ({line})")  # type: ignore[union-attr]
    return "; ".join(sorted(where)) or "nothing"
