"""What the session shows the outside world, and how pause decisions combine.

Contract: pure data and pure functions, no I/O, no threads. :class:`ClientSnapshot` is
immutable, so the session hands the same object to every subscriber and to any thread
without copying. :func:`effective_decision` combines the decisions of every pause
source (the user, later the power policy) into the one the session applies.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from client.config import Settings, SettingsReport
from client.protocol import DeviceState, PauseReason
from client.worker_messages import TrainProgress

ConnectionState = Literal["disconnected", "connecting", "connected", "auth_failed", "stopped"]
#: Whether someone uses the computer: "unknown" when the OS cannot tell (treated as in use).
Activity = Literal["in_use", "idle", "unknown"]


@dataclass(frozen=True)
class PauseDecision:
    """Whether training is allowed now; when not, why (a stable reason and plain words)."""

    allowed: bool
    reason: PauseReason | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.allowed and self.reason is not None:
            raise ValueError("an allowing decision has no pause reason")
        if not self.allowed and self.reason is None:
            raise ValueError("a pausing decision needs a reason")


@dataclass(frozen=True)
class Budget:
    """How hard training may work: ``cores`` (torch threads, >= 1) at ``cpu_percent``
    (1-100) of those cores' time, and ``why`` in plain words ("you are using the
    computer"). ``applied`` is True once the session handed it to the worker
    (:meth:`client.session.core.SessionCore.apply_budget`), which keeps it from its next
    batch boundary; False while only requested."""

    cores: int
    cpu_percent: int
    why: str
    applied: bool = False

    def __post_init__(self) -> None:
        if self.cores < 1 or not 1 <= self.cpu_percent <= 100:
            raise ValueError(f"a budget needs >= 1 core and 1-100 %, got {self}")

    def describe(self) -> str:
        """``"1 core at 50 % (you are using the computer)"``, plus ``", requested"``."""
        cores = f"{self.cores} core{'s' if self.cores != 1 else ''}"
        kept = "" if self.applied else ", requested"
        return f"{cores} at {self.cpu_percent} % ({self.why}{kept})"


ALLOW = PauseDecision(allowed=True)
USER_PAUSED = PauseDecision(allowed=False, reason="user_paused", detail="Paused by you")


def effective_decision(decisions: Iterable[PauseDecision]) -> PauseDecision:
    """The first pausing decision in ``decisions`` (so order = priority), else ALLOW."""
    for decision in decisions:
        if not decision.allowed:
            return decision
    return ALLOW


#: The report when the settings needed no repair.
NO_REPORT: Final = SettingsReport()

#: The progress a snapshot shows before the first round: nothing trained yet.
NO_PROGRESS: Final = TrainProgress(round_id="", epoch=0, epochs=0, step=0, steps=1, fraction=0.0)


@dataclass(frozen=True)
class FederationResult:
    """The server said the federation finished (``federation:finished``)."""

    task: str
    rounds: int
    accuracy: float | None = None
    """The final model's accuracy (0..1) when the server evaluated one."""

    def describe(self) -> str:
        """``"digits, 10 rounds, 95.3 %"``."""
        words = f"{self.task}, {self.rounds} round{'s' if self.rounds != 1 else ''}"
        if self.accuracy is not None:
            words += f", {self.accuracy * 100:.1f} %"
        return words


@dataclass(frozen=True)
class ClientSnapshot:
    """The whole visible state of a :class:`client.session.DistributedClient`.

    ``settings`` are the ones the session runs with (it owns them; a GUI shows these and
    keeps no copy). ``settings_report`` says which settings were reset and why (a typo in
    the file, a file that could not be read; empty when none), from the session's one
    owner of it (:class:`client.session.live_settings.LiveSettings`); the tray and the
    headless status show it from here. ``finished`` is set when the server said the
    federation is over (cleared when a new round starts). The politeness rules'
    readings (:mod:`client.session.politeness`): ``budget`` (None until decided) is
    how hard training may work now; ``activity`` is whether the computer is in use
    ("unknown" when the OS cannot tell, treated as in use) with ``activity_detail`` in
    words (how it was detected); ``temperature_c`` is the CPU temperature (None:
    unknown, never shown as cool); ``other_cpu_percent`` is other programs' share of
    the whole CPU (None before the first measurement). ``next_retry_at`` is a
    :func:`time.monotonic` time; use :meth:`retry_in` for the seconds left (the
    snapshot itself never changes while the clock runs).
    """

    settings: Settings
    connection: ConnectionState = "disconnected"
    next_retry_at: float | None = None
    last_error: str | None = None
    device_state: DeviceState = "idle"
    pause_reason: PauseReason | None = None
    pause_detail: str = ""
    round_id: str | None = None
    progress: TrainProgress = NO_PROGRESS
    upload_fraction: float | None = None
    weights_version: int | None = None
    task: str | None = None
    rounds_completed: int = 0
    simulation: bool = False
    finished: FederationResult | None = None
    settings_report: SettingsReport = NO_REPORT
    budget: Budget | None = None
    activity: Activity = "unknown"
    activity_detail: str = ""
    temperature_c: float | None = None
    other_cpu_percent: float | None = None

    @property
    def server_url(self) -> str:
        return self.settings.server_url

    @property
    def device_id(self) -> str:
        return self.settings.device_id

    @property
    def device_name(self) -> str:
        return self.settings.device_name

    def retry_in(self, now: float | None = None) -> float | None:
        """Seconds until the next connection attempt (``None`` when none is scheduled)."""
        if self.next_retry_at is None:
            return None
        return max(0.0, self.next_retry_at - (time.monotonic() if now is None else now))

    def describe_connection(self, now: float | None = None) -> str:
        """The connection state in plain words, e.g. ``"disconnected, retrying in 4 s"``."""
        wait = self.retry_in(now)
        text = self.connection.replace("_", " ")
        if wait is not None and self.connection in ("disconnected", "auth_failed"):
            text += f", retrying in {wait:.0f} s"
        return text
