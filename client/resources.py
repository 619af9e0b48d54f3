"""System resources (CPU, RAM, battery) for registration and heartbeats.

Contract:

* :class:`ResourceMonitor` gives a :class:`client.protocol.ResourceSnapshot` on demand.
  :meth:`ResourceMonitor.snapshot` never blocks (no sampling interval) and never raises
  for battery problems. Its CPU figure is the system-wide use since the previous
  snapshot (since construction for the first one), whichever thread asks.
* A machine without a battery reports ``battery=None``, never "on battery" (BOINC bug
  #6468 showed desktops as "suspended: on batteries"). Every way the OS can fail to
  answer -- ``psutil.sensors_battery`` missing on the platform, returning ``None``,
  raising, or returning odd values -- gives ``None``. An unknown plug state
  (``power_plugged=None``) gives ``pluggedIn=None``, never ``False``.
* The battery source is injectable (:class:`BatterySource`) so the power policy can be
  driven by made-up readings; :func:`read_battery` is the real one.
* ``FEDTRAY_SIMULATE_BATTERY`` (:data:`SIMULATE_BATTERY_ENV`) overrides what
  :func:`read_battery` returns, for tests and for seeing the power policy on a desktop:
  ``"42,unplugged"``, ``"80,plugged"``, ``"55,unknown"`` or ``"none"`` (no battery).
  :func:`parse_simulated_battery` parses it strictly (pure; :class:`ValueError` with the
  accepted forms for anything else). :func:`read_battery` logs one WARNING per distinct
  value -- "battery is simulated" for a good one, the parse error for a bad one, which is
  then ignored (the real battery is read) -- never one per reading.
* :func:`battery_from_psutil`, :func:`parse_simulated_battery` and
  :func:`cpu_busy_percent` are pure (no I/O).
* Never imports torch or GUI code.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from typing import Final, NamedTuple, Protocol

import psutil

from client.protocol import BatteryStatus, ResourceSnapshot

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024


class BatterySource(Protocol):
    """Something that reads the battery: a status, or ``None`` when there is no battery."""

    def __call__(self) -> BatteryStatus | None: ...


def _clamp_percent(value: float) -> float:
    return min(100.0, max(0.0, value))


def battery_from_psutil(raw: object) -> BatteryStatus | None:
    """Turn what ``psutil.sensors_battery()`` returned into a :class:`BatteryStatus`.

    ``None`` (no battery), an object without ``percent``, or a percent that is not a
    finite number all give ``None``: when in doubt the machine is treated as having no
    battery, which never pauses work. ``power_plugged`` other than ``True``/``False``
    gives ``pluggedIn=None`` (unknown). The percent is clamped to 0-100 because some
    firmware reports e.g. 101 while charging.
    """
    if raw is None:
        return None
    percent = getattr(raw, "percent", None)
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        return None
    if not math.isfinite(percent):
        return None
    plugged = getattr(raw, "power_plugged", None)
    plugged_in = plugged if isinstance(plugged, bool) else None
    return BatteryStatus(percent=_clamp_percent(float(percent)), plugged_in=plugged_in)


SIMULATE_BATTERY_ENV: Final = "FEDTRAY_SIMULATE_BATTERY"
_PLUG_WORDS: Final[dict[str, bool | None]] = {"plugged": True, "unplugged": False, "unknown": None}
_SIMULATE_FORMS: Final = '"PERCENT,plugged", "PERCENT,unplugged", "PERCENT,unknown" or "none"'


def parse_simulated_battery(text: str) -> BatteryStatus | None:
    """A :data:`SIMULATE_BATTERY_ENV` value as a reading; ``None`` for ``"none"`` (no battery).

    Strict: the percent is a number from 0 to 100 (no clamping: a typo such as 420 is an
    error, not a full battery) and the plug word is one of ``plugged``, ``unplugged``,
    ``unknown``; case and spaces around the parts do not matter. Raises
    :class:`ValueError` naming the value and the accepted forms otherwise.
    """
    cleaned = text.strip().lower()
    if cleaned == "none":
        return None
    percent_text, comma, plug_text = cleaned.partition(",")
    problem = f"{SIMULATE_BATTERY_ENV}={text!r} is not understood; use {_SIMULATE_FORMS}"
    plug_word = plug_text.strip()
    if not comma or plug_word not in _PLUG_WORDS:
        raise ValueError(problem)
    try:
        percent = float(percent_text.strip())
    except ValueError:
        raise ValueError(problem) from None
    if not (math.isfinite(percent) and 0.0 <= percent <= 100.0):
        raise ValueError(f"{problem} (the percent must be 0 to 100)")
    return BatteryStatus(percent=percent, plugged_in=_PLUG_WORDS[plug_word])


class _Unset:
    """Marks a simulation value that failed to parse (the real battery is read instead)."""


_UNSET: Final = _Unset()
# One parse (and one log line) per distinct value of the variable; the battery is read
# every few seconds from more than one thread.
_simulated: dict[str, BatteryStatus | _Unset | None] = {}
_simulated_lock = threading.Lock()


def _simulated_reading(value: str) -> BatteryStatus | _Unset | None:
    with _simulated_lock:
        if value in _simulated:
            return _simulated[value]
        result: BatteryStatus | _Unset | None
        try:
            result = parse_simulated_battery(value)
        except ValueError as exc:
            logger.warning("%s; ignoring it and reading the real battery", exc)
            result = _UNSET
        else:
            shown = "no battery" if result is None else f"{value.strip()!r}"
            logger.warning(
                "the battery is SIMULATED (%s=%s): power decisions follow it, not the real battery",
                SIMULATE_BATTERY_ENV,
                shown,
            )
        _simulated[value] = result
        return result


def read_battery() -> BatteryStatus | None:
    """The battery reading through psutil; ``None`` when there is none or on any error.

    :data:`SIMULATE_BATTERY_ENV`, when set to a valid value, replaces the reading.
    """
    override = os.environ.get(SIMULATE_BATTERY_ENV)
    if override is not None:
        simulated = _simulated_reading(override)
        if not isinstance(simulated, _Unset):
            return simulated
    # sensors_battery does not exist on every platform psutil supports.
    sensors_battery: Callable[[], object] | None = getattr(psutil, "sensors_battery", None)
    if sensors_battery is None:
        return None
    try:
        raw = sensors_battery()
    except Exception as exc:  # any OS-level failure means "cannot tell", i.e. no battery
        # debug, not warning: this runs on every heartbeat and would flood the log.
        logger.debug("battery reading failed: %r", exc)
        return None
    return battery_from_psutil(raw)


def battery_present(source: BatterySource = read_battery) -> bool:
    """True when ``source`` reports a battery."""
    return source() is not None


class _CpuTimes(NamedTuple):
    """The two numbers a CPU-use figure needs, in seconds."""

    total: float
    idle: float


def _cpu_totals(times: object, before: object) -> _CpuTimes:
    """Total and idle time elapsed between two ``psutil.cpu_times()`` results."""
    # The fields differ per OS, so walk whatever the namedtuple has. A counter that goes
    # backwards (seen on some kernels) counts as 0, as psutil and top do.
    fields: tuple[str, ...] = getattr(times, "_fields", ())
    delta = {f: max(0.0, float(getattr(times, f)) - float(getattr(before, f))) for f in fields}
    # Linux already counts guest time inside user/nice, and iowait is idle time that
    # Linux keeps out of "idle"; psutil's own cpu_percent does the same adjustments.
    total = sum(delta.values()) - delta.get("guest", 0.0) - delta.get("guest_nice", 0.0)
    idle = delta.get("idle", 0.0) + delta.get("iowait", 0.0)
    return _CpuTimes(total=total, idle=idle)


def cpu_busy_percent(before: object, after: object) -> float:
    """System-wide CPU use (0-100) between two ``psutil.cpu_times()`` results.

    0.0 when no time elapsed between them.
    """
    elapsed = _cpu_totals(after, before)
    if elapsed.total <= 0:
        return 0.0
    return _clamp_percent(100.0 * (elapsed.total - elapsed.idle) / elapsed.total)


class ResourceMonitor:
    """Monitors system resources (RAM, CPU, battery) for heartbeat updates.

    Not thread-safe for concurrent :meth:`snapshot` calls; one owner (the session) asks.
    """

    def __init__(self, battery_source: BatterySource = read_battery) -> None:
        self._battery_source = battery_source
        # psutil.cpu_percent(interval=None) keeps its "previous reading" per thread and
        # shares it with every other caller in the process, so priming it here would be
        # lost when the session snapshots from another thread. Keeping our own previous
        # cpu_times() makes the first snapshot meaningful wherever it is taken.
        self._last_cpu_times: object = psutil.cpu_times()

    def snapshot(self) -> ResourceSnapshot:
        """Current CPU use (since the previous snapshot), RAM and battery; never blocks."""
        now = psutil.cpu_times()
        cpu = cpu_busy_percent(self._last_cpu_times, now)
        self._last_cpu_times = now
        memory = psutil.virtual_memory()
        return ResourceSnapshot(
            cpu_percent=round(cpu, 1),
            ram_used_percent=_clamp_percent(float(memory.percent)),
            ram_available_mb=max(0, int(memory.available) // _MIB),
            battery=self._battery_source(),
        )
