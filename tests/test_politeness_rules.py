"""The politeness rules by table: schedule window, budget, step aside, heat, full screen."""

from __future__ import annotations

from collections import namedtuple
from datetime import datetime, timedelta, timezone
from typing import Any, get_args

import pytest

from client.config import Settings
from client.protocol import PauseReason
from client.rules import pauses as rules
from client.rules.budget import activity_of, decide_budget, resolve_cores
from client.schedule import next_change, parse_schedule
from client.snapshot import ALLOW, Budget

TZ = timezone(timedelta(hours=2))


def at(hour: int, minute: int = 0, day: int = 4) -> datetime:
    return datetime(2026, 5, day, hour, minute, tzinfo=TZ)


# ------------------------------------------------------------------ schedule window


@pytest.mark.parametrize(
    ("window", "now", "inside", "change"),
    [
        ("22:00-07:00", at(23), True, at(7, day=5)),
        ("22:00-07:00", at(3), True, at(7)),
        ("22:00-07:00", at(7), False, at(22)),  # the end is excluded
        ("22:00-07:00", at(22), True, at(7, day=5)),  # the start included
        ("22:00-07:00", at(12), False, at(22)),
        ("09:00-17:00", at(8, 59), False, at(9)),
        ("09:00-17:00", at(17, 30), False, at(9, day=5)),
        ("09:00-17:00", at(10), True, at(17)),
    ],
)
def test_window_contains_and_next_change(
    window: str, now: datetime, inside: bool, change: datetime
) -> None:
    parsed = parse_schedule(window)
    assert parsed is not None
    assert parsed.contains(now.time()) is inside
    assert next_change(parsed, now) == change
    assert rules.schedule(parsed, now).allowed is inside


def test_outside_the_schedule_says_when_training_starts() -> None:
    decision = rules.schedule(parse_schedule("22:00-07:00"), at(12))
    assert decision.reason == "schedule"
    assert decision.detail == "Outside your schedule (22:00\u201307:00) — training starts at 22:00"
    assert rules.schedule(None, at(12)) == ALLOW


# ------------------------------------------------------------------ in use / idle budget


@pytest.mark.parametrize(
    ("idle", "after", "activity"),
    [(None, 180, "unknown"), (0.0, 180, "in_use"), (179.9, 180, "in_use"), (180, 180, "idle")],
)
def test_activity(idle: float | None, after: int, activity: str) -> None:
    assert activity_of(idle, after) == activity


@pytest.mark.parametrize(
    ("setting", "cpus", "cores"),
    [(0, 8, 7), (0, 2, 1), (0, 1, 1), (1, 8, 1), (3, 8, 3), (16, 8, 8), (0, 0, 1)],
)
def test_resolve_cores(setting: int, cpus: int, cores: int) -> None:
    assert resolve_cores(setting, cpus) == cores


LIGHT = Budget(1, 50, "you are using the computer")
IDLE = Budget(7, 100, "the computer is idle")
UNKNOWN_WHY = "cannot tell whether the computer is in use, so treated as in use"


@pytest.mark.parametrize(
    ("activity", "while_in_use", "reason", "budget"),
    [
        ("idle", "light", None, IDLE),
        ("idle", "pause", None, IDLE),
        ("in_use", "light", None, LIGHT),
        ("in_use", "full", None, Budget(7, 100, "you are using the computer")),
        ("in_use", "pause", "in_use", LIGHT),
        # unknown is never idle: treated as in use, and it says so
        ("unknown", "light", None, Budget(1, 50, UNKNOWN_WHY)),
        ("unknown", "pause", "in_use", Budget(1, 50, UNKNOWN_WHY)),
        ("unknown", "full", None, Budget(7, 100, UNKNOWN_WHY)),
    ],
)
def test_decide_budget(
    activity: Any, while_in_use: str, reason: str | None, budget: Budget
) -> None:
    decision = decide_budget(activity, Settings(while_in_use=while_in_use), cpu_count=8)
    assert decision.pause.reason == reason
    assert decision.budget == budget
    assert decision.activity == activity


def test_budget_follows_the_settings() -> None:
    settings = Settings(in_use_cores=2, in_use_cpu_percent=30, idle_cores=4, idle_cpu_percent=80)
    assert decide_budget("in_use", settings, 8).budget == Budget(2, 30, LIGHT.why)
    assert decide_budget("idle", settings, 8).budget == Budget(4, 80, IDLE.why)
    unknown = decide_budget("unknown", Settings(while_in_use="pause"), 8).pause
    assert "cannot tell" in unknown.detail


@pytest.mark.parametrize(
    ("budget", "words"),
    [
        (LIGHT, "1 core at 50 % (you are using the computer, requested)"),
        (
            Budget(3, 100, "the computer is idle", applied=True),
            "3 cores at 100 % (the computer is idle)",
        ),
    ],
)
def test_budget_words(budget: Budget, words: str) -> None:
    assert budget.describe() == words


@pytest.mark.parametrize(("cores", "percent"), [(0, 50), (1, 0), (1, 101)])
def test_a_budget_is_never_empty(cores: int, percent: int) -> None:
    with pytest.raises(ValueError, match="budget"):
        Budget(cores, percent, "x")


# ------------------------------------------------------------------ step aside


def run_step_aside(samples: list[float | None], threshold: int = 50) -> list[str]:
    state = rules.StepAside()
    out = []
    for sample in samples:
        state = rules.step_aside(state, sample, threshold, margin=10, calm_needed=3)
        out.append(state.decision.reason or "ok")
    return out


@pytest.mark.parametrize(
    ("samples", "threshold", "expected"),
    [
        ([10, 49, 50], 50, ["ok", "ok", "ok"]),  # at the threshold: not above
        ([51], 50, ["step_aside"]),
        # hysteresis: 45 is not calm (needs < 40), three calm samples in a row resume
        ([80, 45, 30, 30, 30], 50, ["step_aside"] * 4 + ["ok"]),
        # a busy sample in between starts the count again
        ([80, 30, 30, 45, 30, 30, 30], 50, ["step_aside"] * 6 + ["ok"]),
        ([80, 30, 30, 60, 30, 30, 30], 50, ["step_aside"] * 6 + ["ok"]),
        # an unmeasured sample changes nothing
        ([80, None, 30, None, 30, 30], 50, ["step_aside"] * 5 + ["ok"]),
        ([None, None], 50, ["ok", "ok"]),
        # 0 = off
        ([100, 100], 0, ["ok", "ok"]),
    ],
)
def test_step_aside(samples: list[float | None], threshold: int, expected: list[str]) -> None:
    assert run_step_aside(samples, threshold) == expected


def test_step_aside_words_stay_while_paused() -> None:
    first = rules.step_aside(rules.StepAside(), 73.0, 50)
    assert first.decision.detail == (
        "Other programs are using 73 % of the CPU — training resumes when they use less than 40 %"
    )
    again = rules.step_aside(first, 95.0, 50)
    assert again.decision == first.decision  # not re-announced with new numbers


# ------------------------------------------------------------------ heat


def run_heat(readings: list[float | None], limit: int = 85) -> list[str]:
    decision = ALLOW
    out = []
    for celsius in readings:
        decision = rules.heat(celsius, limit, decision)
        out.append(decision.reason or "ok")
    return out


@pytest.mark.parametrize(
    ("readings", "limit", "expected"),
    [
        ([60, 84.9], 85, ["ok", "ok"]),
        ([85], 85, ["too_hot"]),
        ([90, 80, 76, 75], 85, ["too_hot", "too_hot", "too_hot", "ok"]),  # resume at <= 75
        ([90, 75, 84], 85, ["too_hot", "ok", "ok"]),  # 84 after resuming is fine again
        # unknown never pauses (and never resumes a hot pause as "cool": it is unknown)
        ([None, None], 85, ["ok", "ok"]),
        ([90, None], 85, ["too_hot", "ok"]),
        ([120], 0, ["ok"]),  # 0 = off
    ],
)
def test_heat(readings: list[float | None], limit: int, expected: list[str]) -> None:
    assert run_heat(readings, limit) == expected


def test_heat_words() -> None:
    hot = rules.heat(88.4, 85, ALLOW)
    assert hot.detail == "The CPU is at 88 °C (limit 85 °C) — training resumes at 75 °C"
    assert rules.heat(80, 85, hot) is hot
    assert rules.temperature_words(None) == "unknown"
    assert rules.temperature_words(71.6) == "72 °C"


Temp = namedtuple("Temp", "label current high critical")


def temp(label: str, current: Any) -> Temp:
    return Temp(label, current, None, None)


@pytest.mark.parametrize(
    ("sensors", "celsius"),
    [
        (None, None),
        ({}, None),
        ({"coretemp": [temp("Core 0", 70), temp("Package id 0", 64), temp("Core 1", 72)]}, 64),
        ({"k10temp": [temp("Tccd1", 80), temp("Tctl", 66)], "nvme": [temp("Composite", 90)]}, 66),
        ({"cpu_thermal": [temp("", 51.5)]}, 51.5),
        ({"acpitz": [temp("", 40)], "nvme": [temp("Composite", 45)]}, 45),  # else the hottest
        # implausible and odd readings are skipped
        ({"acpitz": [temp("", 0.0 - 273), temp("", float("nan")), temp("", True)]}, None),
        ({"coretemp": [temp("Package id 0", None)], "acpitz": [temp("", 48)]}, 48),
    ],
)
def test_pick_cpu_temperature(sensors: dict[str, list[Temp]] | None, celsius: float | None) -> None:
    assert rules.pick_cpu_temperature(sensors) == celsius


# ------------------------------------------------------------------ full screen


@pytest.mark.parametrize(
    ("active", "enabled", "reason"),
    [(True, True, "fullscreen"), (True, False, None), (False, True, None), (None, True, None)],
)
def test_fullscreen(active: bool | None, enabled: bool, reason: str | None) -> None:
    decision = rules.fullscreen(active, enabled)
    assert decision.reason == reason
    assert decision == ALLOW or decision.detail == "Paused while a full-screen app is in front"


def test_every_new_reason_is_a_pause_reason() -> None:
    new = {"in_use", "step_aside", "too_hot", "fullscreen", "schedule"}
    assert new <= set(get_args(PauseReason))
