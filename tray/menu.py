"""The tray menu as plain data, built by one pure function.

Contract: :func:`build_menu` maps (snapshot, settings, clock values, snooze end) to a
tuple of :class:`MenuEntry` / :class:`Separator`; no I/O, no GUI imports, never raises
for any valid input. The GUI adapter (:mod:`tray.pystray_menu`) turns the model into
toolkit objects, and the app maps each entry's :data:`ActionId` (plus ``value``) to a
call on the session facade. Labels are the words users see; tests pin them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

from client import __version__
from client.config import Settings
from client.snapshot import ClientSnapshot
from tray.status import is_user_paused, status_text

__all__ = [
    "SNOOZE",
    "THRESHOLD_CHOICES",
    "ActionId",
    "MenuEntry",
    "MenuNode",
    "Separator",
    "build_menu",
    "find_entry",
]

ActionId = Literal[
    "connect",
    "disconnect",
    "pause",
    "resume",
    "snooze",
    "set_threshold",
    "settings",
    "toggle_autostart",
    "open_logs",
    "quit",
]

SNOOZE: Final = timedelta(hours=1)

# (battery_threshold value, label). 0 and 100 are the two ends the power policy
# treats specially: always train / only when plugged in.
THRESHOLD_CHOICES: Final[tuple[tuple[int, str], ...]] = (
    (0, "Always"),
    (20, "Above 20 %"),
    (50, "Above 50 %"),
    (80, "Above 80 %"),
    (100, "Only when plugged in"),
)


@dataclass(frozen=True)
class MenuEntry:
    """One menu line. ``checked`` is None for a plain item; ``radio`` draws a check as a dot.

    ``action`` is None for an informational line or a submenu parent; ``value`` is the
    action's argument (the threshold for ``set_threshold``). ``default`` marks the item
    a left click (the backend's default action) triggers.
    """

    label: str
    action: ActionId | None = None
    value: int | None = None
    enabled: bool = True
    checked: bool | None = None
    radio: bool = False
    default: bool = False
    submenu: tuple[MenuNode, ...] = ()


@dataclass(frozen=True)
class Separator:
    """A line between groups of items."""


MenuNode = MenuEntry | Separator


def _connect_entry(snapshot: ClientSnapshot) -> MenuEntry:
    # "Disconnect" while connected *or trying to* (a retry is scheduled): the user's way
    # to stop the attempts. "Connect" only when nothing is happening.
    trying = snapshot.connection in ("connected", "connecting") or (
        snapshot.connection in ("disconnected", "auth_failed")
        and snapshot.next_retry_at is not None
    )
    return MenuEntry("Disconnect", "disconnect") if trying else MenuEntry("Connect", "connect")


def _threshold_menu(current: int) -> MenuEntry:
    items: list[MenuNode] = [
        MenuEntry(label, "set_threshold", value=value, checked=current == value, radio=True)
        for value, label in THRESHOLD_CHOICES
    ]
    if current not in {value for value, _ in THRESHOLD_CHOICES}:
        # A value set by hand in the config file: show it, or no radio would be checked.
        items.append(
            MenuEntry(
                f"Above {current} % (custom)",
                "set_threshold",
                value=current,
                checked=True,
                radio=True,
            )
        )
    return MenuEntry("Battery threshold", submenu=tuple(items))


def _about_menu(settings: Settings) -> MenuEntry:
    lines = (
        f"fedtray {__version__}",
        f"Device: {settings.device_name}",
        f"Device id: {settings.device_id}",
        f"Server: {settings.server_url}",
    )
    return MenuEntry("About fedtray", submenu=tuple(MenuEntry(t, enabled=False) for t in lines))


def build_menu(
    snapshot: ClientSnapshot,
    *,
    monotonic_now: float,
    wall_now: datetime,
    snoozed_until: datetime | None = None,
) -> tuple[MenuNode, ...]:
    """The whole menu for this moment.

    ``monotonic_now`` is :func:`time.monotonic` (for "retrying in N s");
    ``wall_now`` is the local wall-clock time (for "until 15:30");
    ``snoozed_until`` is when the user's timed pause ends (the settings' ``paused_until``
    in local time), if one is running.
    """
    settings = snapshot.settings
    user_paused = is_user_paused(snapshot)
    pause = (
        MenuEntry("Resume training", "resume")
        if user_paused
        else MenuEntry("Pause training", "pause")
    )
    # Say when the snooze ends: BOINC's users did not realise its Snooze lasts an hour.
    snooze = MenuEntry(f"Pause for 1 hour (until {wall_now + SNOOZE:%H:%M})", "snooze")
    return (
        MenuEntry(status_text(snapshot, monotonic_now, snoozed_until), enabled=False),
        Separator(),
        _connect_entry(snapshot),
        pause,
        snooze,
        _threshold_menu(settings.battery_threshold),
        Separator(),
        MenuEntry("Settings…", "settings", default=True),
        MenuEntry("Start at login", "toggle_autostart", checked=settings.autostart),
        MenuEntry("Open log folder", "open_logs"),
        _about_menu(settings),
        Separator(),
        MenuEntry("Quit", "quit"),
    )


def find_entry(menu: tuple[MenuNode, ...], label: str) -> MenuEntry | None:
    """The first entry (searching submenus too) whose label is ``label`` or starts with it."""
    for node in menu:
        if isinstance(node, Separator):
            continue
        if node.label == label or node.label.startswith(label):
            return node
        found = find_entry(node.submenu, label)
        if found is not None:
            return found
    return None
