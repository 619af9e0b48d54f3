"""The Socket.IO handlers: one ``socketio.AsyncNamespace`` for the default namespace.

Contract: :class:`DeviceNamespace` routes each device event to its ``on_*`` method
(:data:`EVENT_METHODS`; names with ``:`` cannot be method names, so
:meth:`DeviceNamespace.trigger_event` maps them). Handlers are thin: parse the payload
(:func:`client.protocol.parse`), delegate to the registry, the blob store or the round
coordinator, answer. They never raise: every event gets its positive ack or an
``ErrorAck`` (a malformed payload is ``bad_request``, an event before ``device:register``
is ``not_registered``, an unknown event is ``bad_request``, a bug is ``internal_error``),
a line is logged, and the server keeps serving everyone else. Every connection has an
event budget (:mod:`server.ratelimit`), checked before a payload is parsed: over it, an
event is answered ``rate_limited``; a connection that keeps flooding is disconnected. A
connection without a valid token (when tokens are configured) is refused at connect.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import socketio

from client import __version__
from client.errors import FedtrayError
from client.protocol import (
    EV_BLOB_CHUNK,
    EV_BLOB_STATUS,
    EV_HEARTBEAT,
    EV_REGISTER,
    EV_REGISTERED,
    EV_TRAINING_ERROR,
    EV_TRAINING_PROGRESS,
    EV_WEIGHTS_SUBMIT,
    PROTOCOL_VERSION,
    BlobChunk,
    BlobStatus,
    DeviceRegister,
    DeviceRegistered,
    Heartbeat,
    OkAck,
    TrainingError,
    TrainingProgress,
    WeightsSubmit,
    error_ack,
    parse,
)
from client.transfer import BlobStore
from server.auth import UNAUTHORIZED_MESSAGE, TokenChecker
from server.background import Background
from server.config import ServerConfig
from server.coordinator import RoundCoordinator
from server.distribution import Distributor, short
from server.ratelimit import CHUNK_EVENT, ConnectionLimiter, Verdict
from server.registry import DeviceRecord, Registry

log = logging.getLogger(__name__)

#: Device event -> the method that handles it (each takes ``sid`` and one payload).
EVENT_METHODS: dict[str, str] = {
    EV_REGISTER: "on_device_register",
    EV_HEARTBEAT: "on_device_heartbeat",
    EV_TRAINING_PROGRESS: "on_training_progress",
    EV_TRAINING_ERROR: "on_training_error",
    EV_WEIGHTS_SUBMIT: "on_weights_submit",
    EV_BLOB_CHUNK: "on_blob_chunk",
    EV_BLOB_STATUS: "on_blob_status",
}


class DeviceNamespace(socketio.AsyncNamespace):  # type: ignore[misc]
    """The device protocol on namespace ``/`` (see the module docstring)."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        auth: TokenChecker,
        registry: Registry,
        blobs: BlobStore,
        coordinator: RoundCoordinator,
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

    async def trigger_event(self, event: str, *args: Any) -> Any:
        """Dispatch: connect/disconnect as they are, device events guarded, others refused."""
        if event == "connect":
            return await self.on_connect(*args)
        if event == "disconnect":
            return await self.on_disconnect(*args)
        sid, payload = args[0], args[1:]
        refusal = self._admit(sid, event, payload)
        if refusal is not None:
            return refusal
        method = EVENT_METHODS.get(event)
        if method is None:
            log.info("unknown event %s from sid %s answered with bad_request", short(event), sid)
            return error_ack("bad_request", f"unknown event {short(event, 64)}")
        try:
            if len(payload) != 1:
                raise FedtrayError(
                    "bad_request", f"{event} takes exactly one payload object, got {len(payload)}"
                )
            return await getattr(self, method)(sid, payload[0])
        except FedtrayError as exc:
            record = self._registry.by_sid(sid)
            who = record.name if record else f"sid {sid}"
            log.info("%s from %s refused: %s: %s", event, who, exc.code, exc.message)
            return error_ack(exc.code, exc.message)
        except Exception:
            log.exception("bug while handling %s from sid %s", event, sid)
            return error_ack("internal_error", f"the server failed to handle {event}")

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
        record = self._registry.by_sid(sid)
        who = record.name if record else f"sid {sid}"
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

    def _require(self, sid: str) -> DeviceRecord:
        record = self._registry.by_sid(sid)
        if record is None:
            raise FedtrayError("not_registered", "send device:register first")
        self._registry.touch(record.device_id, time.monotonic())
        return record

    # --------------------------------------------------------------- device events

    async def on_device_register(self, sid: str, payload: Any) -> dict[str, Any]:
        if isinstance(payload, dict) and payload.get("protocol", PROTOCOL_VERSION) != (
            PROTOCOL_VERSION
        ):
            raise FedtrayError(
                "unsupported_protocol",
                f"this server speaks protocol {PROTOCOL_VERSION}, "
                f"not {short(payload.get('protocol'), 20)}",
            )
        reg = parse(DeviceRegister, payload)
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
        ).to_wire()
        await self.emit(EV_REGISTERED, ack, to=sid)
        self._coordinator.welcome(record)
        return ack

    async def on_device_heartbeat(self, sid: str, payload: Any) -> dict[str, Any]:
        record = self._require(sid)
        hb = parse(Heartbeat, payload)
        was = record.state
        self._registry.heartbeat(record.device_id, hb, time.monotonic())
        if hb.state == "paused" and was != "paused":
            log.info(
                "device %s paused: %s%s",
                record.name,
                hb.pause_reason or "unknown reason",
                f" ({hb.pause_detail})" if hb.pause_detail else "",
            )
        self._coordinator.devices_changed()
        return OkAck().to_wire()

    async def on_training_progress(self, sid: str, payload: Any) -> None:
        record = self._require(sid)
        progress = parse(TrainingProgress, payload)
        self._registry.progress(record.device_id, progress, time.monotonic())
        self._coordinator.devices_changed()

    async def on_training_error(self, sid: str, payload: Any) -> None:
        record = self._require(sid)
        err = parse(TrainingError, payload)
        log.warning(
            "device %s reported a training error in round %s: %s: %s",
            record.name,
            err.round_id,
            err.code,
            err.message,
        )
        self._coordinator.training_failed(record, err)

    async def on_weights_submit(self, sid: str, payload: Any) -> dict[str, Any]:
        record = self._require(sid)
        return await self._coordinator.accept_update(record, parse(WeightsSubmit, payload))

    async def on_blob_chunk(self, sid: str, payload: Any) -> dict[str, Any]:
        record = self._require(sid)
        chunk = parse(BlobChunk, payload)
        return self._blobs.accept_chunk(record.device_id, chunk, time.monotonic()).to_wire()

    async def on_blob_status(self, sid: str, payload: Any) -> dict[str, Any]:
        record = self._require(sid)
        query = parse(BlobStatus, payload)
        return self._blobs.status(record.device_id, query.blob_id, time.monotonic()).to_wire()
