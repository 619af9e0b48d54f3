"""Reconnect delays: exponential backoff with full jitter, capped; and the reconnect ceiling.

Contract: the arithmetic is pure: no clock, no sleeping, no global random state. The
caller supplies the random draw (``rand`` in ``[0, 1]``), so every delay is reproducible in
a table test. ``delay(attempt, rand)`` is ``rand * ceiling(attempt)`` where
``ceiling(attempt) = min(cap, base * 2**attempt)`` ("full jitter": spreads the
reconnects of many devices after a server restart instead of synchronising them).
Raises :class:`ValueError` for a negative attempt, a ``rand`` outside ``[0, 1]`` or a
non-positive base/cap.

The reconnect ceiling is declared here once, and the server derives from it how long a
round restored after a restart waits for its devices (:func:`server.restore.
return_grace`): a device that keeps trying is back within :data:`RECONNECT_WITHIN_S` of
the server coming back -- one full backoff sleep (:data:`MAX_DELAY_S`) plus one
connection attempt that began just before (:data:`CONNECT_TIMEOUT_S`). :data:`MAX_DELAY_S`
is 60 s unless the environment variable :data:`RECONNECT_CAP_ENV` gives another positive
number of seconds (read once, at import, by :func:`max_delay_from`; tests use it to
shorten both sides; a fleet that changes it sets it on the server too). A bad value is
ignored with a warning, never raised.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Mapping
from typing import Final

log = logging.getLogger(__name__)

BASE_DELAY_S: Final = 1.0
#: The reconnect ceiling unless :data:`RECONNECT_CAP_ENV` says otherwise.
DEFAULT_MAX_DELAY_S: Final = 60.0
#: Environment variable: the reconnect ceiling in seconds (both peers read it).
RECONNECT_CAP_ENV: Final = "FEDTRAY_RECONNECT_CAP_S"
#: How long one connection attempt may take before it counts as failed.
CONNECT_TIMEOUT_S: Final = 10.0


def max_delay_from(environ: Mapping[str, str]) -> float:
    """The reconnect ceiling that ``environ`` sets (:data:`DEFAULT_MAX_DELAY_S` unless
    :data:`RECONNECT_CAP_ENV` holds a positive finite number; a bad value is logged)."""
    text = environ.get(RECONNECT_CAP_ENV)
    if text is None:
        return DEFAULT_MAX_DELAY_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        log.warning(
            "ignoring %s=%r: not a positive number of seconds; the reconnect ceiling stays %g s",
            RECONNECT_CAP_ENV,
            text,
            DEFAULT_MAX_DELAY_S,
        )
        return DEFAULT_MAX_DELAY_S
    return value


#: The longest wait between two reconnect attempts (and after a refused token).
MAX_DELAY_S: Final = max_delay_from(os.environ)
#: A device that keeps trying is connected again within this long of the server's return.
RECONNECT_WITHIN_S: Final = MAX_DELAY_S + CONNECT_TIMEOUT_S


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
