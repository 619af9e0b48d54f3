"""The token bucket and the per-connection limiter, by tables with an injected clock."""

from __future__ import annotations

import math

import pytest

from server.ratelimit import CHUNK_EVENT, ConnectionLimiter, RateLimits, TokenBucket

# (rate, burst, [(now, cost, expected), ...])
BUCKET_CASES = [
    # a full bucket lets the whole burst through at once, then refuses
    (1.0, 3.0, [(0.0, 1, True), (0.0, 1, True), (0.0, 1, True), (0.0, 1, False)]),
    # it refills at `rate` per second
    (2.0, 2.0, [(0.0, 2, True), (0.0, 1, False), (0.4, 1, False), (0.5, 1, True)]),
    # never above `burst`, however long it was quiet
    (10.0, 2.0, [(0.0, 2, True), (100.0, 2, True), (100.0, 1, False)]),
    # a refused take removes nothing
    (1.0, 5.0, [(0.0, 4, True), (0.0, 2, False), (0.0, 1, True)]),
    # a cost over burst is charged as burst: passes once full, not forever refused
    (1.0, 4.0, [(0.0, 100, True), (0.0, 1, False), (4.0, 100, True)]),
    # a clock going backwards refills nothing and does not drain either
    (1.0, 2.0, [(10.0, 2, True), (5.0, 1, False), (11.0, 1, True)]),
]


@pytest.mark.parametrize(("rate", "burst", "steps"), BUCKET_CASES)
def test_token_bucket(rate: float, burst: float, steps: list[tuple[float, float, bool]]) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    got = [bucket.take(now, cost) for now, cost, _ in steps]
    assert got == [expected for _, _, expected in steps]


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 5)])
def test_token_bucket_refuses_non_positive(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate, burst, now=0.0)


SMALL = RateLimits(
    events_per_sec=1.0,
    event_burst=3.0,
    chunk_bytes_per_sec=1000.0,
    chunk_burst_bytes=2000.0,
    min_chunk_cost=100,
    strike_burst=2.0,
    strikes_per_sec=0.5,
)

# ([(event, now, size), ...], expected verdicts)
LIMITER_CASES = [
    # within the burst: all fine
    ([("device:heartbeat", 0.0, 0)] * 3, ["ok", "ok", "ok"]),
    # over it: limited twice (two strikes), then dropped once, then limited for good
    (
        [("x", 0.0, 0)] * 7,
        ["ok", "ok", "ok", "limited", "limited", "disconnect", "limited"],
    ),
    # unknown events cost like known ones
    ([("nope", 0.0, 0), ("device:heartbeat", 0.0, 0)] * 2, ["ok", "ok", "ok", "limited"]),
    # a short excess that stops is forgiven as budgets refill
    (
        [("e", 0.0, 0)] * 4 + [("e", 3.0, 0)] * 2 + [("e", 100.0, 0)] * 4,
        ["ok", "ok", "ok", "limited", "ok", "ok", "ok", "ok", "ok", "limited"],
    ),
    # chunks are counted in bytes, not against the event budget
    (
        [(CHUNK_EVENT, 0.0, 500)] * 4 + [("e", 0.0, 0)],
        ["ok", "ok", "ok", "ok", "ok"],
    ),
    # ... and the byte budget runs out on its own
    ([(CHUNK_EVENT, 0.0, 1000)] * 3, ["ok", "ok", "limited"]),
    # tiny chunks cost at least min_chunk_cost (100): 20 pass, the 21st does not
    ([(CHUNK_EVENT, 0.0, 1)] * 21, ["ok"] * 20 + ["limited"]),
    # an event flood does not stop a transfer
    (
        [("e", 0.0, 0)] * 4 + [(CHUNK_EVENT, 0.0, 1000)],
        ["ok", "ok", "ok", "limited", "ok"],
    ),
]


@pytest.mark.parametrize(("events", "expected"), LIMITER_CASES)
def test_connection_limiter(events: list[tuple[str, float, int]], expected: list[str]) -> None:
    limiter = ConnectionLimiter(SMALL, now=0.0)
    assert [limiter.admit(event, now, size) for event, now, size in events] == expected


def test_limiter_counts_refusals_and_stays_condemned() -> None:
    limiter = ConnectionLimiter(SMALL, now=0.0)
    verdicts = [limiter.admit("e", 0.0) for _ in range(10)]
    assert verdicts.count("disconnect") == 1
    assert limiter.condemned
    assert limiter.refused == 7
    # even after a long quiet spell a condemned connection gets nothing through
    assert limiter.admit("e", 1e6) == "limited"


def test_default_limits_let_a_fast_upload_through() -> None:
    """1 MiB chunks, window 4, 512 MiB (the largest blob) in one second: never limited."""
    limiter = ConnectionLimiter(RateLimits(), now=0.0)
    chunk = 1024 * 1024
    verdicts = {limiter.admit(CHUNK_EVENT, i / 512, chunk) for i in range(512)}
    # ... plus heartbeats and progress at a legitimate pace meanwhile
    verdicts |= {limiter.admit("device:heartbeat", i / 10) for i in range(10)}
    assert verdicts == {"ok"}


@pytest.mark.parametrize(
    "field", ["events_per_sec", "event_burst", "chunk_bytes_per_sec", "strike_burst"]
)
@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan])
def test_rate_limits_must_be_positive(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        RateLimits(**{field: value})
