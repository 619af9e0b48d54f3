"""The CPU budget's arithmetic: how long training sleeps at a batch boundary (pure).

Contract (no I/O, no clock, no threads: the caller passes every time it measured):

* A budget is ``cores`` at ``cpu_percent``: training may use at most
  ``cores * cpu_percent / 100`` CPU-seconds per wall-second, averaged over a sliding
  window (:data:`DEFAULT_WINDOW_S`). "1 core at 50 %" therefore means at most half of
  one core on average; "4 cores at 25 %" at most one core's worth, spread over 4 threads.
  The share of a process is ``cpu / (wall * cores)`` where ``cpu`` is its CPU time, all
  threads together.
* :func:`duty_sleep`: given the measured CPU and wall time since the window's start, the
  seconds to sleep now so that the share over the window (sleep included) is at most
  ``cpu_percent``; 0 when already within it, and always 0 at 100 %.
* :class:`DutyCycle`: the sliding window of :class:`Sample` values taken at batch
  boundaries; :meth:`DutyCycle.sleep_for` answers :func:`duty_sleep` from the oldest
  sample still in the window and records the new one as it stands after the sleep.
  :meth:`DutyCycle.reset` starts a new window (a new budget, a resumed pause, a new
  job): what came before never earns credit or debt.
  Memory is bounded: samples older than the window are dropped.
* :func:`threads_for`: the torch thread count for a budget's cores, a job's own
  ``torch_threads`` (a cap, when set) and the machine's cores: from 1 to ``cpu_count``.
* It keeps an upper bound only: a process that gets less CPU than its budget (a busy
  machine) is never made to catch up.

Raises ``ValueError`` for a budget outside ``cores >= 1`` and ``1 <= cpu_percent <= 100``
(:func:`check_budget`); never anything else.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = [
    "DEFAULT_WINDOW_S",
    "MAX_SLEEP_SLICE_S",
    "DutyCycle",
    "Sample",
    "check_budget",
    "duty_sleep",
    "threads_for",
]

#: Seconds of history the duty cycle averages over.
DEFAULT_WINDOW_S = 2.0
#: The longest single wait of a duty-cycle sleep: a pause, a cancel or a new budget is
#: seen at least this often even without a wake-up.
MAX_SLEEP_SLICE_S = 0.05


def check_budget(cores: int, cpu_percent: int) -> None:
    """Raise ``ValueError`` unless ``cores >= 1`` and ``1 <= cpu_percent <= 100``."""
    if cores < 1 or not 1 <= cpu_percent <= 100:
        raise ValueError(
            f"a CPU budget needs >= 1 core and 1-100 %, got {cores} cores at {cpu_percent} %"
        )


@dataclass(frozen=True)
class Sample:
    """One measurement at a batch boundary: ``wall`` (a monotonic clock) and ``cpu`` (the
    process's CPU time, all threads), both in seconds."""

    wall: float
    cpu: float


def duty_sleep(start: Sample, now: Sample, cores: int, cpu_percent: int) -> float:
    """Seconds to sleep at ``now`` so that ``cpu / (wall * cores) <= cpu_percent / 100``
    over ``start``..``now`` plus the sleep (module docstring)."""
    check_budget(cores, cpu_percent)
    if cpu_percent >= 100:
        return 0.0
    allowed_rate = cores * cpu_percent / 100.0  # CPU-seconds per wall-second
    used = max(0.0, now.cpu - start.cpu)
    elapsed = max(0.0, now.wall - start.wall)
    return max(0.0, used / allowed_rate - elapsed)


class DutyCycle:
    """The sliding window of samples (module docstring); owned by one thread."""

    def __init__(self, window: float = DEFAULT_WINDOW_S) -> None:
        if window <= 0:
            raise ValueError(f"the window must be positive, got {window}")
        self._window = window
        self._samples: deque[Sample] = deque()

    def reset(self) -> None:
        """Start a new window: the next sample is its start."""
        self._samples.clear()

    def sleep_for(self, now: Sample, cores: int, cpu_percent: int) -> float:
        """The seconds to sleep at ``now``: :func:`duty_sleep` from the oldest sample
        within the window (0 for a new window's first sample). The sample is recorded as
        it will be once slept (``wall`` plus the sleep), so the window's start sits after
        a sleep and every window holds as many sleeps as batches: the long-run share is
        the budget, not above it."""
        samples = self._samples
        if not samples:
            samples.append(now)
            return 0.0
        # The window's start: the newest sample at or before ``now - window``.
        while len(samples) > 1 and samples[1].wall <= now.wall - self._window:
            samples.popleft()
        seconds = duty_sleep(samples[0], now, cores, cpu_percent)
        samples.append(Sample(now.wall + seconds, now.cpu))
        return seconds


def threads_for(cores: int, job_threads: int | None, cpu_count: int) -> int:
    """Torch threads for a budget of ``cores``: at most the job's own ``torch_threads``
    when it sets one, and from 1 to ``cpu_count``."""
    wanted = cores if job_threads is None else min(cores, job_threads)
    return max(1, min(wanted, max(1, cpu_count)))
