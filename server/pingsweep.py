"""Coalesced Engine.IO pings: one timer per server instead of one sleeping task per socket.

python-engineio pings each connection from a task of its own that sleeps ``ping_interval``
after the connection's last PONG, at that connection's own phase, and its service task
checks one connection every ``ping_timeout / connections`` seconds: at a fleet of idle
devices each of those is a wakeup of an otherwise sleeping server. :class:`PingSweeper`
does the same work on a grid of ticks.

Contract:

* :class:`DueBuckets` (pure, no I/O, no clock): keys filed by a due time rounded UP to a
  multiple of ``tick`` (never earlier than due); :meth:`DueBuckets.pop_due` returns every
  key whose rounded time is ``<= now``, in filing order, and forgets them. Memory: one
  entry per filed key. :func:`sweep_tick` is the tick for a ping timeout:
  ``min(1 s, ping_timeout / 20)`` -- at most 5 % of the timeout, so the rounding uses at
  most that much of the slack a client keeps beyond the ping interval (the JavaScript
  client waits ``pingInterval + pingTimeout`` for each ping), and at most one wakeup a
  second, whatever the fleet.
* :class:`PingSweeper` serves one python-engineio ``AsyncServer``. :meth:`PingSweeper.adopt`
  (called before Engine.IO's first ``schedule_ping`` of a socket) replaces that socket's
  ``schedule_ping`` with one that files it, as Engine.IO does (only when the previous ping
  cycle completed: ``last_ping`` set, which it then clears), due ``ping_interval`` after
  the PONG. One task per server sleeps until the earliest filed time (nothing per socket
  sleeps); at each tick it sends PING to every due socket that is open and has no ping
  outstanding, in one loop turn, through Engine.IO's own ``send`` (the same packet and
  queue), after setting ``last_ping = time.time()`` exactly as Engine.IO's ``_send_ping``
  does; so a peer gets a ping at most ``ping_interval + tick`` after its last PONG. Each
  ping files a check due ``ping_timeout`` later: a socket still without its PONG then is
  checked with Engine.IO's ``check_ping_timeout`` (which closes it when past the timeout,
  else it is checked again a tick later), so a peer that stops answering pings is closed
  at most ``ping_interval + ping_timeout + 2 × tick`` after its last PONG. It replaces
  Engine.IO's service task (the owner turns that off): besides those checks, it removes
  closed sockets from Engine.IO's table at most every ``ping_timeout`` (at a tick).
  Memory: at most one filed ping per socket that ponged within the last ``ping_interval``
  and one check chain per outstanding ping (O(devices)). An exception while pinging or
  checking one socket is logged and the sweep goes on. :meth:`PingSweeper.stop` ends the
  task. Counters: :attr:`PingSweeper.pings_sent`, :attr:`PingSweeper.sweeps`.
* It never reads or writes the network itself: Engine.IO's writer sends the PING, or its
  owner's :attr:`PingSweeper.write` when set (a hook that writes the same PING text frame,
  :data:`PING_TEXT`, straight to a socket whose writer is idle, and says False to have it
  queued through Engine.IO's ``send`` as before). It relies on python-engineio private
  names that its owner checks once (:func:`missing_names`) before using it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import engineio.async_socket
import engineio.packet

__all__ = [
    "PING_TEXT",
    "DueBuckets",
    "PingSweeper",
    "StraightWriter",
    "missing_names",
    "sweep_tick",
]

log = logging.getLogger(__name__)

#: The longest tick (seconds), and ticks per ping timeout.
MAX_TICK = 1.0
TICKS_PER_TIMEOUT = 20

#: The attributes of an Engine.IO socket the sweeper reads or writes.
_SOCKET_ATTRIBUTES = ("sid", "last_ping", "closing", "closed")
_SOCKET_METHODS = ("schedule_ping", "check_ping_timeout", "send")
#: A timer fires this much after a bucket's time, so the clock has surely passed it.
_MARGIN = 0.001
#: Engine.IO's PING packet as a websocket text frame (what its writer sends for it).
PING_TEXT: str = engineio.packet.Packet(engineio.packet.PING).encode()

#: ``write(socket, text)``: the text frame written straight (True), or not (False: queue it).
StraightWriter = Callable[[Any, str], Awaitable[bool]]


def sweep_tick(ping_timeout: float) -> float:
    """The sweeper's tick (seconds) for Engine.IO's ``ping_timeout``."""
    return min(MAX_TICK, ping_timeout / TICKS_PER_TIMEOUT)


class DueBuckets:
    """Keys filed by due time, rounded up to a multiple of ``tick`` (pure)."""

    def __init__(self, tick: float) -> None:
        if not tick > 0:
            raise ValueError(f"tick must be positive, got {tick!r}")
        self.tick = tick
        self._buckets: dict[int, list[str]] = {}
        self._order: list[int] = []  # heap of the bucket indices in _buckets

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._buckets.values())

    def add(self, key: str, due: float) -> float:
        """File ``key`` at ``due`` rounded up to the tick; the rounded time."""
        index = math.ceil(due / self.tick)
        keys = self._buckets.get(index)
        if keys is None:
            self._buckets[index] = keys = []
            heapq.heappush(self._order, index)
        keys.append(key)
        return index * self.tick

    def next_due(self) -> float | None:
        """The earliest rounded time filed; None when nothing is."""
        return self._order[0] * self.tick if self._order else None

    def pop_due(self, now: float) -> list[str]:
        """Every key whose rounded time is ``<= now`` (earliest first), forgotten."""
        due: list[str] = []
        while self._order and self._order[0] * self.tick <= now:
            due.extend(self._buckets.pop(heapq.heappop(self._order)))
        return due


def missing_names(eio: Any) -> list[str]:
    """The python-engineio names :class:`PingSweeper` relies on that ``eio`` (an
    ``engineio.AsyncServer``) or this python-engineio lacks."""
    cls = engineio.async_socket.AsyncSocket
    missing = [
        f"AsyncSocket.{name}" for name in _SOCKET_METHODS if not callable(getattr(cls, name, None))
    ]
    if not isinstance(getattr(engineio.packet, "PING", None), int):
        missing.append("engineio.packet.PING")
    if not isinstance(getattr(eio, "sockets", None), dict):
        missing.append("AsyncServer.sockets")
    if not isinstance(getattr(eio, "start_service_task", None), bool):
        missing.append("AsyncServer.start_service_task")
    for name in ("ping_interval", "ping_timeout"):
        if not isinstance(getattr(eio, name, None), int | float):
            missing.append(f"AsyncServer.{name}")
    if not missing:
        probe = cls(eio, "probe")  # a socket never connected: no I/O, no task
        missing += [f"AsyncSocket().{a}" for a in _SOCKET_ATTRIBUTES if not hasattr(probe, a)]
    return missing


class PingSweeper:
    """Engine.IO's pings and ping checks for the sockets of ``eio``, on a grid of ticks."""

    def __init__(self, eio: Any) -> None:
        self._eio = eio
        self.tick = sweep_tick(eio.ping_timeout)
        self._pings = DueBuckets(self.tick)
        self._checks = DueBuckets(self.tick)
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._target: float | None = None  # the time the task sleeps until
        self._next_cleanup = 0.0
        #: PING packets queued since construction.
        self.pings_sent = 0
        #: Ticks at which the sweeper woke since construction.
        self.sweeps = 0
        #: The owner's straight writer of a PING (None: every PING goes through Engine.IO's
        #: ``send``); see the module.
        self.write: StraightWriter | None = None

    def adopt(self, socket: Any) -> None:
        """Take over ``socket``'s ping cycle (before Engine.IO schedules its first ping)."""

        def schedule_ping() -> None:
            # As Engine.IO's: only when the previous ping cycle completed.
            if socket.last_ping:
                socket.last_ping = None
                self._file(self._pings, socket.sid, time.time() + self._eio.ping_interval)

        socket.schedule_ping = schedule_ping
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """End the sweeper's task (a later :meth:`adopt` starts it again)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _file(self, buckets: DueBuckets, sid: str, due: float) -> None:
        at = buckets.add(sid, due)
        if (self._target is None or at < self._target) and self._wake and not self._wake.done():
            self._wake.set_result(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            dues = [t for t in (self._pings.next_due(), self._checks.next_due()) if t is not None]
            self._target = min(dues) if dues else None
            self._wake = loop.create_future()
            timer = None
            if self._target is not None:
                delay = max(0.0, self._target - time.time()) + _MARGIN
                timer = loop.call_later(delay, self._wake.set_result, None)
            try:
                await self._wake
            finally:
                if timer is not None:
                    timer.cancel()
            self._target = None
            try:
                await self._sweep(time.time())
            except Exception:  # never let one bad sweep end every later ping
                log.exception("ping sweep failed")

    async def _sweep(self, now: float) -> None:
        due_pings = self._pings.pop_due(now)
        due_checks = self._checks.pop_due(now)
        if not due_pings and not due_checks:
            return
        self.sweeps += 1
        sockets = self._eio.sockets
        for sid in due_pings:
            socket = sockets.get(sid)
            if socket is None or socket.closing or socket.closed or socket.last_ping:
                continue
            try:
                socket.last_ping = time.time()  # as Engine.IO's _send_ping
                write = self.write
                if write is None or not await write(socket, PING_TEXT):
                    await socket.send(engineio.packet.Packet(engineio.packet.PING))
                self.pings_sent += 1
                self._file(self._checks, sid, socket.last_ping + self._eio.ping_timeout)
            except Exception:
                log.exception("could not ping %s", sid)
        for sid in due_checks:
            socket = sockets.get(sid)
            if socket is None or socket.closing or socket.closed or not socket.last_ping:
                continue  # gone, or it answered
            try:
                if await socket.check_ping_timeout():
                    self._file(self._checks, sid, now + self.tick)  # not past it yet
            except Exception:
                log.exception("could not check the ping of %s", sid)
        if now >= self._next_cleanup:  # as Engine.IO's service task
            self._next_cleanup = now + self._eio.ping_timeout
            for socket in list(sockets.values()):
                if socket.closed:
                    sockets.pop(socket.sid, None)
