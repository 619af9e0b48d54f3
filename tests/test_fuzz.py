"""Fuzzing both peers through real Socket.IO connections on loopback (hypothesis).

Server side: a real :class:`server.app.FedServer`; a raw python-socketio ``AsyncClient``
(a :class:`tests.server_harness.ScriptedDevice`) is the attacker and sends arbitrary and
boundary payloads -- JSON-like recursive values, huge ints, NaN/Inf, long strings, bytes,
wrong types, lists for objects, deep nesting, and valid payloads with one field broken or
missing -- to every handler and to unknown events. Properties: every acked event is
answered in time with an ErrorAck carrying a known code or a valid positive ack; the
server's blob buffers never hold more than the attacker actually sent; afterwards a
well-behaved device still registers and gets its heartbeat acknowledged.

Client side: a fake SERVER (a real python-socketio ``AsyncServer`` on aiohttp, scripted
here: it is the attacker) answers ``device:register`` and then calls a real
:class:`client.session.DistributedClient` with arbitrary payloads for ``training:start``,
``weights:global``, ``training:cancel``, ``blob:chunk`` and ``blob:status``. Properties:
each call is answered (ErrorAck with a known code, a ``training:start`` refusal with a
reason, or a valid positive answer), the session never ends, keeps heartbeating, and its
blob buffers stay within what was sent.

Existing fixed tables (``tests/test_server_protocol.py``) cover a few hand-picked bad
payloads per event; this module searches the space around them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
import socketio
from aiohttp import web
from hypothesis import HealthCheck, given, settings, strategies as st

from client.backoff import Backoff
from client.config import Settings
from client.device import detect_device
from client.errors import ERROR_CODES
from client.protocol import (
    EV_BLOB_CHUNK,
    EV_BLOB_STATUS,
    EV_HEARTBEAT,
    EV_REGISTER,
    EV_TRAINING_CANCEL,
    EV_TRAINING_ERROR,
    EV_TRAINING_PROGRESS,
    EV_TRAINING_START,
    EV_WEIGHTS_GLOBAL,
    EV_WEIGHTS_SUBMIT,
    BlobProgress,
    DeviceRegistered,
    Limits,
    SubmitAccepted,
    TrainingStartAck,
)
from client.session import DistributedClient
from client.weights import encode, sha256_hex
from tests.server_harness import (
    LoopThread,
    ScriptedDevice,
    ServerHandle,
    register_payload,
    resources,
    running_server,
)
from tests.waiting import scale_waits, scaled, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

T = TypeVar("T")
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ANSWER_TIMEOUT = 10.0

# --------------------------------------------------------------------------- strategies

SHA = "ab" * 32
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**200)
    | st.integers(min_value=-(2**200), max_value=-(2**63))
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.text(min_size=1000, max_size=2000, alphabet="xé\u2603\x00")
    | st.binary(max_size=64)
)
json_like = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=16,
)


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return {"nested": value}


#: Valid payloads of each device -> server event (camelCase, as on the wire).
SERVER_TEMPLATES: dict[str, dict[str, Any]] = {
    EV_REGISTER: register_payload("00000000-0000-4000-8000-000000000001", "fuzzy"),
    EV_HEARTBEAT: {"state": "idle", "resources": resources()},
    EV_TRAINING_PROGRESS: {
        "roundId": "r1",
        "epoch": 1,
        "epochs": 2,
        "step": 1,
        "steps": 4,
        "fraction": 0.25,
        "loss": 0.5,
        "state": "training",
    },
    EV_TRAINING_ERROR: {"roundId": "r1", "code": "training_failed", "message": "boom"},
    EV_WEIGHTS_SUBMIT: {
        "roundId": "r1",
        "baseVersion": 0,
        "numSamples": 3,
        "metrics": {"trainLoss": 0.5},
        "weights": {"format": "safetensors", "size": 3, "sha256": SHA, "data": b"abc"},
    },
    EV_BLOB_CHUNK: {"blobId": "b1", "offset": 0, "total": 3, "sha256": SHA, "data": b"abc"},
    EV_BLOB_STATUS: {"blobId": "b1"},
}

_MISSING = object()


@st.composite
def one_field_broken(draw: st.DrawFn, templates: dict[str, dict[str, Any]]) -> tuple[str, Any]:
    """A valid payload of a random event with one (possibly nested) field replaced or gone."""
    event = draw(st.sampled_from(sorted(templates)))
    payload: dict[str, Any] = {**templates[event]}
    target = payload
    key = draw(st.sampled_from(sorted(payload)))
    if isinstance(payload[key], dict) and payload[key] and draw(st.booleans()):
        target = payload[key] = {**payload[key]}
        key = draw(st.sampled_from(sorted(target)))
    value = draw(st.just(_MISSING) | json_like)
    if value is _MISSING:
        del target[key]
    else:
        target[key] = value
    return event, payload


def _is_error(ack: Any) -> bool:
    return isinstance(ack, dict) and ack.get("ok") is False


def _check_error(ack: Any, context: object) -> None:
    assert isinstance(ack, dict), (context, ack)
    assert ack.get("code") in ERROR_CODES, (context, ack)
    assert isinstance(ack.get("message"), str) and ack["message"], (context, ack)


# --------------------------------------------------------------------------- the server


class _Attacker:
    """A registered raw device plus the bytes it has sent in blob chunks."""

    def __init__(self, srv: ServerHandle, loop: LoopThread) -> None:
        self.srv, self.loop = srv, loop
        self.device = ScriptedDevice(srv.url, name="attacker")
        self.sent_chunk_bytes = 0
        self.loop.run(self.device.join())

    def call(self, event: str, payload: Any) -> Any:
        if event == EV_BLOB_CHUNK and isinstance(payload, dict):
            data = payload.get("data")
            if isinstance(data, bytes | str):
                self.sent_chunk_bytes += len(data)
        ack = self.loop.run(self.device.call(event, payload, timeout=ANSWER_TIMEOUT))
        # Memory stays bounded: the server never buffers more than it was sent.
        assert self.srv.server.blobs.bytes_held() <= self.sent_chunk_bytes
        if event == EV_REGISTER and not _is_error(ack):
            # A fuzzed but valid registration renamed this connection's device; put the
            # attacker's own registration back so later events are not `not_registered`.
            self.loop.run(self.device.register())
        return ack


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    # Rounds need 5 devices: handlers are fuzzed without training:start interfering.
    # Messages stay under Engine.IO's cap (chunk + margin; 16 leaves of <= 12 KB each):
    # a message over it closes the connection by design (tests/test_server_protocol.py).
    tmp = tmp_path_factory.mktemp("fuzz-server")
    with running_server(
        tmp, min_clients=5, clients_per_round=5, limits=Limits(max_chunk_bytes=256 * 1024)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def attacker(fuzz_server: ServerHandle) -> Iterator[_Attacker]:
    loop = LoopThread()
    try:
        attack = _Attacker(fuzz_server, loop)
        yield attack
        # The barrage is over: the server still serves a well-behaved device.
        good = ScriptedDevice(fuzz_server.url, name="well-behaved")
        assert loop.run(good.join())["ok"] is True
        assert loop.run(good.heartbeat()) == {"ok": True}
        assert attack.device.sio.connected, "the attacker's connection must survive"
        loop.run(good.sio.disconnect())
        loop.run(attack.device.sio.disconnect())
    finally:
        loop.close()


def _check_server_answer(event: str, payload: Any, ack: Any) -> None:
    if _is_error(ack):
        _check_error(ack, (event, payload))
        return
    if event == EV_REGISTER:
        DeviceRegistered.model_validate(ack)
    elif event == EV_HEARTBEAT:
        assert ack == {"ok": True}
    elif event in (EV_BLOB_CHUNK, EV_BLOB_STATUS):
        BlobProgress.model_validate(ack)
    elif event == EV_WEIGHTS_SUBMIT:
        SubmitAccepted.model_validate(ack)
    elif event in (EV_TRAINING_PROGRESS, EV_TRAINING_ERROR):
        assert ack is None, (event, ack)  # unacked events: accepted silently
    else:
        raise AssertionError(f"{event} answered {ack!r} instead of an ErrorAck")


SERVER_EVENTS = sorted(SERVER_TEMPLATES)


@FUZZ
@given(event=st.sampled_from(SERVER_EVENTS), payload=json_like)
def test_server_answers_arbitrary_payloads(attacker: _Attacker, event: str, payload: Any) -> None:
    _check_server_answer(event, payload, attacker.call(event, payload))


@FUZZ
@given(case=one_field_broken(SERVER_TEMPLATES))
def test_server_answers_valid_payloads_with_one_field_broken(
    attacker: _Attacker, case: tuple[str, Any]
) -> None:
    event, payload = case
    _check_server_answer(event, payload, attacker.call(event, payload))


@settings(FUZZ, max_examples=25)
@given(event=st.text(min_size=1, max_size=60), payload=json_like)
def test_server_answers_unknown_events_with_bad_request(
    attacker: _Attacker, event: str, payload: Any
) -> None:
    if event in SERVER_TEMPLATES or event in ("connect", "disconnect", "message"):
        return
    ack = attacker.call(event, payload)
    _check_error(ack, event)
    assert ack["code"] == "bad_request"


@pytest.mark.parametrize("event", SERVER_EVENTS)
@pytest.mark.parametrize(
    "payload",
    [
        _deep(60),
        {"roundId": "r" * 200_000},
        {"blobId": "b", "offset": 2**80, "total": 2**80, "sha256": SHA, "data": b"x"},
        {"blobId": "b", "offset": -1, "total": -5, "sha256": SHA, "data": b"x"},
        {"blobId": "b", "offset": 0, "total": math.inf, "sha256": SHA, "data": b"x"},
        {"blobId": "b", "offset": 0, "total": 1 << 40, "sha256": SHA, "data": b"x"},
        [SERVER_TEMPLATES[EV_HEARTBEAT]],
    ],
    ids=["deep", "long-string", "huge-ints", "negative", "inf", "huge-total", "list-wrapped"],
)
def test_server_answers_boundary_payloads(attacker: _Attacker, event: str, payload: Any) -> None:
    ack = attacker.call(event, payload)
    _check_server_answer(event, payload, ack)
    if event == EV_BLOB_CHUNK and isinstance(payload, dict) and payload.get("total") == 1 << 40:
        assert ack["code"] == "blob_too_large"  # refused before any buffering


# --------------------------------------------------------------------------- the client


class _FakeServer:
    """A scripted Socket.IO server that a real client registers with (the attacker)."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.sio = socketio.AsyncServer(async_mode="aiohttp", max_http_buffer_size=1 << 22)
        self.app = web.Application()
        self.sio.attach(self.app)
        self.sid: str | None = None
        self.heartbeats = 0
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

    async def _on_register(self, sid: str, payload: Any) -> dict[str, Any]:
        self.sid = sid
        return DeviceRegistered(
            device_id=payload["deviceId"],
            heartbeat_interval_sec=0.2,
            server_version="fake",
            limits=Limits(max_chunk_bytes=4096),
            task="synthetic",
            global_version=None,
        ).to_wire()

    async def _on_heartbeat(self, sid: str, payload: Any) -> dict[str, Any]:
        self.heartbeats += 1
        return {"ok": True}

    async def _on_other(self, event: str, sid: str, *args: Any) -> None:
        return None

    def call(self, event: str, payload: Any) -> Any:
        assert self.sid is not None
        return self.loop.run(
            self.sio.call(event, payload, to=self.sid, timeout=ANSWER_TIMEOUT),
            ANSWER_TIMEOUT + 5,
        )

    def close(self) -> None:
        self.loop.run(self.runner.cleanup())


class _Victim:
    def __init__(self, fake: _FakeServer, client: DistributedClient) -> None:
        self.fake, self.client = fake, client
        self.sent_chunk_bytes = 0

    def call(self, event: str, payload: Any) -> Any:
        if event == EV_BLOB_CHUNK and isinstance(payload, dict):
            data = payload.get("data")
            if isinstance(data, bytes | str):
                self.sent_chunk_bytes += len(data)
        ack = self.fake.call(event, payload)
        # Read-only peek at the session's receive buffers: bounded by what was sent.
        assert self.client._session.blobs.bytes_held() <= self.sent_chunk_bytes
        return ack


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Victim]:
    tmp = tmp_path_factory.mktemp("fuzz-client")
    loop = LoopThread()
    fake = _FakeServer(loop)
    client = DistributedClient(
        Settings(server_url=f"http://127.0.0.1:{fake.port}", device_name="victim"),
        device_info=detect_device(probe_gpu=False),
        data_dir=tmp / "data",
        backoff=Backoff(base=0.05, cap=0.2),
        settings_file=None,
    )
    scale_waits(client)
    client.start()
    try:
        client.wait_for(lambda s: s.connection == "connected", 30)
        wait_until(lambda: fake.sid is not None, 10, "registration")
        yield _Victim(fake, client)
        # The barrage is over: the session is alive, connected and still heartbeating.
        assert client.running
        assert client.snapshot().connection == "connected"
        beats = fake.heartbeats
        wait_until(lambda: fake.heartbeats > beats, 10, "a heartbeat after the barrage")
    finally:
        assert client.stop(scaled(30))
        fake.close()
        loop.close()


_WEIGHTS = encode({})
CLIENT_TEMPLATES: dict[str, dict[str, Any]] = {
    EV_TRAINING_START: {
        "roundId": "r1",
        "task": "synthetic",
        "modelParams": {"features": 4, "classes": 2, "hidden": 2, "samples": 20},
        "config": {"epochs": 1, "batchSize": 8, "lr": 0.1, "seed": 0},
        "partition": {"index": 0, "count": 1, "seed": 0, "scheme": "iid"},
        "baseVersion": 7,  # the victim holds no weights: a valid start is refused
        "deadline": time.time() + 3600,
        "weightFormat": "safetensors",
    },
    EV_WEIGHTS_GLOBAL: {
        "version": 3,
        "task": "synthetic",
        "roundId": None,
        "metrics": {},
        "weights": {
            "format": "safetensors",
            "size": len(_WEIGHTS),
            "sha256": sha256_hex(_WEIGHTS),
            "data": _WEIGHTS,
        },
    },
    EV_TRAINING_CANCEL: {"roundId": "r1", "reason": "fuzz"},
    EV_BLOB_CHUNK: {"blobId": "b1", "offset": 0, "total": 3, "sha256": SHA, "data": b"abc"},
    EV_BLOB_STATUS: {"blobId": "b1"},
}
CLIENT_EVENTS = sorted(CLIENT_TEMPLATES)


def _check_client_answer(event: str, payload: Any, ack: Any) -> None:
    if _is_error(ack):
        _check_error(ack, (event, payload))
        # Nothing a server sends may hit a bug in the client.
        assert ack["code"] != "internal_error", (event, payload, ack)
        return
    if event == EV_TRAINING_START:
        answer = TrainingStartAck.model_validate(ack)
        assert not answer.accepted and answer.reason, (payload, ack)
    elif event in (EV_BLOB_CHUNK, EV_BLOB_STATUS):
        BlobProgress.model_validate(ack)
    elif event == EV_WEIGHTS_GLOBAL:
        assert ack == {"ok": True}, (payload, ack)
    elif event == EV_TRAINING_CANCEL:
        assert ack is None, ack
    else:
        raise AssertionError(f"{event} answered {ack!r}")


@FUZZ
@given(event=st.sampled_from(CLIENT_EVENTS), payload=json_like)
def test_client_answers_arbitrary_payloads(victim: _Victim, event: str, payload: Any) -> None:
    _check_client_answer(event, payload, victim.call(event, payload))


@FUZZ
@given(case=one_field_broken(CLIENT_TEMPLATES))
def test_client_answers_valid_payloads_with_one_field_broken(
    victim: _Victim, case: tuple[str, Any]
) -> None:
    event, payload = case
    _check_client_answer(event, payload, victim.call(event, payload))


@pytest.mark.parametrize("event", CLIENT_EVENTS)
@pytest.mark.parametrize(
    "payload",
    [
        _deep(60),
        {"blobId": "b", "offset": 0, "total": 1 << 40, "sha256": SHA, "data": b"x"},
        {"blobId": "b", "offset": 2**80, "total": 2**80, "sha256": SHA, "data": b"x"},
        [CLIENT_TEMPLATES[EV_BLOB_STATUS]],
        None,
    ],
    ids=["deep", "huge-total", "huge-ints", "list-wrapped", "null"],
)
def test_client_answers_boundary_payloads(victim: _Victim, event: str, payload: Any) -> None:
    ack = victim.call(event, payload)
    _check_client_answer(event, payload, ack)
    if event == EV_BLOB_CHUNK and isinstance(payload, dict) and payload.get("total") == 1 << 40:
        assert ack["code"] == "blob_too_large"
