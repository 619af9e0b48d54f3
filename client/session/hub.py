"""The snapshot hub: the one owner of the session's current :class:`ClientSnapshot`.

Contract:

* :attr:`SnapshotHub.current` may be read from any thread: the snapshot is immutable
  and its reference is swapped atomically.
* Everything else runs ON THE SESSION THREAD only: :meth:`SnapshotHub.publish` (the
  one writer of the snapshot; every part of the session reports through it),
  :meth:`add` and :meth:`remove` (the facade posts them to the loop).
* A subscriber is called once when added, with the current snapshot, then on every
  change (an unchanged snapshot is not announced). A subscriber that raises is logged
  and stays subscribed; it never stops the session or the other subscribers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Final

from client.snapshot import ClientSnapshot

__all__ = ["SnapshotHub", "Subscriber"]

log = logging.getLogger(__name__)

Subscriber = Callable[[ClientSnapshot], None]

#: Not a field (an unknown name is refused by dataclasses.replace, as always).
_UNSET: Final = object()


class SnapshotHub:
    """Holds the current snapshot and tells subscribers of every change."""

    def __init__(self, initial: ClientSnapshot) -> None:
        self._current = initial
        self._subscribers: list[Subscriber] = []  # session thread only

    @property
    def current(self) -> ClientSnapshot:
        """The current snapshot (any thread)."""
        return self._current

    def publish(self, **changes: Any) -> None:
        """Session thread only: apply ``changes`` and tell the subscribers if it changed."""
        current = self._current
        # Most publishes repeat what is shown: nothing is built for them. A field compared
        # as the snapshot's own equality compares it (the same object, or equal): when
        # one differs, the new snapshot differs, so it is not compared whole again.
        for name, value in changes.items():
            old = getattr(current, name, _UNSET)
            if old is not value and old != value:
                break
        else:
            return
        snap = dataclasses.replace(current, **changes)
        self._current = snap
        for callback in list(self._subscribers):
            _notify(callback, snap)

    def add(self, callback: Subscriber) -> None:
        """Session thread only: subscribe ``callback`` and call it with the current state."""
        self._subscribers.append(callback)
        _notify(callback, self._current)

    def remove(self, callback: Subscriber) -> None:
        """Session thread only: unsubscribe ``callback`` (no error when it is not there)."""
        with contextlib.suppress(ValueError):
            self._subscribers.remove(callback)


def _notify(callback: Subscriber, snap: ClientSnapshot) -> None:
    try:
        callback(snap)
    except Exception:
        log.exception("a snapshot subscriber failed")
