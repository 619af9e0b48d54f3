"""The uploader: sends the kept updates (:mod:`client.pending`) and settles each one.

Contract (a loop-only object; disk work runs in worker threads):

* An update is in the :class:`client.pending.PendingStore` BEFORE it is sent (the
  rounds part puts it there); the uploader sends it (blob + ``weights:submit``) and
  deletes it only after the server's answer, as :func:`client.session.decisions.
  submit_outcome` says: accepted or ``duplicate`` (counted in ``rounds_completed``),
  ``round_closed`` or another final refusal (each logged); any other refusal, an
  unreadable answer or a lost connection keeps it for a later try. Once an answer is
  final, its settling (the deletion, the count, the log line) runs to the end even when
  the connection ends meanwhile (which cancels the sending task): a deleted update is
  always counted or logged. A deletion the disk refuses is logged, the update still
  counted or logged once, and only its deletion is tried again later (the update is not
  sent again); the sending task goes on.
* Updates go one at a time, oldest first, while connected; :meth:`Uploader.kick` starts
  that unless it is under way (after every registration, and whenever an update is
  kept). After :data:`client.session.decisions.UPLOAD_RETRIES` failures in a row it
  waits for the next reconnect (:func:`upload_retry_delay`). A blob is resumed from the
  server's offset (:func:`client.transfer.send_file_blob`). The pending directory is
  listed (in a worker thread) to find the oldest, except when this process knows what it
  holds: the one update kept since the uploader saw it empty
  (:meth:`client.pending.PendingStore.sole_entry_after`) is taken at once, and after the
  only entry listed is settled with nothing kept since, nothing is left to list. Disk
  work on a small update runs on the loop (:func:`client.session.offload.run_disk`).
* Each byte of an update is read and hashed at most once on its way out: one that fits in
  a chunk is read and checked by :meth:`client.pending.PendingStore.read` and sent inline;
  a larger one is streamed from its file (:func:`client.transfer.send_file_blob`), and
  its last byte goes only once the whole file matched the size and SHA-256 recorded when
  it was kept (hashed as it is read), so the server never completes a blob that differs
  from it. One this process kept (``PendingUpdate.identity``: the trainer hashed its
  bytes as it wrote them) is not hashed again: the file must still have the identity
  (size, mtime, inode) it had when kept, at its opening and before its last byte. When
  the server finds such bytes not matching (``checksum_mismatch``, ``size_mismatch``:
  they rotted in place), the store forgets that identity, so the next try hashes the
  file and discards it if it no longer matches its record.
* An update may be sent while it is still being made durable (kept with
  ``PendingStore.add(..., durable=False)``): its bytes go out meanwhile, but the blob's
  last byte and the ``weights:submit`` only once
  :meth:`client.pending.PendingStore.wait_durable` returned (the store's fsyncs under way
  are awaited on the loop first, :meth:`~client.pending.PendingStore.syncing`), so the
  server never counts an update a power cut could still take from this device; when that
  fsync fails the update is kept and tried again later (logged).
* An update that cannot be read back from disk, or no longer matches what was recorded, is
  discarded (logged), never retried.
* While sending, :attr:`Uploader.uploading` names the round (the device state is then
  ``uploading``) and the snapshot's ``upload_fraction`` follows the blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

import socketio

from client.errors import FedtrayError
from client.pending import PendingStore, PendingUpdate
from client.protocol import EV_WEIGHTS_SUBMIT, Limits, SubmitAccepted, WeightsSubmit, parse
from client.session.decisions import submit_outcome, upload_retry_delay
from client.session.hub import SnapshotHub
from client.session.link import ACK_TIMEOUT_S, Call, error_of
from client.session.offload import is_small, run_disk
from client.transfer import BlobSourceError, blob_ref, send_file_blob, weights_ref_for

__all__ = ["SUBMIT_TIMEOUT_S", "Uploader"]

log = logging.getLogger(__name__)

SUBMIT_TIMEOUT_S: Final = 120.0


class _NotDurableError(Exception):
    """The pending update could not be made durable (the disk refused an fsync)."""


class Uploader:
    """Sends pending updates over the current connection (see the module docstring).

    ``caller`` gives the current connection's acked call (``None``: not connected);
    ``spawn`` runs a task of the current connection; ``limits`` are the server's;
    ``state_changed`` is told whenever :attr:`uploading` changes.
    """

    def __init__(
        self,
        hub: SnapshotHub,
        pending: PendingStore,
        *,
        caller: Callable[[], Call | None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        limits: Callable[[], Limits],
        state_changed: Callable[[], None],
    ) -> None:
        self._hub = hub
        self.pending = pending
        self._caller = caller
        self._spawn = spawn
        self._limits = limits
        self._state_changed = state_changed
        self._task: asyncio.Task[None] | None = None
        #: Settlings under way (held: the loop keeps only weak references to tasks).
        self._settling: set[asyncio.Future[bool]] = set()
        #: Updates the server answered finally whose deletion failed: (data file, SHA-256).
        #: Only their deletion is tried again (never sent again, counted once).
        self._answered: set[tuple[Path, str]] = set()
        self.uploading: str | None = None
        #: PendingStore.generation when the store was last seen empty (None: unknown).
        self._empty_at: int | None = None

    def kick(self) -> None:
        """Start sending pending updates unless that is already under way."""
        if self._caller() is None or (self._task is not None and not self._task.done()):
            return
        self._task = self._spawn(self._upload_all())

    def connection_ended(self) -> None:
        """The connection (and with it the sending task) ended."""
        if self.uploading is not None:
            self.uploading = None
            self._state_changed()

    async def _upload_all(self) -> None:
        failures = 0
        while self._caller() is not None:
            generation = self.pending.generation  # before looking: a later add is seen
            oldest = await self._next()
            if oldest is None:
                self._empty_at = generation
                return
            update, data, count = oldest
            self.uploading = update.round_id
            self._state_changed()
            try:
                done = await self._upload(update, data)
            finally:
                self.uploading = None
                self._state_changed()
            if done:
                failures = 0
                if count == 1 and self.pending.generation == generation:
                    # It was the only entry, it is gone, and nothing was added since.
                    self._empty_at = generation
                    return
                continue
            failures += 1
            delay = upload_retry_delay(failures)
            if delay is None:
                log.warning("giving up sending for now; will retry after the next reconnect")
                return
            await asyncio.sleep(delay)

    async def _next(self) -> tuple[PendingUpdate, bytes | Exception | None, int] | None:
        """The oldest pending update, its bytes (:func:`_payload`) and how many entries
        there were; None when nothing is pending. The one update kept since the store was
        last seen empty is taken without listing the directory (on the loop when small);
        otherwise the directory is listed in a worker thread (:func:`_oldest`)."""
        inline_limit = self._limits().max_chunk_bytes
        empty_at, self._empty_at = self._empty_at, None
        sole = self.pending.sole_entry_after(empty_at) if empty_at is not None else None
        if sole is None:
            return await asyncio.to_thread(_oldest, self.pending, inline_limit)
        return sole, await run_disk(sole.size, _payload, self.pending, sole, inline_limit), 1

    async def _upload(self, update: PendingUpdate, data: bytes | Exception | None) -> bool:
        """Send one update (``data``: its verified bytes, why they could not be read, or
        None to stream it from its file); True when it is resolved (and deleted), False to
        retry later."""
        if (update.path, update.sha256) in self._answered:
            # Answered finally already (and counted or logged): only its deletion is left.
            return await self._delete(update)
        call = self._caller()
        if call is None:
            return False
        if isinstance(data, Exception):
            log.error("discarding the update of round %s: %s", update.round_id, data)
            return await self._delete(update)

        async def blob_call(event: str, payload: dict[str, Any]) -> Any:
            return await call(event, payload, ACK_TIMEOUT_S)

        async def durable() -> None:
            if self.pending.is_durable(update):
                return
            # The fsyncs under way are awaited here, not by a thread blocked on them
            # (shielded: a cancelled wait must not cancel fsyncs queued on the sync thread).
            syncing = self.pending.syncing(update)
            if syncing is not None:
                with contextlib.suppress(OSError):
                    await asyncio.shield(asyncio.wrap_future(syncing))
            if syncing is not None and self.pending.record_durable(update, syncing):
                return
            try:  # none under way (an entry from an earlier run), they failed, or replaced
                await asyncio.to_thread(self.pending.wait_durable, update)
            except OSError as exc:
                raise _NotDurableError(str(exc)) from exc

        limits = self._limits()
        if data is None:
            ref = blob_ref(update.format, size=update.size, sha256=update.sha256)
        else:
            ref = weights_ref_for(
                data, update.format, inline_limit=limits.max_chunk_bytes, sha256=update.sha256
            )
        try:
            if ref.blob_id is not None:
                first = True

                def on_progress(received: int, total: int) -> None:
                    nonlocal first
                    if first and received > 0:
                        log.info(
                            "resuming the upload of round %s at byte %d of %d",
                            update.round_id,
                            received,
                            total,
                        )
                    first = False
                    self._hub.publish(upload_fraction=received / total if total else 1.0)

                await send_file_blob(
                    blob_call,
                    update.path,
                    size=update.size,
                    sha256=update.sha256,
                    blob_id=ref.blob_id,
                    chunk_bytes=limits.max_chunk_bytes,
                    window=limits.max_inflight_chunks,
                    on_progress=on_progress,
                    ready=durable,
                    identity=update.identity,
                )
            await durable()  # (at once after a streamed blob's last byte)
            submit = WeightsSubmit(
                round_id=update.round_id,
                base_version=update.base_version,
                num_samples=update.num_samples,
                metrics=update.metrics,
                weights=ref,
            )
            ack = await call(EV_WEIGHTS_SUBMIT, submit.to_wire(), SUBMIT_TIMEOUT_S)
        except BlobSourceError as exc:
            log.error("discarding the update of round %s: %s", update.round_id, exc)
            return await self._delete(update)
        except FedtrayError as exc:
            if exc.code in _BYTES_REFUSED and update.identity is not None:
                # Sent on its identity, unhashed here: hashed again before the next try.
                self.pending.distrust(update)
            return await self._settle(update, exc.code, exc.message)
        except (socketio.exceptions.SocketIOError, TimeoutError) as exc:
            log.info("sending the update of round %s was interrupted: %s", update.round_id, exc)
            return False
        except _NotDurableError as exc:  # kept, tried again later
            log.error("cannot make the update of round %s durable: %s", update.round_id, exc)
            return False
        finally:
            self._hub.publish(upload_fraction=None)
        err = error_of(ack)
        if err is not None:
            return await self._settle(update, err.code, err.message)
        try:
            accepted = parse(SubmitAccepted, ack)
        except FedtrayError as exc:
            log.warning("unexpected answer to weights:submit: %s", exc.message)
            return False
        settled = await self._settle(update, None, "")
        log.info(
            "round %s: update accepted (%d received so far)", update.round_id, accepted.received
        )
        return settled

    async def _settle(self, update: PendingUpdate, code: str | None, message: str) -> bool:
        """Act on the server's answer (``code`` None: accepted); True when it is final and
        the update deleted (False: kept, tried again later; see :meth:`_resolve`)."""
        outcome = submit_outcome(code)
        if outcome == "retry":
            log.warning(
                "the server could not take round %s yet (%s): %s", update.round_id, code, message
            )
            return False
        if is_small(update.size):
            # Its deletion runs on the loop (run_disk): _resolve never suspends, so no
            # cancel can come between the deletion and its count or log line.
            return await self._resolve(update, outcome, code, message)
        # Shielded: a connection ending now cancels this task, but the answer is final, so
        # the deletion and its count or log line are one step (module docstring).
        settling = asyncio.ensure_future(self._resolve(update, outcome, code, message))
        self._settling.add(settling)
        settling.add_done_callback(self._settling.discard)
        return await asyncio.shield(settling)

    async def _resolve(
        self, update: PendingUpdate, outcome: str, code: str | None, message: str
    ) -> bool:
        """Delete a finally answered update, then count it or log why it was dropped; the
        count or log line comes even when the deletion fails (the answer is final), and
        only the deletion is tried again (:meth:`_delete`). True when it was deleted."""
        deleted = await self._delete(update)
        if outcome in ("accepted", "duplicate"):
            if outcome == "duplicate":
                log.info("round %s: the server already counted this update", update.round_id)
            self._hub.publish(rounds_completed=self._hub.current.rounds_completed + 1)
        elif outcome == "round_closed":
            log.warning("round %s closed before the update arrived; discarded it", update.round_id)
        else:
            log.warning(
                "the server refused the update of round %s (%s): %s; discarded it",
                update.round_id,
                code,
                message,
            )
        return deleted

    async def _delete(self, update: PendingUpdate) -> bool:
        """Delete a finally answered update; when the disk refuses, log it and remember it
        as answered (sent no more, its deletion tried again by the next try). True when
        it is deleted."""
        key = (update.path, update.sha256)
        try:
            await run_disk(update.size, self.pending.remove, update)
        except OSError as exc:
            log.warning(
                "cannot delete the update of round %s, which the server answered: %s; "
                "trying again later",
                update.round_id,
                exc,
            )
            self._answered.add(key)
            return False
        self._answered.discard(key)
        return True


#: What the receiver answers to bytes that do not match their announced size or SHA-256.
_BYTES_REFUSED = frozenset({"checksum_mismatch", "size_mismatch"})


def _payload(
    pending: PendingStore, update: PendingUpdate, inline_limit: int
) -> bytes | Exception | None:
    """``update``'s verified bytes, or why they cannot be read; None when it is over
    ``inline_limit`` and is streamed from its file instead."""
    if update.size > inline_limit:
        return None
    try:
        return pending.read(update)
    except (FedtrayError, OSError) as exc:
        return exc


def _oldest(
    pending: PendingStore, inline_limit: int
) -> tuple[PendingUpdate, bytes | Exception | None, int] | None:
    """The oldest pending update, its bytes (:func:`_payload`) and how many entries there
    are, in one thread hop (which also waits for an inline update to be durable); None
    when nothing is pending."""
    entries = pending.entries()
    if not entries:
        return None
    update = entries[0]
    data = _payload(pending, update, inline_limit)
    if isinstance(data, bytes):
        # Sent whole in its weights:submit: made durable first, in this same hop (a
        # failure is met again, and kept for later, where the uploader waits for it).
        with contextlib.suppress(OSError):
            pending.wait_durable(update)
    return update, data, len(entries)
