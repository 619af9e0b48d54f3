"""The task-file cache: packages and data shares kept on disk by SHA-256, bounded, LRU.

Contract (blocking I/O, no torch, no threads of its own; the owner serialises calls and
runs them off its event loop):

* A file is ``<directory>/<sha256><suffix>`` (``.fedtask`` for a package,
  ``.safetensors`` for a data share); nothing else in the directory is ever read.
  Files are written atomically (:func:`client.atomicfile.write_atomic`), so a crash
  leaves the old state or the whole new file, never a torn one; leftover temporaries
  are deleted when the cache is opened.
* :meth:`FileCache.put` checks the bytes against their SHA-256 (and size) BEFORE
  anything is written (``checksum_mismatch`` / ``size_mismatch``, a
  :class:`client.errors.FedtrayError`), refuses a file larger than the whole cache
  (``blob_too_large``), then evicts the least recently used files (never one named in
  ``keep``) until the new one fits ``max_bytes``.
* "Used" is the file's modification time: :meth:`FileCache.path` (a hit) and
  :meth:`FileCache.put` set it to the clock's now, so the order survives restarts.
  Ties are broken by name, so eviction is deterministic.
* A file found by :meth:`FileCache.path` is re-hashed only when ``verify=True`` (the
  owner trusts its own writes; a file whose hash is wrong is deleted and reported
  missing).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from client.atomicfile import write_atomic
from client.errors import FedtrayError

__all__ = ["CachedFile", "FileCache"]

log = logging.getLogger(__name__)

_NAME: Final = re.compile(r"(?P<sha>[0-9a-f]{64})(?P<suffix>\.[a-z]{1,16})")
_SHA: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CachedFile:
    """One file in the cache."""

    sha256: str
    path: Path
    size: int
    used: float  # seconds since the epoch, the last time it was used


def _check_sha(sha256: str) -> None:
    if not _SHA.fullmatch(sha256):
        raise ValueError(f"not a lower-case SHA-256 hex digest: {sha256!r}")


def _check_suffix(suffix: str) -> None:
    if not re.fullmatch(r"\.[a-z]{1,16}", suffix):
        raise ValueError(f"bad cache file suffix {suffix!r}")


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as fh:
        while piece := fh.read(1 << 20):
            hasher.update(piece)
    return hasher.hexdigest()


class FileCache:
    """Files by content hash in one directory, at most ``max_bytes`` in all."""

    def __init__(
        self, directory: Path, max_bytes: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be 0 or more")
        self.directory = directory
        self.max_bytes = max_bytes
        self._clock = clock
        self._cleaned = False

    # -- reading ------------------------------------------------------------------------

    def entries(self) -> list[CachedFile]:
        """Every file held, least recently used first."""
        self._clean_once()
        found: list[CachedFile] = []
        try:
            paths = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        for path in paths:
            match = _NAME.fullmatch(path.name)
            if match is None:
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            found.append(CachedFile(match["sha"], path, st.st_size, st.st_mtime))
        found.sort(key=lambda f: (f.used, f.path.name))
        return found

    def total_bytes(self) -> int:
        return sum(f.size for f in self.entries())

    def path(self, sha256: str, suffix: str, *, verify: bool = False) -> Path | None:
        """The file with this content, marked as used now; ``None`` when not held."""
        _check_sha(sha256)
        _check_suffix(suffix)
        path = self.directory / f"{sha256}{suffix}"
        if not path.is_file():
            return None
        if verify and _hash_file(path) != sha256:
            log.warning("dropping %s from the task-file cache: its content changed", path.name)
            path.unlink(missing_ok=True)
            return None
        self._touch(path)
        return path

    # -- writing ------------------------------------------------------------------------

    def put(
        self,
        sha256: str,
        data: bytes | bytearray | memoryview,
        suffix: str,
        *,
        size: int | None = None,
        keep: Collection[str] = (),
    ) -> Path:
        """Keep ``data`` as the file of ``sha256``; its path. See the module docstring."""
        _check_sha(sha256)
        _check_suffix(suffix)
        got = memoryview(data).nbytes
        if size is not None and got != size:
            raise FedtrayError("size_mismatch", f"received {got} bytes but {size} were announced")
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise FedtrayError(
                "checksum_mismatch",
                f"the file hashes to sha256 {digest}, not the announced {sha256}; not kept",
            )
        if got > self.max_bytes:
            raise FedtrayError(
                "blob_too_large",
                f"a task file of {got} bytes is over this device's task-file cache of "
                f"{self.max_bytes} bytes",
            )
        path = self.directory / f"{sha256}{suffix}"
        self._make_room(got, keep={sha256, *keep})
        write_atomic(path, data)
        self._touch(path)
        return path

    def evict(self, sha256: str) -> None:
        """Forget one file (every suffix); none is fine."""
        _check_sha(sha256)
        for entry in self.entries():
            if entry.sha256 == sha256:
                entry.path.unlink(missing_ok=True)

    def _make_room(self, incoming: int, *, keep: Collection[str]) -> None:
        entries = self.entries()
        total = sum(f.size for f in entries)
        for entry in entries:
            if total + incoming <= self.max_bytes:
                return
            if entry.sha256 in keep:
                continue
            try:
                entry.path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot evict %s from the task-file cache: %s", entry.path, exc)
                continue
            total -= entry.size
            log.info("evicted %s (%d bytes) from the task-file cache", entry.path.name, entry.size)
        if total + incoming > self.max_bytes:
            raise FedtrayError(
                "blob_too_large",
                f"the task-file cache ({self.max_bytes} bytes) cannot make room for "
                f"{incoming} bytes: the files in use take {total}",
            )

    def _touch(self, path: Path) -> None:
        now = self._clock()
        with contextlib.suppress(OSError):
            os.utime(path, (now, now))

    def _clean_once(self) -> None:
        """Delete temporaries a crash mid-write left (once per process)."""
        if self._cleaned:
            return
        self._cleaned = True
        with contextlib.suppress(OSError):
            for path in self.directory.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()
