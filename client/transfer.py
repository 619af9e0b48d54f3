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

- limits are checked *before* anything is buffered: a chunk over ``max_chunk_bytes`` is
  refused ``chunk_too_large``; a total over ``max_blob_bytes`` (or one that could never
  fit the budgets below) ``blob_too_large``. A new blob is refused ``transfers_full``
  (the sender may retry once a transfer completes or expires) when its peer already has
  ``max_open_per_peer`` partial blobs open, or when its announced total added to the
  totals *announced* by the open blobs would pass ``max_peer_bytes`` (that peer's) or
  ``max_total_bytes`` (all peers together). Budgets count announced totals, not bytes
  received so far, so no number of barely started blobs can later grow past them: the
  bytes held never exceed ``min(max_peer_bytes per peer, max_total_bytes)``. No memory is
  reserved for a claimed total (the buffer grows only with bytes actually received);
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
beside a small JSON sidecar (peer, blob id, total, SHA-256), under a folder per peer
(:mod:`client.transfer_spill`);
:meth:`BlobStore.restore` picks them up after a restart, so ``status`` reports the bytes
already held and the sender resumes from there. The rules above (limits checked before
anything is written, offsets, mismatches) are the same in both modes: only where the
bytes go differs. Plain writes are enough to survive a ``kill -9`` of the process (the
data is in the page cache); a disk that refuses a write answers ``internal_error`` and
the chunk is not counted.

Chunk size: the protocol's default ``maxChunkBytes`` (512 KiB) fits peers built with the
Socket.IO libraries' default message limit; the reference server and device raise their own
limit to :data:`REFERENCE_CHUNK_BYTES` (4 MiB), so between them a 100 MB blob is 25 chunks,
not 200: each chunk costs two Engine.IO messages, an ack, a validation and a file append,
and on a 2-core machine that per-chunk work, not the bytes, is what a large round's transfers
spent (measured with ``benchmarks/vs_flower.py`` at 25 MB: the steady round 35-45 % shorter).
A 4 MiB chunk still moves in milliseconds on any link that carries a 100 MB model, so pings
and heartbeats keep flowing between chunks. A peer advertising less gets chunks of its size.

Message size: :func:`message_limit` is the largest Engine.IO message a peer reads, given
the chunk size it advertises (one chunk plus :data:`MESSAGE_MARGIN_BYTES` of envelope);
the server passes it as ``max_http_buffer_size``. The device reads messages up to
:data:`DEVICE_MAX_MESSAGE_BYTES` (its websocket ``max_msg_size``), far above what a
conforming server sends it, so an oversized event reaches the handlers and is refused
with a code; a message over a peer's limit is cut by the transport, which closes that
connection (it is never read, so it cannot be answered).

Sending side: :mod:`client.transfer_send` (:func:`send_blob` from memory,
:func:`send_file_blob` from a file read once; re-exported here), over any
``call(event, payload)`` coroutine that returns the peer's ack. Errors raise
:class:`client.errors.FedtrayError` with the peer's code.
:func:`limits_towards` is the pure rule for what a server may send a device (the smaller
of its own limits and the ones the device advertised at registration).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.errors import FedtrayError
from client.protocol import (
    BlobChunk,
    BlobProgress,
    Capabilities,
    Limits,
    WeightsRef,
)
from client.transfer_send import (
    BlobSourceError,
    Call,
    blob_ref,
    check_ack,
    send_blob,
    send_file_blob,
    weights_ref_for,
)
from client.transfer_spill import SpillDir
from client.weights import verify_blob

__all__ = [
    "DEFAULT_MAX_OPEN_PER_PEER",
    "DEVICE_MAX_MESSAGE_BYTES",
    "MESSAGE_MARGIN_BYTES",
    "REFERENCE_CHUNK_BYTES",
    "BlobSourceError",
    "BlobStore",
    "Call",
    "blob_ref",
    "check_ack",
    "limits_towards",
    "message_limit",
    "send_blob",
    "send_file_blob",
    "weights_ref_for",
]

#: An Engine.IO message may be this much larger than one chunk: the chunk's envelope, or
#: an inline weights document of up to one chunk plus its metrics.
MESSAGE_MARGIN_BYTES = 64 * 1024
#: The receive limit (``maxChunkBytes``) the reference server and device advertise: 4 MiB
#: (see the module docstring). Chunks are still at most what the receiver advertises.
REFERENCE_CHUNK_BYTES = 4 * 1024 * 1024
#: The largest Engine.IO message the device reads (its websocket ``max_msg_size``): 16 MiB,
#: 4 times the reference chunk (32 times the protocol's default), so a conforming server
#: never comes near it and a larger but readable event is answered with a code rather
#: than cutting the connection.
DEVICE_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Partial blobs one peer may have open at once unless the store is told otherwise (a
#: global, a package, a data share, and transfers interrupted by a reconnect).
DEFAULT_MAX_OPEN_PER_PEER = 8


def message_limit(max_chunk_bytes: int) -> int:
    """The largest Engine.IO message a peer advertising ``max_chunk_bytes`` must read."""
    return max_chunk_bytes + MESSAGE_MARGIN_BYTES


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
        max_total_bytes: int | None = None,
        max_open_per_peer: int = DEFAULT_MAX_OPEN_PER_PEER,
        ttl_sec: float = 600.0,
        spill_dir: Path | None = None,
    ) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.max_blob_bytes = max_blob_bytes
        self.max_peer_bytes = max_blob_bytes
        self.max_total_bytes = max_blob_bytes
        self.max_open_per_peer = max_open_per_peer
        self.set_budget(max_peer_bytes=max_peer_bytes, max_total_bytes=max_total_bytes)
        self.ttl_sec = ttl_sec
        self._blobs: dict[tuple[str, str], _Partial] = {}
        self._spill = SpillDir(spill_dir) if spill_dir is not None else None

    def set_budget(
        self,
        *,
        max_peer_bytes: int | None = None,
        max_total_bytes: int | None = None,
        max_open_per_peer: int | None = None,
    ) -> None:
        """Set the budgets of partial blobs (announced totals of open blobs).

        ``max_peer_bytes`` None: ``max_blob_bytes`` (one largest blob per peer);
        ``max_total_bytes`` None: ``max_peer_bytes`` (right for a store with one peer, the
        device's). Blobs already open stay; only new ones are checked against the budgets.
        Raises ValueError for a budget under 1.
        """
        peer = max_peer_bytes if max_peer_bytes is not None else self.max_blob_bytes
        total = max_total_bytes if max_total_bytes is not None else peer
        count = max_open_per_peer if max_open_per_peer is not None else self.max_open_per_peer
        if min(peer, total, count) < 1:
            raise ValueError("transfer budgets must be positive")
        self.max_peer_bytes, self.max_total_bytes, self.max_open_per_peer = peer, total, count

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
            self._check_budget(peer, chunk)
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

    def _check_budget(self, peer: str, chunk: BlobChunk) -> None:
        """Refuse a new blob that would pass a budget (see the module docstring)."""
        room = min(self.max_peer_bytes, self.max_total_bytes)
        if chunk.total > room:
            raise FedtrayError(
                "blob_too_large",
                f"blob of {chunk.total} bytes is over the {room} bytes this receiver holds "
                "in partial blobs",
            )
        open_here = sum(1 for owner, _ in self._blobs if owner == peer)
        if open_here >= self.max_open_per_peer:
            raise FedtrayError(
                "transfers_full",
                f"{open_here} blobs from this peer are open already (the limit is "
                f"{self.max_open_per_peer}); finish one or wait until one expires",
            )
        mine = self.bytes_committed(peer)
        if mine + chunk.total > self.max_peer_bytes:
            raise FedtrayError(
                "transfers_full",
                f"blobs open from this peer already announce {mine} bytes; with "
                f"{chunk.total} more that is over the limit of {self.max_peer_bytes} bytes",
            )
        everyone = self.bytes_committed()
        if everyone + chunk.total > self.max_total_bytes:
            raise FedtrayError(
                "transfers_full",
                f"open blobs announce {everyone} bytes in all; with {chunk.total} more that is "
                f"over the limit of {self.max_total_bytes} bytes",
            )

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

    def bytes_committed(self, peer: str | None = None) -> int:
        """Announced totals of the blobs open for one peer (all when ``peer`` is None): what
        the budgets count, and the most the bytes held can grow to."""
        return sum(p.total for (owner, _), p in self._blobs.items() if peer in (None, owner))

    def open_blobs(self, peer: str | None = None) -> int:
        """How many blobs are open (partial, or complete and not yet taken)."""
        return sum(1 for owner, _ in self._blobs if peer in (None, owner))

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
