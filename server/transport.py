"""The server's Socket.IO transport: python-socketio's ``AsyncServer``, tuned for a fleet.

Contract:

* :func:`transport_timing` derives Engine.IO's ping interval and ping timeout from the
  device heartbeat interval (pure): the transport ping is made rare because the devices'
  own heartbeats (acknowledged, every ``heartbeat_interval``) already prove liveness, and
  every received packet -- a heartbeat included -- resets Engine.IO's read deadline on
  both sides (on the server, a heartbeat read inline by the lean path below resets it only
  once half of it has passed). Promises: interval ``6 × heartbeat_interval`` and timeout
  ``2 ×`` it, each clamped between Engine.IO's defaults (25 s / 20 s) and 120 s / 60 s (60
  s / 20 s at the default 10 s heartbeat); a peer that vanishes without closing its TCP
  connection is dropped at most ``ping_interval + ping_timeout`` seconds (80 s by default,
  180 s at most) after the last packet it sent (:attr:`TransportTiming.dead_peer_bound`),
  and by the server not before half of that, by Engine.IO's read deadline; the registry
  has marked it stale before (``3 × heartbeat_interval``). A client that only counts pings
  (socket.io's JavaScript client) waits the same interval + timeout for one; the server
  pings at most ``ping_interval + tick`` after the last PONG (the ping sweeper below; tick
  ``<= ping_timeout / 20``), well within it.
* :class:`DeviceServer` is ``socketio.AsyncServer`` that runs the handlers of the events
  in ``inline_events`` (the cheap ones: ``device:heartbeat``) directly in the connection's
  Engine.IO read loop instead of one new asyncio task per event (python-socketio's
  ``async_handlers=True``, kept for every other event). An inline handler must never
  await anything slow: while it runs, that connection's later packets wait. A long
  handler (``weights:submit``, ``blob:chunk``) still runs in its own task, so it never
  holds back the heartbeats of its connection. It overrides one private method of
  python-socketio (``AsyncServer._handle_event``, calling ``_handle_event_internal``);
  when either is missing (a python-socketio release that renamed them) it logs one
  warning and every event goes through the library's own path (behaviour unchanged,
  only slower); :attr:`DeviceServer.inline_handled` counts events handled inline.
* One level down, :class:`DeviceServer` turns off Engine.IO's own ``async_handlers``
  (python-engineio starts one more task per received message for python-socketio's
  ``_handle_eio_message``): that method runs in the connection's read loop too, and it
  awaits nothing slow -- a non-inline event is handed to its own task as above (binary
  attachments are collected first, in memory), an ack runs python-socketio's callback
  (``call``'s, which sets a future), CONNECT runs :meth:`server.handlers.DeviceNamespace.on_connect`
  (a token check and a dict entry, no I/O) and DISCONNECT its ``on_disconnect`` (no I/O
  awaited); either can only hold back the packets of its own connection, which the peer
  sends after the CONNECT is answered or not at all after a DISCONNECT. Each connection's
  packets are thus handled in the order they arrived.
* **The ping sweeper** (``ping_sweep=True``, the default): Engine.IO's pings and ping
  checks are done by one :class:`server.pingsweep.PingSweeper` per server (one timer, at
  most one wakeup a tick, 1 s at the default timing) instead of one sleeping task per
  socket and Engine.IO's service task (turned off): DeviceServer hands it each socket from
  python-socketio's ``_handle_eio_connect`` (before Engine.IO schedules the first ping).
  Each socket is pinged ``ping_interval`` after its last PONG rounded up to the tick (the
  same PING packet through Engine.IO's ``send``, ``last_ping`` set as Engine.IO does), all
  due sockets in one loop turn; one that has not answered ``ping_timeout`` later is closed
  by Engine.IO's ``check_ping_timeout`` (reason ``ping timeout``) within two ticks of that,
  i.e. at most ``ping_interval + ping_timeout + 2 × tick`` after its last PONG (a peer that
  sends nothing at all is dropped by the read deadline first, within
  :attr:`TransportTiming.dead_peer_bound`, as before). Closed sockets leave Engine.IO's
  table at a tick at most every ``ping_timeout``, as its service task did. A PONG is handled
  in the lean path's websocket read when it can be (below), else in Engine.IO's read loop,
  both calling the socket's ``schedule_ping``. With the lean path, the sweeper's PING (the
  same text frame) is written straight to the socket's websocket when its writer is idle,
  as an ack is (see below; counted in :attr:`DeviceServer.pings_written`), else queued
  through Engine.IO's ``send``. It relies on private python-engineio names
  (:func:`server.pingsweep.missing_names`) and python-socketio's ``_handle_eio_connect``,
  checked once at construction: when one is missing it logs one warning and Engine.IO pings
  each socket itself (behaviour unchanged, only costlier).
  :attr:`DeviceServer.ping_sweeper` is the sweeper, None without it.
* **The lean path** (``lean=True``, the default): python-socketio's
  ``_handle_eio_message`` is overridden so that a text packet that
  :func:`server.eventframe.match_acked_event` recognises as an acked EVENT of an inline
  event on the default namespace (no binary packet of the connection half-received) is
  parsed once (python-socketio's JSON module; python-engineio's, with its ``parse_int``,
  through one decoder built once instead of one per message) and its handler run at once:
  the default namespace class's ``trigger_event``, called directly when no handler
  registered with ``on`` would take the event before it (python-socketio's resolution
  order), else through python-socketio's ``_trigger_event`` -- the same handler either
  way, so the same validation and the same ``ErrorAck`` for every bad input -- and its
  ack encoded once (:func:`server.eventframe.ack_packet`: byte for byte the library's;
  the plain ``{"ok": true}`` answer is a constant there). The ack is written
  straight to the connection's websocket (aiohttp's ``send_str``) only when the
  connection's Engine.IO writer is idle -- nothing queued, nothing taken and not yet
  written (:class:`WriterQueue`, the queue Engine.IO creates through ``create_queue``) --
  the socket is upgraded, not upgrading or closing, and Engine.IO's ping check passes
  (``check_ping_timeout``, which closes a peer that missed its pong, as Engine.IO's own
  send does; awaited only while a ping is outstanding, ``last_ping`` set, as without one
  it passes); otherwise it is queued the library's way. So an ack never overtakes a packet
  queued for the same connection before it, and packets are still handled in arrival
  order. On a websocket the lean path runs one level lower still: python-engineio's
  websocket driver (replaced by a subclass, see below) hands each text message it reads
  to :meth:`DeviceServer._read_inline`, which handles a matched one right there and reads
  on, without returning it to Engine.IO's read loop (no task, timer and packet decode per
  message there); any other message is returned to that loop as before, so arrival order
  holds. Engine.IO's read deadline (``ping_interval + ping_timeout``) restarts only when
  its loop gets a message, so a read hands messages inline only during the first half of
  that deadline; past it, the next message goes through the loop (and the lean path from
  there). A connection is thus still dropped at most ``ping_interval + ping_timeout``
  after its last packet, and never before half of that. With the ping sweeper, a PONG read
  within that half is handled there too, as Engine.IO's loop would (the socket's
  ``schedule_ping``, i.e. the sweeper files its next ping; counted in
  :attr:`DeviceServer.pongs_inline`); without it pongs always reach the loop. A
  message over ``max_http_buffer_size`` is returned to the loop, which refuses it as
  before; an exception from an inline handler is logged and reading goes on (as
  Engine.IO's loop does). Everything else -- other events, binary packets, other
  namespaces, an event without an ack id, JSON that does not parse, a connection not (or
  no longer) on the namespace, an answer with binary parts -- goes through the library's
  path unchanged.
  A direct write that fails (the connection is closing) is dropped, as Engine.IO's writer
  drops it; while the write waits for the socket to drain, that connection's later
  packets wait (back-pressure on a peer that does not read). It relies on private names of
  python-socketio and python-engineio (``_LEAN_HOOKS``, ``AsyncServer._binary_packet``,
  the websocket driver in ``engineio.AsyncServer._async``, which it replaces with a
  subclass in this server's own copy of the table), all checked once at construction:
  when one is missing it logs one warning and every event goes the library's way
  (behaviour unchanged, only slower). The driver's aiohttp response (its ``_sock``) and
  the Engine.IO socket's state are read at each ack: without them the ack is queued the
  library's way. Every other packet of one frame the server sends (the ack of an event
  handled the library's way, e.g. ``weights:submit``'s; an event without binary parts)
  goes the same way as a lean ack (straight when the writer is idle, else queued); a
  packet with binary parts (several frames that must follow each other) is always
  queued. Counters:
  :attr:`DeviceServer.lean_handled` (events handled by the lean path, also counted in
  ``inline_handled``), :attr:`DeviceServer.read_inline` (those of them handled in the
  driver's read), :attr:`DeviceServer.acks_written` (lean acks written straight) and
  :attr:`DeviceServer.frames_written` (the other packets of one frame written straight).

It performs no I/O of its own beyond python-socketio's, and the lean path's writes of acks
the library would have sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import engineio
import engineio.async_socket
import socketio
from aiohttp import web
from socketio import packet as sio_packet

from server.eventframe import (
    MESSAGE,
    EventPrefixes,
    ack_packet,
    array_loads,
    event_prefixes,
    is_ok_reply,
    match_acked_event,
)
from server.pingsweep import PingSweeper, missing_names

__all__ = ["DeviceServer", "TransportTiming", "transport_timing"]

log = logging.getLogger(__name__)

#: Engine.IO's own defaults (seconds); the derived values never go below them.
DEFAULT_PING_INTERVAL = 25.0
DEFAULT_PING_TIMEOUT = 20.0
#: Heartbeats per transport ping, and per ping timeout.
PING_EVERY_HEARTBEATS = 6
PING_TIMEOUT_HEARTBEATS = 2
#: The derived values never go above these (seconds), however long the heartbeat interval.
MAX_PING_INTERVAL = 120.0
MAX_PING_TIMEOUT = 60.0


@dataclass(frozen=True)
class TransportTiming:
    """Engine.IO's ping settings (seconds)."""

    ping_interval: float
    ping_timeout: float

    @property
    def dead_peer_bound(self) -> float:
        """Longest a silent, vanished peer keeps its connection after its last packet."""
        return self.ping_interval + self.ping_timeout


def transport_timing(heartbeat_interval: float) -> TransportTiming:
    """The ping settings for devices heartbeating every ``heartbeat_interval`` seconds."""
    interval = PING_EVERY_HEARTBEATS * heartbeat_interval
    timeout = PING_TIMEOUT_HEARTBEATS * heartbeat_interval
    return TransportTiming(
        ping_interval=min(MAX_PING_INTERVAL, max(DEFAULT_PING_INTERVAL, interval)),
        ping_timeout=min(MAX_PING_TIMEOUT, max(DEFAULT_PING_TIMEOUT, timeout)),
    )


_HOOKS = ("_handle_event", "_handle_event_internal")

#: How a websocket text message carrying a Socket.IO EVENT starts (Engine.IO MESSAGE, 2).
_ENGINEIO_EVENT = MESSAGE + "2"
#: An Engine.IO PONG, as a websocket text message.
_ENGINEIO_PONG = "3"

#: The private names the lean path relies on (python-socketio's and python-engineio's),
#: checked once at construction; a public name's absence would fail just as loudly.
_LEAN_HOOKS: tuple[tuple[type, str], ...] = (
    (socketio.AsyncServer, "_handle_eio_message"),
    (socketio.AsyncServer, "_trigger_event"),
    (socketio.AsyncServer, "_send_packet"),
    (engineio.AsyncServer, "create_queue"),
    (engineio.async_socket.AsyncSocket, "_websocket_handler"),
    (engineio.async_socket.AsyncSocket, "check_ping_timeout"),
)


class WriterQueue(asyncio.Queue[Any]):
    """One connection's outgoing Engine.IO queue that knows when its writer is idle: blocked
    in :meth:`get` on an empty queue, having written everything it took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting = 0

    async def get(self) -> Any:
        self._waiting += 1
        try:
            return await super().get()
        finally:
            self._waiting -= 1

    def writer_idle(self) -> bool:
        """True when nothing is queued and a reader waits (so nothing is being written)."""
        return self._waiting > 0 and self.empty()


def _tracking_driver(base: type, server: DeviceServer) -> type:
    """python-engineio's websocket driver class ``base`` for ``server``: it remembers on the
    Engine.IO socket it serves (the owner of the bound handler it is built with) which
    driver it is, and its :meth:`wait` hands each received text message to
    :meth:`DeviceServer._read_inline` before returning it to Engine.IO's read loop."""

    class TrackedWebSocket(base):  # type: ignore[misc]
        async def __call__(self, environ: dict[str, Any]) -> Any:
            self.fedtray_owner = getattr(self.handler, "__self__", None)
            if self.fedtray_owner is not None:
                self.fedtray_owner.fedtray_websocket = self
            return await super().__call__(environ)

        async def wait(self) -> Any:
            owner = getattr(self, "fedtray_owner", None)
            out = getattr(self, "_sock", None)
            if owner is None or not isinstance(out, web.WebSocketResponse):
                return await super().wait()
            started = time.monotonic()
            while True:
                data = (await out.receive()).data
                if type(data) is str and await server._read_inline(owner, data, started):
                    continue
                if not isinstance(data, bytes | str):
                    raise OSError()  # as the driver's own wait: the connection ended
                return data

    return TrackedWebSocket


class DeviceServer(socketio.AsyncServer):  # type: ignore[misc]
    """``socketio.AsyncServer`` that handles ``inline_events`` inline, and by the lean path
    when ``lean`` (see the module)."""

    def __init__(
        self,
        *,
        inline_events: Iterable[str],
        lean: bool = True,
        ping_sweep: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(async_handlers=True, **kwargs)
        #: The coalesced pinger (None: Engine.IO's own per-socket pings), see the module.
        self.ping_sweeper: PingSweeper | None = None
        if ping_sweep:
            gone = missing_names(self.eio)
            if not callable(getattr(socketio.AsyncServer, "_handle_eio_connect", None)):
                gone.append("socketio.AsyncServer._handle_eio_connect")
            if gone:
                log.warning(
                    "this python-engineio has no %s: Engine.IO pings each socket itself",
                    ", ".join(gone),
                )
            else:
                self.ping_sweeper = PingSweeper(self.eio)
                self.eio.start_service_task = False  # the sweeper checks the pings
        # Engine.IO's message handler (python-socketio's dispatch) in the read loop: see the
        # module for why nothing slow is awaited there.
        self.eio.async_handlers = False
        self._inline = frozenset(inline_events)
        if not all(callable(getattr(socketio.AsyncServer, name, None)) for name in _HOOKS):
            log.warning("this python-socketio has no %s: every event runs in its own task", _HOOKS)
            self._inline = frozenset()
        #: Events handled inline since construction (by either path).
        self.inline_handled = 0
        #: Events handled by the lean path since construction (a part of ``inline_handled``).
        self.lean_handled = 0
        #: Acks of the lean path written straight to the websocket since construction.
        self.acks_written = 0
        #: Other packets of one frame (acks of the library's path, events without binary
        #: parts) written straight to the websocket since construction.
        self.frames_written = 0
        #: Events of the lean path handled in the websocket driver's read, never reaching
        #: Engine.IO's read loop (a part of ``lean_handled``).
        self.read_inline = 0
        #: Engine.IO PONGs handled in the websocket driver's read (with the ping sweeper).
        self.pongs_inline = 0
        #: The ping sweeper's PINGs written straight to an idle websocket (lean path).
        self.pings_written = 0
        self._inline_window = 0.0
        self._lean_prefixes: EventPrefixes = ()
        if lean and self._inline:
            missing = self._lean_missing()
            if missing:
                log.warning(
                    "this python-socketio/python-engineio has no %s: %s go the library's way",
                    ", ".join(missing),
                    ", ".join(sorted(self._inline)),
                )
            else:
                self._install_lean()

    # --------------------------------------------------------------- the ping sweeper

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> Any:
        # Engine.IO calls this before its first schedule_ping of the socket.
        socket = self.eio.sockets.get(eio_sid)
        if self.ping_sweeper is not None and socket is not None:
            self.ping_sweeper.adopt(socket)
        return await super()._handle_eio_connect(eio_sid, environ)

    async def shutdown(self) -> None:
        await super().shutdown()
        if self.ping_sweeper is not None:
            await self.ping_sweeper.stop()

    # --------------------------------------------------------------- the lean path

    def _lean_missing(self) -> list[str]:
        """The names the lean path relies on that this python-socketio/-engineio lacks."""
        missing = [
            f"{owner.__name__}.{name}"
            for owner, name in _LEAN_HOOKS
            if not callable(getattr(owner, name, None))
        ]
        if not isinstance(getattr(self, "_binary_packet", None), dict):
            missing.append("AsyncServer._binary_packet")
        for name in ("handlers", "namespace_handlers"):
            if not isinstance(getattr(self, name, None), dict):
                missing.append(f"AsyncServer.{name}")
        if not isinstance(getattr(self.eio, "sockets", None), dict):
            missing.append("engineio.AsyncServer.sockets")
        drivers = getattr(self.eio, "_async", None)
        if not isinstance(drivers, dict) or not isinstance(drivers.get("websocket"), type):
            missing.append("engineio.AsyncServer._async['websocket']")
        if not callable(getattr(self.packet_class, "data_is_binary", None)):
            missing.append("Packet.data_is_binary")
        for name in ("ping_interval", "ping_timeout", "max_http_buffer_size"):
            if not isinstance(getattr(self.eio, name, None), int | float):
                missing.append(f"engineio.AsyncServer.{name}")
        json_module = getattr(self.packet_class, "json", None)
        if not (
            callable(getattr(json_module, "loads", None))
            and callable(getattr(json_module, "dumps", None))
        ):
            missing.append("Packet.json")
        return missing

    def _install_lean(self) -> None:
        """Take over Engine.IO's queues and websocket driver (this server's own copies)."""
        self._lean_prefixes = event_prefixes(self._inline)
        self._loads: Callable[[str], Any] = array_loads(self.packet_class.json)
        self._dumps: Callable[..., str] = self.packet_class.json.dumps
        self.eio.create_queue = WriterQueue
        drivers = dict(self.eio._async)
        drivers["websocket"] = _tracking_driver(drivers["websocket"], self)
        self.eio._async = drivers
        # Messages are read inline for half of Engine.IO's read deadline, then one goes to
        # its read loop, which restarts the deadline (see the module).
        self._inline_window = (self.eio.ping_interval + self.eio.ping_timeout) / 2
        if self.ping_sweeper is not None:
            self.ping_sweeper.write = self._ping_straight

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        if self._lean_prefixes and eio_sid not in self._binary_packet:
            match = match_acked_event(data, self._lean_prefixes)
            if match is not None and await self._handle_lean(eio_sid, data, *match):
                return
        await super()._handle_eio_message(eio_sid, data)

    async def _read_inline(self, socket: Any, data: str, started: float) -> bool:
        """Handle a websocket text message of ``socket`` by the lean path inside the
        driver's read, without returning it to Engine.IO's read loop; False (before doing
        anything) to return it there."""
        if time.monotonic() - started >= self._inline_window:
            return False
        if data == _ENGINEIO_PONG and self.ping_sweeper is not None:
            # What Engine.IO's loop does with a PONG: schedule the next ping (the sweeper's).
            socket.schedule_ping()
            self.pongs_inline += 1
            return True
        if (
            not data.startswith(_ENGINEIO_EVENT)
            or len(data) > self.eio.max_http_buffer_size
            or not getattr(socket, "upgraded", False)
            or getattr(socket, "upgrading", True)
            or getattr(socket, "closing", True)
            or getattr(socket, "closed", True)
        ):
            return False
        eio_sid = getattr(socket, "sid", None)
        if not isinstance(eio_sid, str) or eio_sid in self._binary_packet:
            return False
        message = data[1:]
        match = match_acked_event(message, self._lean_prefixes)
        if match is None:
            return False
        try:
            handled = await self._handle_lean(eio_sid, message, *match)
        except Exception:  # as Engine.IO's read loop: log it and read on
            log.exception("bug while handling a message from %s", eio_sid)
            return True
        if handled:
            self.read_inline += 1
        return handled

    async def _handle_lean(self, eio_sid: str, data: str, ack_id: int, start: int) -> bool:
        """Handle a matched packet; False (before doing anything) to leave it to the library."""
        try:
            args = self._loads(data[start:])
        except ValueError:
            return False  # the library raises the same, where it is logged
        if type(args) is not list or not args or args[0] not in self._inline:
            return False
        sid = self.manager.sid_from_eio_sid(eio_sid, "/")
        if sid is None or not self.manager.is_connected(sid, "/"):
            return False  # the library logs it and drops the event
        self.inline_handled += 1
        self.lean_handled += 1
        event = args[0]
        namespace = self.namespace_handlers.get("/")
        if namespace is not None and not self._event_handler_for(event):
            # What _trigger_event would do (no handler registered with ``on``): the
            # namespace's own dispatch, without the library's lookups.
            answer = await namespace.trigger_event(event, sid, *args[1:])
        else:
            answer = await self._trigger_event(event, "/", sid, *args[1:])
        if answer is self.not_handled:
            return True
        reply = [] if answer is None else list(answer) if isinstance(answer, tuple) else [answer]
        if not is_ok_reply(reply) and self.packet_class.data_is_binary(reply):
            await self._send_packet(
                eio_sid, self.packet_class(sio_packet.ACK, namespace="/", id=ack_id, data=reply)
            )
            return True
        await self._send_ack(eio_sid, ack_packet(ack_id, reply, self._dumps))
        return True

    def _event_handler_for(self, event: str) -> bool:
        """True when a handler registered with ``on`` (this namespace's or ``*``) would
        take ``event`` before the namespace class (python-socketio's resolution order)."""
        handlers = self.handlers
        if not handlers:
            return False
        mine = handlers.get("/", {})
        anywhere = handlers.get("*", {})
        return bool(event in mine or "*" in mine or event in anywhere or "*" in anywhere)

    @staticmethod
    def _idle_websocket(socket: Any) -> web.WebSocketResponse | None:
        """The websocket of Engine.IO ``socket`` when a frame may be written straight to it
        (its writer idle, nothing queued, nothing unsent in its transport; upgraded, not
        upgrading or closing); else None."""
        queue = getattr(socket, "queue", None)
        out = getattr(getattr(socket, "fedtray_websocket", None), "_sock", None)
        transport = getattr(getattr(out, "_writer", None), "transport", None)
        if (
            not isinstance(out, web.WebSocketResponse)
            or not isinstance(queue, WriterQueue)
            or not queue.writer_idle()
            # Bytes the peer has not taken yet: the write could wait on them (a peer that
            # stopped reading), where the library's queue never makes the sender wait.
            or transport is None
            or transport.get_write_buffer_size() != 0
            or not getattr(socket, "upgraded", False)
            or getattr(socket, "upgrading", True)
            or getattr(socket, "closing", True)
            or getattr(socket, "closed", True)
        ):
            return None
        return out

    @staticmethod
    async def _write(out: web.WebSocketResponse, text: str, what: str, eio_sid: str) -> bool:
        """Write one text frame; False when it could not be (dropped, as Engine.IO's writer
        drops what it cannot write: the connection is going away)."""
        try:
            await out.send_str(text)
        except Exception as exc:
            log.debug("could not write %s to %s: %s", what, eio_sid, exc)
            return False
        return True

    async def _send_ack(self, eio_sid: str, ack: str, *, lean: bool = True) -> None:
        """Write ``ack`` straight to the connection's websocket when its writer is idle
        (nothing queued before it), else queue it the library's way; counted in
        ``acks_written`` (``lean``: an ack of the lean path) or ``frames_written``."""
        socket = self.eio.sockets.get(eio_sid)
        out = self._idle_websocket(socket)
        if out is None:
            await self.eio.send(eio_sid, ack)
            return
        # Engine.IO's check_ping_timeout passes without a ping outstanding (``last_ping``
        # unset) on an open socket, so it is only awaited with one.
        if getattr(socket, "last_ping", True) and not await socket.check_ping_timeout():
            return  # Engine.IO closed it (as its send would have)
        if await self._write(out, MESSAGE + ack, "an ack", eio_sid):
            if lean:
                self.acks_written += 1
            else:
                self.frames_written += 1

    async def _send_packet(self, eio_sid: str, pkt: Any) -> None:
        # With the lean path, every packet of one frame (an ack or event without binary
        # parts: a weights:submit's ack, ...) goes as a lean ack does (_send_ack: straight
        # to an idle websocket, else queued); one with binary parts (several frames that
        # must stay together) the library's way.
        if not self._lean_prefixes:
            await super()._send_packet(eio_sid, pkt)
            return
        encoded = pkt.encode()
        if isinstance(encoded, str):
            await self._send_ack(eio_sid, encoded, lean=False)
            return
        for part in encoded:
            await self.eio.send(eio_sid, part)

    async def _ping_straight(self, socket: Any, text: str) -> bool:
        """The ping sweeper's writer: ``text`` (a PING) written straight when the socket's
        writer is idle (True, also when the write failed and was dropped); else False."""
        out = self._idle_websocket(socket)
        if out is None:
            return False
        if await self._write(out, text, "a ping", str(getattr(socket, "sid", "?"))):
            self.pings_written += 1
        return True

    # --------------------------------------------------------------- inline, library path

    async def _handle_event(self, eio_sid: str, namespace: str | None, id: Any, data: Any) -> None:
        if not (self._inline and isinstance(data, list) and data and data[0] in self._inline):
            await super()._handle_event(eio_sid, namespace, id, data)
            return
        namespace = namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if sid is None or not self.manager.is_connected(sid, namespace):
            return
        self.inline_handled += 1
        await self._handle_event_internal(self, sid, eio_sid, data, namespace, id)
