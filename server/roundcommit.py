"""Group commit of the open round's accepted updates: durable before the ack, fsyncs shared.

Contract: :class:`RoundCommits` makes an accepted update durable -- its bytes, its name in
``round/`` and a ``round.json`` naming it -- before the server acknowledges it, with as
few fsyncs one after the other as that order allows, and one commit for every update
that is ready at the same time. Owned by the server's event loop; a commit's file work
runs in one thread hop (its fsyncs side by side on a small pool of its own), so a commit
costs the loop one hand-off, not one per file.

* :meth:`RoundCommits.place` (on the loop, under the coordinator's aggregation lock) renames
  a checked incoming file to its device's update file (no fsync), notes its slot, and
  starts the fsync of its bytes at once (on the commits' pool: no hop back to the loop;
  the commit that holds it waits for it). A device has at most one placed update:
  :meth:`RoundCommits.placed` is the one in flight (wait for it, then check again).
* :meth:`RoundCommits.commit` returns once a ``round.json`` naming that update is durable;
  raises :class:`OSError` when the commit holding it failed (the update is then
  forgotten: not acknowledged, the device sends it again; its file is left for the next
  placement or the round's removal). One commit runs at a time; every update placed
  while one runs shares the next. A commit takes the round as ``snapshot()`` gives it
  (its counted reports) plus every placed update, and does, in this order:

  1. side by side: the fsync of each placed update's bytes, the fsync of ``round/`` (their
     renames), and ``round.json``'s temporary file written and fsynced;
  2. the temporary file renamed to ``round.json``, then the state directory fsynced.

  So ``round.json`` never names an update whose bytes or name are not durable (a restart
  would discard the whole saved round), and a commit costs two fsyncs one after the other,
  whatever the number of updates in it.
* :meth:`RoundCommits.settle` ends a placed update's life here once the round counted it
  (``snapshot()`` includes it from then on) or gave it up.
* :meth:`RoundCommits.idle` returns once no commit runs or waits: a new round's files are
  written only after (an earlier round's late commit never lands on them).

Never writes ``round.json`` except in a commit; never removes a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from client.atomicfile import fsync_file
from server.roundstore import RoundStore, SavedRound, SavedSlot

__all__ = ["RoundCommits"]


#: Threads for a commit's fsyncs run side by side (an fsync waits on the disk, not the CPU).
_SYNCS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="round-fsync")


def _commit(store: RoundStore, saved: bytes, updates: list[Future[None]]) -> None:
    """One commit, blocking (module docstring): side by side the fsync of each update's
    bytes (``updates``, started when each was placed), of ``round/`` and ``round.json``'s
    temporary file written and fsynced (in this thread); then, only when all of them
    succeeded, that file installed. Every fsync is waited for before leaving, even when
    one fails; a sync failure is raised first."""
    syncs = [*updates, _SYNCS.submit(store.sync_round_dir)]
    staged: Path | None = None
    stage_error: BaseException | None = None
    try:
        staged = store.stage(saved)
    except BaseException as exc:  # raised below, once every fsync has ended
        stage_error = exc
    failed = next((e for e in (f.exception() for f in syncs) if e is not None), None)
    if failed is not None:
        if staged is not None:
            with contextlib.suppress(OSError):
                os.unlink(staged)
        raise failed
    if stage_error is not None:
        raise stage_error
    if staged is not None:  # always, once stage returned
        store.install(staged)


@dataclass
class _Placed:
    round_id: str
    slot: SavedSlot
    synced: Future[None]  # the fsync of its bytes (on _SYNCS)
    done: asyncio.Future[None]  # settled (counted, given up or failed)
    snapshot: Callable[[], SavedRound]


class RoundCommits:
    """The open round's commits (see the module docstring)."""

    def __init__(self, store: RoundStore) -> None:
        self._store = store
        self._placed: dict[str, _Placed] = {}
        self._next: asyncio.Future[None] | None = None  # the commit placed updates wait for
        self._runner: asyncio.Task[None] | None = None

    def placed(self, device_id: str) -> asyncio.Future[None] | None:
        """The device's update being committed now (done once settled), or None."""
        entry = self._placed.get(device_id)
        return None if entry is None else entry.done

    def place(
        self,
        device_id: str,
        incoming: Path,
        slot: SavedSlot,
        snapshot: Callable[[], SavedRound],
        *,
        round_id: str | None = None,
    ) -> str:
        """Rename ``incoming`` to the device's update file and start its fsync; the file
        name. ``slot`` is its ``round.json`` entry (its ``update_file`` is set here, unless
        it names the file and is ``reported`` already: then it is kept as it is);
        ``snapshot()`` the open round as counted so far, whose id is ``round_id`` (when
        given, ``snapshot`` is not called here: a commit calls it). Raises OSError (nothing
        placed)."""
        if device_id in self._placed:
            raise RuntimeError(f"an update of {device_id} is being committed already")
        name = self._store.place_update(device_id, incoming)
        loop = asyncio.get_running_loop()
        if not (slot.reported and slot.update_file == name):
            slot = slot.model_copy(update={"update_file": name, "reported": True})
        self._placed[device_id] = _Placed(
            round_id=snapshot().round_id if round_id is None else round_id,
            slot=slot,
            synced=_SYNCS.submit(fsync_file, self._store.update_path(name)),
            done=loop.create_future(),
            snapshot=snapshot,
        )
        return name

    async def commit(self, device_id: str) -> None:
        """Return once a ``round.json`` naming the device's placed update is durable;
        OSError when its commit failed (the update is forgotten)."""
        if device_id not in self._placed:
            raise RuntimeError(f"no update of {device_id} is placed")
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        waiting = self._next
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
        await asyncio.shield(waiting)

    def settle(self, device_id: str) -> None:
        """The placed update is counted by the round (or given up): forget it here."""
        entry = self._placed.pop(device_id, None)
        if entry is not None and not entry.done.done():
            entry.done.set_result(None)

    async def idle(self) -> None:
        """Return once no commit runs or waits."""
        while self._runner is not None:
            await asyncio.shield(self._runner)

    async def _run(self) -> None:
        try:
            while self._next is not None:
                waiting, self._next = self._next, None
                batch = dict(self._placed)
                try:
                    await self._write(batch)
                except Exception as exc:
                    for device_id, entry in batch.items():
                        if self._placed.get(device_id) is entry:
                            self.settle(device_id)
                    waiting.set_exception(exc)
                    waiting.exception()  # retrieved: a waiter may have been cancelled
                else:
                    waiting.set_result(None)
        finally:
            self._runner = None

    async def _write(self, batch: dict[str, _Placed]) -> None:
        if not batch:
            return
        first = next(iter(batch.values()))
        saved = first.snapshot()
        for device_id, entry in batch.items():
            if entry.round_id != saved.round_id:
                raise RuntimeError("updates of two rounds in one commit")
            saved.slots[device_id] = entry.slot
        # round.json's bytes made here: the thread does only the system calls (Python
        # work in a worker thread contends with the loop for the GIL).
        data = self._store.round_json(saved)
        await asyncio.to_thread(_commit, self._store, data, [e.synced for e in batch.values()])
