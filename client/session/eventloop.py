"""The session's event loop: uvloop where it is installed, else asyncio's own.

Contract:

* :func:`new_session_loop` returns a new event loop for the session thread: uvloop's
  (it runs the loop's own turn, its selector and its thread-safe wake-ups in C, which
  cuts the session's CPU per round) when ``uvloop`` can be imported -- a dependency
  wherever it builds, so not on Windows -- else ``asyncio.new_event_loop()``. It never
  raises for a missing uvloop, and it sets no global event-loop policy (the tray's and
  tests' own loops are left alone).
"""

from __future__ import annotations

import asyncio

__all__ = ["new_session_loop"]


def new_session_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for the session thread (module docstring)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
