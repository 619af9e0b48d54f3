"""The tray menu as plain data, built by one pure function.

Contract: :func:`build_menu` maps (snapshot, settings, clock values, snooze end) to a
tuple of :class:`MenuEntry` / :class:`Separator`; no I/O, no GUI imports, never raises
for any valid input. The GUI adapter (:mod:`tray.pystray_menu`) turns the model into
toolkit objects, and the app maps each entry's :data:`ActionId` (plus ``value``) to a
call on the session facade. Labels are the words users see; tests pin them.

Order: the status line, then the main action (Pause / Resume training) and the timed
pauses ("Pause for a while" ▸ 1, 3, 8 hours, until tomorrow: each label says when it
ends, computed by :func:`snooze_end`, the same function the click uses), then how
training behaves ("While I'm using this computer" ▸ Pause / Light / Full, bound to the
``while_in_use`` setting; the battery threshold), then the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

from client import __version__
from client.config import Settings
from client.schedule import until_tomorrow
from client.snapshot import ClientSnapshot
from tray.status import Activity, CpuBudget, is_user_paused, schedule_of, status_text

__all__ = [
    "SNOOZE_HOURS",
    "THRESHOLD_CHOICES",
    "TOMORROW",
    "WHILE_IN_USE_CHOICES",
    "ActionId",
    "MenuEntry",
    "MenuNode",
    "Separator",
    "build_menu",
    "find_entry",
    "snooze_end",
]

ActionId = Literal[
    "connect",
    "disconnect",
    "pause",
    "resume",
    "snooze",
    "set_threshold",
    "set_while_in_use",
    "settings",
    "toggle_autostart",
    "open_logs",
    "quit",
]

#: The timed pauses offered, in hours; the last entry pauses until tomorrow (:data:`TOMORROW`).
SNOOZE_HOURS: Final = (1, 3, 8)
#: The ``snooze`` action's value for "Until tomorrow" (see :func:`client.schedule.until_tomorrow`).
TOMORROW: Final = "tomorrow"

#: (while_in_use value, label): what training does while someone uses the computer.
WHILE_IN_USE_CHOICES: Final[tuple[tuple[str, str], ...]] = (
    ("pause", "Pause"),
    ("light", "Light"),
    ("full", "Full"),
)

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
    action's argument (the threshold for ``set_threshold``, the hours or
    :data:`TOMORROW` for ``snooze``, the mode for ``set_while_in_use``). ``default``
    marks the item a left click (the backend's default action) triggers.
    """

    label: str
    action: ActionId | None = None
    value: int | str | None = None
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


def snooze_end(value: int | str | None, wall_now: datetime, settings: Settings) -> datetime:
    """When the ``snooze`` with ``value`` (hours, or :data:`TOMORROW`) chosen at the local
    ``wall_now`` ends, in the same (naive local) time."""
    if isinstance(value, int):
        return wall_now + timedelta(hours=value)
    return until_tomorrow(wall_now, schedule_of(settings))


def _snooze_menu(settings: Settings, wall_now: datetime) -> MenuEntry:
    items = [
        MenuEntry(
            f"{hours} hour{'' if hours == 1 else 's'} "
            f"(until {snooze_end(hours, wall_now, settings):%H:%M})",
            "snooze",
            value=hours,
        )
        for hours in SNOOZE_HOURS
    ]
    tomorrow = snooze_end(TOMORROW, wall_now, settings)
    items.append(MenuEntry(f"Until tomorrow ({tomorrow:%a %H:%M})", "snooze", value=TOMORROW))
    return MenuEntry("Pause for a while", submenu=tuple(items))


def _while_in_use_menu(current: str) -> MenuEntry:
    items = tuple(
        MenuEntry(label, "set_while_in_use", value=value, checked=current == value, radio=True)
        for value, label in WHILE_IN_USE_CHOICES
    )
    return MenuEntry("While I'm using this computer", submenu=items)


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
    budget: CpuBudget | None = None,
    activity: Activity = "unknown",
) -> tuple[MenuNode, ...]:
    """The whole menu for this moment.

    ``monotonic_now`` is :func:`time.monotonic` (for "retrying in N s");
    ``wall_now`` is the local wall-clock time (naive; for "until 15:30" and the schedule);
    ``snoozed_until`` is when the user's timed pause ends (the settings' ``paused_until``
    in local time), if one is running; ``budget`` the worker's CPU budget now, if
    known, and ``activity`` whether the computer is in use (both from the session).
    """
    settings = snapshot.settings
    user_paused = is_user_paused(snapshot)
    pause = (
        MenuEntry("Resume training", "resume")
        if user_paused
        else MenuEntry("Pause training", "pause")
    )
    status = status_text(
        snapshot, monotonic_now, snoozed_until, wall_now=wall_now, budget=budget, activity=activity
    )
    return (
        MenuEntry(status, enabled=False),
        pause,
        # Each says when it ends: BOINC's users did not realise its Snooze lasts an hour.
        _snooze_menu(settings, wall_now),
        Separator(),
        _while_in_use_menu(settings.while_in_use),
        _threshold_menu(settings.battery_threshold),
        Separator(),
        _connect_entry(snapshot),
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
