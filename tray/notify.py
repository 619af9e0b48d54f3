"""When to show a desktop notification, and with what words.

Contract: :func:`decide` is pure: given the previous snapshot (``None`` at start), the
new one, the :class:`NotifyMemory` returned by the previous call and the monotonic
``now``, it returns the notifications to show (at most one) and the memory to pass next
time. No I/O, never raises. Call it on every snapshot change *and* now and then
without one (the "server unreachable for a long time" notice depends on time alone).

What notifies, and how often at most:

* the first successful connection of this run ("connected"), and the first connection
  after an "unreachable" notice ("reconnected");
* a pause by the power policy, with its reason ("power_paused"), and the resume that
  ends it ("power_resumed"): at most one of each per :data:`POWER_INTERVAL`;
* a submitted round ("round_submitted"): at most one per :data:`ROUND_INTERVAL`;
* the server refusing this device's token ("auth_failed"): at most one per
  :data:`AUTH_INTERVAL`;
* the server unreachable for :data:`UNREACHABLE_AFTER` while the client keeps trying
  ("unreachable"): once per outage, and never after the federation finished;
* the federation finished ("finished"): once per finish;
* settings that were reset or a settings file that cannot be used (the snapshot's
  ``settings_report``: a typo in the file, a file that cannot be read), at start and
  whenever the report gains something ("settings_reset"), naming the keys and where the
  original file was kept: at most one per :data:`SETTINGS_INTERVAL` (a file saved with
  the same typo again and again is told once a minute at most). It comes before the
  other notices: it explains them (a wrong server is why nothing connects).

Nothing notifies for what the user just did (their own pause, resume or disconnect).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final, Literal

from client.protocol import PauseReason
from client.snapshot import ClientSnapshot
from tray.status import round_label, server_host

__all__ = [
    "AUTH_INTERVAL",
    "POWER_INTERVAL",
    "ROUND_INTERVAL",
    "SETTINGS_INTERVAL",
    "UNREACHABLE_AFTER",
    "Notification",
    "NotificationKind",
    "NotifyMemory",
    "decide",
]

NotificationKind = Literal[
    "connected",
    "reconnected",
    "power_paused",
    "power_resumed",
    "round_submitted",
    "auth_failed",
    "unreachable",
    "finished",
    "settings_reset",
]

POWER_INTERVAL: Final = 60.0
ROUND_INTERVAL: Final = 300.0
AUTH_INTERVAL: Final = 3600.0
UNREACHABLE_AFTER: Final = 300.0
SETTINGS_INTERVAL: Final = 60.0

_INTERVALS: Final[Mapping[NotificationKind, float]] = {
    "power_paused": POWER_INTERVAL,
    "power_resumed": POWER_INTERVAL,
    "round_submitted": ROUND_INTERVAL,
    "auth_failed": AUTH_INTERVAL,
    "settings_reset": SETTINGS_INTERVAL,
}
_POWER_REASONS: Final[frozenset[PauseReason]] = frozenset({"battery_low", "unplugged"})


@dataclass(frozen=True)
class Notification:
    """One notification: a short title and a sentence."""

    kind: NotificationKind
    title: str
    message: str


@dataclass(frozen=True)
class NotifyMemory:
    """What earlier calls of :func:`decide` notified; treat as opaque, pass it back."""

    last_sent: Mapping[NotificationKind, float] = field(
        default_factory=lambda: MappingProxyType({})
    )
    ever_connected: bool = False
    trying_since: float | None = None
    unreachable_notified: bool = False


def _trying(snapshot: ClientSnapshot) -> bool:
    """Whether the client is trying to reach the server and has not (yet) succeeded."""
    if snapshot.connection == "connecting":
        return True
    return snapshot.connection == "disconnected" and snapshot.next_retry_at is not None


def _allowed(memory: NotifyMemory, kind: NotificationKind, now: float) -> bool:
    last = memory.last_sent.get(kind)
    return last is None or now - last >= _INTERVALS.get(kind, 0.0)


def _candidate(
    prev: ClientSnapshot | None, new: ClientSnapshot, memory: NotifyMemory, now: float
) -> Notification | None:
    host = server_host(new.server_url)
    settings = _settings_notice(prev, new)
    if settings is not None:
        return settings
    if new.finished is not None:
        if prev is None or prev.finished != new.finished:
            return Notification(
                "finished",
                "Training finished",
                f"The federation is complete ({new.finished.describe()}). Thank you!",
            )
        return None  # a server that stops after the end is no outage to report
    was_connected = prev is not None and prev.connection == "connected"
    if new.connection == "connected" and not was_connected:
        if not memory.ever_connected:
            return Notification(
                "connected",
                "fedtray is connected",
                f"Connected to {host}. This computer will train when the server starts a round.",
            )
        if memory.unreachable_notified:
            return Notification("reconnected", "fedtray is connected again", f"Reached {host}.")

    if new.connection == "auth_failed" and (prev is None or prev.connection != "auth_failed"):
        return Notification(
            "auth_failed",
            "The server refused this device",
            "Check the server address and token in fedtray's Settings…",
        )

    prev_reason = prev.pause_reason if prev is not None else None
    if new.pause_reason in _POWER_REASONS and prev_reason not in _POWER_REASONS:
        detail = new.pause_detail or (
            "On battery" if new.pause_reason == "unplugged" else "Battery low"
        )
        return Notification("power_paused", "Training paused", f"{detail}. It resumes by itself.")
    if prev_reason in _POWER_REASONS and new.pause_reason is None:
        return Notification(
            "power_resumed", "Training resumed", "Power is fine again; training continues."
        )

    if prev is not None and new.rounds_completed > prev.rounds_completed:
        return Notification(
            "round_submitted",
            "Round submitted",
            f"Thank you: this computer finished {round_label(prev.round_id or new.round_id)} "
            f"({new.rounds_completed} so far).",
        )

    since = memory.trying_since
    if since is not None and not memory.unreachable_notified and now - since >= UNREACHABLE_AFTER:
        minutes = int((now - since) // 60)
        why = f" ({new.last_error})" if new.last_error else ""
        return Notification(
            "unreachable",
            "Cannot reach the server",
            f"{host} has not answered for {minutes} minutes{why}. fedtray keeps trying.",
        )
    return None


def _settings_notice(prev: ClientSnapshot | None, new: ClientSnapshot) -> Notification | None:
    """A notice when the settings report gained something since ``prev``."""
    report = new.settings_report
    before = prev.settings_report if prev is not None else None
    if report.ok or report == before:
        return None
    if (
        before is not None
        and set(report.reset_keys) <= set(before.reset_keys)
        and (report.file_problem in (None, before.file_problem))
    ):
        return None  # only fewer problems: the user is dealing with them
    if report.in_memory and not report.resets:
        title = "fedtray cannot read its settings"
    else:
        title = "Some settings were reset"
    return Notification("settings_reset", title, report.summary())


def decide(
    prev: ClientSnapshot | None, new: ClientSnapshot, memory: NotifyMemory, now: float
) -> tuple[tuple[Notification, ...], NotifyMemory]:
    """The notifications to show for the change ``prev`` -> ``new`` and the next memory."""
    # Track the current outage first: it is what the "unreachable" rule measures.
    if _trying(new):
        trying_since = memory.trying_since if memory.trying_since is not None else now
        memory = replace(memory, trying_since=trying_since)
    elif memory.trying_since is not None:
        # Connected, refused (the server answered) or stopped by the user: no outage.
        memory = replace(memory, trying_since=None)

    note = _candidate(prev, new, memory, now)
    if new.connection == "connected":
        memory = replace(memory, ever_connected=True, unreachable_notified=False)
    if note is None or not _allowed(memory, note.kind, now):
        return (), memory
    sent = dict(memory.last_sent)
    sent[note.kind] = now
    memory = replace(memory, last_sent=MappingProxyType(sent))
    if note.kind == "unreachable":
        memory = replace(memory, unreachable_notified=True)
    return (note,), memory
