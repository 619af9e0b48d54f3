"""The step-aside, heat, full-screen and schedule rules (pure; table-tested).

Contract (no I/O, no clock; the caller passes readings, the previous state and "now"):

* :func:`step_aside`: other programs' share of the whole CPU (percent, ``None``: not
  measured) against ``step_aside_cpu_percent`` (0 = off). Pauses (``step_aside``) above
  the threshold; once paused, resumes only after :data:`STEP_ASIDE_CALM_SAMPLES`
  consecutive samples below the threshold minus :data:`STEP_ASIDE_MARGIN` (like the
  battery rule's hysteresis), so a share hovering at the threshold does not flap. An
  unmeasured sample changes nothing. While paused the decision (and its words) stays
  the one that paused, so a changing reading does not re-announce the pause.
* :func:`heat`: pauses (``too_hot``) at or above ``max_temperature`` (0 = off); once
  paused, resumes at or below ``max_temperature - HEAT_MARGIN_C`` (the pausing decision
  is kept meanwhile, as for step-aside). An unknown
  temperature never pauses and is never called cool (:func:`temperature_words`).
* :func:`pick_cpu_temperature`: the CPU package temperature from what
  ``psutil.sensors_temperatures()`` returned: coretemp "Package id 0", k10temp
  "Tctl"/"Tdie", cpu_thermal, else the hottest plausible reading; ``None`` when none.
* :func:`fullscreen`: pauses (``fullscreen``) when the setting is on and a full-screen
  app is known to be in front (unknown never pauses).
* :func:`schedule`: pauses (``schedule``) outside the daily window (none: any time);
  :func:`client.schedule.next_change` says when that flips.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from client.schedule import Schedule
from client.snapshot import ALLOW, PauseDecision

__all__ = [
    "HEAT_MARGIN_C",
    "STEP_ASIDE_CALM_SAMPLES",
    "STEP_ASIDE_MARGIN",
    "StepAside",
    "fullscreen",
    "heat",
    "pick_cpu_temperature",
    "schedule",
    "step_aside",
    "temperature_words",
]

#: Percentage points below the threshold other programs must stay under to resume.
STEP_ASIDE_MARGIN: Final = 10
#: Consecutive calm samples needed to resume after stepping aside.
STEP_ASIDE_CALM_SAMPLES: Final = 3
#: Degrees Celsius below ``max_temperature`` at which training resumes.
HEAT_MARGIN_C: Final = 10
#: Readings outside this range (°C) are sensor noise, not temperatures.
_PLAUSIBLE_C: Final = (-40.0, 150.0)
#: Sensor (chip, label) pairs that are the CPU package, best first.
_PACKAGE_SENSORS: Final = (
    ("coretemp", "Package id 0"),
    ("k10temp", "Tctl"),
    ("k10temp", "Tdie"),
    ("cpu_thermal", None),
    ("cpu-thermal", None),
)


@dataclass(frozen=True)
class StepAside:
    """The step-aside rule's state: its decision and the calm samples counted so far."""

    decision: PauseDecision = ALLOW
    calm: int = 0


def step_aside(
    previous: StepAside,
    others_percent: float | None,
    threshold: int,
    *,
    margin: int = STEP_ASIDE_MARGIN,
    calm_needed: int = STEP_ASIDE_CALM_SAMPLES,
) -> StepAside:
    """The next state after one sample (see the module docstring)."""
    if threshold <= 0:
        return StepAside()
    if others_percent is None:
        return previous
    resume_below = max(0, threshold - margin)
    if others_percent > threshold:
        if not previous.decision.allowed:
            return StepAside(previous.decision, 0)  # still busy: the same words, no flapping
        detail = (
            f"Other programs are using {others_percent:.0f} % of the CPU — training "
            f"resumes when they use less than {resume_below} %"
        )
        return StepAside(PauseDecision(allowed=False, reason="step_aside", detail=detail))
    if previous.decision.allowed:
        return StepAside()
    if others_percent >= resume_below:
        return StepAside(previous.decision, 0)  # not calm enough: the count starts again
    calm = previous.calm + 1
    return StepAside() if calm >= calm_needed else StepAside(previous.decision, calm)


def temperature_words(celsius: float | None) -> str:
    """``"72 °C"``, or ``"unknown"`` (never a guess)."""
    return "unknown" if celsius is None else f"{celsius:.0f} °C"


def heat(celsius: float | None, max_temperature: int, previous: PauseDecision) -> PauseDecision:
    """The heat decision for this reading (see the module docstring)."""
    if max_temperature <= 0 or celsius is None:
        return ALLOW
    was_hot = not previous.allowed and previous.reason == "too_hot"
    resume_at = max_temperature - HEAT_MARGIN_C
    if was_hot and celsius > resume_at:
        return previous  # still hot: the words from when it paused, no flapping
    if celsius >= max_temperature:
        detail = (
            f"The CPU is at {celsius:.0f} °C (limit {max_temperature} °C) — training "
            f"resumes at {resume_at} °C"
        )
        return PauseDecision(allowed=False, reason="too_hot", detail=detail)
    return ALLOW


def _plausible(values: Iterable[Any]) -> list[float]:
    found = []
    for entry in values:
        value = getattr(entry, "current", None)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value) and _PLAUSIBLE_C[0] < value < _PLAUSIBLE_C[1]:
            found.append(float(value))
    return found


def pick_cpu_temperature(sensors: Mapping[str, Iterable[Any]] | None) -> float | None:
    """The CPU package temperature in °C from psutil's sensors (see the module docstring).

    Each entry needs ``label`` and ``current`` (psutil's ``shwtemp``); anything odd is
    skipped, and no plausible reading gives ``None``.
    """
    if not sensors:
        return None
    chips = {chip: list(entries) for chip, entries in sensors.items()}
    for chip, label in _PACKAGE_SENSORS:
        entries = [
            e for e in chips.get(chip, []) if label is None or getattr(e, "label", None) == label
        ]
        found = _plausible(entries)
        if found:
            return max(found)
    everything = _plausible(e for entries in chips.values() for e in entries)
    return max(everything) if everything else None


FULLSCREEN_PAUSE: Final = PauseDecision(
    allowed=False, reason="fullscreen", detail="Paused while a full-screen app is in front"
)


def fullscreen(active: bool | None, enabled: bool) -> PauseDecision:
    """Pause for a full-screen app when ``enabled`` and known to be ``active``."""
    return FULLSCREEN_PAUSE if enabled and active is True else ALLOW


def schedule(window: Schedule | None, now: datetime) -> PauseDecision:
    """Outside the daily ``window`` (at the aware local time ``now``) → a pause."""
    if window is None or window.contains(now.time()):
        return ALLOW
    detail = f"Outside your schedule ({window.words()}) — training starts at {window.start:%H:%M}"
    return PauseDecision(allowed=False, reason="schedule", detail=detail)
