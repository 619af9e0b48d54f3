"""Where the session's disk work runs: on the loop when it is small, else in a thread.

Contract:

* :func:`run_disk` runs ``fn(*args)`` and returns its result (or raises its exception).
  Work over at most :data:`SMALL_DISK_BYTES` bytes (the caller's bound on what it
  reads, writes, hashes or deletes) runs on the calling loop at once: a few hundred
  microseconds, cheaper than the hop to a worker thread and back (a thread wake-up,
  two futures, a loop wake-up: ~0.1-0.3 ms of CPU, and more wall time on a busy
  machine); a disk that stalls writes to the page cache stalls the loop as long (it
  stalled the awaiting handler before). Larger work, or work of unknown size
  (``nbytes=None``), runs in a worker thread (``asyncio.to_thread``), so the loop never
  waits for a big file.
* It never changes what the work does, only where it runs; exceptions are the work's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, ParamSpec, TypeVar

__all__ = ["SMALL_DISK_BYTES", "is_small", "run_disk"]

#: The most bytes of disk work run on the loop itself (the 0.4 MB benchmark model fits;
#: a 100 MB one goes to a thread).
SMALL_DISK_BYTES: Final = 1 << 20

P = ParamSpec("P")
T = TypeVar("T")


def is_small(nbytes: int | None) -> bool:
    """Whether work over ``nbytes`` bytes runs on the loop (``None``: unknown, no)."""
    return nbytes is not None and nbytes <= SMALL_DISK_BYTES


async def run_disk(
    nbytes: int | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """``fn(*args, **kwargs)`` on the loop when :func:`is_small` (``nbytes``), else in a
    worker thread (module docstring)."""
    if is_small(nbytes):
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)
