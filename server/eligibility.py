"""Eligibility counts kept incrementally, and which connected devices went stale.

Contract: pure bookkeeping for :class:`server.registry.Registry`, its one owner (no I/O,
no clock: times are passed in). Nothing here walks the fleet on an event:

* :class:`Tally` -- for one query (a task, and a package size for a packaged task): each
  device's reason to be ineligible (None: eligible), how many devices have each reason,
  and the eligible count. :meth:`Tally.set` is O(1); it tells the listeners
  (``listener(old_eligible, new_eligible)``) when a count changed, never when a device's
  reason stayed the same (a heartbeat that changes nothing tells nobody).
  :meth:`Tally.summary` is the waiting text (``1 of 2 eligible devices (1 paused:
  battery_low)``), built from the counts: O(distinct reasons).
* :class:`Freshness` -- connected devices ordered by when they were last heard from:
  :meth:`Freshness.seen` and :meth:`Freshness.gone` are O(1); :meth:`Freshness.sweep`
  returns the devices that went stale (``now - last_seen > stale_after``) since the last
  sweep, O(devices that changed). A clock that goes backwards (callers may pass any
  times) costs one full re-sort at the next sweep, and a device whose staleness an
  earlier, later ``now`` decided is decided again, so the answer is always the one
  ``now`` gives.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

#: ``listener(old_eligible, new_eligible)``, called after any count of a tally changed.
Listener = Callable[[int, int], None]

_UNSET = object()


class Tally:
    """Each device's ineligibility reason for one query, and the counts by reason."""

    def __init__(self, task: str, package_bytes: int | None) -> None:
        self.task = task
        self.package_bytes = package_bytes
        self._reasons: dict[str, str | None] = {}
        self._counts: Counter[str] = Counter()
        self.eligible = 0
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Call ``listener`` after every change of a count (see the module docstring)."""
        self._listeners.append(listener)

    def reason(self, device_id: str) -> str | None:
        """The device's recorded reason (None: eligible, or unknown)."""
        return self._reasons.get(device_id)

    def set(self, device_id: str, reason: str | None) -> None:
        """Record the device's reason; tell the listeners when a count changes."""
        old = self._reasons.get(device_id, _UNSET)
        if old == reason:
            return
        self._reasons[device_id] = reason
        before = self.eligible
        if old is None:
            self.eligible -= 1
        elif isinstance(old, str):
            left = self._counts[old] - 1
            if left:
                self._counts[old] = left
            else:
                del self._counts[old]
        if reason is None:
            self.eligible += 1
        else:
            self._counts[reason] += 1
        for listener in self._listeners:
            listener(before, self.eligible)

    def counts(self) -> dict[str, int]:
        """Devices by reason to be ineligible (a copy)."""
        return dict(self._counts)

    def summary(self, needed: int) -> str:
        """E.g. ``1 of 2 eligible devices (1 paused: battery_low, 1 stale)``."""
        text = f"{self.eligible} of {needed} eligible devices"
        if self._counts:
            text += " (" + ", ".join(f"{n} {why}" for why, n in sorted(self._counts.items())) + ")"
        elif not self._reasons:
            text += " (none registered yet)"
        return text


class Freshness:
    """Connected devices by last-seen time; which of them are stale (module docstring)."""

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self._fresh: OrderedDict[str, float] = OrderedDict()
        self._stale: dict[str, float] = {}
        self._latest = float("-inf")
        self._ordered = True
        self._swept_at = float("-inf")

    def __len__(self) -> int:
        return len(self._fresh) + len(self._stale)

    def is_stale(self, device_id: str) -> bool:
        """Stale as of the last sweep."""
        return device_id in self._stale

    def seen(self, device_id: str, now: float) -> bool:
        """The connected device was heard from at ``now``; True when it was stale."""
        was_stale = self._stale.pop(device_id, None) is not None
        fresh = self._fresh
        fresh[device_id] = now
        fresh.move_to_end(device_id)
        if now >= self._latest:
            self._latest = now
        else:
            self._ordered = False
        return was_stale

    def gone(self, device_id: str) -> None:
        """The device is no longer connected."""
        self._fresh.pop(device_id, None)
        self._stale.pop(device_id, None)

    def next_expiry(self) -> float | None:
        """When the least recently seen fresh device turns stale (None: no fresh device;
        ``-inf`` when a sweep must first restore the order)."""
        if not self._ordered:
            return float("-inf")
        for last_seen in self._fresh.values():
            return last_seen + self.stale_after
        return None

    def sweep(self, now: float) -> tuple[list[str], list[str]]:
        """``(went stale, fresh again)`` as of ``now`` since the last sweep."""
        back: list[str] = []
        if now < self._swept_at or not self._ordered:
            back = [d for d, t in self._stale.items() if not now - t > self.stale_after]
            for device_id in back:
                self._fresh[device_id] = self._stale.pop(device_id)
            self._restore_order()
        self._swept_at = now
        went: list[str] = []
        fresh, limit = self._fresh, self.stale_after
        while fresh:
            device_id, last_seen = next(iter(fresh.items()))
            if not now - last_seen > limit:
                break
            del fresh[device_id]
            self._stale[device_id] = last_seen
            went.append(device_id)
        return went, back

    def _restore_order(self) -> None:
        items: Iterable[tuple[str, float]] = sorted(self._fresh.items(), key=lambda kv: kv[1])
        self._fresh = OrderedDict(items)
        self._latest = max(self._fresh.values(), default=float("-inf"))
        self._ordered = True
