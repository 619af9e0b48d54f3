"""The ``schedule`` setting: a daily time-of-day window such as ``22:00-07:00``.

Contract (pure, stdlib only, no clock of its own):

* :func:`parse_window` reads ``"HH:MM-HH:MM"`` (24-hour; an en dash or spaces around
  the dash are accepted) into a :class:`Window`; an empty string is ``None`` ("any
  time"). Anything else raises :class:`ValueError` with words saying what is allowed.
  A window may cross midnight (``22:00-07:00``); start and end may not be equal.
* :meth:`Window.contains` says whether a wall-clock time lies inside (start included,
  end excluded); :func:`next_change` is the next aware datetime at which inside/outside
  flips, computed in the wall-clock time of ``now``'s time zone.
* :meth:`Window.spelled` is the one normalised spelling (``"22:00-07:00"``) the settings
  file keeps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Final

__all__ = ["SCHEDULE_WORDS", "Window", "next_change", "parse_window"]

#: What the ``schedule`` setting accepts, in the words every error message uses.
SCHEDULE_WORDS: Final = (
    'a daily window "HH:MM-HH:MM" in 24-hour time (e.g. "22:00-07:00", may cross '
    'midnight), or "" for any time'
)

_PATTERN: Final = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*[-\u2013]\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Window:
    """A daily window from ``start`` (included) to ``end`` (excluded), wall-clock time."""

    start: time
    end: time

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise ValueError("a schedule's start and end must differ")

    @property
    def crosses_midnight(self) -> bool:
        return self.end < self.start

    def contains(self, moment: time) -> bool:
        """Whether the wall-clock time ``moment`` lies inside the window."""
        moment = moment.replace(tzinfo=None)
        if self.crosses_midnight:
            return moment >= self.start or moment < self.end
        return self.start <= moment < self.end

    def spelled(self) -> str:
        """``"22:00-07:00"``: the one spelling the settings file keeps."""
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def words(self) -> str:
        """``"22:00–07:00"``, for people."""
        return f"{self.start:%H:%M}\u2013{self.end:%H:%M}"


def parse_window(text: str) -> Window | None:
    """The window ``text`` names; ``None`` for ``""`` (any time). ValueError otherwise."""
    if text.strip() == "":
        return None
    match = _PATTERN.match(text)
    if match is None:
        raise ValueError(f"schedule must be {SCHEDULE_WORDS}, got {text!r}")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if not (h1 < 24 and h2 < 24 and m1 < 60 and m2 < 60):
        raise ValueError(f"schedule must be {SCHEDULE_WORDS}: {text!r} is not a time of day")
    try:
        return Window(time(h1, m1), time(h2, m2))
    except ValueError:
        raise ValueError(
            f"schedule must be {SCHEDULE_WORDS}: {text!r} starts and ends at the same time "
            '(use "" for any time)'
        ) from None


def next_change(window: Window, now: datetime) -> datetime:
    """The first time after ``now`` (aware) at which :meth:`Window.contains` flips.

    That is the window's end when ``now`` is inside, else its start; today's if still
    ahead, else tomorrow's, in ``now``'s own time zone.
    """
    boundary = window.end if window.contains(now.time()) else window.start
    candidate = now.replace(hour=boundary.hour, minute=boundary.minute, second=0, microsecond=0)
    if candidate <= now:
        candidate += timedelta(days=1)
    return candidate
