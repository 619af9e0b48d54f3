"""The time-of-day schedule ("train only 22:00-07:00") and "pause until tomorrow", pure.

Contract: pure functions of their arguments; no I/O, no clock of their own. Times are the
local wall clock, passed in as naive :class:`datetime.datetime` / :class:`datetime.time`
values (the caller converts an aware deadline with ``.astimezone(UTC)``, which applies
the local time zone and its daylight-saving rules).

* :func:`parse_schedule` reads the ``schedule`` setting: ``""`` (or only spaces) is "any
  time" and gives ``None``; ``"HH:MM-HH:MM"`` (24-hour clock; an en dash and spaces
  around the dash are accepted) gives a :class:`Schedule`. Anything else, and a window
  whose start equals its end (always or never?), raises ValueError naming ``schedule``
  and the accepted form. ``str(schedule)`` is the one spelling the settings file keeps.
* :meth:`Schedule.contains`: the window includes its start and excludes its end; a window
  whose end is earlier than its start runs across midnight (``22:00-07:00``).
  :func:`next_change` is the first moment after an aware ``now`` at which that flips, in
  the wall-clock time of ``now``'s time zone; :meth:`Schedule.words` spells the window
  for people (``22:00–07:00``).
* :func:`until_tomorrow`: when "Pause until tomorrow" ends. "Tomorrow" is the day after
  today, where a night belongs to the day before until :data:`DAY_STARTS` (04:00): at
  01:00 "tomorrow" is still the coming morning. The pause ends at the first
  :data:`MORNING` (07:00) of tomorrow or, with a schedule, at the first start of the
  schedule's window tomorrow (so a night-time schedule skips tonight and trains again
  tomorrow night). The result is always later than ``now``.
* :func:`until_words`: how a deadline is said to people ("15:30"; with the day when it
  is not today: "Mon 30 Nov 00:33"), the one spelling the CLI and the pause detail use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Final, Protocol

__all__ = [
    "DAY_STARTS",
    "MORNING",
    "SCHEDULE_WORDS",
    "DailyStart",
    "Schedule",
    "next_change",
    "parse_schedule",
    "until_tomorrow",
    "until_words",
]

#: What the ``schedule`` setting accepts, in the words every message about it uses.
SCHEDULE_WORDS: Final = (
    "a daily window HH:MM-HH:MM on the 24-hour clock (e.g. 22:00-07:00 to train only at "
    "night), or empty for any time"
)
#: When "tomorrow" begins, for "Pause until tomorrow": the small hours still belong to today.
DAY_STARTS: Final = time(4, 0)
#: When "Pause until tomorrow" ends when no schedule is set.
MORNING: Final = time(7, 0)

_WINDOW: Final = re.compile(r"^(\d{1,2}):(\d{2})\s*[-–]\s*(\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class Schedule:
    """A daily window of local time during which training may run."""

    start: time
    end: time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def words(self) -> str:
        """``22:00–07:00``: the window for people (an en dash)."""
        return f"{self.start:%H:%M}\u2013{self.end:%H:%M}"

    def contains(self, moment: time) -> bool:
        """Whether training may run at the local time of day ``moment``."""
        moment = moment.replace(second=0, microsecond=0, tzinfo=None)
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end  # across midnight


def _clock(hours: str, minutes: str) -> time | None:
    h, m = int(hours), int(minutes)
    return time(h, m) if 0 <= h <= 23 and 0 <= m <= 59 else None


def parse_schedule(text: str) -> Schedule | None:
    """The schedule ``text`` describes, or None for "any time"; ValueError when malformed."""
    stripped = text.strip()
    if not stripped:
        return None
    match = _WINDOW.match(stripped)
    start = _clock(match.group(1), match.group(2)) if match else None
    end = _clock(match.group(3), match.group(4)) if match else None
    if start is None or end is None:
        raise ValueError(f"schedule must be {SCHEDULE_WORDS}, got {text!r}")
    if start == end:
        raise ValueError(
            f"schedule {text!r} starts and ends at the same time; leave it empty to train "
            "at any time"
        )
    return Schedule(start, end)


def next_change(schedule: Schedule, now: datetime) -> datetime:
    """The first time after ``now`` (aware) at which :meth:`Schedule.contains` flips:
    the window's end when ``now`` is inside, else its start; today's if still ahead, else
    tomorrow's, in ``now``'s own time zone."""
    boundary = schedule.end if schedule.contains(now.time()) else schedule.start
    candidate = now.replace(hour=boundary.hour, minute=boundary.minute, second=0, microsecond=0)
    if candidate <= now:
        candidate += timedelta(days=1)
    return candidate


class DailyStart(Protocol):
    """Anything with a daily start time (a :class:`Schedule`, or another window type)."""

    @property
    def start(self) -> time: ...


def until_tomorrow(now: datetime, schedule: DailyStart | None) -> datetime:
    """When "Pause until tomorrow" ends (naive local time; see the module docstring)."""
    tomorrow = (now - _since_midnight(DAY_STARTS)).date() + timedelta(days=1)
    begins = datetime.combine(tomorrow, DAY_STARTS)
    at = schedule.start if schedule is not None else MORNING
    end = datetime.combine(tomorrow, at)
    if end < begins:  # e.g. a 02:00 start: tomorrow's is the night after
        end += timedelta(days=1)
    return end


def _since_midnight(moment: time) -> timedelta:
    return timedelta(hours=moment.hour, minutes=moment.minute)


def until_words(until: datetime, now: datetime) -> str:
    """An aware deadline in local time: ``"15:30"``, with the day when it is not today."""
    local, today = until.astimezone(), now.astimezone()
    return f"{local:%H:%M}" if local.date() == today.date() else f"{local:%a %d %b %H:%M}"
