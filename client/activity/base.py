"""The one interface every activity backend implements, and the small helpers they share.

Contract:

* :class:`ActivityProbe` is what the rules consume: ``idle_seconds()`` (seconds since the
  user last touched keyboard or mouse), ``fullscreen_active()`` (the active window fills
  the screen) and ``describe()`` (one plain sentence naming the backend, or why nothing
  can be told). ``None`` always means *cannot tell*; a backend never answers a guess
  (unknown is never reported as idle, nor as "not full-screen").
* Calls are synchronous and made from **one polling thread** (about once a second), never
  from an asyncio event loop: each is a local round trip at most (the X server's socket,
  the session D-Bus with a bounded timeout, one Win32/IOKit call), normally well under a
  millisecond. A frozen X server blocks the caller (it freezes the desktop too), which is
  why the poller must be a thread of its own. Each probe serializes its own calls with a
  lock, so a second caller is safe, just not useful.
* No call raises for OS trouble (no display, a bus that went away, a failed OS call):
  it answers ``None`` and logs the problem once (:class:`LogOnce`): at WARNING when a
  source that answered stops, at INFO while looking for one (a headless machine has none).
* Nothing here imports GUI toolkits or torch.
"""

from __future__ import annotations

import logging
import threading
from typing import Final, Protocol, runtime_checkable

__all__ = ["ActivityProbe", "LogOnce", "UnknownProbe"]


@runtime_checkable
class ActivityProbe(Protocol):
    """What the pause rules ask the OS about the user (see the module contract)."""

    def idle_seconds(self) -> float | None:
        """Seconds since the last keyboard/mouse input (>= 0); ``None``: cannot tell."""
        ...

    def fullscreen_active(self) -> bool | None:
        """Whether the active window is full-screen; ``None``: cannot tell."""
        ...

    def describe(self) -> str:
        """Which backend answers, or why none can, in plain words (for status lines)."""
        ...


class LogOnce:
    """Log each distinct problem once (bounded: after :data:`LIMIT` kinds, nothing more)."""

    LIMIT: Final = 32

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING) -> None:
        self._logger = logger
        self._level = level
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, problem: str) -> None:
        with self._lock:
            if problem in self._seen or len(self._seen) >= self.LIMIT:
                return
            self._seen.add(problem)
        self._logger.log(self._level, "activity detection: %s", problem)


class UnknownProbe:
    """Knows nothing: both answers are ``None``; ``describe()`` says why."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def idle_seconds(self) -> float | None:
        return None

    def fullscreen_active(self) -> bool | None:
        return None

    def describe(self) -> str:
        return self._reason


class SimulatedProbe:
    """A fixed idle time and no full-screen window (``FEDTRAY_SIMULATE_IDLE_SECONDS``)."""

    def __init__(self, idle_seconds: float) -> None:
        self._idle = idle_seconds

    def idle_seconds(self) -> float | None:
        return self._idle

    def fullscreen_active(self) -> bool | None:
        return False

    def describe(self) -> str:
        return f"simulated: idle for {self._idle:g} s (FEDTRAY_SIMULATE_IDLE_SECONDS)"


class CombinedProbe:
    """Idle time from one probe, full-screen state from another (e.g. D-Bus + X11)."""

    def __init__(self, idle: ActivityProbe, fullscreen: ActivityProbe) -> None:
        self._idle = idle
        self._fullscreen = fullscreen

    def idle_seconds(self) -> float | None:
        return self._idle.idle_seconds()

    def fullscreen_active(self) -> bool | None:
        return self._fullscreen.fullscreen_active()

    def describe(self) -> str:
        first, second = self._idle.describe(), self._fullscreen.describe()
        return first if first == second else f"{first}; {second}"
