"""Tooltip / status-line words and the menu model, by table."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import pytest

from client.config import Settings
from client.snapshot import NO_PROGRESS, ClientSnapshot, FederationResult
from tray.menu import (
    TOMORROW,
    MenuEntry,
    MenuNode,
    Separator,
    build_menu,
    find_entry,
    snooze_end,
)
from tray.status import MAX_TOOLTIP, Activity, budget_words, round_label, status_text

NOW = 100.0
WALL = datetime(2026, 5, 4, 14, 30)


BASE = ClientSnapshot(
    settings=Settings(
        server_url="http://127.0.0.1:3001",
        device_id="00000000-0000-4000-8000-00000000000d",
        device_name="n",
    )
)


def snap(**changes: Any) -> ClientSnapshot:
    """BASE with snapshot fields and setting keys (e.g. ``server_url``) changed."""
    keys = {k: changes.pop(k) for k in list(changes) if k in Settings.model_fields}
    settings = changes.pop("settings", BASE.settings).model_copy(update=keys)
    return replace(BASE, settings=settings, **changes)


CONNECTED: dict[str, Any] = {"connection": "connected"}
RESULT = FederationResult(task="digits", rounds=10, accuracy=0.953)


@pytest.mark.parametrize(
    ("changes", "snoozed", "expected"),
    [
        (
            {
                **CONNECTED,
                "device_state": "training",
                "round_id": "r12-1-ab",
                "progress": replace(NO_PROGRESS, fraction=0.45),
            },
            None,
            "fedtray — training round 12, 45 %",
        ),
        (
            {
                **CONNECTED,
                "device_state": "paused",
                "pause_reason": "battery_low",
                "pause_detail": "On battery at 42 %",
            },
            None,
            "Paused: on battery at 42 %",
        ),
        (
            {**CONNECTED, "device_state": "paused", "pause_reason": "unplugged"},
            None,
            "Paused: on battery (set to train only when plugged in)",
        ),
        (
            {"connection": "disconnected", "next_retry_at": 108.2},
            None,
            "Not connected: retrying in 8 s",
        ),
        ({"connection": "disconnected"}, None, "Not connected"),
        (
            {"connection": "disconnected", "pause_reason": "user_paused"},
            None,
            "Not connected (paused by you)",
        ),
        ({"connection": "connecting"}, None, "Connecting to 127.0.0.1:3001…"),
        (
            {"connection": "auth_failed", "next_retry_at": 160.0},
            None,
            "Server refused this device: check the token in Settings (retrying in 60 s)",
        ),
        ({"connection": "stopped"}, None, "fedtray — stopped"),
        (CONNECTED, None, "fedtray — connected to 127.0.0.1:3001, waiting for a round"),
        (
            {**CONNECTED, "device_state": "paused", "pause_reason": "user_paused"},
            None,
            "Paused by you",
        ),
        (
            {**CONNECTED, "device_state": "paused", "pause_reason": "user_paused"},
            datetime(2026, 5, 4, 15, 30),
            "Paused by you until 15:30",
        ),
        (
            {**CONNECTED, "device_state": "uploading", "round_id": "r3-2-x"},
            None,
            "fedtray — sending results for round 3",
        ),
        (
            {
                **CONNECTED,
                "device_state": "training",
                "round_id": "custom",
                "progress": replace(NO_PROGRESS, fraction=1.7),
            },
            None,
            "fedtray — training round custom, 100 %",
        ),
        # the end of a federation is a state, connected or after the server went away
        ({**CONNECTED, "finished": RESULT}, None, "Finished — digits, 10 rounds, 95.3 %"),
        (
            {"connection": "disconnected", "next_retry_at": 130.0, "finished": RESULT},
            None,
            "Finished — digits, 10 rounds, 95.3 %",
        ),
        (
            {**CONNECTED, "finished": FederationResult(task="synthetic", rounds=1)},
            None,
            "Finished — synthetic, 1 round",
        ),
    ],
)
def test_status_text(changes: dict[str, object], snoozed: datetime | None, expected: str) -> None:
    assert status_text(snap(**changes), NOW, snoozed) == expected


PAUSED: dict[str, Any] = {**CONNECTED, "device_state": "paused"}


@dataclass(frozen=True)
class Budget:
    """The shape of the session's CPU budget (cores, cpu_percent)."""

    cores: int
    cpu_percent: int


LIGHT = Budget(cores=1, cpu_percent=50)
TRAINING: dict[str, Any] = {
    **CONNECTED,
    "device_state": "training",
    "round_id": "r12-1-ab",
    "progress": replace(NO_PROGRESS, fraction=0.45),
}


@pytest.mark.parametrize(
    ("changes", "wall", "slowed", "expected"),
    [
        # outside the schedule: the session holds training back, the tooltip says till when
        (
            {**PAUSED, "pause_reason": "schedule", "schedule": "22:00-07:00"},
            WALL,
            None,
            "Waiting until 22:00 (your schedule)",
        ),
        # whichever rule's reason the session shows, the schedule's words explain it best
        (
            {
                **PAUSED,
                "pause_reason": "battery_low",
                "pause_detail": "On battery at 42 %",
                "schedule": "09:00-17:00",
            },
            datetime(2026, 5, 4, 18, 0),
            None,
            "Waiting until 09:00 (your schedule)",
        ),
        # inside the window the pause's own words are right
        (
            {
                **PAUSED,
                "pause_reason": "battery_low",
                "pause_detail": "On battery at 42 %",
                "schedule": "09:00-17:00",
            },
            WALL,
            None,
            "Paused: on battery at 42 %",
        ),
        # the user's own pause comes first, also outside the schedule
        (
            {**PAUSED, "pause_reason": "user_paused", "schedule": "22:00-07:00"},
            WALL,
            None,
            "Paused by you",
        ),
        # no clock given: the schedule is not mentioned
        (
            {**PAUSED, "pause_reason": "battery_low", "schedule": "22:00-07:00"},
            None,
            None,
            "Paused: battery low",
        ),
        # training is not "waiting", whatever the schedule says
        ({**TRAINING, "schedule": "22:00-07:00"}, WALL, None, "fedtray — training round 12, 45 %"),
        # the new rules' reasons: their detail is the sentence
        (
            {
                **PAUSED,
                "pause_reason": "in_use",
                "pause_detail": "Paused while you use the computer",
            },
            WALL,
            None,
            "Paused while you use the computer",
        ),
        (
            {**PAUSED, "pause_reason": "too_hot", "pause_detail": "CPU at 91 °C (limit 85 °C)"},
            WALL,
            None,
            "Paused: CPU at 91 °C (limit 85 °C)",  # an acronym keeps its capitals
        ),
        (
            {
                **PAUSED,
                "pause_reason": "step_aside",
                "pause_detail": "Other programs use 78 % of the CPU",
            },
            WALL,
            None,
            "Paused: other programs use 78 % of the CPU",
        ),
        # a reason the tray has no words for, without a detail, still says "Paused"
        ({**PAUSED, "pause_reason": "fullscreen"}, WALL, None, "Paused"),
        # slowed: the budget follows the progress
        (
            TRAINING,
            WALL,
            (LIGHT, "in_use"),
            "fedtray — training round 12, 45 % · Light: 1 core at 50 % while you use the computer",
        ),
        (
            TRAINING,
            WALL,
            (LIGHT, "unknown"),
            "fedtray — training round 12, 45 % · Light: 1 core at 50 % (cannot tell whether "
            "the computer is in use)",
        ),
        # idle (the idle budget) or while_in_use = full: full speed says nothing more
        (TRAINING, WALL, (Budget(7, 100), "idle"), "fedtray — training round 12, 45 %"),
        (
            {**TRAINING, "while_in_use": "full"},
            WALL,
            (Budget(7, 100), "in_use"),
            "fedtray — training round 12, 45 %",
        ),
        # waiting for a round: no budget words (nothing is slowed)
        (
            CONNECTED,
            WALL,
            (LIGHT, "in_use"),
            "fedtray — connected to 127.0.0.1:3001, waiting for a round",
        ),
    ],
)
def test_status_says_why(
    changes: dict[str, Any],
    wall: datetime | None,
    slowed: tuple[Budget, Activity] | None,
    expected: str,
) -> None:
    budget, activity = slowed if slowed is not None else (None, "unknown")
    text = status_text(snap(**changes), NOW, wall_now=wall, budget=budget, activity=activity)
    assert text == expected


@pytest.mark.parametrize(
    ("budget", "activity", "mode", "expected"),
    [
        (None, "in_use", "light", None),
        (LIGHT, "in_use", "light", "Light: 1 core at 50 % while you use the computer"),
        (Budget(2, 30), "in_use", "light", "Light: 2 cores at 30 % while you use the computer"),
        (
            LIGHT,
            "unknown",
            "light",
            "Light: 1 core at 50 % (cannot tell whether the computer is in use)",
        ),
        (LIGHT, "idle", "light", None),
        (Budget(7, 100), "in_use", "full", None),
        (LIGHT, "in_use", "pause", None),  # paused, not slowed: the pause words say it
    ],
)
def test_budget_words(
    budget: Budget | None, activity: Activity, mode: str, expected: str | None
) -> None:
    assert budget_words(budget, activity, mode) == expected


def test_status_text_is_bounded() -> None:
    text = status_text(snap(connection="connecting", server_url="http://" + "a" * 300 + ":1"), NOW)
    assert len(text) == MAX_TOOLTIP
    assert text.endswith("…")


@pytest.mark.parametrize(
    ("round_id", "expected"),
    [("r12-1-ab3f", "round 12"), ("weird", "round weird"), (None, "a round"), ("", "a round")],
)
def test_round_label(round_id: str | None, expected: str) -> None:
    assert round_label(round_id) == expected


# ---------------------------------------------------------------------------
# menu

SETTINGS = Settings(
    server_url="http://127.0.0.1:3001",
    device_name="laptop",
    device_id="3f0c8a52-6d1e-4b8e-9a43-0d2a1f7e5c11",
)


def labels(menu: tuple[MenuNode, ...]) -> list[str]:
    return ["---" if isinstance(n, Separator) else n.label for n in menu]


def menu_for(
    changes: dict[str, Any],
    settings: Settings = SETTINGS,
    snoozed_until: datetime | None = None,
) -> tuple[MenuNode, ...]:
    return build_menu(
        snap(settings=settings, **changes),
        monotonic_now=NOW,
        wall_now=WALL,
        snoozed_until=snoozed_until,
    )


@pytest.mark.parametrize(
    ("changes", "connect_label", "pause_label"),
    [
        (CONNECTED, "Disconnect", "Pause training"),
        ({"connection": "connecting"}, "Disconnect", "Pause training"),
        ({"connection": "disconnected", "next_retry_at": 110.0}, "Disconnect", "Pause training"),
        ({"connection": "disconnected"}, "Connect", "Pause training"),
        ({"connection": "stopped"}, "Connect", "Pause training"),
        ({"connection": "auth_failed"}, "Connect", "Pause training"),
        ({"connection": "auth_failed", "next_retry_at": 500.0}, "Disconnect", "Pause training"),
        (
            {**CONNECTED, "pause_reason": "user_paused", "device_state": "paused"},
            "Disconnect",
            "Resume training",
        ),
        # A power pause is not the user's: they can still add their own pause.
        (
            {**CONNECTED, "pause_reason": "battery_low", "device_state": "paused"},
            "Disconnect",
            "Pause training",
        ),
        (
            {"connection": "disconnected", "pause_reason": "user_paused"},
            "Connect",
            "Resume training",
        ),
    ],
)
def test_menu_toggles(changes: dict[str, object], connect_label: str, pause_label: str) -> None:
    menu = menu_for(changes)
    # The main action first, right under the status line.
    assert labels(menu) == [
        status_text(snap(**changes), NOW),
        pause_label,
        "Pause for a while",
        "---",
        "While I'm using this computer",
        "Battery threshold",
        "---",
        connect_label,
        "Settings…",
        "Start at login",
        "Open log folder",
        "About fedtray",
        "---",
        "Quit",
    ]
    status = menu[0]
    assert isinstance(status, MenuEntry) and not status.enabled and status.action is None
    actions = {
        "Connect": "connect",
        "Disconnect": "disconnect",
        "Pause training": "pause",
        "Resume training": "resume",
    }
    for label in (connect_label, pause_label):
        entry = find_entry(menu, label)
        assert entry is not None and entry.action == actions[label] and entry.enabled


@pytest.mark.parametrize(
    ("threshold", "checked"),
    [
        (0, ["Always"]),
        (20, ["Above 20 %"]),
        (50, ["Above 50 %"]),
        (80, ["Above 80 %"]),
        (100, ["Only when plugged in"]),
        (35, ["Above 35 % (custom)"]),
    ],
)
def test_threshold_radio(threshold: int, checked: list[str]) -> None:
    settings = SETTINGS.model_copy(update={"battery_threshold": threshold})
    sub = find_entry(menu_for(CONNECTED, settings), "Battery threshold")
    assert sub is not None
    items = [n for n in sub.submenu if isinstance(n, MenuEntry)]
    assert all(i.radio and i.action == "set_threshold" for i in items)
    assert [i.label for i in items if i.checked] == checked
    assert [i.value for i in items][:5] == [0, 20, 50, 80, 100]


@pytest.mark.parametrize("autostart", [True, False])
def test_autostart_checkbox_follows_setting(autostart: bool) -> None:
    settings = SETTINGS.model_copy(update={"autostart": autostart})
    entry = find_entry(menu_for(CONNECTED, settings), "Start at login")
    assert entry is not None and entry.checked is autostart and not entry.radio


@pytest.mark.parametrize(
    ("schedule", "wall", "expected"),
    [
        (
            "",
            WALL,  # Mon 4 May 2026, 14:30
            [
                ("1 hour (until 15:30)", 1),
                ("3 hours (until 17:30)", 3),
                ("8 hours (until 22:30)", 8),
                ("Until tomorrow (Tue 07:00)", TOMORROW),
            ],
        ),
        (
            "22:00-07:00",
            WALL,
            [
                ("1 hour (until 15:30)", 1),
                ("3 hours (until 17:30)", 3),
                ("8 hours (until 22:30)", 8),
                ("Until tomorrow (Tue 22:00)", TOMORROW),  # tomorrow night's window
            ],
        ),
        (
            "",
            datetime(2026, 5, 5, 1, 15),  # after midnight: tomorrow is this morning
            [
                ("1 hour (until 02:15)", 1),
                ("3 hours (until 04:15)", 3),
                ("8 hours (until 09:15)", 8),
                ("Until tomorrow (Tue 07:00)", TOMORROW),
            ],
        ),
    ],
)
def test_snooze_menu_says_when_each_ends(
    schedule: str, wall: datetime, expected: list[tuple[str, object]]
) -> None:
    snapshot = snap(settings=SETTINGS, schedule=schedule, **CONNECTED)
    menu = build_menu(snapshot, monotonic_now=NOW, wall_now=wall)
    parent = find_entry(menu, "Pause for a while")
    assert parent is not None and parent.action is None and parent.enabled
    items = [n for n in parent.submenu if isinstance(n, MenuEntry)]
    assert [(i.label, i.value) for i in items] == expected
    assert all(i.action == "snooze" and i.checked is None and i.enabled for i in items)
    # The label's time is the deadline the click sets.
    for item in items:
        end = snooze_end(item.value, wall, snapshot.settings)
        assert f"{end:%H:%M}" in item.label


def test_snooze_offered_while_snoozed_and_status_says_until_when() -> None:
    changes = {**CONNECTED, "pause_reason": "user_paused", "device_state": "paused"}
    menu = menu_for(changes, snoozed_until=datetime(2026, 5, 4, 15, 10))
    first = menu[0]
    assert isinstance(first, MenuEntry) and first.label == "Paused by you until 15:10"
    assert labels(menu)[1] == "Resume training"
    snooze = find_entry(menu, "3 hours")
    assert snooze is not None and snooze.label == "3 hours (until 17:30)"
    assert (snooze.action, snooze.value) == ("snooze", 3)


@pytest.mark.parametrize(
    ("mode", "checked"), [("pause", "Pause"), ("light", "Light"), ("full", "Full")]
)
def test_while_in_use_radio_follows_setting(mode: str, checked: str) -> None:
    settings = SETTINGS.model_copy(update={"while_in_use": mode})
    sub = find_entry(menu_for(CONNECTED, settings), "While I'm using this computer")
    assert sub is not None and sub.action is None
    items = [n for n in sub.submenu if isinstance(n, MenuEntry)]
    assert [(i.label, i.value) for i in items] == [
        ("Pause", "pause"),
        ("Light", "light"),
        ("Full", "full"),
    ]
    assert all(i.radio and i.action == "set_while_in_use" for i in items)
    assert [i.label for i in items if i.checked] == [checked]


def test_while_in_use_defaults_to_light() -> None:
    sub = find_entry(menu_for(CONNECTED), "While I'm using this computer")
    assert sub is not None
    assert [n.label for n in sub.submenu if isinstance(n, MenuEntry) and n.checked] == ["Light"]


def test_menu_status_line_is_the_tooltip_with_schedule_and_budget() -> None:
    changes = {**PAUSED, "pause_reason": "schedule", "schedule": "22:00-07:00"}
    menu = build_menu(snap(**changes), monotonic_now=NOW, wall_now=WALL)
    assert isinstance(menu[0], MenuEntry)
    assert menu[0].label == "Waiting until 22:00 (your schedule)"
    menu = build_menu(
        snap(**TRAINING), monotonic_now=NOW, wall_now=WALL, budget=LIGHT, activity="in_use"
    )
    assert isinstance(menu[0], MenuEntry)
    assert menu[0].label.endswith("· Light: 1 core at 50 % while you use the computer")


def test_about_and_default() -> None:
    menu = menu_for(CONNECTED)
    about = find_entry(menu, "About fedtray")
    assert about is not None
    lines = [n.label for n in about.submenu if isinstance(n, MenuEntry)]
    assert lines[0].startswith("fedtray ")
    assert "Device id: 3f0c8a52-6d1e-4b8e-9a43-0d2a1f7e5c11" in lines
    assert "Server: http://127.0.0.1:3001" in lines
    assert all(not n.enabled for n in about.submenu if isinstance(n, MenuEntry))
    defaults = [n.label for n in menu if isinstance(n, MenuEntry) and n.default]
    assert defaults == ["Settings…"]
