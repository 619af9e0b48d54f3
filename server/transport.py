"""The server's Socket.IO transport: python-socketio's ``AsyncServer``, tuned for a fleet.

Contract:

* :func:`transport_timing` derives Engine.IO's ping interval and ping timeout from the
  device heartbeat interval (pure): the transport ping is made rare because the devices'
  own heartbeats (acknowledged, every ``heartbeat_interval``) already prove liveness, and
  every received packet -- a heartbeat included -- resets Engine.IO's read deadline on
  both sides. Promises: interval ``6 × heartbeat_interval`` and timeout ``2 ×`` it,
  each clamped between Engine.IO's defaults (25 s / 20 s) and 120 s / 60 s (60 s / 20 s
  at the default 10 s heartbeat); a peer that vanishes without closing its TCP connection
  is dropped at most ``ping_interval + ping_timeout`` seconds (80 s by default, 180 s at
  most) after the last packet it sent (:attr:`TransportTiming.dead_peer_bound`), by
  Engine.IO's read deadline; the registry has marked it stale before
  (``3 × heartbeat_interval``). A client that only counts pings (socket.io's JavaScript
  client) waits the same interval + timeout for one, which the server keeps.
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

It performs no I/O of its own beyond python-socketio's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import socketio

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


class DeviceServer(socketio.AsyncServer):  # type: ignore[misc]
    """``socketio.AsyncServer`` that handles ``inline_events`` inline (see the module)."""

    def __init__(self, *, inline_events: Iterable[str], **kwargs: Any) -> None:
        super().__init__(async_handlers=True, **kwargs)
        # Engine.IO's message handler (python-socketio's dispatch) in the read loop: see the
        # module for why nothing slow is awaited there.
        self.eio.async_handlers = False
        self._inline = frozenset(inline_events)
        if not all(callable(getattr(socketio.AsyncServer, name, None)) for name in _HOOKS):
            log.warning("this python-socketio has no %s: every event runs in its own task", _HOOKS)
            self._inline = frozenset()
        #: Events handled inline since construction.
        self.inline_handled = 0

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
