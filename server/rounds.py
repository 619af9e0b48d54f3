"""The round state machine: selection, slots, reports, closing, and submission checks.

Contract: :class:`Round` is pure bookkeeping for one training round attempt (no I/O, no
clock: callers pass ``now``). Each selected device has a slot that moves
``starting -> training -> reported``, or ends ``refused``, ``dropped`` (disconnected or
stale) or ``failed`` (training:error, weights send failed). The round is *settled* when no
slot is starting or training; it *succeeds* when reports reach the required count.

:meth:`Round.check_submit` applies the ``weights:submit`` checks in the documented order,
each with its own :class:`client.errors.FedtrayError` code: ``round_closed`` (unknown,
closed or past deadline), ``not_selected``, ``duplicate``, ``stale_base``. It never
changes state, so a refused submission is never counted; :meth:`Round.record_report`
counts an accepted one exactly once. :func:`drop_stale` and :func:`abandon_detail` judge a
round's slots against the device registry, :func:`awaiting_return` against the devices
welcomed back since a restart.
:meth:`Round.close` closes it to submissions; the federation's phase (waiting,
training, aggregating, ...) is not kept here but by :class:`server.phase.PhaseMachine`.
:func:`select_devices` picks at random with the caller's ``random.Random``.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from client.errors import FedtrayError
from server.registry import Registry

SlotState = Literal["starting", "training", "reported", "refused", "dropped", "failed"]
WORKING: frozenset[SlotState] = frozenset({"starting", "training"})

T = TypeVar("T")


def select_devices(candidates: Sequence[T], k: int, rng: random.Random) -> list[T]:
    """Up to ``k`` candidates chosen uniformly at random without replacement."""
    return rng.sample(list(candidates), min(k, len(candidates)))


@dataclass
class Slot:
    """One selected device's progress through the round."""

    state: SlotState = "starting"
    detail: str | None = None
    index: int = 0  # the device's data partition: part ``index`` of ``len(slots)``
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Round:
    """One attempt at a round (a retried round gets a new id and a new Round)."""

    round_id: str
    number: int
    attempt: int
    base_version: int
    deadline: float
    started_at: float
    required: int
    slots: dict[str, Slot] = field(default_factory=dict)
    closed: bool = False
    deadline_unix: float = 0.0  # the deadline as sent to devices (wall clock)

    @classmethod
    def open(
        cls,
        *,
        round_id: str,
        number: int,
        attempt: int,
        base_version: int,
        selected: Sequence[str],
        now: float,
        timeout: float,
        required: int,
        deadline_unix: float = 0.0,
    ) -> Round:
        return cls(
            round_id=round_id,
            number=number,
            attempt=attempt,
            base_version=base_version,
            deadline=now + timeout,
            started_at=now,
            required=required,
            slots={device_id: Slot(index=i) for i, device_id in enumerate(selected)},
            deadline_unix=deadline_unix,
        )

    # --- queries --------------------------------------------------------------------

    @property
    def selected(self) -> list[str]:
        return list(self.slots)

    def in_state(self, *states: SlotState) -> list[str]:
        return [d for d, s in self.slots.items() if s.state in states]

    @property
    def reported(self) -> list[str]:
        return self.in_state("reported")

    @property
    def working(self) -> list[str]:
        return self.in_state(*WORKING)

    @property
    def settled(self) -> bool:
        """No device is still expected to report."""
        return not self.working

    @property
    def succeeded(self) -> bool:
        return len(self.reported) >= self.required

    @property
    def can_still_succeed(self) -> bool:
        return len(self.reported) + len(self.working) >= self.required

    def is_open(self, now: float) -> bool:
        return not self.closed and now <= self.deadline

    # --- transitions ----------------------------------------------------------------

    def mark(self, device_id: str, state: SlotState, detail: str | None = None) -> bool:
        """Move a working slot to ``state``; False (no change) when it is not working."""
        slot = self.slots.get(device_id)
        if slot is None or slot.state not in WORKING:
            return False
        slot.state = state
        slot.detail = detail
        return True

    def reoffer(self, device_id: str, now: float) -> int | None:
        """Give a device that lost its connection its slot back while the round is open.

        Returns its partition index (to send the same ``training:start`` again, so it can
        resume from its checkpoint), or None when there is nothing to re-offer.
        """
        slot = self.slots.get(device_id)
        if slot is None or not self.is_open(now):
            return None
        if slot.state != "dropped" or slot.detail != "disconnected":
            return None
        slot.state = "starting"
        slot.detail = None
        return slot.index

    def check_submit(self, device_id: str, round_id: str, base_version: int, now: float) -> None:
        """Raise FedtrayError unless this submission may be counted (changes nothing)."""
        slot = self.slots.get(device_id) if round_id == self.round_id else None
        if slot is not None and slot.state == "reported":
            # Checked before closure: a resend after a lost ack must learn that its update
            # was counted, even when the round has closed since.
            raise FedtrayError(
                "duplicate", f"this device's update for round {round_id} was already counted"
            )
        if round_id != self.round_id or not self.is_open(now):
            raise FedtrayError(
                "round_closed", f"round {round_id} is closed or unknown; the update is not counted"
            )
        if slot is None or slot.state == "refused":
            raise FedtrayError("not_selected", f"this device was not selected for round {round_id}")
        if base_version != self.base_version:
            raise FedtrayError(
                "stale_base",
                f"the update was trained from version {base_version}, but round {round_id} "
                f"starts from version {self.base_version}",
            )

    def record_report(self, device_id: str, num_samples: int, metrics: dict[str, float]) -> int:
        """Count an accepted update (after check_submit passed); return reports so far.

        A device whose slot was freed (dropped, failed) but which reports in time is
        counted: its work is not thrown away.
        """
        slot = self.slots[device_id]
        if slot.state in ("reported", "refused"):
            raise ValueError(f"device {device_id} cannot report in state {slot.state}")
        slot.state = "reported"
        slot.num_samples = num_samples
        slot.metrics = dict(metrics)
        return len(self.reported)

    def close(self) -> list[str]:
        """Close the round; return the devices still working (to be sent training:cancel)."""
        self.closed = True
        working = self.working
        for device_id in working:
            self.slots[device_id].state = "dropped"
            self.slots[device_id].detail = "round closed"
        return working


def drop_stale(rnd: Round, registry: Registry, now: float) -> list[str]:
    """Free the working slots of devices gone or stale; the names of the stale ones."""
    stale = []
    for device_id in rnd.working:
        record = registry.get(device_id)
        if record is None or not record.connected:
            rnd.mark(device_id, "dropped", "disconnected")
        elif registry.is_stale(record, now):
            rnd.mark(device_id, "dropped", "stale (missed 3 heartbeats)")
            stale.append(record.name)
    return stale


def awaiting_return(rnd: Round, welcomed: Container[str]) -> bool:
    """True while a restored round has a slot whose device has not been welcomed back
    since the restart (the caller bounds this by a grace time).

    "Welcomed", not "registered": a device is in the registry from its registration on,
    but it gets its slot back only when the coordinator welcomes it, after its
    ``device:registered`` is sent. Judged by the registry, a round looked at in between
    saw the device back and its slot still dropped, and gave the round up.
    """
    return any(
        slot.state == "dropped" and slot.detail == "disconnected" and d not in welcomed
        for d, slot in rnd.slots.items()
    )


def abandon_detail(rnd: Round, registry: Registry, now: float) -> str:
    """Why a round that did not succeed was abandoned, slot by slot."""
    parts = [
        f"{registry.name_of(d)} {slot.state}" + (f" ({slot.detail})" if slot.detail else "")
        for d, slot in rnd.slots.items()
        if slot.state != "reported"
    ]
    if now >= rnd.deadline:
        parts.insert(0, "timed out")
    return "; ".join(parts) or "no report"
