"""The power policy, by table: every rule, the flapping case, and the plain words."""

from __future__ import annotations

import itertools

import pytest

from client.power import PowerSettings, decide, resume_level
from client.protocol import BatteryStatus
from client.snapshot import ALLOW, PauseDecision


def bat(percent: float, plugged: bool | None) -> BatteryStatus:
    return BatteryStatus(percent=percent, plugged_in=plugged)


LOW = PauseDecision(allowed=False, reason="battery_low", detail="…")
DEFAULT = PowerSettings(threshold=50, hysteresis=5)

CASES = [
    # (name, battery, settings, user_paused, previous, allowed, reason)
    ("no battery", None, DEFAULT, False, ALLOW, True, None),
    ("no battery, only-when-plugged", None, PowerSettings(100, 5), False, ALLOW, True, None),
    ("no battery, user paused", None, DEFAULT, True, ALLOW, False, "user_paused"),
    ("plugged in, empty battery", bat(3, True), DEFAULT, False, ALLOW, True, None),
    ("plugged in, user paused", bat(90, True), DEFAULT, True, ALLOW, False, "user_paused"),
    ("on battery above threshold", bat(80, False), DEFAULT, False, ALLOW, True, None),
    ("on battery at threshold", bat(50, False), DEFAULT, False, ALLOW, True, None),
    ("on battery below threshold", bat(49, False), DEFAULT, False, ALLOW, False, "battery_low"),
    ("unknown plug state counts as battery", bat(42, None), DEFAULT, False, ALLOW, False,
     "battery_low"),
    ("unknown plug state above threshold", bat(60, None), DEFAULT, False, ALLOW, True, None),
    ("threshold 0 means always", bat(1, False), PowerSettings(0, 5), False, ALLOW, True, None),
    ("threshold 0, previously low", bat(1, False), PowerSettings(0, 5), False, LOW, True, None),
    ("threshold 100, on battery full", bat(100, False), PowerSettings(100, 5), False, ALLOW,
     False, "unplugged"),
    ("threshold 100, unknown plug", bat(100, None), PowerSettings(100, 5), False, ALLOW, False,
     "unplugged"),
    ("threshold 100, plugged", bat(10, True), PowerSettings(100, 5), False, ALLOW, True, None),
    # hysteresis: once paused for low battery, resume only at threshold + hysteresis
    ("paused low, recovered to threshold", bat(50, False), DEFAULT, False, LOW, False,
     "battery_low"),
    ("paused low, just under resume level", bat(54.9, False), DEFAULT, False, LOW, False,
     "battery_low"),
    ("paused low, at resume level", bat(55, False), DEFAULT, False, LOW, True, None),
    ("paused low, plugged in", bat(20, True), DEFAULT, False, LOW, True, None),
    ("paused by user before, battery at threshold", bat(50, False), DEFAULT, False,
     PauseDecision(allowed=False, reason="user_paused", detail="x"), True, None),
    ("resume level capped at 100", bat(100, False), PowerSettings(98, 5), False, LOW, True, None),
    ("high threshold, capped level not reached", bat(99, False), PowerSettings(98, 5), False,
     LOW, False, "battery_low"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "battery", "settings", "user_paused", "previous", "allowed", "reason"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_rules(
    name: str,
    battery: BatteryStatus | None,
    settings: PowerSettings,
    user_paused: bool,
    previous: PauseDecision,
    allowed: bool,
    reason: str | None,
) -> None:
    decision = decide(battery, settings, user_paused=user_paused, previous=previous)
    assert (decision.allowed, decision.reason) == (allowed, reason)
    assert bool(decision.detail) == (not allowed)


def test_battery_hovering_at_threshold_does_not_flap() -> None:
    """A battery oscillating around the threshold pauses once and stays paused."""
    readings = [51, 50, 49, 50, 51, 52, 51, 54, 53, 55, 54, 50]
    previous = ALLOW
    states = []
    for percent in readings:
        previous = decide(bat(percent, False), DEFAULT, user_paused=False, previous=previous)
        states.append(previous.allowed)
    assert states == [True, True, False, False, False, False, False, False, False, True, True,
                      True]  # fmt: skip
    changes = sum(1 for a, b in itertools.pairwise(states) if a != b)
    assert changes == 2


@pytest.mark.parametrize(
    ("battery", "settings", "detail"),
    [
        (bat(42, False), DEFAULT,
         "On battery at 42 % — training resumes at 55 % or when plugged in"),
        (bat(42.4, None), DEFAULT,
         "Battery at 42 % (power source unknown) — training resumes at 55 % or when plugged in"),
        (bat(80, False), PowerSettings(100, 5),
         "On battery at 80 % — training resumes when plugged in"),
        (bat(10, False), PowerSettings(98, 5),
         "On battery at 10 % — training resumes at 100 % or when plugged in"),
    ],
)  # fmt: skip
def test_plain_words(battery: BatteryStatus, settings: PowerSettings, detail: str) -> None:
    assert decide(battery, settings, user_paused=False).detail == detail


def test_user_pause_detail_is_passed_through() -> None:
    d = decide(None, DEFAULT, user_paused=True, user_detail="Paused until 15:30")
    assert d.detail == "Paused until 15:30"


@pytest.mark.parametrize(("t", "h", "level"), [(50, 5, 55), (0, 5, 5), (98, 5, 100), (100, 0, 100)])
def test_resume_level(t: int, h: int, level: int) -> None:
    assert resume_level(PowerSettings(t, h)) == level
