"""Weight distribution: getting the global model (and the end of the federation) to devices.

Contract: :class:`Distributor` sends ``weights:global`` in the format each device prefers
(safetensors when it lists it, else json) within the limits towards that device
(:func:`client.transfer.limits_towards`: the smaller of the server's own and the ones the
device advertised in its capabilities): inline when the document fits one chunk, else as a
``blob:chunk`` transfer of chunks of at most that ``maxChunkBytes`` with at most that
``maxInflightChunks`` unacknowledged. A global over the device's ``maxBlobBytes`` is not
sent at all (one warning per device and version says so; the device is skipped until it
can take it). ``weights:global`` names the model the weights are for, as
``training:start`` does (``modelParams``, and ``package`` for a packaged task; set by
:meth:`Distributor.describe_model`), so a device can check their layout on receipt.
:meth:`Distributor.ensure_global` sends the current version unless the device already
holds it (one send per device at a time, and none while a ``training:start`` carrying it
inline, :meth:`Distributor.inline_global`, is unanswered: a device is never sent the same
version twice) and returns whether the device now holds it; it never raises for a peer's
failure (timeouts, disconnects, refusals are logged and answered False). On success the
registry records the version the device holds
(:meth:`server.registry.Registry.holds_version`). A device that refuses a version as
unusable (an ErrorAck with one of :data:`UNUSABLE_CODES`: the tensors do not fit its
model) is recorded in the registry (:meth:`server.registry.Registry.refused_weights`,
which keeps it out of rounds), one warning line is logged, and that version is not sent to
it again (``ensure_global`` answers False at once) until it holds it or a newer version; a
newer version is offered as usual. :meth:`Distributor.broadcast` starts that for every
connected device in the background. :meth:`Distributor.presend` sends a new version's
document (over one chunk) to the connected devices while it is being saved, all but its
last chunk; that one goes only after :meth:`server.presend.Presend.durable` (its version's
save is over: done, or failed and published all the same), so a device never completes,
and is never told of, a version whose save is still under way. Concurrent sends of one
document to several devices share its chunks (:class:`server.presend.SharedChunks`: each
chunk cut once, not once per device). :meth:`Distributor.deliver_final` sends the final
global and then ``federation:finished``, at most once per connection.
:meth:`Distributor.ensure_file` gives a device a task file (a package or a data share):
``task:file`` asks whether it holds it; when not, the file goes as a blob (id = its
SHA-256, same limits as weights) followed by ``task:file`` naming the blob; True once the
device says it holds it, False (logged) otherwise. It never raises for a peer's failure
either."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import socketio
from pydantic import JsonValue

from client.errors import ErrorCode, FedtrayError
from client.protocol import (
    ErrorAck,
    FederationFinished,
    FileRef,
    TaskFile,
    TaskFileHeld,
    TaskFileKind,
    WeightFormat,
    WeightsGlobal,
    parse,
)
from client.protocol.events import FEDERATION_FINISHED, TASK_FILE, WEIGHTS_GLOBAL
from client.transfer import blob_ref, limits_towards, send_blob, weights_ref_for
from client.transfer_send import Call, ReadPiece, peer_offset, send_from
from server.background import Background
from server.config import ServerConfig
from server.globalmodel import GlobalModel
from server.presend import Presend, SharedChunks
from server.registry import DeviceRecord, Registry

log = logging.getLogger(__name__)

#: Refusals of ``weights:global`` that sending the same version again cannot change: the
#: tensors do not fit the model the device builds for the task.
UNUSABLE_CODES: frozenset[ErrorCode] = frozenset(
    {"layout_mismatch", "shape_mismatch", "dtype_mismatch"}
)


def short(value: object, limit: int = 80) -> str:
    """A value safe and short enough for a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _AbandonedError(Exception):
    """A presend's version will not be published."""


def format_for(record: DeviceRecord) -> WeightFormat:
    """The weights format a device gets: safetensors when it takes it, else its first."""
    formats = record.capabilities.weight_formats
    return "safetensors" if "safetensors" in formats else formats[0]


class Distributor:
    """Sends the global model to devices (see the module docstring)."""

    def __init__(
        self,
        sio: socketio.AsyncServer,
        config: ServerConfig,
        registry: Registry,
        model: GlobalModel,
        background: Background,
    ) -> None:
        self._sio = sio
        self._config = config
        self._registry = registry
        self._model = model
        self._background = background
        self._send_locks: dict[str, asyncio.Lock] = {}
        self._file_locks: dict[str, asyncio.Lock] = {}
        self._told_finished: set[str] = set()  # sids sent federation:finished
        self._too_large: dict[str, int] = {}  # device id -> the version warned about
        # Devices a training:start carrying the global is on its way to: a send of the
        # global to them waits until that start is answered (never the same version twice).
        self._carrying: dict[str, asyncio.Event] = {}
        self._model_params: dict[str, JsonValue] = dict(config.model_params)
        self._package: FileRef | None = None
        self._chunks = SharedChunks()

    def describe_model(self, params: dict[str, JsonValue], package: FileRef | None) -> None:
        """The model ``weights:global`` names: the task's parameters and its package."""
        self._model_params = dict(params)
        self._package = package

    async def ensure_global(self, record: DeviceRecord) -> bool:
        """Send the current global weights unless the device holds them; True on success."""
        lock = self._send_locks.setdefault(record.device_id, asyncio.Lock())
        async with lock:
            while (carrying := self._carrying.get(record.device_id)) is not None:
                await carrying.wait()
            if record.weights_version == self._model.version:
                return True
            if record.refused_version == self._model.version:
                return False  # it refused this version as unusable: not again
            sid = record.sid
            if sid is None:
                return False
            return await self._send(record, sid)

    async def _send(self, record: DeviceRecord, sid: str) -> bool:
        cfg = self._config
        fmt = format_for(record)
        version, data, digest = await self._model.encoded(fmt)
        limits = limits_towards(record.capabilities, cfg.limits)
        if len(data) > limits.max_blob_bytes:
            if self._too_large.get(record.device_id) != version:
                self._too_large[record.device_id] = version
                log.warning(
                    "not sending version %d to %s: the %s document is %d bytes, over the "
                    "%d bytes the device takes (its maxBlobBytes); it is skipped until it "
                    "can take it",
                    version,
                    record.name,
                    fmt,
                    len(data),
                    limits.max_blob_bytes,
                )
            return False
        chunk = limits.max_chunk_bytes
        message = self._message(version, fmt, data, digest, chunk)
        ref = message.weights

        async def call(event: str, payload: dict[str, Any]) -> Any:
            return await self._sio.call(event, payload, to=sid, timeout=cfg.ack_timeout)

        try:
            if ref.blob_id is not None:
                await self._send_shared(
                    call, data, digest, ref.blob_id, chunk, limits.max_inflight_chunks
                )
            ack = await call(WEIGHTS_GLOBAL.name, message.to_wire())
        except FedtrayError as exc:
            log.warning(
                "sending version %d to %s failed: %s: %s",
                version,
                record.name,
                exc.code,
                exc.message,
            )
            return False
        except Exception as exc:  # timeouts and disconnects of the transport
            log.warning(
                "sending version %d to %s failed: %s", version, record.name, type(exc).__name__
            )
            return False
        return self._settle(record, version, ack)

    async def _send_shared(
        self,
        call: Call,
        data: bytes | memoryview,
        digest: str,
        blob_id: str,
        chunk: int,
        window: int,
        read: ReadPiece | None = None,
    ) -> None:
        """:func:`client.transfer.send_blob` of the global, its chunks cut once for every
        device it is sent to side by side (:class:`SharedChunks`), or read by ``read``."""
        offset = await peer_offset(call, blob_id, len(data))
        cut = self._chunks.cut

        async def shared(start: int, end: int) -> bytes:
            return cut(digest, data, start, end)

        await send_from(
            call,
            shared if read is None else read,
            offset,
            total=len(data),
            digest=digest,
            blob_id=blob_id,
            chunk_bytes=chunk,
            window=window,
            on_progress=None,
        )

    def presend(self, version: int, data: bytes | memoryview, digest: str) -> Presend:
        """Start sending version ``version``'s safetensors document ``data`` (hash
        ``digest``), prepared but not yet durable nor published, to every connected device
        that takes safetensors and would get it as a blob (over one chunk, the server's
        own chunk size too, and within its ``maxBlobBytes``), in the background: all of it
        at once but the last chunk, which goes only after :meth:`Presend.durable`
        (nothing names the version before it is published: ``weights:global`` and
        ``training:start`` go as before; the device cannot complete the blob until then).
        The device's global sends wait for it (:meth:`ensure_global` then finds the blob
        held and sends only the message). A failure is logged (debug) and left to
        :meth:`ensure_global`."""
        presend = Presend(version)
        if len(data) <= self._config.limits.max_chunk_bytes:
            # Within one of the server's own chunks (inline for most devices): no pass over
            # a fleet of devices on every round for it.
            return presend
        for record in self._registry.connected():
            if format_for(record) != "safetensors" or record.weights_version == version:
                continue
            limits = limits_towards(record.capabilities, self._config.limits)
            if not limits.max_chunk_bytes < len(data) <= limits.max_blob_bytes:
                continue
            self._background.spawn(
                self._presend_one(
                    record,
                    presend,
                    data,
                    digest,
                    limits.max_chunk_bytes,
                    limits.max_inflight_chunks,
                ),
                f"presend-v{version}-to-{record.device_id}",
                record.device_id,
            )
        return presend

    async def _presend_one(
        self,
        record: DeviceRecord,
        presend: Presend,
        data: bytes | memoryview,
        digest: str,
        chunk: int,
        window: int,
    ) -> None:
        lock = self._send_locks.setdefault(record.device_id, asyncio.Lock())
        async with lock:
            sid = record.sid
            if sid is None or (record.weights_version or 0) >= presend.version:
                return  # gone, or given it (or a newer one) meanwhile
            cfg = self._config

            async def call(event: str, payload: dict[str, Any]) -> Any:
                return await self._sio.call(event, payload, to=sid, timeout=cfg.ack_timeout)

            async def gated(start: int, end: int) -> bytes:
                if end == len(data) and not await presend.wait():
                    raise _AbandonedError
                return self._chunks.cut(digest, data, start, end)

            try:
                await self._send_shared(call, data, digest, digest, chunk, window, gated)
            except _AbandonedError:
                return
            except Exception as exc:  # refusals, timeouts, disconnects: ensure_global's
                log.debug(
                    "sending version %d ahead to %s stopped: %s",
                    presend.version,
                    record.name,
                    type(exc).__name__,
                )

    def _settle(self, record: DeviceRecord, version: int, ack: object) -> bool:
        """Record the device's answer to ``version`` (a ``weights:global`` ack, or the
        ``training:start`` ack of one that carried it); True when it now holds it."""
        if isinstance(ack, dict) and ack.get("ok") is False:
            try:
                err: ErrorAck | None = ErrorAck.model_validate(ack)
            except ValueError:
                err = None
            if err is not None and err.code in UNUSABLE_CODES:
                self._registry.refused_weights(record.device_id, version, err.code, err.message)
                log.warning(
                    "device %s refused version %d as unusable (%s: %s); not sending it "
                    "again nor selecting the device until it holds a newer version",
                    record.name,
                    version,
                    err.code,
                    short(err.message, 300),
                )
                return False
            why = f"{err.code}: {err.message}" if err is not None else short(ack)
            log.warning("device %s refused version %d: %s", record.name, version, why)
            return False
        self._registry.holds_version(record.device_id, version)
        log.debug("device %s now holds version %d", record.name, version)
        return True

    async def inline_global(self, record: DeviceRecord) -> WeightsGlobal | None:
        """The current version's ``weights:global`` with its document inline, for
        ``training:start`` to carry, when the device lacks it and it fits one chunk
        towards the device; None otherwise (then :meth:`ensure_global` sends it, or the
        device holds it already, or a send to it is under way)."""
        if record.weights_version == self._model.version:
            return None
        lock = self._send_locks.get(record.device_id)
        if lock is not None and lock.locked():
            return None  # a send is under way: ensure_global waits for it
        if record.refused_version == self._model.version:
            return None  # ensure_global answers False at once
        fmt = format_for(record)
        version, data, digest = await self._model.encoded(fmt)
        limits = limits_towards(record.capabilities, self._config.limits)
        if len(data) > min(limits.max_chunk_bytes, limits.max_blob_bytes):
            return None
        self._carrying.setdefault(record.device_id, asyncio.Event())
        return self._message(version, fmt, data, digest, limits.max_chunk_bytes)

    def settle_inline(self, record: DeviceRecord, message: WeightsGlobal, ack: object) -> bool:
        """Record the answer to a ``training:start`` that carried ``message`` (an ErrorAck
        is a refusal of the weights, as :meth:`ensure_global` records it); True when the
        device now holds that version."""
        settled = self._settle(record, message.version, ack)
        self.release_inline(record.device_id)
        return settled

    def release_inline(self, device_id: str) -> None:
        """The ``training:start`` that :meth:`inline_global` gave the global to is answered
        or given up: sends of the global to that device go on (idempotent)."""
        carrying = self._carrying.pop(device_id, None)
        if carrying is not None:
            carrying.set()

    def _message(
        self, version: int, fmt: WeightFormat, data: bytes | memoryview, digest: str, chunk: int
    ) -> WeightsGlobal:
        if len(data) > chunk:  # a blob: only its size and digest are named
            ref = blob_ref(fmt, size=len(data), sha256=digest)
        else:
            inline = data if isinstance(data, bytes) else bytes(data)
            ref = weights_ref_for(inline, fmt, inline_limit=chunk, sha256=digest)
        return WeightsGlobal(
            version=version,
            task=self._config.task,
            round_id=self._model.round_id,
            metrics=self._model.metrics,
            weights=ref,
            model_params=self._model_params,
            package=self._package,
        )

    async def ensure_file(
        self, record: DeviceRecord, kind: TaskFileKind, data: bytes, sha256: str
    ) -> bool:
        """Give the device a task file unless it holds it; True once it does."""
        lock = self._file_locks.setdefault(record.device_id, asyncio.Lock())
        async with lock:
            sid = record.sid
            if sid is None:
                return False
            try:
                return await self._send_file(record, sid, kind, data, sha256)
            except FedtrayError as exc:
                log.warning(
                    "giving %s the %s file failed: %s: %s",
                    record.name,
                    kind,
                    exc.code,
                    exc.message,
                )
            except Exception as exc:  # timeouts and disconnects of the transport
                log.warning(
                    "giving %s the %s file failed: %s", record.name, kind, type(exc).__name__
                )
            return False

    async def _send_file(
        self, record: DeviceRecord, sid: str, kind: TaskFileKind, data: bytes, sha256: str
    ) -> bool:
        cfg = self._config

        async def call(event: str, payload: dict[str, Any]) -> Any:
            return await self._sio.call(event, payload, to=sid, timeout=cfg.ack_timeout)

        async def offer(blob_id: str | None) -> bool:
            message = TaskFile(kind=kind, sha256=sha256, size=len(data), blob_id=blob_id)
            ack = await call(TASK_FILE.name, message.to_wire())
            if isinstance(ack, dict) and ack.get("ok") is False:
                err = parse(ErrorAck, ack)
                raise FedtrayError(err.code, err.message)
            return parse(TaskFileHeld, ack).held

        if await offer(None):
            return True
        limits = limits_towards(record.capabilities, cfg.limits)
        if len(data) > limits.max_blob_bytes:
            log.warning(
                "not sending the %s file to %s: %d bytes, over its maxBlobBytes %d",
                kind,
                record.name,
                len(data),
                limits.max_blob_bytes,
            )
            return False
        log.info("sending the %s file (%d bytes) to %s", kind, len(data), record.name)
        await send_blob(
            call,
            data,
            blob_id=sha256,
            chunk_bytes=limits.max_chunk_bytes,
            window=limits.max_inflight_chunks,
            sha256=sha256,
        )
        if not await offer(sha256):
            log.warning("device %s did not keep the %s file", record.name, kind)
            return False
        return True

    def send_global_later(self, record: DeviceRecord) -> None:
        """Bring one device up to date in the background (if it is not already)."""
        if record.weights_version != self._model.version:
            self._background.spawn(
                self.ensure_global(record), f"global-to-{record.device_id}", record.device_id
            )

    def broadcast(self, exclude: frozenset[str] = frozenset()) -> None:
        """Send the current version to every connected device (but the ids in ``exclude``:
        the devices a round is starting, which get it with ``training:start``),
        concurrently."""
        for record in self._registry.connected():
            if record.device_id not in exclude:
                self.send_global_later(record)

    async def deliver_final(self, record: DeviceRecord, finished: FederationFinished) -> None:
        """The final global, then ``federation:finished`` (once per connection)."""
        await self.ensure_global(record)
        sid = record.sid
        if sid is None or sid in self._told_finished:
            return
        self._told_finished.add(sid)
        try:
            await self._sio.emit(FEDERATION_FINISHED.name, finished.to_wire(), to=sid)
        except Exception as exc:  # a transport failure: the device is gone
            log.info("telling %s the federation finished failed: %s", record.name, exc)

    async def deliver_final_to_all(self, finished: FederationFinished) -> None:
        """:meth:`deliver_final` to every connected device, concurrently; returns when done."""
        sends = [self.deliver_final(r, finished) for r in self._registry.connected()]
        await asyncio.gather(*sends, return_exceptions=True)

    def forget_connection(self, sid: str) -> None:
        self._told_finished.discard(sid)
