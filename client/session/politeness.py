"""The politeness pause sources: in use / idle, step aside, heat, full screen, schedule.

Contract (loop-only objects, each a :class:`client.session.pause.PauseSource` registered
with the session's :class:`~client.session.pause.PauseBoard`, so a pause they decide
takes effect exactly like the user's or the power pause):

* Readings come from injected edges: a :class:`client.activity.ActivityProbe` (idle seconds, full
  screen, a description; ``None`` = the OS cannot tell), a :class:`CpuSampler` (other
  programs' share of the whole CPU since its last call) and a temperature reader. Each
  is called in a worker thread (an OS call may block; the loop never does); one that
  raises counts as "cannot tell" and is logged at debug level only. Decisions come from
  the pure rules (:mod:`client.rules`).
* :class:`InUsePause` polls the probe every :data:`INUSE_POLL_S` seconds (input switches
  the budget or pauses within that plus one batch). It reports an ``in_use`` pause only
  with ``while_in_use = "pause"``; otherwise it hands the budget to ``apply_budget``
  (whenever it changes, and once at start). Unknown activity is shown as unknown and
  treated as in use, never guessed idle.
* :class:`StepAsidePause` samples every ``window_s`` seconds (default
  :data:`STEP_ASIDE_WINDOW_S`): the whole machine's busy share minus fedtray's own
  processes (this process and its children, i.e. the worker), with the hysteresis of
  :func:`client.rules.pauses.step_aside`.
* :class:`HeatPause` reads the CPU temperature every :data:`HEAT_POLL_S` seconds
  (psutil's sensors where the OS offers them); unknown never pauses.
* :class:`FullscreenPause` polls the probe every :data:`FULLSCREEN_POLL_S` seconds.
* :class:`SchedulePause` re-decides at the next change of the window, waking at least
  every :data:`SCHEDULE_CHECK_S` seconds against the wall clock (a suspended laptop or a
  changed clock cannot make it miss), like the timed pause's deadline.
* Every interval above is a default: :class:`PollIntervals` (one field a source) is how
  a session is given others (``DistributedClient(poll_intervals=...)``: tests shorten
  them); it raises ``ValueError`` for an interval that is not a positive number.
* New settings re-decide at once from the last reading. After :meth:`stop` nothing is
  reported. ``FEDTRAY_SIMULATE_OTHER_CPU`` (:data:`SIMULATE_OTHER_CPU_ENV`, a percent)
  replaces the real CPU measurement (tests, demos), with one WARNING.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Final, Protocol, TypeVar

import psutil

from client.activity import ActivityProbe
from client.config import Settings
from client.rules import pauses as rules
from client.rules.budget import activity_of, decide_budget
from client.schedule import next_change, parse_schedule
from client.session.live_settings import LiveSettings
from client.session.pause import Report
from client.snapshot import ALLOW, Budget, PauseDecision

__all__ = [
    "FULLSCREEN_POLL_S",
    "HEAT_POLL_S",
    "INUSE_POLL_S",
    "SCHEDULE_CHECK_S",
    "STEP_ASIDE_WINDOW_S",
    "CpuSampler",
    "FullscreenPause",
    "HeatPause",
    "InUsePause",
    "OtherCpuSampler",
    "PollIntervals",
    "SchedulePause",
    "StepAsidePause",
    "default_cpu_sampler",
    "read_cpu_temperature",
]

log = logging.getLogger(__name__)

#: Seconds between idle-time readings: input switches the budget within this (+ a batch).
INUSE_POLL_S: Final = 0.5
#: Seconds between full-screen checks.
FULLSCREEN_POLL_S: Final = 1.0
#: The window (seconds) over which other programs' CPU share is measured.
STEP_ASIDE_WINDOW_S: Final = 2.0
#: Seconds between temperature readings.
HEAT_POLL_S: Final = 5.0
#: Longest sleep of the schedule task: wall-clock jumps are noticed within it.
SCHEDULE_CHECK_S: Final = 1.0
SIMULATE_OTHER_CPU_ENV: Final = "FEDTRAY_SIMULATE_OTHER_CPU"


@dataclass(frozen=True)
class PollIntervals:
    """The seconds each polled source waits between readings (defaults: the constants)."""

    in_use: float = INUSE_POLL_S
    fullscreen: float = FULLSCREEN_POLL_S
    step_aside_window: float = STEP_ASIDE_WINDOW_S
    heat: float = HEAT_POLL_S
    schedule_check: float = SCHEDULE_CHECK_S

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(
                    f"poll interval {field.name} must be a positive number, got {value!r}"
                )


#: How sources show their readings: ``publish(**snapshot_fields)`` (the hub's publish).
Publish = Callable[..., None]
T = TypeVar("T")


class CpuSampler(Protocol):
    """Other programs' share (0-100) of the whole CPU since the last call; ``None`` on
    the first call (nothing to compare with yet) or when the OS cannot tell."""

    def __call__(self) -> float | None: ...


async def _read(what: str, read: Callable[[], T | None]) -> T | None:
    """``read()`` in a worker thread; ``None`` (logged at debug level) when it raises."""
    try:
        return await asyncio.to_thread(read)
    except Exception as exc:  # an OS edge may fail any way: "cannot tell", never a crash
        log.debug("%s failed: %r", what, exc)
        return None


class _Polling:
    """One loop task that calls ``tick`` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float) -> None:
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"a poll interval must be a positive number, got {interval}")
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def _loop(self, tick: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await tick()

    def _begin(self, tick: Callable[[], Awaitable[None]]) -> None:
        if not self._stopped:
            self._task = asyncio.ensure_future(self._loop(tick))

    async def stop(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _PollingRule(_Polling, ABC):
    """A polled source that decides from its last reading and the settings: it reads once
    at start, then every ``interval``; new settings re-decide from the last reading."""

    @abstractmethod
    async def _tick(self) -> None:
        """Read the OS (off the loop) and decide."""

    @abstractmethod
    def _decide(self, settings: Settings) -> None:
        """Report the decision for the last reading and ``settings``."""

    async def start(self) -> None:
        await self._tick()
        self._begin(self._tick)

    def settings_changed(self, old: Settings, new: Settings) -> None:
        self._decide(new)


class InUsePause(_PollingRule):
    """In use or idle: the budget, or a pause (see the module docstring)."""

    name: Final = "in_use"

    def __init__(
        self,
        settings: LiveSettings,
        probe: ActivityProbe,
        report: Report,
        apply_budget: Callable[[Budget], None],
        publish: Publish,
        *,
        cpu_count: int | None = None,
        interval: float = INUSE_POLL_S,
    ) -> None:
        super().__init__(interval)
        self._settings = settings
        self._probe = probe
        self._report = report
        self._apply_budget = apply_budget
        self._publish = publish
        self._cpus = cpu_count or os.cpu_count() or 1
        self._idle: float | None = None
        self._described = ""
        self._budget: Budget | None = None

    def first_decision(self) -> PauseDecision:
        return decide_budget("unknown", self._settings.value, self._cpus).pause

    def _decide(self, settings: Settings) -> None:
        if self._stopped:
            return
        activity = activity_of(self._idle, settings.idle_after_seconds)
        decision = decide_budget(activity, settings, self._cpus)
        self._report(self.name, decision.pause)
        # Stable words (no running count), so the snapshot changes only with the state.
        after = settings.idle_after_seconds
        if self._idle is None:
            words = f"cannot tell whether the computer is in use ({self._described})"
        elif activity == "idle":
            words = f"no input for {after} s or more ({self._described})"
        else:
            words = f"input within the last {after} s ({self._described})"
        self._publish(activity=activity, activity_detail=words)
        if decision.budget != self._budget:
            self._budget = decision.budget
            self._apply_budget(decision.budget)

    async def _tick(self) -> None:
        self._idle = await _read("reading the idle time", self._probe.idle_seconds)
        if not self._described:
            described = await _read("describing the detector", self._probe.describe)
            self._described = described or "unknown detector"
        self._decide(self._settings.value)


class FullscreenPause(_PollingRule):
    """A full-screen app in front pauses training (see the module docstring)."""

    name: Final = "fullscreen"

    def __init__(
        self,
        settings: LiveSettings,
        probe: ActivityProbe,
        report: Report,
        *,
        interval: float = FULLSCREEN_POLL_S,
    ) -> None:
        super().__init__(interval)
        self._settings = settings
        self._probe = probe
        self._report = report
        self._active: bool | None = None

    def first_decision(self) -> PauseDecision:
        return ALLOW

    def _decide(self, settings: Settings) -> None:
        if not self._stopped:
            self._report(self.name, rules.fullscreen(self._active, settings.pause_when_fullscreen))

    async def _tick(self) -> None:
        if self._settings.value.pause_when_fullscreen:  # off: no OS call at all
            self._active = await _read("the full-screen check", self._probe.fullscreen_active)
        self._decide(self._settings.value)


def _system_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores summed."""
    times = psutil.cpu_times()
    total = sum(times)
    # guest time is already counted in user/nice (psutil's cpu_percent does the same)
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


class OtherCpuSampler:
    """Other programs' share of the whole CPU: the machine's busy time minus that of
    ``root`` (default: this process) and all its descendants, between two calls."""

    def __init__(self, root: int | None = None) -> None:
        self._root = psutil.Process(root)
        self._last: tuple[float, float] | None = None
        self._own: dict[tuple[int, float], float] = {}

    def _own_times(self) -> dict[tuple[int, float], float]:
        seen: dict[tuple[int, float], float] = {}
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    seen[(proc.pid, proc.create_time())] = times.user + times.system
            except psutil.Error:  # ended meanwhile
                continue
        return seen

    def __call__(self) -> float | None:
        busy, total = _system_times()
        own = self._own_times()
        own_delta = sum(cpu - self._own.get(key, 0.0) for key, cpu in own.items())
        last, self._last, self._own = self._last, (busy, total), own
        if last is None or total <= last[1]:
            return None
        others = (busy - last[0]) - max(0.0, own_delta)
        return min(100.0, max(0.0, 100.0 * others / (total - last[1])))


def default_cpu_sampler() -> CpuSampler:
    """The real sampler, or the constant :data:`SIMULATE_OTHER_CPU_ENV` says (logged)."""
    given = os.environ.get(SIMULATE_OTHER_CPU_ENV)
    if given is None:
        return OtherCpuSampler()
    try:
        value = float(given)
        if not (math.isfinite(value) and 0.0 <= value <= 100.0):
            raise ValueError
    except ValueError:
        log.warning(
            "%s=%r is not a percent from 0 to 100; ignoring it", SIMULATE_OTHER_CPU_ENV, given
        )
        return OtherCpuSampler()
    log.warning("other programs' CPU use is SIMULATED (%s=%s)", SIMULATE_OTHER_CPU_ENV, given)
    return lambda: value


class StepAsidePause(_Polling):
    """Step aside while other programs keep the CPU busy (see the module docstring)."""

    name: Final = "step_aside"

    def __init__(
        self,
        settings: LiveSettings,
        sampler: CpuSampler,
        report: Report,
        publish: Publish,
        *,
        window_s: float = STEP_ASIDE_WINDOW_S,
        calm_needed: int = rules.STEP_ASIDE_CALM_SAMPLES,
    ) -> None:
        super().__init__(window_s)
        self._settings = settings
        self._sampler = sampler
        self._report = report
        self._publish = publish
        self._calm_needed = calm_needed
        self._state = rules.StepAside()
        self._last: float | None = None

    def first_decision(self) -> PauseDecision:
        return ALLOW

    def _step(self, state: rules.StepAside, threshold: int) -> None:
        if self._stopped:
            return
        new = rules.step_aside(state, self._last, threshold, calm_needed=self._calm_needed)
        if new.decision != self._state.decision:
            log.info("step aside: %s", new.decision.detail or "other programs settled; resuming")
            self._report(self.name, new.decision)
        self._state = new

    async def _tick(self) -> None:
        self._last = await _read("measuring other programs' CPU use", self._sampler)
        if self._last is not None:
            self._publish(other_cpu_percent=round(self._last, 1))
        self._step(self._state, self._settings.value.step_aside_cpu_percent)

    async def start(self) -> None:
        await _read("measuring other programs' CPU use", self._sampler)  # the baseline
        self._begin(self._tick)

    def settings_changed(self, old: Settings, new: Settings) -> None:
        if old.step_aside_cpu_percent != new.step_aside_cpu_percent:
            # the new threshold decides afresh from the last sample, not at the next one
            self._step(rules.StepAside(), new.step_aside_cpu_percent)


def read_cpu_temperature() -> float | None:
    """The CPU package temperature through psutil (``None`` where the OS offers none)."""
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:  # not on this OS (Windows, macOS)
        return None
    return rules.pick_cpu_temperature(sensors())


class HeatPause(_PollingRule):
    """Pause while the CPU is too hot (see the module docstring)."""

    name: Final = "heat"

    def __init__(
        self,
        settings: LiveSettings,
        report: Report,
        publish: Publish,
        *,
        read: Callable[[], float | None] = read_cpu_temperature,
        interval: float = HEAT_POLL_S,
    ) -> None:
        super().__init__(interval)
        self._settings = settings
        self._read_temperature = read
        self._report = report
        self._publish = publish
        self._celsius: float | None = None
        self._decision = ALLOW

    def first_decision(self) -> PauseDecision:
        return ALLOW

    def _decide(self, settings: Settings) -> None:
        if self._stopped:
            return
        new = rules.heat(self._celsius, settings.max_temperature, self._decision)
        if new != self._decision:
            log.info("heat: %s", new.detail or "the CPU cooled down; resuming")
            self._decision = new
            self._report(self.name, new)

    async def _tick(self) -> None:
        self._celsius = await _read("reading the CPU temperature", self._read_temperature)
        self._publish(temperature_c=self._celsius)
        self._decide(self._settings.value)


def local_now() -> datetime:
    return datetime.now().astimezone()


class SchedulePause:
    """Train only inside the ``schedule`` window (see the module docstring)."""

    name: Final = "schedule"

    def __init__(
        self,
        settings: LiveSettings,
        report: Report,
        *,
        now: Callable[[], datetime] = local_now,
        check_s: float = SCHEDULE_CHECK_S,
    ) -> None:
        self._settings = settings
        self._report = report
        self._now = now
        self._check_s = check_s
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def _decide(self, settings: Settings) -> PauseDecision:
        return rules.schedule(parse_schedule(settings.schedule), self._now())

    def first_decision(self) -> PauseDecision:
        return self._decide(self._settings.value)

    async def start(self) -> None:
        self._report(self.name, self._decide(self._settings.value))
        self._task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        # Short sleeps against the wall clock: the change is a wall-clock time.
        while True:
            window = parse_schedule(self._settings.value.schedule)
            left = self._check_s
            if window is not None:
                now = self._now()
                left = min(left, max(0.0, (next_change(window, now) - now).total_seconds()))
            await asyncio.sleep(left)
            if not self._stopped:
                self._report(self.name, self._decide(self._settings.value))

    def settings_changed(self, old: Settings, new: Settings) -> None:
        if not self._stopped:
            self._report(self.name, self._decide(new))

    async def stop(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
