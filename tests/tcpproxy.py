"""A loopback TCP forwarder for fault-injection tests: it can cut every connection on demand.

Contract: :class:`TcpProxy` listens on a free ``127.0.0.1`` port (bound with port 0, the
real port read back, so no race) and forwards each accepted connection to
``(target_host, target_port)`` in both directions, in its own thread with its own asyncio
loop. It only ever touches loopback addresses.

* :meth:`TcpProxy.cut` closes every live connection at once (both sides see a reset or
  EOF) and returns how many were cut; new connections are still accepted afterwards.
  It is thread-safe and may be called from any thread, including a session thread.
* :meth:`TcpProxy.cut_one` closes one live connection chosen with the caller's
  ``random.Random`` (True when there was one to close).
* :meth:`TcpProxy.chaos` starts cutting at random intervals drawn uniformly from
  ``[low, high]`` seconds with a seeded ``random.Random`` until :meth:`TcpProxy.calm`
  (bounded: at most ``max_cuts`` cuts); each cut closes one random connection, or all
  of them with ``every=True``.
* ``bytes_up`` / ``bytes_down`` count what was forwarded client -> target and back;
  ``cuts`` counts cuts that closed at least one connection.
* :meth:`TcpProxy.close` stops everything; the proxy is also a context manager.

Never sleeps blindly: waits are bounded and driven by the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from tests.waiting import scaled

_READ = 64 * 1024
T = TypeVar("T")


class TcpProxy:
    """A cuttable TCP forwarder to one loopback target (see the module docstring)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.cuts = 0
        self._loop = asyncio.new_event_loop()
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._server: asyncio.Server | None = None
        self._chaos: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._run(self._start())

    # -- control (any thread) ----------------------------------------------------------

    def cut(self) -> int:
        """Close every live connection now; the number closed."""
        return self._run(self._cut())

    def cut_one(self, rng: random.Random) -> bool:
        """Close one live connection chosen with ``rng``; False when none is live."""
        return self._run(self._cut_one(rng))

    def chaos(
        self,
        rng: random.Random,
        low: float,
        high: float,
        max_cuts: int = 100,
        *,
        every: bool = False,
    ) -> None:
        """Cut at random intervals in ``[low, high]`` s until :meth:`calm`."""

        async def start() -> None:
            self._chaos = asyncio.ensure_future(self._chaos_loop(rng, low, high, max_cuts, every))

        self._run(start())

    def calm(self) -> None:
        """Stop cutting at random (live connections are kept)."""

        async def stop() -> None:
            if self._chaos is not None:
                self._chaos.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._chaos
                self._chaos = None

        self._run(stop())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.calm()

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            await self._cut()

        self._run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(scaled(10))
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- the loop side -----------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(scaled(10))

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    @staticmethod
    def _abort(link: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        for writer in link:
            # abort(): no graceful FIN handshake, like a dropped link.
            writer.transport.abort()

    async def _cut(self) -> int:
        links, self._links = self._links, []
        for link in links:
            self._abort(link)
        if links:
            self.cuts += 1
        return len(links)

    async def _cut_one(self, rng: random.Random) -> bool:
        if not self._links:
            return False
        link = self._links.pop(rng.randrange(len(self._links)))
        self._abort(link)
        self.cuts += 1
        return True

    async def _chaos_loop(
        self, rng: random.Random, low: float, high: float, limit: int, every: bool
    ) -> None:
        for _ in range(limit):
            await asyncio.sleep(rng.uniform(low, high))
            if every:
                await self._cut()
            else:
                await self._cut_one(rng)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.append(link)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await src.read(_READ):
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                # One side ended: end the other too (no half-open links in tests).
                dst.transport.abort()

        await asyncio.gather(
            pump(reader, up_writer, True), pump(up_reader, writer, False), return_exceptions=True
        )
        if link in self._links:
            self._links.remove(link)
