"""The lean path's frames (server/eventframe.py), by table, against python-socketio's and
python-engineio's own encoders and decoder."""

from __future__ import annotations

import collections
import json
from typing import Any

import engineio.json
import engineio.packet
import pytest
import socketio.packet

from server.eventframe import (
    MAX_ACK_DIGITS,
    MESSAGE,
    ack_packet,
    array_loads,
    event_prefixes,
    is_ok_reply,
    match_acked_event,
)

HB = event_prefixes({"device:heartbeat"})
BODY = '["device:heartbeat",{"state":"idle"}]'


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("21" + BODY, (1, 2)),
        ("2123" + BODY, (123, 4)),
        ("20" + BODY, (0, 2)),
        ("2007" + BODY, (7, 4)),  # leading zeros: the id python-socketio reads
        ('21["device:heartbeat"]', (1, 2)),  # no payload: matched, the guard refuses it
        ('21["device:heartbeat",{"x"', (1, 2)),  # matched; the caller's parse fails
        ("2" + "9" * (MAX_ACK_DIGITS - 1) + BODY, (int("9" * (MAX_ACK_DIGITS - 1)), 19)),
        ("2" + "9" * MAX_ACK_DIGITS + BODY, None),  # a huge id: the library's
        ("2" + BODY, None),  # no ack id
        ("2/admin,1" + BODY, None),  # a namespace
        ("21-1" + BODY, None),  # attachments
        ("51-1" + BODY, None),  # BINARY_EVENT
        ("31" + BODY, None),  # an ACK
        ("0", None),  # CONNECT
        ("1", None),  # DISCONNECT
        ("2", None),
        ("", None),
        ('21[ "device:heartbeat",{}]', None),  # spelt otherwise: left to the library
        ('21["device:heart\\u0062eat",{}]', None),
        ('21["device:register",{}]', None),  # another event
        ('21["device:heartbeats",{}]', None),
        (("21" + BODY).encode(), None),  # binary frame
        (None, None),
    ],
)
def test_match_acked_event(data: Any, expected: tuple[int, int] | None) -> None:
    assert match_acked_event(data, HB) == expected


@pytest.mark.parametrize("data", ["21" + BODY, "2123" + BODY, "2007" + BODY, "20" + BODY])
def test_a_match_is_what_python_socketio_decodes(data: str) -> None:
    match = match_acked_event(data, HB)
    assert match is not None
    ack_id, start = match
    pkt = socketio.packet.Packet(encoded_packet=data)
    assert pkt.packet_type == socketio.packet.EVENT
    assert pkt.namespace is None and pkt.attachment_count == 0
    assert pkt.id == ack_id
    assert pkt.data == json.loads(data[start:])


def test_no_prefixes_match_nothing() -> None:
    assert match_acked_event("21" + BODY, ()) is None
    assert event_prefixes(["b:x", "a:y"]) == ('["a:y"', '["b:x"')


@pytest.mark.parametrize(
    ("ack_id", "reply"),
    [
        (1, [{"ok": True}]),
        (0, [{"ok": True}]),
        (123456789, [{"ok": False, "code": "bad_request", "message": 'déjà "vu" \n'}]),
        (7, []),
        (8, [None]),
        (9, [{"a": [1, 2.5, None]}, "two"]),
        # Near the constant OK reply: each must be encoded, not taken for it.
        (10, [{"ok": 1}]),
        (11, [{"ok": 1.0}]),
        (12, [{"ok": False}]),
        (13, [{"ok": True, "extra": None}]),
        (14, [{"ok": True}, None]),
        (15, [{"ok": "true"}]),
        (16, [{"OK": True}]),
        (17, [[{"ok": True}]]),
        (10**18, [{"ok": True}]),
    ],
)
def test_ack_packet_is_the_librarys(ack_id: int, reply: list[Any]) -> None:
    dumps = socketio.packet.Packet.json.dumps
    ours = ack_packet(ack_id, reply, dumps)
    library = socketio.packet.Packet(
        socketio.packet.ACK, namespace="/", id=ack_id, data=reply
    ).encode()
    assert ours == library
    frame = engineio.packet.Packet(engineio.packet.MESSAGE, data=library).encode()
    assert MESSAGE + ours == frame


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ([{"ok": True}], True),
        ([{"ok": 1}], False),
        ([{"ok": 1.0}], False),
        ([{"ok": False}], False),
        ([{"ok": None}], False),
        ([{"ok": True, "code": "x"}], False),
        ([{"ok": True}, {"ok": True}], False),
        ([], False),
        ([None], False),
        ([True], False),
        ([collections.OrderedDict(ok=True)], False),
    ],
)
def test_is_ok_reply_only_for_exactly_the_ok_ack(reply: list[Any], expected: bool) -> None:
    assert is_ok_reply(reply) is expected


def test_the_ok_reply_is_not_encoded_again() -> None:
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("dumps called for the constant OK reply")

    library = socketio.packet.Packet(
        socketio.packet.ACK, namespace="/", id=42, data=[{"ok": True}]
    ).encode()
    assert ack_packet(42, [{"ok": True}], refuse) == library


def _outcome(loads: Any, text: str) -> tuple[str, str]:
    try:
        return "value", repr(loads(text))
    except Exception as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize(
    "text",
    [
        '["device:heartbeat",{"state":"idle","resources":{"cpuPercent":12.5}}]',
        '["a",1]',
        '["a",1] \n',  # whitespace after: accepted
        '["a",1]x',  # extra data
        '["a",1] [2]',
        "[1,2]]",
        "[",
        '["a",',
        '["a",NaN,Infinity,-Infinity,1e999]',
        '["a",' + "9" * 150 + "]",  # python-engineio's parse_int refuses it
        '["a",' + "9" * 100 + "]",  # ... and takes this one
        '["a",{"k":1,"k":2}]',  # duplicate keys: the last wins
        '["\\ud800","\\u00e9"]',
        '[ "a" , { "x" : [ 1 , 2.5 , null , true ] } ]',
        "[]",
        "[" * 50 + "]" * 50,
    ],
)
def test_the_reused_decoder_is_python_engineios_loads(text: str) -> None:
    ours = array_loads(engineio.json)
    assert _outcome(ours, text) == _outcome(engineio.json.loads, text)


def test_another_json_module_is_used_as_it_is() -> None:
    class Module:
        @staticmethod
        def loads(text: str) -> Any:
            return ("mine", text)

    assert array_loads(Module)("[1]") == ("mine", "[1]")
