"""The session's pure decisions and its pause board, by table: no network, no process.

Covers :mod:`client.session.decisions` (refusing a round, the outcome of a submit ack,
the user's pause, the retry policy, the device state) and the state transitions of
:mod:`client.session.pause` (how sources combine, when a decision takes effect, how a
timed pause that ran out while fedtray was stopped is cleared).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from client.config import Settings, load_settings
from client.errors import FINAL_SUBMIT_CODES
from client.protocol import Partition, TrainingConfig, TrainingStart
from client.session.decisions import (
    UPLOAD_RETRIES,
    HeldBase,
    device_state,
    refuse_round,
    submit_outcome,
    upload_retry_delay,
    user_decision,
)
from client.session.live_settings import LiveSettings
from client.session.pause import PauseBoard, UserPause
from client.snapshot import ALLOW, USER_PAUSED, PauseDecision
from tests.waiting import wait_until_async

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
BATTERY = PauseDecision(allowed=False, reason="battery_low", detail="On battery at 12 %")
UNPLUGGED = PauseDecision(allowed=False, reason="unplugged", detail="Unplugged")


def _settings(**changes: object) -> Settings:
    return Settings(server_url="http://127.0.0.1:1", device_name="t", **changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------- the user's pause


@pytest.mark.parametrize(
    ("paused", "until", "expected_reason", "detail_has_until"),
    [
        (False, None, None, False),
        (True, None, "user_paused", False),
        (True, NOW - timedelta(seconds=1), None, False),  # ran out: training allowed
        (True, NOW, None, False),  # the deadline itself is already over
        (True, NOW + timedelta(hours=1), "user_paused", True),
    ],
)
def test_user_decision(
    paused: bool,
    until: datetime | None,
    expected_reason: str | None,
    detail_has_until: bool,
) -> None:
    decision = user_decision(_settings(paused=paused, paused_until=until), NOW)
    assert decision.reason == expected_reason
    assert decision.allowed == (expected_reason is None)
    if detail_has_until:
        assert until is not None
        assert decision.detail == f"Paused by you until {until.astimezone():%H:%M}"
    elif expected_reason is not None:
        assert decision == USER_PAUSED


# ------------------------------------------------------------------- refusing a round

START = TrainingStart(
    round_id="r7",
    task="synthetic",
    config=TrainingConfig(epochs=1, batch_size=8, learning_rate=0.1),
    partition=Partition(index=0, count=2),
    base_version=3,
    deadline=1000.0,
)
HELD = HeldBase(version=3, task="synthetic")
TASKS = ("synthetic", "digits")


# Each row changes these defaults (a start that is accepted) and names the refusal.
ACCEPTABLE: dict[str, Any] = {
    "pause": ALLOW,
    "training": None,
    "worker_busy": False,
    "tasks": TASKS,
    "held": HELD,
    "now": 999.0,
}
ALL_WRONG: dict[str, Any] = {"training": "r6", "worker_busy": True, "tasks": (), "held": None}
MISSING = "missing_base: needs v3 of synthetic, holds"


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({}, None),
        ({"pause": USER_PAUSED}, "user_paused: Paused by you"),
        ({"pause": BATTERY}, "battery_low: On battery at 12 %"),
        # the pause comes before every other reason, busy before the rest, and so on
        ({"pause": USER_PAUSED, **ALL_WRONG, "now": 2000.0}, "user_paused: Paused by you"),
        ({**ALL_WRONG, "now": 2000.0}, "busy: training r6"),
        ({"training": "r6"}, "busy: training r6"),
        ({"worker_busy": True}, "busy: training another round"),
        ({"tasks": ("digits",)}, "unknown_task: task synthetic is not installed here"),
        ({"tasks": (), "held": None}, "unknown_task: task synthetic is not installed here"),
        ({"held": None, "now": 2000.0}, f"{MISSING} no global weights"),
        ({"held": HeldBase(2, "synthetic")}, f"{MISSING} v2 of synthetic"),
        ({"held": HeldBase(4, "synthetic")}, f"{MISSING} v4 of synthetic"),
        ({"held": HeldBase(3, "digits")}, f"{MISSING} v3 of digits"),
        ({"now": 1000.0}, "deadline_passed: the round's deadline has passed"),
        ({"now": 1001.0}, "deadline_passed: the round's deadline has passed"),
    ],
)
def test_refuse_round(changes: dict[str, Any], refusal: str | None) -> None:
    ack = refuse_round(START, **{**ACCEPTABLE, **changes})
    if refusal is None:
        assert ack is None
    else:
        assert ack is not None and not ack.accepted
        assert f"{ack.reason}: {ack.detail}" == refusal


# ------------------------------------------------------------------- submit outcomes


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (None, "accepted"),
        ("duplicate", "duplicate"),
        ("round_closed", "round_closed"),
        ("not_selected", "final"),
        ("stale_base", "final"),
        ("layout_mismatch", "final"),
        ("blob_too_large", "final"),
        ("internal_error", "retry"),
        ("rate_limited", "retry"),
        ("timeout", "retry"),
        ("some_future_code", "retry"),
    ],
)
def test_submit_outcome(code: str | None, outcome: str) -> None:
    assert submit_outcome(code) == outcome


def test_every_final_code_deletes_the_update() -> None:
    assert {submit_outcome(code) for code in FINAL_SUBMIT_CODES} == {
        "duplicate",
        "round_closed",
        "final",
    }


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (UPLOAD_RETRIES, None), (9, None)],
)
def test_upload_retry_delay(failures: int, delay: float | None) -> None:
    assert upload_retry_delay(failures) == delay


@pytest.mark.parametrize(
    ("uploading", "allowed", "training", "state"),
    [
        (False, True, False, "idle"),
        (False, True, True, "training"),
        (False, False, True, "paused"),
        (False, False, False, "paused"),
        (True, False, True, "uploading"),
        (True, True, False, "uploading"),
    ],
)
def test_device_state(uploading: bool, allowed: bool, training: bool, state: str) -> None:
    assert device_state(uploading=uploading, allowed=allowed, training=training) == state


# ------------------------------------------------------------------- the pause board


class FixedSource:
    """A pause source with a fixed first decision that watches nothing."""

    def __init__(self, name: str, first: PauseDecision) -> None:
        self.name = name
        self.first = first

    def first_decision(self) -> PauseDecision:
        return self.first

    async def start(self) -> None:
        return None

    def settings_changed(self, old: Settings, new: Settings) -> None:
        return None

    async def stop(self) -> None:
        return None


@pytest.mark.parametrize(
    ("steps", "applied", "effects"),
    [
        # (source, decision) steps after registering "user" (ALLOW) and "power" (ALLOW)
        ([], ALLOW, []),
        ([("power", BATTERY)], BATTERY, [(ALLOW, BATTERY)]),
        ([("power", BATTERY), ("power", BATTERY)], BATTERY, [(ALLOW, BATTERY)]),
        (
            [("power", BATTERY), ("user", USER_PAUSED)],
            USER_PAUSED,
            [(ALLOW, BATTERY), (BATTERY, USER_PAUSED)],
        ),
        ([("user", USER_PAUSED), ("power", BATTERY)], USER_PAUSED, [(ALLOW, USER_PAUSED)]),
        (
            [("user", USER_PAUSED), ("power", BATTERY), ("user", ALLOW)],
            BATTERY,
            [(ALLOW, USER_PAUSED), (USER_PAUSED, BATTERY)],
        ),
        (
            [("power", BATTERY), ("power", UNPLUGGED), ("power", ALLOW)],
            ALLOW,
            [(ALLOW, BATTERY), (BATTERY, UNPLUGGED), (UNPLUGGED, ALLOW)],
        ),
        # a source set from outside (no source object) comes after the registered ones
        (
            [("heat", UNPLUGGED), ("power", BATTERY)],
            BATTERY,
            [(ALLOW, UNPLUGGED), (UNPLUGGED, BATTERY)],
        ),
    ],
)
def test_pause_board_applies_each_change_once(
    steps: list[tuple[str, PauseDecision]],
    applied: PauseDecision,
    effects: list[tuple[PauseDecision, PauseDecision]],
) -> None:
    seen: list[tuple[PauseDecision, PauseDecision]] = []
    board = PauseBoard(lambda old, new: seen.append((old, new)))
    board.register(FixedSource("user", ALLOW))
    board.register(FixedSource("power", ALLOW))
    for name, decision in steps:
        board.set(name, decision)
    assert board.applied == applied
    assert seen == effects


def test_a_paused_first_decision_counts_without_an_effect() -> None:
    seen: list[object] = []
    board = PauseBoard(lambda old, new: seen.append(new))
    board.register(FixedSource("user", USER_PAUSED))
    assert board.applied == USER_PAUSED
    assert board.decision("user") == USER_PAUSED
    assert board.decision("never_set") == ALLOW
    assert seen == [], "the first decisions are the starting state, not a change"


def _wired(live: LiveSettings, apply: Callable[[PauseDecision, PauseDecision], None]) -> PauseBoard:
    """A board whose sources hear of settings changes, as the session wires them."""
    board = PauseBoard(apply)

    async def changed(old: Settings, new: Settings) -> None:
        board.settings_changed(old, new)

    live.on_change = changed
    return board


def test_a_timed_pause_that_ran_out_while_stopped_is_cleared_at_start(tmp_path: Path) -> None:
    ran_out = _settings(paused=True, paused_until=NOW - timedelta(minutes=5))
    live = LiveSettings(ran_out, file=tmp_path / "settings.toml", poll_interval=1.0)
    seen: list[PauseDecision] = []
    board = _wired(live, lambda old, new: seen.append(new))
    user = UserPause(live, board.set, now=lambda: NOW)
    board.register(user)
    assert board.applied == ALLOW, "a deadline already passed does not pause"

    async def start() -> None:
        await user.start()
        await user.stop()

    asyncio.run(start())
    assert (live.value.paused, live.value.paused_until) == (False, None)
    on_disk = load_settings(tmp_path / "settings.toml")
    assert (on_disk.paused, on_disk.paused_until) == (False, None)
    assert seen == []


def test_a_timed_pause_ends_by_itself_at_its_deadline() -> None:
    live = LiveSettings(_settings(), file=None, poll_interval=1.0)
    board = _wired(live, lambda old, new: None)
    wired = live.on_change
    saved: list[Settings] = []

    async def record(old: Settings, new: Settings) -> None:
        saved.append(new)
        await wired(old, new)

    live.on_change = record
    clock = [NOW]
    user = UserPause(live, board.set, now=lambda: clock[0])
    board.register(user)

    async def scenario() -> None:
        await user.set(True, NOW + timedelta(milliseconds=50))
        assert board.applied.reason == "user_paused"
        assert live.value.paused_until == NOW + timedelta(milliseconds=50)
        clock[0] = NOW + timedelta(seconds=1)  # the wall clock jumps past the deadline
        # The deadline task sleeps at most until the deadline it saw (50 ms) between checks.
        await wait_until_async(lambda: board.applied.allowed, what="the timed pause ended")
        await user.stop()

    asyncio.run(scenario())
    assert board.applied == ALLOW
    assert [(s.paused, s.paused_until) for s in saved] == [
        (True, NOW + timedelta(milliseconds=50)),
        (False, None),
    ]
