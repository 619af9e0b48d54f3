"""The power policy: may this device train now, given its battery and the user's pause?

Pure logic, no I/O: :func:`decide` maps a battery reading, the battery settings, the
user's pause flag and the previous decision to a :class:`client.snapshot.PauseDecision`
with a stable reason and a plain-words detail. The session polls the battery (through a
:class:`client.resources.BatterySource`) and applies whatever this returns.

Rules, in order:

1. The user paused → ``user_paused`` (whatever the battery says).
2. No battery (a desktop) → allowed. Never "on battery" without one: that is BOINC's
   bug #6468, desktops shown "suspended: on batteries".
3. Plugged in → allowed.
4. Threshold 0 → allowed on battery too ("always").
5. Threshold 100 → only when plugged in: on battery → ``unplugged``.
6. On battery (an unknown plug state counts as on battery, the safe side for a
   volunteer's laptop): allowed while percent ≥ threshold. Once paused for low battery,
   resume only at ≥ threshold + hysteresis (capped at 100) or when plugged in, so a
   battery hovering at the threshold does not flap between training and paused.
"""

from __future__ import annotations

from dataclasses import dataclass

from client.protocol import BatteryStatus
from client.snapshot import ALLOW, PauseDecision

USER_PAUSE_DETAIL = "Paused by you"


@dataclass(frozen=True)
class PowerSettings:
    """The user's battery settings (see ``battery_threshold``/``battery_hysteresis``)."""

    threshold: int = 50
    hysteresis: int = 5


def resume_level(settings: PowerSettings) -> int:
    """Battery percent at which training resumes after a low-battery pause."""
    return min(settings.threshold + settings.hysteresis, 100)


def _on_battery_words(battery: BatteryStatus) -> str:
    percent = f"{battery.percent:.0f} %"
    if battery.plugged_in is None:
        return f"Battery at {percent} (power source unknown)"
    return f"On battery at {percent}"


def decide(
    battery: BatteryStatus | None,
    settings: PowerSettings,
    *,
    user_paused: bool,
    previous: PauseDecision = ALLOW,
    user_detail: str = USER_PAUSE_DETAIL,
) -> PauseDecision:
    """The decision for this reading. ``previous`` is the last decision returned."""
    if user_paused:
        return PauseDecision(allowed=False, reason="user_paused", detail=user_detail)
    if battery is None or battery.plugged_in is True or settings.threshold <= 0:
        return ALLOW
    words = _on_battery_words(battery)
    if settings.threshold >= 100:
        return PauseDecision(
            allowed=False,
            reason="unplugged",
            detail=f"{words} — training resumes when plugged in",
        )
    was_low = not previous.allowed and previous.reason == "battery_low"
    needed = resume_level(settings) if was_low else settings.threshold
    if battery.percent >= needed:
        return ALLOW
    return PauseDecision(
        allowed=False,
        reason="battery_low",
        detail=f"{words} — training resumes at {resume_level(settings)} % or when plugged in",
    )
