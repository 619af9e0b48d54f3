"""Condition waits for tests: poll until something holds, or fail with what was last seen.

Every test that waits for a background thread, a server or a device uses these instead of a
bare ``time.sleep``: the wait ends as soon as the condition holds, and a condition that never
holds raises :class:`TimeoutError` naming ``what`` was awaited (and the last value polled).
Nothing here touches the network or the file system itself; the callables given do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(
    fetch: Callable[[], T],
    predicate: Callable[[T], bool],
    timeout: float = 10.0,
    what: str = "a condition",
    interval: float = 0.05,
) -> T:
    """Call ``fetch`` until ``predicate`` holds for its value; return that value.

    Raises TimeoutError (with the last value) once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = fetch()
        if predicate(last):
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "a condition",
    interval: float = 0.02,
) -> None:
    """Block until ``predicate()`` is true; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "a condition",
    interval: float = 0.02,
) -> None:
    """Like :func:`wait_until` without blocking the caller's event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def poll_async(
    fetch: Callable[[], T],
    predicate: Callable[[T], bool],
    timeout: float = 10.0,
    what: str = "a condition",
    interval: float = 0.05,
) -> T:
    """Like :func:`poll`, calling the blocking ``fetch`` in a worker thread."""
    deadline = time.monotonic() + timeout
    while True:
        last = await asyncio.to_thread(fetch)
        if predicate(last):
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


def holds_for(
    predicate: Callable[[], bool], seconds: float, what: str, interval: float = 0.05
) -> None:
    """Assert ``predicate()`` stays true for ``seconds``: something must NOT happen.

    The one place a test waits a fixed time: proving an absence needs a window.
    Raises AssertionError naming ``what`` as soon as the predicate fails.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        time.sleep(interval)
