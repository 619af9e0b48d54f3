"""The open round's files on disk: saved once as the round opens, removed once it is over.

Contract: :class:`RoundFiles` orders the writes of ``state_dir/round.json`` and
``state_dir/round/`` (:class:`server.roundstore.RoundStore`) around the round loop:

* :meth:`RoundFiles.open` starts the round's first save (replacing whatever files a
  previous round left) beside its devices' starts; it waits for the previous round's
  removal first, so a removal never runs after the save;
* :meth:`RoundFiles.opened` returns once that save is done (at once for a round it did not
  open, e.g. one restored from disk): nothing of a round is counted, and its files are
  never removed, before it;
* :meth:`RoundFiles.forget` removes the closed round's files now (an abandoned round),
  once no commit runs (a late commit of the closed round never lands after the removal);
  :meth:`RoundFiles.forget_later` after a new version is published, off the round's path
  (when the next round opens before that removal has begun, the next round's first save,
  which removes whatever a previous round left before it writes, does it instead: one
  thread hop, not two);
* :attr:`RoundFiles.commits` makes accepted updates durable (:mod:`server.roundcommit`);
  a round's first save waits until the previous round's last commit is done.

A failed write or removal is logged, never raised (the round goes on; a leftover round of
an older version is discarded at restart).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from server.restore import saved_round_of
from server.roundcommit import RoundCommits
from server.rounds import Round
from server.roundstore import RoundStore

log = logging.getLogger(__name__)


class RoundFiles:
    """When the open round's files are written and removed (see the module docstring)."""

    def __init__(self, store: RoundStore, task: str, state_dir: Path) -> None:
        self._store = store
        self._task = task
        self._state_dir = state_dir
        self._opening: tuple[Round, asyncio.Task[None]] | None = None
        self._forgetting: asyncio.Task[None] | None = None
        #: A removal asked by forget_later that has not begun (open takes it over).
        self._forget_due = False
        #: The group commit of accepted updates (used by :class:`server.intake.UpdateIntake`).
        self.commits = RoundCommits(store)

    def open(self, rnd: Round) -> None:
        """Start ``rnd``'s first save (see :meth:`opened`); it removes the previous
        round's files first, so a removal asked by :meth:`forget_later` that has not
        begun yet is left to it."""
        self._forget_due = False
        self._opening = (rnd, asyncio.create_task(self._persist_logged(rnd)))

    async def opened(self, rnd: Round) -> None:
        """Return once ``rnd``'s first save is done (at once for a restored round)."""
        opening = self._opening
        if opening is not None and opening[0] is rnd:
            await asyncio.shield(opening[1])

    async def forget(self) -> None:
        """Remove the closed round's files (after its outcome is saved, if it completed),
        once its last commit is done: an update committed as the round closed never
        writes ``round.json`` after the removal (a restart would bring an abandoned attempt
        back; after the last round, nothing else would remove it)."""
        await self.commits.idle()
        try:
            await asyncio.to_thread(self._store.clear)
        except OSError as exc:
            log.warning("cannot remove the closed round's files: %s", exc)

    def forget_later(self) -> None:
        """Remove them in the background; the next round's first save waits for it (or
        does it, when it opens before the removal has begun)."""
        self._forget_due = True
        self._forgetting = asyncio.create_task(self._forget_if_due())

    async def _forget_if_due(self) -> None:
        if self._forget_due:
            self._forget_due = False
            await self.forget()

    async def _persist_logged(self, rnd: Round) -> None:
        forgetting, self._forgetting = self._forgetting, None
        if forgetting is not None:
            await forgetting  # the previous round's removal, never after this save
        await self.commits.idle()  # a late commit of the previous round, never after it
        # round.json's bytes made here: the thread does only the system calls.
        data = self._store.round_json(saved_round_of(rnd, self._task, self._store, time.time()))
        try:
            await asyncio.to_thread(self._persist, data)
        except OSError as exc:
            log.error("cannot save round %s in %s: %s", rnd.round_id, self._state_dir, exc)

    def _persist(self, data: bytes) -> None:
        """A new round replaces whatever round files a previous round left."""
        self._store.clear()
        self._store.save(data)
