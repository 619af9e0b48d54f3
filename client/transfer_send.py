"""The sending side of the blob sub-protocol (:mod:`client.transfer`): from memory or a file.

Contract: :func:`send_blob` sends bytes held in memory, :func:`send_file_blob` a file read a
chunk at a time; both over any ``call(event, payload)`` coroutine that returns the peer's
ack (python-socketio's ``call`` on either side), both resume from the offset the peer
reports (``blob:status``) and keep up to ``window`` chunks in flight (Socket.IO keeps their
order on one connection). They return when the peer holds the whole blob; a refusal raises
:class:`client.errors.FedtrayError` with the peer's code, a lost connection the
transport's own exception (calling again after a reconnect resumes).

:func:`send_file_blob` reads the file once: each piece is read and hashed in a worker
thread (SHA-256 runs beside the loop's sending, without the GIL) while the pieces before it
are on the wire, and no copy of the whole file is ever held. Its promise: the blob's last
byte is sent only once the whole file -- the part the peer already held included, read
again for the hash -- has hashed to the given SHA-256 and has the given size; otherwise it
raises :class:`BlobSourceError` and the peer never completes the blob (it keeps an
incomplete one until it expires); so does a file that cannot be opened or read (its
``OSError`` is the cause), so a caller tells its own copy's faults from the peer's and the
link's. So a sender that knows its file's digest (recorded when it was written) neither
hashes it in a separate pass nor ever lets the peer take bytes that differ from it; the
peer still checks the digest itself. Given the file's ``identity`` (size, mtime, inode)
as it was when its digest was known to hold (the sender hashed the bytes as it wrote
them), a file opened with that identity is not hashed again: it is checked to still have
that identity (and size) before the last piece instead, so bytes changed on disk since
(a new mtime) are never completed either. Its ``ready`` (when given) is awaited before
the last piece is read and sent, after every piece before it is on the wire: a sender
whose file is still being made durable (fsynced) sends the rest meanwhile and completes
the blob only once that is done (what ``ready`` raises passes on, the last byte unsent).
A peer that already holds the whole file gets nothing, and ``ready`` is not awaited.

:func:`weights_ref_for` and :func:`blob_ref` name what was sent in a weights message.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

from client.atomicfile import FileIdentity, file_identity
from client.errors import FedtrayError
from client.protocol import (
    EV_BLOB_CHUNK,
    EV_BLOB_STATUS,
    BlobChunk,
    BlobProgress,
    BlobStatus,
    ErrorAck,
    WeightFormat,
    WeightsRef,
)
from client.weights import sha256_hex

__all__ = [
    "BlobSourceError",
    "Call",
    "blob_ref",
    "check_ack",
    "peer_offset",
    "send_blob",
    "send_file_blob",
    "send_from",
    "weights_ref_for",
]

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]
#: Reads the bytes ``[offset, end)`` of the blob being sent.
ReadPiece = Callable[[int, int], Awaitable[bytes]]


class BlobSourceError(Exception):
    """The file being sent cannot be read, or is not the one described (another size, or
    another SHA-256): the sender's own copy is at fault, not the peer or the link."""


def check_ack(ack: Any, what: str) -> BlobProgress:
    """Turn a peer's ack into BlobProgress, or raise FedtrayError with the peer's code."""
    if isinstance(ack, dict) and ack.get("ok") is False:
        try:
            err = ErrorAck.model_validate(ack)
        except ValueError:
            raise FedtrayError("internal_error", f"peer refused {what}: {ack!r:.200}") from None
        raise FedtrayError(err.code, err.message)
    try:
        return BlobProgress.model_validate(ack)
    except ValueError:
        raise FedtrayError("bad_request", f"unexpected ack to {what}: {ack!r:.200}") from None


async def peer_offset(call: Call, blob_id: str, total: int) -> int:
    """How many bytes of blob ``blob_id`` (``total`` long) the peer holds (``blob:status``);
    raises FedtrayError when that cannot be this blob."""
    status = check_ack(
        await call(EV_BLOB_STATUS, BlobStatus(blob_id=blob_id).to_wire()), "blob:status"
    )
    if status.received > total:
        raise FedtrayError(
            "blob_mismatch", f"peer holds {status.received} bytes of a {total}-byte blob"
        )
    return status.received


async def send_from(
    call: Call,
    read: ReadPiece,
    offset: int,
    *,
    total: int,
    digest: str,
    blob_id: str,
    chunk_bytes: int,
    window: int,
    on_progress: Callable[[int, int], None] | None,
) -> None:
    """Send ``[offset, total)`` as chunks read by ``read``, ``window`` of them in flight."""
    if on_progress is not None:
        on_progress(offset, total)
    in_flight: list[asyncio.Task[Any]] = []
    try:
        while offset < total or in_flight:
            while offset < total and len(in_flight) < window:
                end = min(offset + chunk_bytes, total)
                chunk = BlobChunk(
                    blob_id=blob_id,
                    offset=offset,
                    total=total,
                    sha256=digest,
                    data=await read(offset, end),
                )
                in_flight.append(asyncio.ensure_future(call(EV_BLOB_CHUNK, chunk.to_wire())))
                offset = end
            progress = check_ack(await in_flight.pop(0), "blob:chunk")
            if on_progress is not None:
                on_progress(progress.received, total)
    finally:
        for task in in_flight:
            task.cancel()


def _check_window(chunk_bytes: int, window: int) -> None:
    if chunk_bytes < 1 or window < 1:
        raise ValueError("chunk_bytes and window must be positive")


async def send_blob(
    call: Call,
    data: bytes,
    *,
    blob_id: str,
    chunk_bytes: int,
    window: int = 4,
    sha256: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Send ``data`` (held in memory) as blob ``blob_id`` (see the module docstring);
    ``sha256`` is ``data``'s, when the caller knows it."""
    _check_window(chunk_bytes, window)
    total = len(data)
    digest = sha256 or sha256_hex(data)
    view = memoryview(data)
    offset = await peer_offset(call, blob_id, total)

    async def read(start: int, end: int) -> bytes:
        return bytes(view[start:end])

    await send_from(
        call,
        read,
        offset,
        total=total,
        digest=digest,
        blob_id=blob_id,
        chunk_bytes=chunk_bytes,
        window=window,
        on_progress=on_progress,
    )


async def send_file_blob(
    call: Call,
    path: Path,
    *,
    size: int,
    sha256: str,
    blob_id: str,
    chunk_bytes: int,
    window: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
    identity: FileIdentity | None = None,
) -> None:
    """Send the file ``path``, which must be ``size`` bytes hashing to ``sha256``, as blob
    ``blob_id``, reading it once (see the module docstring). Raises :class:`BlobSourceError`
    (before its last byte is sent) when the file is not that or cannot be read, what
    ``ready`` raises (awaited before the last piece), and what :func:`send_blob` raises."""
    _check_window(chunk_bytes, window)
    try:
        fh = await asyncio.to_thread(path.open, "rb")
    except OSError as exc:
        raise BlobSourceError(f"cannot open {path}: {exc}") from exc
    try:
        hasher: Any = hashlib.sha256()
        if identity is not None and identity.size == size and _identity(fh) == identity:
            hasher = None  # vouched for by its identity: checked again at the end instead
        offset = await peer_offset(call, blob_id, size)
        if hasher is None:
            fh.seek(offset)
        else:
            # The bytes the peer holds already are hashed too (read, not sent).
            await asyncio.to_thread(_hash_prefix, fh, hasher, offset, chunk_bytes)

        async def read(start: int, end: int) -> bytes:
            if end == size and ready is not None:
                await ready()  # the last piece: only once the file is durable
            return await asyncio.to_thread(
                _read_piece, fh, hasher, start, end, size, sha256, identity
            )

        await send_from(
            call,
            read,
            offset,
            total=size,
            digest=sha256,
            blob_id=blob_id,
            chunk_bytes=chunk_bytes,
            window=window,
            on_progress=on_progress,
        )
    finally:
        fh.close()


def _read(fh: BinaryIO, n: int) -> bytes:
    try:
        return fh.read(n)
    except OSError as exc:
        raise BlobSourceError(f"cannot read {fh.name}: {exc}") from exc


def _hash_prefix(fh: BinaryIO, hasher: Any, held: int, piece: int) -> None:
    """Feed the file's first ``held`` bytes to ``hasher`` (a worker thread)."""
    done = 0
    while done < held:
        data = _read(fh, min(piece, held - done))
        if not data:
            raise BlobSourceError(f"the file ended at byte {done}, before the peer's {held}")
        hasher.update(data)
        done += len(data)


def _identity(fh: BinaryIO) -> FileIdentity | None:
    try:
        return file_identity(fh.fileno())
    except OSError:
        return None


def _read_piece(
    fh: BinaryIO,
    hasher: Any,
    start: int,
    end: int,
    size: int,
    sha256: str,
    identity: FileIdentity | None,
) -> bytes:
    """The file's bytes ``[start, end)``, read in order after the ones before them and fed
    to ``hasher``; at the end of the blob, the whole file's size and digest are checked
    (``hasher`` None: its size and identity) (a worker thread). Raises BlobSourceError."""
    data = _read(fh, end - start)
    if len(data) != end - start:
        raise BlobSourceError(f"the file ended at byte {start + len(data)}, not at {size}")
    if hasher is not None:
        hasher.update(data)
    if end == size:
        if _read(fh, 1):
            raise BlobSourceError(f"the file is longer than {size} bytes")
        if hasher is None:
            if _identity(fh) != identity:
                raise BlobSourceError("the file changed on disk while it was sent")
        elif hasher.hexdigest() != sha256:
            raise BlobSourceError(f"the file no longer hashes to sha256 {sha256}")
    return data


def blob_ref(fmt: WeightFormat, *, size: int, sha256: str) -> WeightsRef:
    """The reference to a document sent as a blob; the blob id is the content's SHA-256, so
    the same document keeps the same id across restarts and a resumed upload finds its
    partial blob."""
    return WeightsRef(format=fmt, size=size, sha256=sha256, blob_id=sha256)


def weights_ref_for(
    data: bytes, fmt: WeightFormat, *, inline_limit: int, sha256: str | None = None
) -> WeightsRef:
    """A WeightsRef for ``data``: inline when it fits ``inline_limit``, else a blob reference
    (:func:`blob_ref`). When ``ref.blob_id`` is set the caller sends the blob
    (:func:`send_blob`) before the message that carries the ref."""
    digest = sha256 or sha256_hex(data)
    if len(data) <= inline_limit:
        return WeightsRef(format=fmt, size=len(data), sha256=digest, data=data)
    return blob_ref(fmt, size=len(data), sha256=digest)
