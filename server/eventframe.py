"""Socket.IO text frames of the server's lean event path (:mod:`server.transport`), pure.

Contract:

* :func:`match_acked_event` recognises, in one Engine.IO message as python-engineio hands
  it to python-socketio (a ``str`` for a text frame, without Engine.IO's ``4`` prefix), a
  Socket.IO EVENT packet (type ``2``) on the default namespace, with an ack id and no
  binary attachments, whose JSON array starts with the name of one of the given events
  written plainly (``["device:heartbeat"`` exactly, as every Socket.IO client encodes
  it). It returns the ack id (an ``int``, as python-socketio reads it: leading zeros
  dropped) and where the JSON array starts; anything else -- bytes, another packet type, a
  namespace, attachments, no ack id, an ack id of :data:`MAX_ACK_DIGITS` digits or more, an
  event name spelt with spaces or escapes -- is ``None``: the caller leaves it to
  python-socketio, which handles it the same way, only slower. It never parses the JSON
  (the caller does, once), so a match may still be malformed JSON.
* :func:`ack_packet` is the Socket.IO ACK packet of ``reply`` (the ack's arguments) for
  ``ack_id`` on the default namespace, byte for byte what python-socketio's
  ``Packet(ACK, namespace="/", id=ack_id, data=reply).encode()`` gives for data without
  binary parts (``dumps`` is python-socketio's JSON module's, compact separators);
  :data:`MESSAGE` prefixed to it is the websocket text frame python-engineio sends for it.
  The plain positive answer ``[{"ok": True}]`` (``OkAck``'s wire form, exactly: one dict
  whose one key ``"ok"`` is ``True`` itself, not ``1``) is not re-encoded each time: its
  JSON is a constant (:func:`is_ok_reply` says when), the same bytes ``dumps`` gives.

* :func:`array_loads` is a JSON module's ``loads`` for the JSON array a match starts at:
  for python-engineio's module (``loads`` with its ``parse_int``), one decoder built once
  scans the text from its first character, and the decoder's own ``decode`` decides when
  the scan fails or stops before the end -- the same value, or the same error, as the
  module's ``loads`` for a text that starts with ``[``; any other module's ``loads`` as
  it is.

It does no I/O and raises nothing but what ``dumps`` raises on data it cannot encode (and
what ``loads`` raises on a text that is not JSON).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import engineio.json

__all__ = [
    "MAX_ACK_DIGITS",
    "MESSAGE",
    "EventPrefixes",
    "ack_packet",
    "array_loads",
    "event_prefixes",
    "is_ok_reply",
    "match_acked_event",
]

#: Engine.IO's MESSAGE packet type: the first character of a text frame carrying Socket.IO.
MESSAGE = "4"
#: Socket.IO EVENT packet (``2``) in the default namespace, as python-socketio receives it.
_EVENT = "2"
#: Ack ids this long or longer are left to python-socketio (it accepts up to 100 digits).
MAX_ACK_DIGITS = 19

#: The JSON of the reply ``[{"ok": True}]`` as ``dumps`` writes it (compact separators).
_OK_JSON = '[{"ok":true}]'

EventPrefixes = tuple[str, ...]
"""How the JSON array of each matched event starts (``["<name>"``)."""


def event_prefixes(events: Iterable[str]) -> EventPrefixes:
    """The JSON array openings :func:`match_acked_event` looks for, one per event name."""
    return tuple(sorted("[" + json.dumps(name) for name in events))


def match_acked_event(data: object, prefixes: EventPrefixes) -> tuple[int, int] | None:
    """``(ack id, index of the JSON array)`` when ``data`` is an acked EVENT packet of one
    of the events in ``prefixes`` on the default namespace (see the module); else None."""
    if type(data) is not str or not prefixes or not data.startswith(_EVENT):
        return None
    end = 1
    size = len(data)
    while end < size and "0" <= data[end] <= "9":
        end += 1
    digits = end - 1
    if digits == 0 or digits >= MAX_ACK_DIGITS:
        return None  # no ack id (or unacked: a namespace, attachments), or a huge one
    if not data.startswith(prefixes, end):
        return None
    return int(data[1:end]), end


def is_ok_reply(reply: list[Any]) -> bool:
    """True when ``reply`` is exactly ``[{"ok": True}]`` (types checked, not just equality:
    ``[{"ok": 1}]`` compares equal but encodes differently); it has no binary parts."""
    if len(reply) != 1:
        return False
    first = reply[0]
    return type(first) is dict and len(first) == 1 and first.get("ok") is True


def ack_packet(ack_id: int, reply: list[Any], dumps: Callable[..., str]) -> str:
    """The Socket.IO ACK packet answering ``ack_id`` with ``reply`` (see the module)."""
    if is_ok_reply(reply):
        return "3" + str(ack_id) + _OK_JSON
    return "3" + str(ack_id) + dumps(reply, separators=(",", ":"))


def array_loads(module: Any) -> Callable[[str], Any]:
    """``module.loads`` for a JSON text that starts with ``[`` (what the lean path parses),
    with its decoder built once: python-engineio's JSON module calls :func:`json.loads` with
    ``parse_int`` (its ``_safe_int``), which builds a new ``JSONDecoder`` per call. The text
    is scanned once from its first character (no whitespace can precede a ``[`` there);
    when the scan fails or stops before the end, the decoder's own ``decode`` decides (the
    same value, or the same error, as ``loads``). Any other module: its own ``loads``."""
    safe_int = getattr(module, "_safe_int", None)
    if module is not engineio.json or not callable(safe_int):
        own: Callable[[str], Any] = module.loads
        return own
    decoder = json.JSONDecoder(parse_int=safe_int)
    decode: Callable[[str], Any] = decoder.decode
    scan = getattr(decoder, "scan_once", None)  # set by JSONDecoder.__init__
    if not callable(scan):
        return decode

    def loads(text: str) -> Any:
        try:
            value, end = scan(text, 0)
        except StopIteration:
            return decode(text)  # raises json's own error for it
        return value if end == len(text) else decode(text)

    return loads
