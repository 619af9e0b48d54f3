"""Tooltip / status-line words and the menu model, by table."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest

from client.config import Settings
from client.snapshot import NO_PROGRESS, ClientSnapshot, FederationResult
from tray.menu import MenuEntry, MenuNode, Separator, build_menu, find_entry
from tray.status import MAX_TOOLTIP, round_label, status_text

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
    assert labels(menu) == [
        status_text(snap(**changes), NOW),
        "---",
        connect_label,
        pause_label,
        "Pause for 1 hour (until 15:30)",
        "Battery threshold",
        "---",
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


def test_snooze_label_and_status_when_snoozed() -> None:
    changes = {**CONNECTED, "pause_reason": "user_paused", "device_state": "paused"}
    menu = menu_for(changes, snoozed_until=datetime(2026, 5, 4, 15, 10))
    first = menu[0]
    assert isinstance(first, MenuEntry) and first.label == "Paused by you until 15:10"
    snooze = find_entry(menu, "Pause for 1 hour")
    assert snooze is not None and snooze.label == "Pause for 1 hour (until 15:30)"
    assert snooze.action == "snooze"


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
