"""The tray's status words: one plain sentence for the tooltip and the menu's status line.

Contract: pure functions of a :class:`client.snapshot.ClientSnapshot` and the clock
values passed in; no I/O, no threads, never raises for any snapshot. The same sentence
is used by the tooltip and the first (disabled) menu line, so the two never disagree.
Sentences are at most :data:`MAX_TOOLTIP` characters (Windows cuts tooltips at 127).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final
from urllib.parse import urlsplit

from client.protocol import PauseReason
from client.snapshot import ClientSnapshot

__all__ = ["MAX_TOOLTIP", "is_user_paused", "round_label", "server_host", "status_text"]

MAX_TOOLTIP: Final = 127
APP: Final = "fedtray"

# The server names rounds "r<number>-<attempt>-<run tag>"; people want the number only.
_ROUND_ID: Final = re.compile(r"^r(\d+)-")

_PAUSE_WORDS: Final[dict[PauseReason, str]] = {
    "user_paused": "Paused by you",
    "battery_low": "Paused: battery low",
    "unplugged": "Paused: on battery (set to train only when plugged in)",
}


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
    return text[:1].lower() + text[1:]


def _pause_words(snapshot: ClientSnapshot, snoozed_until: datetime | None) -> str:
    reason = snapshot.pause_reason
    if reason == "user_paused":
        if snoozed_until is not None:
            return f"Paused by you until {snoozed_until:%H:%M}"
        return _PAUSE_WORDS["user_paused"]
    if reason is not None and snapshot.pause_detail:
        # The power policy's detail is already plain words ("On battery at 42 %").
        return f"Paused: {_lower_first(snapshot.pause_detail)}"
    if reason is not None:
        return _PAUSE_WORDS[reason]
    return "Paused"


def _connected_words(snapshot: ClientSnapshot, snoozed_until: datetime | None) -> str:
    if snapshot.device_state == "paused" or snapshot.pause_reason is not None:
        return _pause_words(snapshot, snoozed_until)
    if snapshot.device_state == "training":
        percent = round(min(1.0, max(0.0, snapshot.progress.fraction)) * 100)
        return f"{APP} — training {round_label(snapshot.round_id)}, {percent} %"
    if snapshot.device_state == "uploading":
        return f"{APP} — sending results for {round_label(snapshot.round_id)}"
    return f"{APP} — connected to {server_host(snapshot.server_url)}, waiting for a round"


def status_text(snapshot: ClientSnapshot, now: float, snoozed_until: datetime | None = None) -> str:
    """One plain sentence for ``snapshot``; ``now`` is a :func:`time.monotonic` time.

    ``snoozed_until`` is when the user's timed pause ends (the settings' ``paused_until``,
    local wall clock), if one is running.
    """
    conn = snapshot.connection
    wait = snapshot.retry_in(now)
    if snapshot.finished is not None:
        # The end of a federation is a state: it stays while the server keeps serving
        # and after it went away, until a new round starts.
        text = f"Finished — {snapshot.finished.describe()}"
    elif conn == "connected":
        text = _connected_words(snapshot, snoozed_until)
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
