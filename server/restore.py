"""An open round on disk: what ``round.json`` holds for a :class:`Round`, and back.

Contract: :func:`saved_round_of` is the pure mapping of a round to its
:class:`server.roundstore.SavedRound` (reported slots name their update file).
:func:`restore_round` runs once at start, in a thread, after the global weights are
loaded: it returns the open round a previous run saved when it can go on -- same task,
based on the saved global version, the next round number, deadline not passed, rounds
still to run -- with its saved updates folded into ``strategy`` again (each counted once)
and the slots of devices that had not reported marked ``dropped``/``disconnected`` (offered
their part again when they reconnect). Any other saved round is removed with a log line
saying why, and None is returned. It never raises for a bad or unreadable saved round.

:func:`return_grace` is the pure rule for how long a restored round waits for devices
that have not been back since the restart before it may be given up: the client's
declared reconnect ceiling (:data:`client.backoff.RECONNECT_WITHIN_S`: its longest
backoff sleep plus one connection attempt) plus the server's ``stale_after`` (time to
register and be heard from), so a device in its longest backoff is never given up on
while it is on its way back. The caller bounds it by the round's deadline. It raises
:class:`ValueError` for a negative or non-finite duration.
"""

from __future__ import annotations

import logging
import math
import time

from client.backoff import RECONNECT_WITHIN_S
from client.weights import Layout, StateDict
from server.rounds import Round, Slot
from server.roundstore import RoundStore, SavedRound, SavedSlot
from server.store import StoreError
from server.strategies.base import Strategy

log = logging.getLogger(__name__)


def return_grace(stale_after: float, reconnect_within: float = RECONNECT_WITHIN_S) -> float:
    """Seconds a restored round waits for its devices to come back after a restart (from
    the moment it is restored; the caller stops at the round's deadline)."""
    if not (math.isfinite(stale_after) and stale_after >= 0):
        raise ValueError(f"stale_after must be 0 or more seconds, got {stale_after}")
    if not (math.isfinite(reconnect_within) and reconnect_within > 0):
        raise ValueError(f"reconnect_within must be positive, got {reconnect_within}")
    return reconnect_within + stale_after


def saved_round_of(rnd: Round, task: str, store: RoundStore, now_unix: float) -> SavedRound:
    """What ``round.json`` holds for ``rnd``; ``now_unix`` dates its start."""
    slots: dict[str, SavedSlot] = {}
    for device_id, slot in rnd.slots.items():
        reported = slot.state == "reported"
        slots[device_id] = SavedSlot(
            index=slot.index,
            reported=reported,
            num_samples=slot.num_samples if reported else 0,
            metrics=dict(slot.metrics) if reported else {},
            update_file=store.update_file_name(device_id) if reported else None,
        )
    return SavedRound(
        task=task,
        round_id=rnd.round_id,
        number=rnd.number,
        attempt=rnd.attempt,
        base_version=rnd.base_version,
        started_unix=now_unix - (time.monotonic() - rnd.started_at),
        deadline_unix=rnd.deadline_unix,
        required=rnd.required,
        slots=slots,
    )


def restore_round(
    store: RoundStore,
    strategy: Strategy,
    *,
    task: str,
    version: int,
    rounds_completed: int,
    rounds_target: int,
    global_state: StateDict,
    layout: Layout,
) -> Round | None:
    """The saved open round when it can go on, else None (its files removed)."""
    try:
        saved = store.load()
    except StoreError as exc:
        log.warning("discarding the saved open round: %s", exc)
        store.clear()
        return None
    if saved is None:
        return None
    now_unix = time.time()
    why: str | None = None
    if saved.task != task:
        why = f"it trains task {saved.task}"
    elif saved.base_version != version or saved.number != rounds_completed + 1:
        why = (
            f"it is round {saved.number} from version {saved.base_version}, but the saved "
            f"global is version {version} after {rounds_completed} rounds"
        )
    elif saved.deadline_unix <= now_unix:
        why = "its deadline has passed"
    elif rounds_target and rounds_completed >= rounds_target:
        why = "all rounds are complete"
    if why is not None:
        log.info("discarding the saved open round %s: %s", saved.round_id, why)
        store.clear()
        return None
    slots: dict[str, Slot] = {}
    strategy.begin(global_state)
    try:
        for device_id, kept in saved.slots.items():
            if kept.reported and kept.update_file is not None:
                update = store.load_update(kept.update_file, layout)
                strategy.add(update, kept.num_samples)
                slots[device_id] = Slot(
                    state="reported",
                    index=kept.index,
                    num_samples=kept.num_samples,
                    metrics=dict(kept.metrics),
                )
            else:
                slots[device_id] = Slot(state="dropped", detail="disconnected", index=kept.index)
    except (StoreError, ValueError) as exc:
        log.warning("discarding the saved open round %s: %s", saved.round_id, exc)
        store.clear()
        return None
    now = time.monotonic()
    rnd = Round(
        round_id=saved.round_id,
        number=saved.number,
        attempt=saved.attempt,
        base_version=saved.base_version,
        deadline=now + (saved.deadline_unix - now_unix),
        started_at=now - max(0.0, now_unix - saved.started_unix),
        required=saved.required,
        slots=slots,
        deadline_unix=saved.deadline_unix,
    )
    log.info(
        "restored round %d (%s) after a restart: %d of %d reported, %d needed, deadline in %.0f s",
        rnd.number,
        rnd.round_id,
        len(rnd.reported),
        len(rnd.slots),
        rnd.required,
        saved.deadline_unix - now_unix,
    )
    return rnd
