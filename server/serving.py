"""The port both servers serve devices on: the single-process :mod:`server.app` and a cluster
worker (:mod:`server.cluster.worker`). Contract: :func:`device_server` builds the
Socket.IO server with the configured message limit and the transport timing derived from
the heartbeat interval (heartbeats handled inline); :func:`tls_context` is the TLS context
of ``certfile``/``keyfile`` (None without them); :func:`bind_socket` binds a non-blocking
socket (``SO_REUSEADDR``, and ``SO_REUSEPORT`` when asked) without listening, so a port in
use is reported before anything else is done; :func:`serve_on` listens on it and serves an
aiohttp application (HTTPS and WSS with a TLS context) -- and, as the process now becomes
a long-lived server of many connections, raises the garbage collector's thresholds
(:data:`GC_THRESHOLDS`, process-wide; see there why) and keeps the transfer buffers'
memory between chunks (:func:`client.transfer_memory.keep_transfer_buffers`, process-
wide); :func:`close_serving` disconnects the given devices, shuts Socket.IO down and
releases the port, every step bounded in time. Each raises :class:`StartupError` (one
line) when it cannot; :func:`bind_socket` never leaves a socket open when it raises.
:func:`run_server` runs a server's main coroutine to completion on uvloop's event loop
where uvloop is installed (Linux and macOS), else on asyncio's own (:func:`loop_factory`
says which): uvloop runs the loop's own turn in C, which cuts the server's CPU per
heartbeat by ~15-30 % at a 10 s interval (docs/benchmarks.md, "Server capacity"); only the
servers use it, the client stays on asyncio.
:func:`wait_until_stopped` is how both wait for a signal or the federation's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from client.protocol import events as ev
from client.transfer_memory import keep_transfer_buffers
from server.config import ServerConfig
from server.tls import TLSConfigError, server_ssl_context
from server.transport import DeviceServer, transport_timing

__all__ = [
    "GC_THRESHOLDS",
    "INLINE_EVENTS",
    "StartupError",
    "bind_socket",
    "close_serving",
    "device_server",
    "loop_factory",
    "run_server",
    "serve_on",
    "tls_context",
    "wait_until_stopped",
]

log = logging.getLogger(__name__)

#: The collector's thresholds once serving (CPython's default: 700, 10, 10). Each
#: connection keeps hundreds of long-lived objects, and with the default thresholds the
#: allocations of heartbeats trigger full collections that walk all of them: at 8,000
#: devices these stalled the event loop for over a second (heartbeat ack p99 1.2-1.6 s;
#: 42-159 ms with these, and 20 % less CPU per heartbeat: docs/benchmarks.md, "Server
#: capacity"). Garbage in reference cycles is then freed in larger batches (at most
#: ~100,000 objects wait), which costs a few MB.
GC_THRESHOLDS = (100_000, 50, 1_000)

#: Events handled in the connection's read loop, not in a task each (server.transport).
INLINE_EVENTS = frozenset({ev.HEARTBEAT.name})


T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """``uvloop.new_event_loop`` when uvloop can be imported (it is a dependency wherever
    it builds: not on Windows), else ``asyncio.new_event_loop``."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_server(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop of :func:`loop_factory`."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


async def wait_until_stopped(stop: asyncio.Event, finished: asyncio.Event | None) -> bool:
    """Wait for ``stop`` (set by SIGTERM/SIGINT) or ``finished`` (the federation's end, when
    the server exits once done; None: it does not); True when it was the end. Logs which."""
    waiters = [asyncio.create_task(stop.wait())]
    if finished is not None:
        waiters.append(asyncio.create_task(finished.wait()))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if stop.is_set():
        log.info("stopping on signal")
        return False
    log.info("the federation is finished; exiting (--exit-when-done)")
    return True


class StartupError(Exception):
    """The server cannot start (bad task, unusable state dir, port in use); one line."""


def device_server(config: ServerConfig, **options: Any) -> DeviceServer:
    """The Socket.IO server for devices (``options``: more python-socketio settings)."""
    timing = transport_timing(config.heartbeat_interval)
    return DeviceServer(
        # Cheap, frequent and never awaiting I/O: run in the connection's read loop.
        inline_events=INLINE_EVENTS,
        async_mode="aiohttp",
        max_http_buffer_size=config.max_message_bytes,
        # The devices' heartbeats prove liveness; the transport ping is rare.
        ping_interval=timing.ping_interval,
        ping_timeout=timing.ping_timeout,
        logger=False,
        engineio_logger=False,
        **options,
    )


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The TLS context of ``certfile``/``keyfile``; None when either is not set."""
    if config.certfile is None or config.keyfile is None:
        return None
    try:
        return server_ssl_context(config.certfile, config.keyfile)
    except TLSConfigError as exc:
        raise StartupError(str(exc)) from None


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking socket bound to ``host:port`` (``port=0``: a free one), not listening."""
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc}") from None
    return sock


async def serve_on(
    app: web.Application,
    sock: socket.socket,
    ssl_context: ssl.SSLContext | None,
    *,
    backlog: int,
    where: str,
) -> web.AppRunner:
    """Listen on the bound ``sock`` and serve ``app`` (connections are taken from here on);
    its runner. ``where`` names the port in the error."""
    gc.set_threshold(*GC_THRESHOLDS)
    keep_transfer_buffers()
    try:
        sock.listen(backlog)
    except OSError as exc:
        raise StartupError(f"cannot listen on {where}: {exc}") from None
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    return runner


async def close_serving(sio: DeviceServer, sids: list[str], runner: web.AppRunner | None) -> None:
    """Disconnect ``sids``, shut Socket.IO down, release the port; each step bounded."""
    if sids:
        await asyncio.wait([asyncio.ensure_future(sio.disconnect(sid)) for sid in sids], timeout=5)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(sio.shutdown(), 5)
    if runner is not None:
        await runner.cleanup()
