"""Where a disk-backed :class:`client.transfer.BlobStore` keeps its partial blobs.

Contract: ``<dir>/<peer hash>/<blob hash>.part`` holds the bytes received so far and a
``.json`` sidecar (peer, blob id, total, SHA-256) describes it; the sidecar is written
(atomically) before its part file exists, so a part file is never orphaned of its
description. Nothing here is fsynced, the sidecar included: a ``kill -9`` loses nothing (the
OS holds the data), and after a power cut a lost or torn sidecar makes :meth:`SpillDir.scan`
drop its part (the sender starts that blob again from offset 0) while a part that lost its
tail reports fewer bytes (the sender resumes from there); the blob's SHA-256 is checked
when it completes either way. (An fsync per new blob, in the receiving event loop, cost
about 10 ms each on the reference server.) All the I/O of the blob store lives here; the
rules (limits, offsets, checksums) live in :class:`client.transfer.BlobStore`. Methods
raise ``OSError`` from the disk; :meth:`SpillDir.scan` deletes leftovers it cannot read
instead of raising.

Each appended chunk's write-out to the disk is started at once (Linux's
``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait for it; nothing elsewhere),
so when the server fsyncs a received update before acknowledging it
(:mod:`server.roundcommit`) most of its bytes are on the disk already and the fsync has
little left to wait for (measured: 100 MB written in 4 MiB pieces, the final fsync 76 ms
without, 1 ms with). It promises nothing by itself: durability still comes from that fsync.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from client.atomicfile import write_atomic

__all__ = ["SpillDir"]

log = logging.getLogger(__name__)


#: ``sync_file_range``'s flag to start writing a range out without waiting (Linux).
SYNC_FILE_RANGE_WRITE = 2


def _writeback_starter() -> Callable[[int, int, int], bool]:
    """``start(fd, offset, nbytes)``: start the range's write-out without waiting for it
    and say whether it was started (Linux); elsewhere, or without the call, a no-op that
    says False. Never raises (it is only a hint)."""
    if not sys.platform.startswith("linux"):
        return lambda fd, offset, nbytes: False
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, nbytes: False
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> bool:
        return bool(call(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) == 0)

    return start


start_writeback = _writeback_starter()


def _name_hash(text: str) -> str:
    """A file-name-safe stand-in for a peer or blob id (ids may hold ``:`` or ``.``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class SpillDir:
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
        write_atomic(meta, json.dumps(doc).encode("utf-8"), durable=False)
        part.unlink(missing_ok=True)
        part.touch(mode=0o600)  # private, like the sidecar: it holds a device's weights

    def append(self, peer: str, blob_id: str, held: int, data: bytes) -> None:
        """Append ``data`` after the ``held`` bytes (cutting any torn tail of a failed write)."""
        part, _ = self._paths(peer, blob_id)
        with part.open("r+b") as fh:
            fh.truncate(held)
            fh.seek(held)
            fh.write(data)
            fh.flush()
            start_writeback(fh.fileno(), held, len(data))

    def part_path(self, peer: str, blob_id: str) -> Path:
        """Where the partial blob's bytes are (a verified blob's file may be moved away)."""
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
