"""One OS read at a time, answered ``None`` on trouble: the shape the ctypes probes share.

Contract: :meth:`GuardedReads.read` serializes the reads of one probe with a lock, calls
the OS once, and turns the raw value into an answer. It never raises for OS trouble: an
``OSError`` from the call answers ``None``, and so does a value the conversion cannot
use (it returns ``None``); each distinct problem is logged once (:class:`LogOnce`).
Anything else a call raises is a bug and propagates. Nothing here touches the OS itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from client.activity.base import LogOnce

__all__ = ["GuardedReads"]

Raw = TypeVar("Raw")
Answer = TypeVar("Answer")


class GuardedReads:
    """Serialized OS reads for one probe, each problem logged once (see the module contract)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._lock = threading.Lock()
        self._problem = LogOnce(logger)

    def read(
        self,
        what: str,
        call: Callable[[], Raw],
        convert: Callable[[Raw], Answer | None],
        odd: str = "unexpected value",
    ) -> Answer | None:
        """``convert(call())``; None (logged as ``what: ...``) when either cannot answer.

        ``odd`` names a value ``convert`` refuses in the log line, e.g. "undocumented state".
        """
        with self._lock:
            try:
                value = call()
            except OSError as exc:
                self._problem(f"{what}: {exc}")
                return None
            answer = convert(value)
            if answer is None:
                self._problem(f"{what}: {odd} {value!r}")
            return answer
