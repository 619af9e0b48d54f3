"""In use or idle, and the CPU budget or pause that follows (pure; table-tested).

Contract (no I/O, no clock):

* :func:`activity_of`: seconds since the last input (``None``: the OS cannot tell)
  against ``idle_after_seconds`` gives ``"in_use"``, ``"idle"`` or ``"unknown"``. Never
  guesses idle: unknown is its own answer.
* :func:`resolve_cores`: a cores setting (0 = all but one) on a machine with
  ``cpu_count`` cores, always from 1 to ``cpu_count``.
* :func:`decide_budget`: the activity and the settings give a :class:`BudgetDecision`:
  idle → the idle budget; in use (and unknown, treated as in use) → with
  ``while_in_use = "pause"`` an ``in_use`` pause, with ``"light"`` the in-use budget,
  with ``"full"`` the idle budget. Each budget says why in plain words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from client.config import Settings
from client.snapshot import ALLOW, Activity, Budget, PauseDecision

__all__ = ["BudgetDecision", "activity_of", "decide_budget", "resolve_cores"]

#: Why a budget applies, per activity (the words the tray, headless line and server show).
WHY: Final[dict[Activity, str]] = {
    "idle": "the computer is idle",
    "in_use": "you are using the computer",
    "unknown": "cannot tell whether the computer is in use, so treated as in use",
}

IN_USE_PAUSE: Final = PauseDecision(
    allowed=False, reason="in_use", detail="Paused while you use the computer"
)
UNKNOWN_PAUSE: Final = PauseDecision(
    allowed=False,
    reason="in_use",
    detail="Paused: cannot tell whether the computer is in use (treated as in use)",
)


@dataclass(frozen=True)
class BudgetDecision:
    """What the activity means: the pause (ALLOW unless ``while_in_use = "pause"``) and
    the budget training keeps while it runs."""

    activity: Activity
    pause: PauseDecision
    budget: Budget


def activity_of(idle_seconds: float | None, idle_after_seconds: float) -> Activity:
    """``"unknown"`` for ``None``, ``"idle"`` from ``idle_after_seconds`` on, else in use."""
    if idle_seconds is None:
        return "unknown"
    return "idle" if idle_seconds >= idle_after_seconds else "in_use"


def resolve_cores(setting: int, cpu_count: int) -> int:
    """Cores for a setting (0 = all but one), between 1 and ``cpu_count``."""
    count = max(1, cpu_count)
    wanted = count - 1 if setting <= 0 else setting
    return min(count, max(1, wanted))


def decide_budget(activity: Activity, settings: Settings, cpu_count: int) -> BudgetDecision:
    """The pause and budget for ``activity`` under ``settings`` (see the module docstring)."""
    idle = Budget(
        cores=resolve_cores(settings.idle_cores, cpu_count),
        cpu_percent=settings.idle_cpu_percent,
        why=WHY[activity],
    )
    if activity == "idle":
        return BudgetDecision(activity, ALLOW, idle)
    light = Budget(
        cores=resolve_cores(settings.in_use_cores, cpu_count),
        cpu_percent=settings.in_use_cpu_percent,
        why=WHY[activity],
    )
    if settings.while_in_use == "pause":
        pause = UNKNOWN_PAUSE if activity == "unknown" else IN_USE_PAUSE
        return BudgetDecision(activity, pause, light)
    if settings.while_in_use == "full":
        return BudgetDecision(activity, ALLOW, idle)
    return BudgetDecision(activity, ALLOW, light)
