"""The tray's status words: one plain sentence for the tooltip and the menu's status line.

Contract: pure functions of a :class:`client.snapshot.ClientSnapshot` and the clock
values passed in; no I/O, no threads, never raises for any snapshot. The same sentence
is used by the tooltip and the first (disabled) menu line, so the two never disagree.
Sentences are at most :data:`MAX_TOOLTIP` characters (Windows cuts tooltips at 127).

Why training is held back or slowed is always said:

* paused: the user's pause ("Paused by you until 15:30"), else — while the settings'
  ``schedule`` says this is outside its window (the local ``wall_now`` passed in) —
  "Waiting until 22:00 (your schedule)", else the session's pause words (the snapshot's
  ``pause_detail``, which every pause source writes in plain words, or the reason's own
  words when it has none; an unknown reason still reads "Paused");
* training on the light CPU budget (``while_in_use = light`` and the computer in use;
  the budget and the activity are the session's, passed in): the budget follows the
  progress, e.g. "fedtray — training round 12, 45 % · Light: 1 core at 50 % while you
  use the computer"; when the session cannot tell whether the computer is in use it
  says so (it then keeps the in-use budget).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final, Literal, Protocol
from urllib.parse import urlsplit

from client.config import Settings
from client.protocol import PauseReason
from client.schedule import Schedule, parse_schedule
from client.snapshot import ClientSnapshot

__all__ = [
    "MAX_TOOLTIP",
    "Activity",
    "CpuBudget",
    "budget_words",
    "is_user_paused",
    "round_label",
    "schedule_of",
    "server_host",
    "status_text",
]

MAX_TOOLTIP: Final = 127
APP: Final = "fedtray"

# The server names rounds "r<number>-<attempt>-<run tag>"; people want the number only.
_ROUND_ID: Final = re.compile(r"^r(\d+)-")

_PAUSE_WORDS: Final[dict[PauseReason, str]] = {
    "user_paused": "Paused by you",
    "battery_low": "Paused: battery low",
    "unplugged": "Paused: on battery (set to train only when plugged in)",
}


#: Whether someone uses the computer, as the session reports it ("unknown": the OS cannot
#: tell, and the in-use budget applies).
Activity = Literal["in_use", "idle", "unknown"]


class CpuBudget(Protocol):
    """The CPU budget the worker keeps now, as the session's snapshot reports it."""

    @property
    def cores(self) -> int: ...

    @property
    def cpu_percent(self) -> int: ...


def budget_words(budget: CpuBudget | None, activity: Activity, while_in_use: str) -> str | None:
    """``"Light: 1 core at 50 % while you use the computer"``; None when not slowed.

    Training is slowed by the light budget, which applies (``while_in_use = light``)
    while the computer is in use or when that cannot be told.
    """
    if budget is None or while_in_use != "light" or activity == "idle":
        return None
    cores = f"{budget.cores} core{'' if budget.cores == 1 else 's'}"
    words = f"Light: {cores} at {budget.cpu_percent} %"
    if activity == "unknown":
        return f"{words} (cannot tell whether the computer is in use)"
    return f"{words} while you use the computer"


def schedule_of(settings: Settings) -> Schedule | None:
    """The settings' daily window (None: any time, or a value that does not parse)."""
    try:
        return parse_schedule(settings.schedule)
    except ValueError:
        return None


def round_label(round_id: str | None) -> str:
    """``"round 12"`` for the server's ``"r12-1-ab3f"``; the raw id for any other shape."""
    if not round_id:
        return "a round"
    match = _ROUND_ID.match(round_id)
    return f"round {match.group(1)}" if match else f"round {round_id}"


def server_host(url: str) -> str:
    """The host (and port) part of ``url`` for display; the whole string if it has none."""
    try:
        return urlsplit(url).netloc or url
    except ValueError:
        return url


def is_user_paused(snapshot: ClientSnapshot) -> bool:
    """Whether the user's own pause is what holds training back (so "Resume" applies)."""
    return snapshot.pause_reason == "user_paused"


def _lower_first(text: str) -> str:
    if text[1:2].isupper():  # an acronym ("CPU at 91 °C") keeps its capitals
        return text
    return text[:1].lower() + text[1:]


def _pause_words(
    snapshot: ClientSnapshot, snoozed_until: datetime | None, wall_now: datetime | None
) -> str:
    reason = snapshot.pause_reason
    if reason == "user_paused":
        if snoozed_until is not None:
            return f"Paused by you until {snoozed_until:%H:%M}"
        return _PAUSE_WORDS["user_paused"]
    schedule = schedule_of(snapshot.settings)
    if schedule is not None and wall_now is not None and not schedule.contains(wall_now.time()):
        return f"Waiting until {schedule.start:%H:%M} (your schedule)"
    detail = snapshot.pause_detail.strip()
    if reason is not None and detail:
        # Pause sources write plain words ("On battery at 42 %", "Paused while ...").
        return detail if detail.startswith("Paused") else f"Paused: {_lower_first(detail)}"
    if reason is not None:
        return _PAUSE_WORDS.get(reason, "Paused")
    return "Paused"


def _connected_words(
    snapshot: ClientSnapshot,
    snoozed_until: datetime | None,
    wall_now: datetime | None,
    budget: CpuBudget | None,
    activity: Activity,
) -> str:
    if snapshot.device_state == "paused" or snapshot.pause_reason is not None:
        return _pause_words(snapshot, snoozed_until, wall_now)
    if snapshot.device_state == "training":
        percent = round(min(1.0, max(0.0, snapshot.progress.fraction)) * 100)
        text = f"{APP} — training {round_label(snapshot.round_id)}, {percent} %"
        slowed = budget_words(budget, activity, snapshot.settings.while_in_use)
        return text if slowed is None else f"{text} · {slowed}"
    if snapshot.device_state == "uploading":
        return f"{APP} — sending results for {round_label(snapshot.round_id)}"
    return f"{APP} — connected to {server_host(snapshot.server_url)}, waiting for a round"


def status_text(
    snapshot: ClientSnapshot,
    now: float,
    snoozed_until: datetime | None = None,
    *,
    wall_now: datetime | None = None,
    budget: CpuBudget | None = None,
    activity: Activity = "unknown",
) -> str:
    """One plain sentence for ``snapshot``; ``now`` is a :func:`time.monotonic` time.

    ``snoozed_until`` is when the user's timed pause ends (the settings' ``paused_until``,
    local wall clock), if one is running. ``wall_now`` is the local wall-clock time (for
    the schedule; without it the schedule is not mentioned); ``budget`` the worker's CPU
    budget now (None: not known, nothing said) and ``activity`` whether the computer is
    in use, both as the session reports them.
    """
    conn = snapshot.connection
    wait = snapshot.retry_in(now)
    if snapshot.finished is not None:
        # The end of a federation is a state: it stays while the server keeps serving
        # and after it went away, until a new round starts.
        text = f"Finished — {snapshot.finished.describe()}"
    elif conn == "connected":
        text = _connected_words(snapshot, snoozed_until, wall_now, budget, activity)
    elif conn == "connecting":
        text = f"Connecting to {server_host(snapshot.server_url)}…"
    elif conn == "auth_failed":
        text = "Server refused this device: check the token in Settings"
        if wait is not None:
            text += f" (retrying in {wait:.0f} s)"
    elif conn == "stopped":
        text = f"{APP} — stopped"
    elif wait is not None:
        text = f"Not connected: retrying in {wait:.0f} s"
    else:
        text = "Not connected"
    if conn != "connected" and is_user_paused(snapshot):
        text += " (paused by you)"
    if len(text) > MAX_TOOLTIP:
        text = text[: MAX_TOOLTIP - 1] + "…"
    return text
