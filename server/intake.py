"""Taking in one update: received, checked, on disk, counted exactly once, acknowledged.

Contract: :meth:`UpdateIntake.accept` answers one ``weights:submit`` for the open round (or
refuses it with :class:`client.errors.FedtrayError`): the update is received through the
blob store (each byte hashed once as it arrives), checked in place against the model's
layout and the size limit (a safetensors document is kept as received, never decoded and
re-encoded; a JSON one is converted; one sent inline of at most :data:`INLINE_WORK_BYTES` is
checked in memory, written, and folded from those checked bytes, on the event loop; a larger
one is checked where it lies, in worker threads), made durable in the round store together
with the saved round that names it (updates ready together share one commit,
:mod:`server.roundcommit`), folded into the strategy and only then counted and acknowledged,
so an acknowledged update survives a crash (the device deletes its copy on the ack). Placing
and counting happen under :attr:`UpdateIntake.lock`, which the coordinator also holds to
close the round: an update is never counted into a closed round, and a concurrent duplicate
is counted once. Nothing of a round is taken in before its first save
(:meth:`server.roundfiles.RoundFiles.opened`). Device records change only through the
registry's named transitions. A file that cannot be written is refused ``internal_error``
(send it again later) and logged. :func:`receive_update` (receiving and checking one update
into a round store) is also the cluster's intake (:mod:`server.cluster.service`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from client.errors import FedtrayError
from client.protocol import SubmitAccepted, WeightsSubmit
from client.transfer import BlobStore
from client.weights import Layout, StateDict, decode, decode_views, encode
from server.config import ServerConfig
from server.globalmodel import GlobalModel
from server.phase import PhaseMachine
from server.registry import DeviceRecord, Registry
from server.restore import saved_round_of
from server.roundfiles import RoundFiles
from server.roundstore import RoundStore, SavedRound, SavedSlot
from server.strategies import Strategy
from server.strategies.optimizers import Plain

log = logging.getLogger("server.coordinator")

#: An update of at most this many bytes is written, checked and folded on the event loop
#: (a few tenths of a millisecond at this size, less than the two thread hops it saves);
#: a larger one in worker threads, so the loop keeps serving.
INLINE_WORK_BYTES = 1 << 20


def runs_inline(nbytes: int, passes: int = 1) -> bool:
    """Whether work over ``nbytes`` bytes, ``passes`` times over, is done on the event loop
    (at most :data:`INLINE_WORK_BYTES` in all) rather than in a worker thread. Pure."""
    return nbytes * max(1, passes) <= INLINE_WORK_BYTES


def aggregate_runs_inline(model_bytes: int, strategy: Strategy, reported: int) -> bool:
    """Whether a round's aggregate is computed on the event loop: a small model
    (:func:`runs_inline`), read once (not again per kept update, as the
    robust rules do), with no server optimizer state (several times the model's bytes in
    float64, encoded, hashed and written with the new global). Pure."""
    if not isinstance(strategy.optimizer, Plain):
        return False
    passes = reported + 1 if strategy.reads_kept_updates else 1
    return runs_inline(model_bytes, passes)


def unsaved_error() -> FedtrayError:
    """The refusal of an update the server cannot store now (the device resends later)."""
    return FedtrayError(
        "internal_error", "the server cannot store the update now; send it again later"
    )


class UpdateIntake:
    """Counts each update of the open round once (see the module docstring)."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        phase: PhaseMachine,
        files: RoundFiles,
        round_store: RoundStore,
        blobs: BlobStore,
        model: GlobalModel,
        registry: Registry,
        strategy: Strategy,
        on_counted: Callable[[], None],
    ) -> None:
        self._config = config
        self._phase = phase
        self._files = files
        self._round_store = round_store
        self._blobs = blobs
        self._model = model
        self._registry = registry
        self._strategy = strategy
        self._on_counted = on_counted
        #: Held to count an update, and by the coordinator to close the round.
        self.lock = asyncio.Lock()

    async def accept(self, record: DeviceRecord, sub: WeightsSubmit) -> SubmitAccepted:
        """Count a ``weights:submit`` exactly once; the ack. Raises FedtrayError to refuse."""
        rnd = self._phase.round_for(sub.round_id)
        if rnd is None:
            raise FedtrayError("round_closed", f"round {sub.round_id} is closed or unknown")
        rnd.check_submit(record.device_id, sub.round_id, sub.base_version, time.monotonic())
        await self._files.opened(rnd)
        incoming, checked = await self._receive(record, sub)
        # On disk (fsynced) before it is counted and acknowledged: an acknowledged update
        # survives a server crash (the device deletes its copy on the ack). Placed under the
        # lock, made durable outside it (updates ready together share one commit,
        # server.roundcommit), counted under it.
        commits, device_id = self._files.commits, record.device_id
        task, store, unsaved, placed = self._config.task, self._round_store, unsaved_error(), False

        def snapshot() -> SavedRound:
            return saved_round_of(rnd, task, store, time.time())

        try:
            while True:
                async with self.lock:
                    # The round may have closed, or a duplicate been counted, meanwhile.
                    if self._phase.round is not rnd:
                        raise FedtrayError("round_closed", f"round {sub.round_id} is closed")
                    rnd.check_submit(device_id, sub.round_id, sub.base_version, time.monotonic())
                    earlier = commits.placed(device_id)
                    if earlier is None:
                        slot = SavedSlot(
                            index=rnd.slots[device_id].index,
                            reported=True,
                            num_samples=sub.num_samples,
                            metrics=dict(sub.metrics),
                            update_file=store.update_file_name(device_id),
                        )
                        try:
                            name = commits.place(
                                device_id, incoming, slot, snapshot, round_id=rnd.round_id
                            )
                        except OSError as exc:
                            log.error("cannot save the update of %s: %s", record.name, exc)
                            raise unsaved from None
                        placed = True
                        break
                await earlier  # the same device's earlier submission: then check again
            try:
                await commits.commit(device_id)
            except OSError as exc:
                log.error("cannot save round %s: %s", rnd.round_id, exc)
                raise unsaved from None
            async with self.lock:
                if self._phase.round is not rnd or rnd.closed:  # closed while committing
                    raise FedtrayError("round_closed", f"round {sub.round_id} is closed")
                if checked is not None:  # small: the checked views of the bytes written
                    added = self._strategy.add(checked, sub.num_samples)
                else:
                    added = await asyncio.to_thread(
                        store.fold_update,
                        name,
                        self._model.layout,
                        lambda update: self._strategy.add(update, sub.num_samples),
                    )
                if added.clipped:
                    self._registry.update_clipped(device_id, rnd.number, added.norm)
                    log.warning(
                        "round %s: the update of %s was %.4g from the global; clipped to %g",
                        rnd.round_id,
                        record.name,
                        added.norm,
                        self._strategy.settings.clip_norm,
                    )
                received = rnd.record_report(device_id, sub.num_samples, sub.metrics)
        finally:
            del checked
            if placed:
                commits.settle(device_id)
            else:
                incoming.unlink(missing_ok=True)  # removed when refused (renamed once placed)
        self._registry.update_accepted(record.device_id)
        log.info(
            "round %s: update from %s accepted (%d samples; %d of %d reported)",
            rnd.round_id,
            record.name,
            sub.num_samples,
            received,
            len(rnd.slots),
        )
        self._on_counted()
        return SubmitAccepted(round_id=rnd.round_id, received=received)

    async def _receive(
        self, record: DeviceRecord, sub: WeightsSubmit
    ) -> tuple[Path, StateDict | None]:
        """The submitted update as a checked file in the round store, and, for a small
        inline one (at most :data:`INLINE_WORK_BYTES`, on the loop: :func:`land_checked`),
        its checked tensors as read-only views of the bytes written (folded from those,
        not read back); else (:func:`receive_update`) None."""
        ref, layout = sub.weights, self._model.layout
        max_bytes = self._config.limits.max_blob_bytes
        small = ref.data is not None and runs_inline(len(ref.data))
        if ref.format == "safetensors" and small:
            data = self._blobs.take(record.device_id, ref)
            try:
                return land_checked(
                    self._round_store, record.device_id, data, layout=layout, max_bytes=max_bytes
                )
            except OSError as exc:
                log.error("cannot save the update of %s: %s", record.name, exc)
                raise unsaved_error() from None
        incoming = await receive_update(
            self._blobs, self._round_store, record, sub, layout=layout, max_bytes=max_bytes
        )
        return incoming, None


async def receive_update(
    blobs: BlobStore,
    store: RoundStore,
    record: DeviceRecord,
    sub: WeightsSubmit,
    *,
    layout: Layout,
    max_bytes: int,
) -> Path:
    """The submitted update as a checked safetensors file in ``store`` (not yet fsynced or
    counted). Each byte is hashed once (by the blob store, as it arrives) and checked once
    where it lies; a safetensors document is kept as received, never decoded and
    re-encoded (a JSON one is converted); an inline safetensors document is written and
    checked on the loop when it is at most :data:`INLINE_WORK_BYTES`, else in one thread
    hop. Raises FedtrayError to refuse (``internal_error``
    when the file cannot be written); nothing is left behind when it raises. Shared by the
    single-process intake and the cluster's (:mod:`server.cluster.service`)."""
    ref = sub.weights
    if ref.format == "safetensors" and ref.data is not None:
        # Inline (a small update): verified here, then written and checked on the loop
        # when it is small (cheaper than a thread hop), else in ONE hop.
        data = blobs.take(record.device_id, ref)
        try:
            if runs_inline(len(data)):
                return _land(store, record.device_id, data, layout=layout, max_bytes=max_bytes)
            return await asyncio.to_thread(
                _land, store, record.device_id, data, layout=layout, max_bytes=max_bytes
            )
        except OSError as exc:
            log.error("cannot save the update of %s: %s", record.name, exc)
            raise unsaved_error() from None
    try:
        incoming = await asyncio.to_thread(store.incoming_path, record.device_id)
    except OSError as exc:
        log.error("cannot save the update of %s: %s", record.name, exc)
        raise unsaved_error() from None
    try:
        if ref.format != "safetensors" or not blobs.take_file(record.device_id, ref, incoming):
            data = blobs.take(record.device_id, ref)
            if ref.format != "safetensors":
                state = await asyncio.to_thread(
                    decode, data, ref.format, expected=layout, max_bytes=max_bytes
                )
                data = await asyncio.to_thread(encode, state, "safetensors")
                del state
            await asyncio.to_thread(store.write_incoming, incoming, data)
            del data
        await asyncio.to_thread(store.check_update, incoming, layout, max_bytes)
    except OSError as exc:
        incoming.unlink(missing_ok=True)
        log.error("cannot save the update of %s: %s", record.name, exc)
        raise unsaved_error() from None
    except BaseException:
        incoming.unlink(missing_ok=True)
        raise
    return incoming


def land_checked(
    store: RoundStore,
    device_id: str,
    data: bytes | bytearray,
    *,
    layout: Layout,
    max_bytes: int,
) -> tuple[Path, StateDict]:
    """``data`` checked in memory (as :meth:`RoundStore.check_update` checks a file: the
    same :func:`client.weights.decode_views`), then written to a fresh incoming file; the
    file and the checked tensors (read-only views of ``data``). Raises the check's
    WeightsError (nothing written) or OSError (nothing left behind)."""
    views = decode_views(data, expected=layout, max_bytes=max_bytes)
    incoming = store.incoming_path(device_id)
    try:
        store.write_incoming(incoming, data)
    except BaseException:
        incoming.unlink(missing_ok=True)
        raise
    return incoming, views


def _land(
    store: RoundStore,
    device_id: str,
    data: bytes | bytearray,
    *,
    layout: Layout,
    max_bytes: int,
) -> Path:
    """``data`` written to a fresh incoming file and checked where it lies (in a thread);
    the file. Raises OSError or the check's WeightsError, leaving nothing behind."""
    incoming = store.incoming_path(device_id)
    try:
        store.write_incoming(incoming, data)
        store.check_update(incoming, layout, max_bytes)
    except BaseException:
        incoming.unlink(missing_ok=True)
        raise
    return incoming
