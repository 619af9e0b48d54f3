"""Reconnect delays: exponential backoff with full jitter, capped.

Contract: pure arithmetic, no clock, no sleeping, no global random state. The caller
supplies the random draw (``rand`` in ``[0, 1)``), so every delay is reproducible in a
table test. ``delay(attempt, rand)`` is ``rand * ceiling(attempt)`` where
``ceiling(attempt) = min(cap, base * 2**attempt)`` ("full jitter": spreads the
reconnects of many devices after a server restart instead of synchronising them).
Raises :class:`ValueError` for a negative attempt, a ``rand`` outside ``[0, 1]`` or a
non-positive base/cap.
"""

from __future__ import annotations

import math
import random
from typing import Final

BASE_DELAY_S: Final = 1.0
MAX_DELAY_S: Final = 60.0


def ceiling(attempt: int, *, base: float = BASE_DELAY_S, cap: float = MAX_DELAY_S) -> float:
    """The largest delay allowed before retry number ``attempt`` (0 = first retry)."""
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, got {attempt}")
    if not (base > 0 and cap > 0 and math.isfinite(base) and math.isfinite(cap)):
        raise ValueError(f"base and cap must be positive and finite, got {base} and {cap}")
    # Past ~64 doublings any base is over any sane cap; avoid building a huge float.
    if attempt >= 64:
        return cap
    return min(cap, base * (2.0**attempt))


def delay(
    attempt: int, rand: float, *, base: float = BASE_DELAY_S, cap: float = MAX_DELAY_S
) -> float:
    """The delay before retry ``attempt`` for the random draw ``rand`` in ``[0, 1]``."""
    if not 0.0 <= rand <= 1.0:
        raise ValueError(f"rand must be within [0, 1], got {rand}")
    return rand * ceiling(attempt, base=base, cap=cap)


class Backoff:
    """Counts consecutive failures and hands out the next delay.

    Holds only a counter and an injected :class:`random.Random`; no clock and no I/O.
    """

    def __init__(
        self,
        *,
        base: float = BASE_DELAY_S,
        cap: float = MAX_DELAY_S,
        rng: random.Random | None = None,
    ) -> None:
        ceiling(0, base=base, cap=cap)  # validate once, up front
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng if rng is not None else random.Random()

    def next_delay(self) -> float:
        """The delay before the next retry; each call counts one more failure."""
        value = delay(self.attempt, self._rng.random(), base=self.base, cap=self.cap)
        self.attempt += 1
        return value

    def reset(self) -> None:
        """Forget the failures (after a successful connection)."""
        self.attempt = 0
