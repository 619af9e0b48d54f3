"""Table tests for the reconnect backoff (client.backoff)."""

from __future__ import annotations

import random

import pytest

from client.backoff import MAX_DELAY_S, Backoff, ceiling, delay


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (0, 1.0),
        (1, 2.0),
        (2, 4.0),
        (3, 8.0),
        (5, 32.0),
        (6, 60.0),  # 64 is over the cap
        (10, 60.0),
        (1000, 60.0),  # no overflow for a very long outage
    ],
)
def test_ceiling_doubles_then_caps(attempt: int, expected: float) -> None:
    assert ceiling(attempt) == expected


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (0, 0.0, 0.0),
        (0, 0.5, 0.5),
        (0, 1.0, 1.0),
        (3, 0.25, 2.0),
        (6, 0.5, 30.0),
        (20, 1.0, 60.0),
    ],
)
def test_delay_is_full_jitter_of_the_ceiling(attempt: int, rand: float, expected: float) -> None:
    assert delay(attempt, rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("base", "cap", "attempt", "expected"),
    [(0.5, 10.0, 0, 0.5), (0.5, 10.0, 4, 8.0), (0.5, 10.0, 5, 10.0), (2.0, 3.0, 1, 3.0)],
)
def test_custom_base_and_cap(base: float, cap: float, attempt: int, expected: float) -> None:
    assert ceiling(attempt, base=base, cap=cap) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attempt": -1, "rand": 0.5}, "attempt"),
        ({"attempt": 0, "rand": -0.1}, "rand"),
        ({"attempt": 0, "rand": 1.5}, "rand"),
        ({"attempt": 0, "rand": 0.5, "base": 0.0}, "positive"),
        ({"attempt": 0, "rand": 0.5, "cap": float("inf")}, "finite"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        delay(**kwargs)  # type: ignore[arg-type]


def test_backoff_grows_stays_under_cap_and_resets() -> None:
    backoff = Backoff(rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(0.0 <= d <= ceiling(i) for i, d in enumerate(delays))
    assert all(d <= MAX_DELAY_S for d in delays)
    assert backoff.attempt == 12
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() <= 1.0


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    a = Backoff(rng=random.Random(42))
    b = Backoff(rng=random.Random(42))
    assert [a.next_delay() for _ in range(8)] == [b.next_delay() for _ in range(8)]
