"""The Socket.IO handlers: one ``socketio.AsyncNamespace`` for the default namespace.

Contract: :class:`DeviceNamespace` handles exactly the events the event table
(:mod:`client.protocol.events`) says the server receives (:func:`event_handlers` checks
that every such event has one ``@handles(spec)`` method and no method handles another
event; a drift raises at construction). Each event passes, in order: the connection's
event budget (:mod:`server.ratelimit`), checked before anything is parsed (over it, an
event is answered ``rate_limited``; a connection that keeps flooding is disconnected);
then the shared guard (:func:`client.protocol.guard.guard_sid`), which refuses an event
before ``device:register`` with ``not_registered`` (every event but ``device:register``),
parses the payload (a malformed one is ``bad_request``, a wrong ``protocol``
``unsupported_protocol``) and turns a refusal (FedtrayError) or a bug into an
``ErrorAck``. Handlers are thin ``async (sid, model)``: they delegate to the registry,
the blob store or the round coordinator and return the event's ack model (``None`` for
an unacknowledged event, which is never answered). An unknown event is ``bad_request``.
Nothing raises into python-socketio: a line is logged and the server keeps serving
everyone else. A connection without a valid token (when tokens are configured) is
refused at connect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import socketio

from client import __version__
from client.errors import FedtrayError
from client.protocol import (
    BlobChunk,
    BlobProgress,
    BlobStatus,
    DeviceRegister,
    DeviceRegistered,
    EvaluationFailed,
    EvaluationResult,
    Heartbeat,
    OkAck,
    SubmitAccepted,
    TrainingError,
    TrainingProgress,
    WeightsSubmit,
    error_ack,
    events as ev,
)
from client.protocol.events import A, EventSpec, P
from client.protocol.guard import Answer, guard_sid
from client.transfer import BlobStore
from server.auth import UNAUTHORIZED_MESSAGE, TokenChecker
from server.background import Background
from server.config import ServerConfig
from server.distribution import Distributor, short
from server.ratelimit import CHUNK_EVENT, ConnectionLimiter, Verdict
from server.registry import DeviceRecord, Registry

log = logging.getLogger(__name__)

#: ``OkAck().to_wire()``, computed once.
_OK_WIRE: dict[str, Any] = OkAck().to_wire()


class _OnceEncodedOk(OkAck):
    """An OkAck whose wire dict is computed once: it is frozen and its one field is a
    constant, so every ``to_wire`` is equal to ``OkAck().to_wire()`` (a fresh copy, so a
    reader that changes it changes nothing here)."""

    def to_wire(self) -> dict[str, Any]:
        return dict(_OK_WIRE)


#: The heartbeat's ack: one frozen instance, not one per heartbeat, nor one model dump.
_OK = _OnceEncodedOk()


class FederatedService(Protocol):
    """Federated evaluation's events (:class:`server.fedeval.FederatedEvaluation`)."""

    async def on_result(self, record: DeviceRecord, result: EvaluationResult) -> None: ...

    def on_failed(self, record: DeviceRecord, failed: EvaluationFailed) -> None: ...


class RoundService(Protocol):
    """What the handlers call about rounds: :class:`server.coordinator.RoundCoordinator`
    in one process, :class:`server.cluster.service.ClusterRounds` in a cluster worker."""

    @property
    def version(self) -> int: ...

    @property
    def federated(self) -> FederatedService: ...

    def devices_changed(self) -> None: ...

    def device_left(self, record: DeviceRecord) -> None: ...

    def heard_training(self, record: DeviceRecord, round_id: str) -> None: ...

    def training_failed(self, record: DeviceRecord, err: TrainingError) -> None: ...

    def welcome(self, record: DeviceRecord) -> None: ...

    async def accept_update(self, record: DeviceRecord, sub: WeightsSubmit) -> SubmitAccepted: ...


NS = TypeVar("NS", bound="DeviceNamespace")
Method = Callable[[NS, str, P], Awaitable[A | None]]

_SPEC_ATTR = "__fedtray_event__"


def handles(spec: EventSpec[P, A]) -> Callable[[Method[NS, P, A]], Method[NS, P, A]]:
    """Mark a :class:`DeviceNamespace` method as the handler of ``spec`` (type-checked:
    it takes ``spec.payload`` and returns ``spec.ack`` or None)."""

    def mark(method: Method[NS, P, A]) -> Method[NS, P, A]:
        setattr(method, _SPEC_ATTR, spec)
        return method

    return mark


def event_handlers(cls: type[DeviceNamespace]) -> Mapping[str, str]:
    """Event name -> the name of the ``cls`` method that handles it, for every event the
    server receives. Raises TypeError when the handlers and the event table drift apart
    (an event without a handler, a handler of an event the server does not receive, two
    handlers of one event)."""
    found: dict[str, str] = {}
    for attr in dir(cls):  # what the class resolves each name to, overrides included
        spec = getattr(getattr(cls, attr, None), _SPEC_ATTR, None)
        if not isinstance(spec, EventSpec):
            continue
        other = found.get(spec.name)
        if other is not None:
            raise TypeError(f"{spec.name} has two handlers: {other} and {attr}")
        found[spec.name] = attr
    expected = {spec.name for spec in ev.handled_by("server")}
    if missing := expected - set(found):
        raise TypeError(f"{cls.__name__} handles no {sorted(missing)}")
    if extra := set(found) - expected:
        raise TypeError(f"{cls.__name__} handles {sorted(extra)}, not sent to the server")
    return found


class DeviceNamespace(socketio.AsyncNamespace):  # type: ignore[misc]
    """The device protocol on namespace ``/`` (see the module docstring)."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        auth: TokenChecker,
        registry: Registry,
        blobs: BlobStore,
        coordinator: RoundService,
        distributor: Distributor,
        background: Background,
    ) -> None:
        super().__init__("/")
        self._config = config
        self._auth = auth
        self._registry = registry
        self._blobs = blobs
        self._coordinator = coordinator
        self._distributor = distributor
        self._background = background
        self._limiters: dict[str, ConnectionLimiter] = {}
        self._guarded: dict[str, Callable[..., Awaitable[Answer]]] = {}
        for name, attr in event_handlers(type(self)).items():
            spec = ev.BY_NAME[name]
            check = None if spec is ev.REGISTER else self._check_registered
            handler = getattr(self, attr)
            self._guarded[name] = guard_sid(spec, handler, check=check, who=self._who, logger=log)

    async def trigger_event(self, event: str, *args: Any) -> Any:
        """Dispatch: connect/disconnect as they are, device events admitted and guarded,
        unknown events refused."""
        if event == "connect":
            return await self.on_connect(*args)
        if event == "disconnect":
            return await self.on_disconnect(*args)
        sid, payload = args[0], args[1:]
        refusal = self._admit(sid, event, payload)
        if refusal is not None:
            return refusal
        guarded = self._guarded.get(event)
        if guarded is None:
            log.info("unknown event %s from sid %s answered with bad_request", short(event), sid)
            return error_ack("bad_request", f"unknown event {short(event, 64)}")
        return await guarded(sid, *payload)

    def _who(self, sid: str) -> str:
        """The sender of ``sid`` for a log line: its device name once registered."""
        record = self._registry.by_sid(sid)
        return record.name if record else f"sid {sid}"

    def _admit(self, sid: str, event: str, args: tuple[Any, ...]) -> dict[str, Any] | None:
        """None when ``sid`` may send ``event`` now; else the ``rate_limited`` ErrorAck.

        Checked before anything is parsed or buffered. A connection that keeps flooding
        after being refused is disconnected; refusals are logged once per connection, so
        a flood cannot flood the log either.
        """
        limiter = self._limiters.get(sid)
        if limiter is None:
            # The connection is gone (events still queued after its disconnect): nobody
            # reads the answer, so do no work and log nothing.
            return error_ack("rate_limited", "this connection is closed")
        size = 0
        if event == CHUNK_EVENT and len(args) == 1 and isinstance(args[0], dict):
            data = args[0].get("data")
            size = len(data) if isinstance(data, bytes | str) else 0
        verdict: Verdict = limiter.admit(event, time.monotonic(), size)
        if verdict == "ok":
            return None
        who = self._who(sid)
        if verdict == "limited" and limiter.refused == 1:
            log.warning("%s is sending too fast: answering rate_limited", who)
        elif verdict == "disconnect":
            log.warning(
                "%s kept flooding after %d rate_limited answers; disconnecting it",
                who,
                limiter.refused,
            )
            self._background.spawn(self.disconnect(sid), f"disconnect-flooder-{sid}")
        return error_ack("rate_limited", "too many events; slow down")

    # --------------------------------------------------------------- connections

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        if not self._auth.check(auth):
            log.warning(
                "refused a connection from %s: no valid token",
                environ.get("REMOTE_ADDR", "an unknown address"),
            )
            raise socketio.exceptions.ConnectionRefusedError(UNAUTHORIZED_MESSAGE)
        self._limiters[sid] = ConnectionLimiter(self._config.rate_limits, time.monotonic())

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        self._limiters.pop(sid, None)
        self._distributor.forget_connection(sid)
        try:
            record = self._registry.disconnect(sid)
            if record is None:
                return
            log.info("device %s (%s) disconnected", record.name, record.device_id)
            self._background.cancel_device(record.device_id)
            self._coordinator.device_left(record)
        except Exception:
            log.exception("bug while handling a disconnect of sid %s", sid)

    def _check_registered(self, sid: str) -> None:
        """The guard's check for every event but ``device:register``: refuse
        ``not_registered`` before registration; else note that the device is alive."""
        record = self._registry.by_sid(sid)
        if record is None:
            raise FedtrayError("not_registered", "send device:register first")
        self._registry.touch(record.device_id, time.monotonic())

    def _record(self, sid: str) -> DeviceRecord:
        """The registered device of ``sid`` (checked by the guard just before)."""
        record = self._registry.by_sid(sid)
        if record is None:
            raise FedtrayError("not_registered", "send device:register first")
        return record

    # --------------------------------------------------------------- device events

    @handles(ev.REGISTER)
    async def on_device_register(self, sid: str, reg: DeviceRegister) -> DeviceRegistered:
        record, replaced = self._registry.register(reg, sid, time.monotonic())
        if replaced is not None:
            log.info(
                "device %s (%s) reconnected; dropping its old connection", reg.name, reg.device_id
            )
            self._background.spawn(self.disconnect(replaced), f"disconnect-{replaced}")
        else:
            log.info(
                "device %s (%s, %s, %s) registered; tasks: %s",
                reg.name,
                reg.device_id,
                reg.device_type,
                reg.platform.os,
                ", ".join(reg.capabilities.tasks) or "none",
            )
        cfg = self._config
        ack = DeviceRegistered(
            device_id=reg.device_id,
            heartbeat_interval_sec=cfg.heartbeat_interval,
            server_version=__version__,
            limits=cfg.limits,
            task=cfg.task,
            global_version=self._coordinator.version,
        )
        await self.emit(ev.REGISTERED.name, ack.to_wire(), to=sid)
        self._coordinator.welcome(record)
        return ack

    @handles(ev.HEARTBEAT)
    async def on_device_heartbeat(self, sid: str, hb: Heartbeat) -> OkAck:
        record = self._record(sid)
        was = record.state
        self._registry.heartbeat(record.device_id, hb, time.monotonic())
        if hb.round_id is not None:
            self._coordinator.heard_training(record, hb.round_id)
        if hb.hardware is not None and self._registry.hardware_reported(
            record.device_id, hb.hardware
        ):
            gpu = hb.hardware.gpu
            log.info(
                "device %s updated its hardware: GPU %s",
                record.name,
                f"{gpu.kind} {gpu.name or ''}".strip() if gpu else "none",
            )
        if hb.state == "paused" and was != "paused":
            log.info(
                "device %s paused: %s%s",
                record.name,
                hb.pause_reason or "unknown reason",
                f" ({hb.pause_detail})" if hb.pause_detail else "",
            )
        return _OK

    @handles(ev.TRAINING_PROGRESS)
    async def on_training_progress(self, sid: str, progress: TrainingProgress) -> None:
        record = self._record(sid)
        self._registry.progress(record.device_id, progress, time.monotonic())

    @handles(ev.TRAINING_ERROR)
    async def on_training_error(self, sid: str, err: TrainingError) -> None:
        record = self._record(sid)
        log.warning(
            "device %s reported a training error in round %s: %s: %s",
            record.name,
            err.round_id,
            err.code,
            err.message,
        )
        self._coordinator.training_failed(record, err)

    @handles(ev.WEIGHTS_SUBMIT)
    async def on_weights_submit(self, sid: str, sub: WeightsSubmit) -> SubmitAccepted:
        return await self._coordinator.accept_update(self._record(sid), sub)

    @handles(ev.EVALUATION_RESULT)
    async def on_evaluation_result(self, sid: str, result: EvaluationResult) -> None:
        await self._coordinator.federated.on_result(self._record(sid), result)

    @handles(ev.EVALUATION_FAILED)
    async def on_evaluation_failed(self, sid: str, failed: EvaluationFailed) -> None:
        self._coordinator.federated.on_failed(self._record(sid), failed)

    @handles(ev.BLOB_CHUNK)
    async def on_blob_chunk(self, sid: str, chunk: BlobChunk) -> BlobProgress:
        record = self._record(sid)
        return self._blobs.accept_chunk(record.device_id, chunk, time.monotonic())

    @handles(ev.BLOB_STATUS)
    async def on_blob_status(self, sid: str, query: BlobStatus) -> BlobProgress:
        record = self._record(sid)
        return self._blobs.status(record.device_id, query.blob_id, time.monotonic())
