"""Notification decisions by table: what notifies, with which words, and how often."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest

from client.config import Reset, Settings, SettingsReport
from client.snapshot import ClientSnapshot, FederationResult
from tray.notify import (
    AUTH_INTERVAL,
    POWER_INTERVAL,
    ROUND_INTERVAL,
    SETTINGS_INTERVAL,
    UNREACHABLE_AFTER,
    NotificationKind,
    NotifyMemory,
    decide,
)

BASE = ClientSnapshot(
    settings=Settings(
        server_url="http://127.0.0.1:3001",
        device_id="00000000-0000-4000-8000-00000000000d",
        device_name="n",
    )
)


def snap(**changes: Any) -> ClientSnapshot:
    return replace(BASE, **changes)


OFF = snap(connection="disconnected")
CONNECTING = snap(connection="connecting")
UP = snap(connection="connected")
BATTERY = snap(
    connection="connected",
    device_state="paused",
    pause_reason="battery_low",
    pause_detail="On battery at 12 %",
)
UNPLUGGED = snap(connection="connected", device_state="paused", pause_reason="unplugged")
USER = snap(connection="connected", device_state="paused", pause_reason="user_paused")
TRAINING = snap(
    connection="connected", device_state="training", round_id="r4-1-x", rounds_completed=2
)
DONE = snap(connection="connected", round_id="r4-1-x", rounds_completed=3)
REFUSED = snap(connection="auth_failed", next_retry_at=900.0)
RESULT = FederationResult(task="digits", rounds=10, accuracy=0.953)
FINISHED = snap(connection="connected", finished=RESULT)
FINISHED_GONE = snap(connection="disconnected", next_retry_at=5.0, finished=RESULT)
CONNECTED_BEFORE = NotifyMemory(ever_connected=True)


def sent(
    kind: NotificationKind, at: float, memory: NotifyMemory = CONNECTED_BEFORE
) -> NotifyMemory:
    return replace(memory, last_sent=MappingProxyType({kind: at}))


@pytest.mark.parametrize(
    ("prev", "new", "memory", "now", "kind", "words"),
    [
        # the end of the federation: once, in words; a server that stops after it is no outage
        (UP, FINISHED, CONNECTED_BEFORE, 10.0, "finished", "complete (digits, 10 rounds, 95.3 %)"),
        (FINISHED, FINISHED, CONNECTED_BEFORE, 10.0, None, None),
        (FINISHED, FINISHED_GONE, CONNECTED_BEFORE, 10.0, None, None),
        (
            FINISHED_GONE,
            FINISHED_GONE,
            replace(CONNECTED_BEFORE, trying_since=0.0),
            UNREACHABLE_AFTER + 1,
            None,
            None,
        ),
        # first connection of the run, but not a later reconnect
        (CONNECTING, UP, NotifyMemory(), 10.0, "connected", "Connected to 127.0.0.1:3001"),
        (None, UP, NotifyMemory(), 10.0, "connected", "Connected to 127.0.0.1:3001"),
        (CONNECTING, UP, CONNECTED_BEFORE, 10.0, None, None),
        (UP, UP, NotifyMemory(ever_connected=False), 10.0, None, None),
        # a reconnect after an "unreachable" notice is worth saying
        (
            CONNECTING,
            UP,
            replace(CONNECTED_BEFORE, unreachable_notified=True),
            10.0,
            "reconnected",
            "Reached 127.0.0.1:3001",
        ),
        # power pause / resume, with the reason; the user's own pause is silent
        (UP, BATTERY, CONNECTED_BEFORE, 10.0, "power_paused", "On battery at 12 %."),
        (UP, UNPLUGGED, CONNECTED_BEFORE, 10.0, "power_paused", "On battery."),
        (BATTERY, UP, CONNECTED_BEFORE, 10.0, "power_resumed", "Power is fine again"),
        (BATTERY, UNPLUGGED, CONNECTED_BEFORE, 10.0, None, None),
        (UP, USER, CONNECTED_BEFORE, 10.0, None, None),
        (USER, UP, CONNECTED_BEFORE, 10.0, None, None),
        (BATTERY, USER, CONNECTED_BEFORE, 10.0, None, None),
        # rate limits
        (UP, BATTERY, sent("power_paused", 0.0), POWER_INTERVAL - 1, None, None),
        (UP, BATTERY, sent("power_paused", 0.0), POWER_INTERVAL, "power_paused", "12 %"),
        # round submitted, at most one per ROUND_INTERVAL
        (TRAINING, DONE, CONNECTED_BEFORE, 10.0, "round_submitted", "finished round 4 (3 so far)"),
        (TRAINING, DONE, sent("round_submitted", 5.0), 5.0 + ROUND_INTERVAL - 1, None, None),
        (
            TRAINING,
            DONE,
            sent("round_submitted", 5.0),
            5.0 + ROUND_INTERVAL,
            "round_submitted",
            "round 4",
        ),
        (DONE, DONE, CONNECTED_BEFORE, 10.0, None, None),
        # the token refused
        (CONNECTING, REFUSED, NotifyMemory(), 10.0, "auth_failed", "token"),
        (REFUSED, REFUSED, NotifyMemory(), 10.0, None, None),
        (CONNECTING, REFUSED, sent("auth_failed", 0.0), AUTH_INTERVAL - 1, None, None),
    ],
)
def test_decide(
    prev: ClientSnapshot | None,
    new: ClientSnapshot,
    memory: NotifyMemory,
    now: float,
    kind: str | None,
    words: str | None,
) -> None:
    notes, after = decide(prev, new, memory, now)
    if kind is None:
        assert notes == ()
        assert after.last_sent == memory.last_sent
    else:
        assert [n.kind for n in notes] == [kind]
        assert words is not None and words in notes[0].message
        assert after.last_sent[notes[0].kind] == now


RESET_ONE = SettingsReport(
    resets=(Reset("battery_threshold", "battery_threshold must be ..., got 150", "50"),),
    kept_aside="/cfg/config.toml.corrupt-1",
)
RESET_TWO = replace(
    RESET_ONE,
    resets=(*RESET_ONE.resets, Reset("server_url", "server_url must be ...", '"x"')),
)
CANNOT_READ = SettingsReport(file_problem="cannot be read: Permission denied", in_memory=True)


@pytest.mark.parametrize(
    ("prev", "new", "memory", "now", "title", "words"),
    [
        # at start, before anything else (it explains a wrong server)
        (
            None,
            snap(settings_report=RESET_ONE),
            NotifyMemory(),
            1.0,
            "Some settings were reset",
            "reset: battery_threshold; every other setting was kept; the original is kept at "
            "/cfg/config.toml.corrupt-1",
        ),
        (
            None,
            snap(settings_report=CANNOT_READ),
            NotifyMemory(),
            1.0,
            "fedtray cannot read its settings",
            "Permission denied",
        ),
        # a new typo while running
        (
            snap(settings_report=RESET_ONE),
            snap(settings_report=RESET_TWO),
            CONNECTED_BEFORE,
            10.0,
            "Some settings were reset",
            "battery_threshold, server_url",
        ),
        # fewer problems, or the same again: nothing new to say
        (
            snap(settings_report=RESET_TWO),
            snap(settings_report=RESET_ONE),
            CONNECTED_BEFORE,
            10.0,
            None,
            None,
        ),
        (
            snap(settings_report=RESET_ONE),
            snap(settings_report=RESET_ONE),
            CONNECTED_BEFORE,
            10.0,
            None,
            None,
        ),
        (snap(settings_report=RESET_ONE), BASE, CONNECTED_BEFORE, 10.0, None, None),
        # rate-limited: a file saved with typos again and again
        (
            BASE,
            snap(settings_report=RESET_ONE),
            sent("settings_reset", 5.0),
            5.0 + SETTINGS_INTERVAL - 1,
            None,
            None,
        ),
        (
            BASE,
            snap(settings_report=RESET_ONE),
            sent("settings_reset", 5.0),
            5.0 + SETTINGS_INTERVAL,
            "Some settings were reset",
            "battery_threshold",
        ),
    ],
)
def test_settings_reset_is_notified(
    prev: ClientSnapshot | None,
    new: ClientSnapshot,
    memory: NotifyMemory,
    now: float,
    title: str | None,
    words: str | None,
) -> None:
    notes, _ = decide(prev, new, memory, now)
    if title is None:
        assert notes == ()
    else:
        assert [(n.kind, n.title) for n in notes] == [("settings_reset", title)]
        assert words is not None and words in notes[0].message


def test_unreachable_for_long_notifies_once_per_outage() -> None:
    trying = snap(connection="disconnected", next_retry_at=1.0, last_error="connection refused")
    memory = CONNECTED_BEFORE
    notes, memory = decide(UP, trying, memory, 100.0)
    assert notes == ()
    notes, memory = decide(trying, CONNECTING, memory, 100.0 + UNREACHABLE_AFTER - 1)
    assert notes == ()
    notes, memory = decide(CONNECTING, trying, memory, 100.0 + UNREACHABLE_AFTER)
    assert [n.kind for n in notes] == ["unreachable"]
    assert "5 minutes (connection refused)" in notes[0].message
    # Same outage: silent from now on.
    notes, memory = decide(trying, trying, memory, 100.0 + 3 * UNREACHABLE_AFTER)
    assert notes == ()
    # Back: "connected again", and a new outage may notify again.
    notes, memory = decide(trying, UP, memory, 2000.0)
    assert [n.kind for n in notes] == ["reconnected"]
    notes, memory = decide(UP, trying, memory, 3000.0)
    notes, memory = decide(trying, trying, memory, 3000.0 + UNREACHABLE_AFTER)
    assert [n.kind for n in notes] == ["unreachable"]


def test_user_disconnect_is_not_an_outage() -> None:
    memory = CONNECTED_BEFORE
    _, memory = decide(UP, OFF, memory, 0.0)  # no retry scheduled: the user's choice
    notes, memory = decide(OFF, OFF, memory, 10 * UNREACHABLE_AFTER)
    assert notes == ()
    assert memory.trying_since is None
