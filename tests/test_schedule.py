"""client.schedule: the daily window and "pause until tomorrow", by table."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from client.schedule import Schedule, parse_schedule, until_tomorrow, until_words

NIGHT = Schedule(time(22, 0), time(7, 0))
OFFICE = Schedule(time(9, 0), time(17, 30))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("   ", None),
        ("22:00-07:00", NIGHT),
        (" 22:00 – 7:00 ", NIGHT),  # en dash, spaces, one-digit hour
        ("9:00-17:30", OFFICE),
        ("00:00-23:59", Schedule(time(0, 0), time(23, 59))),
    ],
)
def test_parse_schedule(text: str, expected: Schedule | None) -> None:
    assert parse_schedule(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("22:00", "schedule must be a daily window HH:MM-HH:MM"),
        ("24:00-07:00", "got '24:00-07:00'"),
        ("22:60-07:00", "got '22:60-07:00'"),
        ("10pm-7am", "on the 24-hour clock"),
        ("22:00-07:00-08:00", "schedule must be"),
        ("22.00-07.00", "schedule must be"),
        ("08:00-08:00", "starts and ends at the same time; leave it empty"),
    ],
)
def test_parse_schedule_refuses(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="schedule") as info:
        parse_schedule(text)
    assert fragment in str(info.value)


def test_one_spelling() -> None:
    assert str(parse_schedule(" 7:05 – 9:00")) == "07:05-09:00"


@pytest.mark.parametrize(
    ("schedule", "moment", "inside"),
    [
        (NIGHT, time(22, 0), True),  # the start is in
        (NIGHT, time(23, 59), True),
        (NIGHT, time(0, 0), True),
        (NIGHT, time(6, 59, 59), True),
        (NIGHT, time(7, 0), False),  # the end is out
        (NIGHT, time(14, 30), False),
        (NIGHT, time(21, 59, 59), False),
        (OFFICE, time(9, 0), True),
        (OFFICE, time(17, 29), True),
        (OFFICE, time(17, 30), False),
        (OFFICE, time(8, 59), False),
        (OFFICE, time(23, 0), False),
    ],
)
def test_contains(schedule: Schedule, moment: time, inside: bool) -> None:
    assert schedule.contains(moment) is inside


@pytest.mark.parametrize(
    ("now", "schedule", "expected"),
    [
        # no schedule: tomorrow at 07:00
        (datetime(2026, 5, 4, 14, 30), None, datetime(2026, 5, 5, 7, 0)),
        (datetime(2026, 5, 4, 6, 0), None, datetime(2026, 5, 5, 7, 0)),
        (datetime(2026, 5, 4, 23, 59), None, datetime(2026, 5, 5, 7, 0)),
        # the small hours still belong to the day before: "tomorrow" is this morning
        (datetime(2026, 5, 5, 1, 0), None, datetime(2026, 5, 5, 7, 0)),
        (datetime(2026, 5, 5, 3, 59), None, datetime(2026, 5, 5, 7, 0)),
        (datetime(2026, 5, 5, 4, 0), None, datetime(2026, 5, 6, 7, 0)),
        # across a month's end
        (datetime(2026, 5, 31, 20, 0), None, datetime(2026, 6, 1, 7, 0)),
        # a schedule: its start tomorrow (a night schedule skips tonight)
        (datetime(2026, 5, 4, 14, 30), NIGHT, datetime(2026, 5, 5, 22, 0)),
        (datetime(2026, 5, 4, 23, 0), NIGHT, datetime(2026, 5, 5, 22, 0)),
        (datetime(2026, 5, 5, 1, 0), NIGHT, datetime(2026, 5, 5, 22, 0)),
        (datetime(2026, 5, 4, 14, 30), OFFICE, datetime(2026, 5, 5, 9, 0)),
        # a window starting before 04:00 belongs to the night after tomorrow's day
        (
            datetime(2026, 5, 4, 14, 30),
            Schedule(time(2, 0), time(6, 0)),
            datetime(2026, 5, 6, 2, 0),
        ),
    ],
)
def test_until_tomorrow(now: datetime, schedule: Schedule | None, expected: datetime) -> None:
    end = until_tomorrow(now, schedule)
    assert end == expected
    assert end > now


@pytest.mark.parametrize(
    ("minutes_from_now", "with_day"),
    [(0, False), (30, False), (24 * 60, True), (-24 * 60, True)],
)
def test_until_words(minutes_from_now: int, with_day: bool) -> None:
    # A local noon, so +-30 minutes stay today and +-1 day is another day in any zone.
    noon = datetime.now().replace(hour=12, minute=0, second=0, microsecond=0).astimezone()
    until = (noon + timedelta(minutes=minutes_from_now)).astimezone(UTC)
    local = until.astimezone()
    expected = f"{local:%a %d %b %H:%M}" if with_day else f"{local:%H:%M}"
    assert until_words(until, noon) == expected
    assert (len(expected) > len("15:30")) is with_day
