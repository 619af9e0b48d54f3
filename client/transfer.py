"""The chunked, acknowledged, resumable blob sub-protocol, for both peers.

Why chunks: one multi-megabyte Socket.IO message starves the engine.io ping/pong and
drops the connection (socket.io#3135, python-socketio#479). Blobs are therefore sent as
``blob:chunk`` messages of at most the receiver's ``maxChunkBytes``, with a small window
of chunks in flight, and a sender that reconnects asks ``blob:status`` and resumes from
the receiver's offset instead of from zero.

Receiving side: :class:`BlobStore`, bookkeeping (no clock of its own; no I/O unless
given a ``spill_dir``, see below), keyed by ``(peer, blobId)`` where ``peer`` is a stable
identity (the device id, not the Socket.IO sid) so partial blobs survive a reconnect
until they expire. It promises:

- limits are checked *before* anything is buffered: a chunk over ``max_chunk_bytes``,
  a total over ``max_blob_bytes``, or a peer holding more than ``max_peer_bytes`` is
  refused with its code, and no memory is reserved for a claimed total (the buffer
  grows only with bytes actually received);
- a repeated chunk (offset below what is held) is acknowledged without effect; a chunk
  past it is refused with ``offset_gap``; ``total``/``sha256`` must match the first chunk;
- a chunk that would run past ``total`` is refused with ``size_mismatch`` and changes
  nothing (the bytes held stay as they were, so a correct chunk can follow);
- the chunk that completes a blob is acknowledged ``complete`` only when the whole blob
  hashes to its announced SHA-256 (hashed incrementally as chunks arrive); otherwise the
  blob is dropped (memory and files freed, ``status`` answers 0 again) and the chunk is
  refused with ``checksum_mismatch``, so a sender never believes a corrupt blob arrived;
- :meth:`BlobStore.take` hands out a blob only when complete and its size and SHA-256
  match the weights reference, then forgets it; :meth:`BlobStore.take_file` hands over a
  verified spilled blob's file itself (moved, not read or hashed again).

By default blobs are held in memory. With ``spill_dir`` (the server's, so an upload
survives a server restart) each partial blob is a ``.part`` file appended chunk by chunk
beside a small JSON sidecar (peer, blob id, total, SHA-256), under a folder per peer;
:meth:`BlobStore.restore` picks them up after a restart, so ``status`` reports the bytes
already held and the sender resumes from there. The rules above (limits checked before
anything is written, offsets, mismatches) are the same in both modes: only where the
bytes go differs. Plain writes are enough to survive a ``kill -9`` of the process (the
data is in the page cache); a disk that refuses a write answers ``internal_error`` and
the chunk is not counted.

Sending side: :func:`send_blob`, an async function over any ``call(event, payload)``
coroutine that returns the peer's ack (python-socketio's ``call`` on either side).
Errors raise :class:`client.errors.FedtrayError` with the peer's code.
:func:`limits_towards` is the pure rule for what a server may send a device (the smaller
of its own limits and the ones the device advertised at registration).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.atomicfile import write_atomic
from client.errors import FedtrayError
from client.protocol import (
    EV_BLOB_CHUNK,
    EV_BLOB_STATUS,
    BlobChunk,
    BlobProgress,
    BlobStatus,
    Capabilities,
    ErrorAck,
    Limits,
    WeightFormat,
    WeightsRef,
)
from client.weights import sha256_hex, verify_blob

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


log = logging.getLogger(__name__)


@dataclass
class _Partial:
    total: int
    sha256: str
    buffer: bytearray = field(default_factory=bytearray)  # in memory mode only
    received: int = 0
    touched: float = 0.0
    # SHA-256 of the bytes held, fed chunk by chunk; None for a blob restored from disk
    # (hashed from its file when it completes).
    hasher: Any = field(default_factory=hashlib.sha256)
    verified: bool = False  # complete, and the whole blob hashes to ``sha256``


def _name_hash(text: str) -> str:
    """A file-name-safe stand-in for a peer or blob id (ids may hold ``:`` or ``.``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class _SpillDir:
    """Where a disk-backed BlobStore keeps its bytes: ``<dir>/<peer>/<blob>.part`` + ``.json``.

    All the I/O of the blob store lives here; the rules live in :class:`BlobStore`.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _paths(self, peer: str, blob_id: str) -> tuple[Path, Path]:
        base = self.directory / _name_hash(peer) / _name_hash(blob_id)
        return base.with_suffix(".part"), base.with_suffix(".json")

    def create(self, peer: str, blob_id: str, total: int, sha256: str) -> None:
        """An empty partial blob; the sidecar is written first so a part file is never
        orphaned of its description."""
        part, meta = self._paths(peer, blob_id)
        doc = {"peer": peer, "blobId": blob_id, "total": total, "sha256": sha256}
        write_atomic(meta, json.dumps(doc).encode("utf-8"))
        part.unlink(missing_ok=True)
        part.touch(mode=0o600)  # private, like the sidecar: it holds a device's weights

    def append(self, peer: str, blob_id: str, held: int, data: bytes) -> None:
        """Append ``data`` after the ``held`` bytes (cutting any torn tail of a failed write)."""
        part, _ = self._paths(peer, blob_id)
        with part.open("r+b") as fh:
            fh.truncate(held)
            fh.seek(held)
            fh.write(data)

    def part_path(self, peer: str, blob_id: str) -> Path:
        return self._paths(peer, blob_id)[0]

    def read(self, peer: str, blob_id: str) -> bytes:
        part, _ = self._paths(peer, blob_id)
        return part.read_bytes()

    def digest(self, peer: str, blob_id: str) -> str:
        """SHA-256 hex of the part file, read a piece at a time."""
        part, _ = self._paths(peer, blob_id)
        hasher = hashlib.sha256()
        with part.open("rb") as fh:
            while piece := fh.read(1 << 20):
                hasher.update(piece)
        return hasher.hexdigest()

    def remove(self, peer: str, blob_id: str) -> None:
        part, meta = self._paths(peer, blob_id)
        for path in (meta, part):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            part.parent.rmdir()  # only when empty

    def scan(self) -> list[tuple[str, str, int, str, int]]:
        """``(peer, blob_id, total, sha256, bytes held)`` of every readable partial blob;
        unreadable leftovers are deleted."""
        found: list[tuple[str, str, int, str, int]] = []
        if not self.directory.is_dir():
            return found
        for meta in sorted(self.directory.glob("*/*.json")):
            part = meta.with_suffix(".part")
            try:
                doc = json.loads(meta.read_text(encoding="utf-8"))
                peer, blob_id = str(doc["peer"]), str(doc["blobId"])
                total, sha256 = int(doc["total"]), str(doc["sha256"])
                size = part.stat().st_size
                if self._paths(peer, blob_id)[1] != meta or size > total:
                    raise ValueError("does not describe its part file")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unreadable partial blob %s: %s", meta, exc)
                for path in (meta, part):
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                continue
            found.append((peer, blob_id, total, sha256, size))
        for part in self.directory.glob("*/*.part"):
            if not part.with_suffix(".json").exists():
                with contextlib.suppress(OSError):
                    part.unlink()
        return found


class BlobStore:
    """Partial and complete blobs received from peers, with limits and expiry.

    Not thread-safe: it is owned by one asyncio loop (the session's or the server's).
    ``now`` arguments are monotonic seconds supplied by the caller, which keeps this
    class free of clocks and easy to test.
    """

    def __init__(
        self,
        *,
        max_chunk_bytes: int,
        max_blob_bytes: int,
        max_peer_bytes: int | None = None,
        ttl_sec: float = 600.0,
        spill_dir: Path | None = None,
    ) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.max_blob_bytes = max_blob_bytes
        # Two blobs per peer (an update being resent beside a new one) by default.
        self.max_peer_bytes = max_peer_bytes if max_peer_bytes is not None else 2 * max_blob_bytes
        self.ttl_sec = ttl_sec
        self._blobs: dict[tuple[str, str], _Partial] = {}
        self._spill = _SpillDir(spill_dir) if spill_dir is not None else None

    def restore(self, now: float) -> int:
        """Pick up the partial blobs a previous process left in ``spill_dir``.

        Returns how many were restored (0 in memory mode). Their expiry starts at ``now``.
        """
        if self._spill is None:
            return 0
        found = self._spill.scan()
        for peer, blob_id, total, sha256, size in found:
            self._blobs[(peer, blob_id)] = _Partial(
                total=total, sha256=sha256, received=size, touched=now, hasher=None
            )
        return len(found)

    def accept_chunk(self, peer: str, chunk: BlobChunk, now: float) -> BlobProgress:
        """Append one chunk; return what is now held. Raises FedtrayError on refusal.

        The chunk that completes the blob is checked against the blob's SHA-256; on a
        mismatch the blob is dropped and ``checksum_mismatch`` raised.
        """
        size = len(chunk.data)
        if size > self.max_chunk_bytes:
            raise FedtrayError(
                "chunk_too_large",
                f"chunk of {size} bytes is over the limit of {self.max_chunk_bytes} bytes",
            )
        if chunk.total > self.max_blob_bytes:
            raise FedtrayError(
                "blob_too_large",
                f"blob of {chunk.total} bytes is over the limit of {self.max_blob_bytes} bytes",
            )
        key = (peer, chunk.blob_id)
        partial = self._blobs.get(key)
        if partial is None:
            if chunk.offset != 0:
                raise FedtrayError(
                    "offset_gap", f"blob {chunk.blob_id} is unknown here: start at offset 0"
                )
            if size > chunk.total:
                # Checked before the blob is recorded, so a refused first chunk leaves nothing.
                raise FedtrayError(
                    "size_mismatch",
                    f"chunk of {size} bytes is larger than blob {chunk.blob_id} ({chunk.total})",
                )
            held = self.bytes_held(peer)
            if held + chunk.total > self.max_peer_bytes:
                raise FedtrayError(
                    "blob_too_large",
                    f"this device already has {held} bytes in transfer; the limit is "
                    f"{self.max_peer_bytes} bytes",
                )
            partial = _Partial(total=chunk.total, sha256=chunk.sha256)
            if self._spill is not None:
                try:
                    self._spill.create(peer, chunk.blob_id, chunk.total, chunk.sha256)
                except OSError as exc:
                    self._spill.remove(peer, chunk.blob_id)
                    raise FedtrayError("internal_error", f"cannot store the blob: {exc}") from None
            self._blobs[key] = partial
        elif partial.total != chunk.total or partial.sha256 != chunk.sha256:
            raise FedtrayError(
                "blob_mismatch",
                f"blob {chunk.blob_id} was announced with another size or checksum",
            )
        partial.touched = now
        received = partial.received
        if chunk.offset < received:
            # A resent chunk after a lost ack: already held, acknowledge idempotently.
            return self._progress(partial)
        if chunk.offset > received:
            raise FedtrayError(
                "offset_gap",
                f"chunk at offset {chunk.offset} but only {received} bytes of blob "
                f"{chunk.blob_id} are held; ask blob:status and resume",
            )
        if received + size > partial.total:
            raise FedtrayError(
                "size_mismatch",
                f"chunk would grow blob {chunk.blob_id} past its announced {partial.total} bytes",
            )
        if self._spill is None:
            partial.buffer += chunk.data
        else:
            try:
                self._spill.append(peer, chunk.blob_id, received, chunk.data)
            except OSError as exc:
                raise FedtrayError("internal_error", f"cannot store the chunk: {exc}") from None
        if partial.hasher is not None:
            partial.hasher.update(chunk.data)
        partial.received += size
        if partial.received == partial.total:
            self._verify_complete(peer, chunk.blob_id, partial)
        return self._progress(partial)

    def _verify_complete(self, peer: str, blob_id: str, partial: _Partial) -> None:
        """Check a just-completed blob against its announced SHA-256; drop it if it fails."""
        if partial.hasher is not None:
            digest = partial.hasher.hexdigest()
        else:
            assert self._spill is not None  # only restored (disk) blobs lack a hasher
            try:
                digest = self._spill.digest(peer, blob_id)
            except OSError as exc:
                raise FedtrayError("internal_error", f"cannot read blob {blob_id}: {exc}") from None
        partial.hasher = None  # complete: nothing more to feed it
        if digest != partial.sha256:
            self.discard(peer, blob_id)
            raise FedtrayError(
                "checksum_mismatch",
                f"blob {blob_id} is complete but hashes to sha256 {digest}, not the announced "
                f"{partial.sha256}; it was dropped: send it again from offset 0",
            )
        partial.verified = True

    def status(self, peer: str, blob_id: str, now: float) -> BlobProgress:
        """What is held of a blob (0 when unknown); refreshes its expiry."""
        partial = self._blobs.get((peer, blob_id))
        if partial is None:
            return BlobProgress(received=0)
        partial.touched = now
        return self._progress(partial)

    def take(self, peer: str, ref: WeightsRef) -> bytes | bytearray:
        """The verified bytes a weights reference points to (inline or blob).

        A blob is forgotten once taken. Raises FedtrayError: ``blob_unknown``,
        ``blob_incomplete``, ``size_mismatch`` or ``checksum_mismatch``.
        """
        data: bytes | bytearray
        # A blob hashed as it arrived and held in memory by this store only since is not
        # hashed again; one read back from disk, or named with other size/sha256, is.
        verified = False
        if ref.data is not None:
            data = ref.data
        else:
            assert ref.blob_id is not None  # guaranteed by WeightsRef's validator
            partial = self._blobs.get((peer, ref.blob_id))
            if partial is None:
                raise FedtrayError("blob_unknown", f"blob {ref.blob_id} was never received")
            if partial.received < partial.total:
                raise FedtrayError(
                    "blob_incomplete",
                    f"blob {ref.blob_id} holds {partial.received} of {partial.total} bytes",
                )
            if self._spill is None:
                # Handed over without a copy: the store forgets the blob, the caller owns it.
                data = partial.buffer
                verified = partial.verified and (ref.size, ref.sha256) == (
                    partial.total,
                    partial.sha256,
                )
            else:
                try:
                    data = self._spill.read(peer, ref.blob_id)
                except OSError as exc:
                    raise FedtrayError(
                        "internal_error", f"cannot read blob {ref.blob_id}: {exc}"
                    ) from None
            self.discard(peer, ref.blob_id)
        if not verified:
            verify_blob(data, size=ref.size, sha256=ref.sha256)
        return data

    def take_file(self, peer: str, ref: WeightsRef, dest: Path) -> bool:
        """Move the verified spilled file of the blob ``ref`` names to ``dest`` (no read,
        no second hash) and forget the blob; True when moved. False, changing nothing, when
        there is no such file (inline data, memory mode, unknown, incomplete, not verified
        since it arrived, another size/SHA-256, or the move fails): then use :meth:`take`.
        """
        if self._spill is None or ref.blob_id is None:
            return False
        partial = self._blobs.get((peer, ref.blob_id))
        if partial is None or not partial.verified:
            return False
        if (ref.size, ref.sha256) != (partial.total, partial.sha256):
            return False
        try:
            os.replace(self._spill.part_path(peer, ref.blob_id), dest)
        except OSError:
            return False
        self.discard(peer, ref.blob_id)
        return True

    def discard(self, peer: str, blob_id: str) -> None:
        """Forget a blob (idempotent); its files too in disk mode."""
        if self._blobs.pop((peer, blob_id), None) is not None and self._spill is not None:
            self._spill.remove(peer, blob_id)

    def expire(self, now: float) -> int:
        """Drop blobs untouched for ``ttl_sec``; return how many were dropped."""
        stale = [k for k, p in self._blobs.items() if now - p.touched > self.ttl_sec]
        for peer, blob_id in stale:
            self.discard(peer, blob_id)
        return len(stale)

    def bytes_held(self, peer: str | None = None) -> int:
        """Bytes held (in memory or on disk) for one peer, or for all when ``peer`` is None."""
        return sum(p.received for (owner, _), p in self._blobs.items() if peer in (None, owner))

    @staticmethod
    def _progress(partial: _Partial) -> BlobProgress:
        return BlobProgress(received=partial.received, complete=partial.received == partial.total)


def limits_towards(device: Capabilities, own: Limits) -> Limits:
    """The limits a server keeps to when it sends blobs to ``device``: the smaller of its
    own and the ones the device advertised (chunk size, chunks in flight, blob size)."""
    return Limits(
        max_chunk_bytes=min(own.max_chunk_bytes, device.max_chunk_bytes),
        max_blob_bytes=min(own.max_blob_bytes, device.max_blob_bytes),
        max_inflight_chunks=min(own.max_inflight_chunks, device.max_inflight_chunks),
    )


def _check_ack(ack: Any, what: str) -> BlobProgress:
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
    """Send ``data`` as blob ``blob_id``, resuming from what the peer already holds.

    Up to ``window`` chunks are in flight at once (Socket.IO keeps their order on one
    connection). Returns when the peer holds the whole blob. Raises FedtrayError with
    the peer's code on a refusal; a lost connection surfaces as the transport's own
    exception, and calling again after a reconnect resumes.
    """
    if chunk_bytes < 1 or window < 1:
        raise ValueError("chunk_bytes and window must be positive")
    total = len(data)
    digest = sha256 or sha256_hex(data)
    view = memoryview(data)
    status = _check_ack(
        await call(EV_BLOB_STATUS, BlobStatus(blob_id=blob_id).to_wire()), "blob:status"
    )
    offset = status.received
    if offset > total:
        raise FedtrayError("blob_mismatch", f"peer holds {offset} bytes of a {total}-byte blob")
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
                    data=bytes(view[offset:end]),
                )
                in_flight.append(asyncio.ensure_future(call(EV_BLOB_CHUNK, chunk.to_wire())))
                offset = end
            progress = _check_ack(await in_flight.pop(0), "blob:chunk")
            if on_progress is not None:
                on_progress(progress.received, total)
    finally:
        for task in in_flight:
            task.cancel()


def weights_ref_for(
    data: bytes, fmt: WeightFormat, *, inline_limit: int, sha256: str | None = None
) -> WeightsRef:
    """A WeightsRef for ``data``: inline when it fits ``inline_limit``, else a blob reference.

    The blob id is the content's SHA-256, so the same document keeps the same id across
    restarts and a resumed upload finds its partial blob. When ``ref.blob_id`` is set the
    caller sends the blob (:func:`send_blob`) before the message that carries the ref.
    """
    digest = sha256 or sha256_hex(data)
    if len(data) <= inline_limit:
        return WeightsRef(format=fmt, size=len(data), sha256=digest, data=data)
    return WeightsRef(format=fmt, size=len(data), sha256=digest, blob_id=digest)
