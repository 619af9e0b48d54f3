"""A new global's document on its way to the devices: shared chunks and the hold on its
last one.

Contract: :class:`SharedChunks` cuts a range of a document (by its SHA-256) into bytes
once and hands the same bytes to every send that reads that range while it is kept: at
most ``keep`` chunks held, the oldest dropped first (pure; owned by the event loop).
:class:`Presend` is a new version sent ahead of its publication
(:meth:`server.distribution.Distributor.presend`): the sends wait on :meth:`Presend.wait`
before the document's last chunk, which answers True once :meth:`Presend.durable` (the
version's save is over) and False once :meth:`Presend.abandon` (it will not be
published); the first of the two decides. Nothing here sends or does I/O.
"""

from __future__ import annotations

import asyncio

#: Chunks of the global kept for concurrent sends to share (at most this many; each at most
#: one chunk towards a device): the devices of a round are sent the same version side by
#: side, chunk by chunk, so each chunk is cut (copied out of the document) once, not once
#: per device.
SHARED_CHUNKS = 16


class SharedChunks:
    """Chunks of documents being sent, cut once and handed to every send that reads the
    same range of the same document (by its SHA-256) while it is kept; at most ``keep``
    chunks held, the oldest dropped first. Owned by the event loop."""

    def __init__(self, keep: int = SHARED_CHUNKS) -> None:
        self._keep = keep
        self._held: dict[tuple[str, int, int], bytes] = {}

    def cut(self, digest: str, data: bytes | memoryview, start: int, end: int) -> bytes:
        """``data[start:end]`` as bytes (``data`` hashes to ``digest``), shared when held."""
        key = (digest, start, end)
        piece = self._held.get(key)
        if piece is None:
            piece = bytes(memoryview(data)[start:end])
            self._held[key] = piece
            if len(self._held) > self._keep:
                del self._held[next(iter(self._held))]  # dicts keep insertion order
        return piece


class Presend:
    """A new version's document sent ahead of its publication (:meth:`Distributor.
    presend`): its bytes go out at once, its last chunk only after :meth:`durable`;
    :meth:`abandon` stops the sends instead (the version will not be published)."""

    def __init__(self, version: int) -> None:
        self.version = version
        self._outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def durable(self) -> None:
        """The version is saved (or its save was given up and it is published anyway):
        the sends may complete the document."""
        if not self._outcome.done():
            self._outcome.set_result(True)

    def abandon(self) -> None:
        """The version will not be published: the sends stop before its last chunk."""
        if not self._outcome.done():
            self._outcome.set_result(False)

    async def wait(self) -> bool:
        """True once :meth:`durable`, False once :meth:`abandon` was called."""
        return await asyncio.shield(self._outcome)
