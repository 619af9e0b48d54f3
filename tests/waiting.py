"""Condition waits for tests, and the one time scale every test deadline derives from.

Every test that waits for a background thread, a server or a device uses these instead of a
bare ``time.sleep``: the wait ends as soon as the condition holds, and a condition that never
holds raises :class:`TimeoutError` naming ``what`` was awaited (and the last value polled).

Time scale: a deadline written in a test is in *reference seconds*, what the work takes on an
idle 2-core developer machine. :func:`time_scale` says how much slower this run is: the
``FEDTRAY_TEST_TIME_SCALE`` environment variable when set (a number >= 1, e.g. ``4`` on a
loaded machine), else a measurement taken once per process (:func:`calibrate`: a fixed small
CPU workload timed against :data:`REFERENCE_WORKLOAD_S`, and the load average per core; the
larger, clamped to [1, :data:`MAX_TIME_SCALE`]). tests/conftest.py measures it once per session
and exports it in the environment, so xdist workers and the subprocesses tests start use the
same value. :func:`scaled` applies it; :func:`poll`, :func:`wait_until`, :func:`poll_async`
and :func:`wait_until_async` apply it to their ``timeout`` themselves, so a condition that
holds returns at once and only a failing wait takes longer. Server-side timeouts a test
configures (round timeouts, heartbeat intervals and the staleness derived from them) are
scaled by the harness (tests/server_harness.py), and a "must NOT happen within T" window
(:func:`holds_for`) is not scaled here: callers derive T from the setting that makes the thing
happen (a multiple of the heartbeat interval, say), which is already scaled.

Nothing here touches the network or the file system itself; the callables given do.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

#: Environment variable that sets the time scale (skips the measurement).
SCALE_ENV = "FEDTRAY_TEST_TIME_SCALE"
#: The scale never exceeds this: a machine that much slower needs the variable set.
MAX_TIME_SCALE = 8.0
#: Seconds :func:`_workload` takes on an idle reference machine (CPython 3.11, 2 cores).
REFERENCE_WORKLOAD_S = 0.05
#: The measurement stops after this many seconds, however slow the machine.
CALIBRATION_BUDGET_S = 2.0
_WORKLOAD_STEPS = 300_000


def _workload() -> float:
    """Seconds one fixed pure-Python loop takes here (wall clock: load counts)."""
    start = time.perf_counter()
    x = 0
    for i in range(_WORKLOAD_STEPS):
        x = (x * 31 + i) & 0xFFFFFFFF
    return time.perf_counter() - start


def _load_per_core() -> float:
    try:
        return os.getloadavg()[0] / max(1, os.cpu_count() or 1)
    except OSError:  # not available on this platform
        return 0.0


def _clamp(value: float) -> float:
    return min(MAX_TIME_SCALE, max(1.0, value))


def calibrate(repeats: int = 5) -> float:
    """Measure how much slower than the reference this machine is right now (bounded).

    The median of ``repeats`` runs of the workload (at most :data:`CALIBRATION_BUDGET_S` in
    all) over :data:`REFERENCE_WORKLOAD_S`, or the 1-minute load average per core if larger;
    clamped to [1, :data:`MAX_TIME_SCALE`].
    """
    times: list[float] = []
    deadline = time.monotonic() + CALIBRATION_BUDGET_S
    while len(times) < repeats and time.monotonic() < deadline:
        times.append(_workload())
    ratio = statistics.median(times) / REFERENCE_WORKLOAD_S
    return round(_clamp(max(ratio, _load_per_core())), 2)


def parse_scale(text: str) -> float:
    """The scale in ``FEDTRAY_TEST_TIME_SCALE``; ValueError unless a finite number >= 1."""
    value = float(text)
    if not math.isfinite(value) or value < 1.0:
        raise ValueError(f"{SCALE_ENV} must be a number >= 1, got {text!r}")
    return value


@functools.cache
def time_scale() -> float:
    """This run's time scale: ``FEDTRAY_TEST_TIME_SCALE`` if set, else :func:`calibrate`."""
    given = os.environ.get(SCALE_ENV)
    return parse_scale(given) if given else calibrate()


def scaled(seconds: float) -> float:
    """``seconds`` of reference time as a deadline for this run."""
    return seconds * time_scale()


class SnapshotWaiter(Protocol):
    """What :func:`scale_waits` wraps: ``DistributedClient.wait_for(predicate, timeout)``."""

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float) -> Any: ...


W = TypeVar("W", bound=SnapshotWaiter)


def scale_waits(client: W) -> W:
    """``client`` with its ``wait_for(predicate, timeout)`` taking reference seconds.

    For tests that create a session (:class:`client.session.DistributedClient`): its own
    ``wait_for`` takes plain seconds, so the test's fixture wraps it once here and every
    ``client.wait_for(pred, 30)`` in the test is scaled like the waits in this module.
    Only the deadline changes; the call is the client's own.
    """
    plain = client.wait_for

    def wait_for(predicate: Callable[[Any], bool], timeout: float) -> Any:
        return plain(predicate, scaled(timeout))

    client.wait_for = wait_for  # type: ignore[method-assign]
    return client


def _timed_out(timeout: float, allowed: float, what: str) -> str:
    scale = time_scale()
    return f"timed out after {allowed:.1f} s ({timeout:g} s x scale {scale:g}) waiting for {what}"


def poll(
    fetch: Callable[[], T],
    predicate: Callable[[T], bool],
    timeout: float = 10.0,
    what: str = "a condition",
    interval: float = 0.05,
) -> T:
    """Call ``fetch`` until ``predicate`` holds for its value; return that value.

    Raises TimeoutError (with the last value) once ``scaled(timeout)`` seconds have passed.
    """
    allowed = scaled(timeout)
    deadline = time.monotonic() + allowed
    while True:
        last = fetch()
        if predicate(last):
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"{_timed_out(timeout, allowed, what)}; last: {last!r}")
        time.sleep(interval)


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "a condition",
    interval: float = 0.02,
) -> None:
    """Block until ``predicate()`` is true; TimeoutError after ``scaled(timeout)`` seconds."""
    allowed = scaled(timeout)
    deadline = time.monotonic() + allowed
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(_timed_out(timeout, allowed, what))
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "a condition",
    interval: float = 0.02,
) -> None:
    """Like :func:`wait_until` without blocking the caller's event loop."""
    allowed = scaled(timeout)
    deadline = time.monotonic() + allowed
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(_timed_out(timeout, allowed, what))
        await asyncio.sleep(interval)


async def poll_async(
    fetch: Callable[[], T],
    predicate: Callable[[T], bool],
    timeout: float = 10.0,
    what: str = "a condition",
    interval: float = 0.05,
) -> T:
    """Like :func:`poll`, calling the blocking ``fetch`` in a worker thread."""
    allowed = scaled(timeout)
    deadline = time.monotonic() + allowed
    while True:
        last = await asyncio.to_thread(fetch)
        if predicate(last):
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"{_timed_out(timeout, allowed, what)}; last: {last!r}")
        await asyncio.sleep(interval)


def holds_for(
    predicate: Callable[[], bool], seconds: float, what: str, interval: float = 0.05
) -> None:
    """Assert ``predicate()`` stays true for ``seconds``: something must NOT happen.

    The one place a test waits a fixed time: proving an absence needs a window. ``seconds``
    is not scaled here: derive it from the (scaled) setting that would make the thing
    happen. Raises AssertionError naming ``what`` as soon as the predicate fails.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        time.sleep(interval)
