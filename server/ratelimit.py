"""Per-connection flood protection: token buckets with an injected clock.

Contract: pure logic, no I/O, no clock of its own (every call takes ``now``, a monotonic
time in seconds), so it is tested by tables.

* :class:`TokenBucket` holds up to ``burst`` tokens and refills at ``rate`` tokens per
  second; :meth:`TokenBucket.take` removes ``cost`` tokens and says whether there were
  enough (a refused take removes nothing).
* :class:`ConnectionLimiter` is the budget of one Socket.IO connection. Every event
  (known or unknown, registered or not) costs one token of the *events* bucket, except
  ``blob:chunk``, which costs its byte size (at least :attr:`RateLimits.min_chunk_cost`)
  in the *chunk bytes* bucket instead: a legitimate upload sends many chunks quickly,
  and its memory is already bounded by the per-device blob budget. Each refused event
  also costs one token of the *strikes* bucket; a connection that runs out of strikes
  (it keeps flooding after being told ``rate_limited``) gets the verdict
  ``"disconnect"`` exactly once (the caller drops it then), and ``"limited"`` for
  every event after that.
* :class:`RateLimits` holds the numbers; the defaults are far above what a
  well-behaved client sends (heartbeats every few seconds, throttled progress, a
  1 MiB x 4 chunk window at loopback speed) and they raise :class:`ValueError` when not
  positive and finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["ok", "limited", "disconnect"]

#: The one event whose cost is counted in bytes rather than events.
CHUNK_EVENT = "blob:chunk"


@dataclass(frozen=True)
class RateLimits:
    """Budgets of one connection (see the module docstring)."""

    #: Sustained events per second (heartbeats, progress, status, submits, unknown ones).
    events_per_sec: float = 50.0
    #: Events that may arrive at once after a quiet spell.
    event_burst: float = 200.0
    #: Sustained ``blob:chunk`` bytes per second (well above loopback socket.io speed).
    chunk_bytes_per_sec: float = 1024.0 * 1024 * 1024
    #: Chunk bytes that may arrive at once: one whole maximum blob.
    chunk_burst_bytes: float = 512.0 * 1024 * 1024
    #: Smallest cost of one chunk, so a flood of tiny chunks is counted as a flood.
    min_chunk_cost: int = 64 * 1024
    #: Refusals tolerated at once before the connection is dropped ...
    strike_burst: float = 50.0
    #: ... and how fast that tolerance comes back (refusals per second).
    strikes_per_sec: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "events_per_sec",
            "event_burst",
            "chunk_bytes_per_sec",
            "chunk_burst_bytes",
            "min_chunk_cost",
            "strike_burst",
            "strikes_per_sec",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"rate limit {name} must be a positive number, got {value!r}")


class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second; starts full at ``now``."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not (rate > 0 and burst > 0):
            raise ValueError(f"a token bucket needs a positive rate and burst, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def _refill(self, now: float) -> None:
        # A clock that goes backwards (it should not) refills nothing rather than draining.
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = max(self.updated, now)

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Remove ``cost`` tokens if there are that many; True when they were taken.

        A cost above ``burst`` is charged as ``burst`` (it can pass once the bucket is full),
        so one oversized item is not refused forever; its size is checked elsewhere.
        """
        self._refill(now)
        cost = min(cost, self.burst)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def available(self, now: float) -> float:
        """Tokens available at ``now``."""
        self._refill(now)
        return self.tokens


class ConnectionLimiter:
    """The event budget of one connection (see the module docstring)."""

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.limits = limits
        self.events = TokenBucket(limits.events_per_sec, limits.event_burst, now)
        self.chunk_bytes = TokenBucket(limits.chunk_bytes_per_sec, limits.chunk_burst_bytes, now)
        self.strikes = TokenBucket(limits.strikes_per_sec, limits.strike_burst, now)
        self.refused = 0
        self.condemned = False

    def admit(self, event: str, now: float, size: int = 0) -> Verdict:
        """The verdict for one incoming ``event`` (``size``: a chunk's data bytes)."""
        if self.condemned:
            self.refused += 1
            return "limited"
        if event == CHUNK_EVENT:
            ok = self.chunk_bytes.take(now, max(size, self.limits.min_chunk_cost))
        else:
            ok = self.events.take(now)
        if ok:
            return "ok"
        self.refused += 1
        if not self.strikes.take(now):
            self.condemned = True
            return "disconnect"
        return "limited"
