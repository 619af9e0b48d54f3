"""Keep the memory of transfer buffers in the process between chunks (glibc's malloc).

Why: every chunk of a blob passes through a few fresh buffers of about the chunk's size in
the websocket layer (aiohttp masks a copy of each frame it sends and joins and unmasks each
frame it receives) and in ours. With glibc's default thresholds a freed multi-megabyte
buffer at the top of the heap is given back to the OS (``brk`` trimmed, or ``munmap``) and
the next chunk's buffer is faulted in again page by page: measured on the reference server
receiving 100 MB in 4 MiB chunks, those page faults were about a third of its CPU per byte,
and of the sending device's (4 MiB buffers: 0.45 -> 0.28 CPU s per 100 MB received, 0.22 ->
0.11 sent; ``benchmarks/transfer.py``).

Contract: :func:`keep_transfer_buffers` raises glibc's ``M_MMAP_THRESHOLD`` and
``M_TRIM_THRESHOLD`` (:func:`thresholds`: a few chunks' worth) for the whole process, so
buffers up to a few chunks come from the heap and up to that much freed memory stays there
for the next chunk; larger allocations (a whole 100 MB model) are still mapped and unmapped
on their own. The cost: up to the trim threshold (32 MiB at 4 MiB chunks) of freed memory
may stay in the process. It is called once at the start of a process that moves blobs (the
server's loop, the device's session); calling it again changes nothing. It never raises: on
another C library or OS, or when the operator set glibc's ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` environment variables (their choice is kept), it does nothing and
returns False. It changes no behaviour, only where freed memory goes.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

from client.transfer import REFERENCE_CHUNK_BYTES

__all__ = ["M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD", "keep_transfer_buffers", "thresholds"]

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc refuses an mmap threshold above half its heap size: 32 MiB on 64-bit systems.
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
#: Chunks' worth of buffers kept on the heap (a frame, its copy, the joined fragments).
CHUNKS_KEPT = 4
#: The operator's own choice, when set, wins.
ENV_OVERRIDES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_outcome: list[bool] = []  # the first call's answer, once made


def thresholds(chunk_bytes: int) -> tuple[int, int]:
    """``(mmap threshold, trim threshold)`` in bytes for chunks of ``chunk_bytes``: buffers
    up to :data:`CHUNKS_KEPT` chunks (at most :data:`MAX_MMAP_THRESHOLD`, at least glibc's
    own 128 KiB default) from the heap, and twice that kept when freed (glibc's own ratio).
    Raises ValueError for a chunk size under 1."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    mmap = min(max(CHUNKS_KEPT * chunk_bytes, 128 * 1024), MAX_MMAP_THRESHOLD)
    return mmap, 2 * mmap


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl's mallopt is a stub)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_transfer_buffers(chunk_bytes: int = REFERENCE_CHUNK_BYTES) -> bool:
    """Set the process's malloc thresholds for chunks of ``chunk_bytes`` (see the module
    docstring); True when they are set (now or by an earlier call), False when nothing was
    done. Thread-safe, idempotent, never raises (except ValueError for ``chunk_bytes`` < 1)."""
    mmap, trim = thresholds(chunk_bytes)
    with _lock:
        if not _outcome:
            _outcome.append(_apply(mmap, trim))
        return _outcome[0]


def _apply(mmap: int, trim: int) -> bool:
    if any(name in os.environ for name in ENV_OVERRIDES):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # The mmap threshold first: glibc refuses one above its maximum, and then nothing is
    # changed (setting either stops glibc adjusting both by itself; the trim threshold
    # alone, with the mmap one stuck at 128 KiB, would be worse than neither).
    if libc.mallopt(M_MMAP_THRESHOLD, mmap) != 1:
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, trim) == 1)
