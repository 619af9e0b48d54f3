"""The federation's global model: its weights, version, history and encodings.

Contract: :class:`GlobalModel` is the one owner (and writer) of the global weights, their
version, the number of completed rounds, the round history and the last round's metrics.
:meth:`GlobalModel.adopt` takes what :class:`server.store.Store` saved (or version 0 of a
new federation). A new version goes through three steps: :meth:`GlobalModel.prepare`
encodes it once as safetensors, hashes it once and writes its weights file (not yet
fsynced; a large one written while it is hashed); :meth:`GlobalModel.persist` makes it
durable and writes ``history.json`` naming it with its round's record, their fsyncs side
by side (:meth:`server.store.Store.commit_version`: two one after the other); and
:meth:`GlobalModel.publish` makes it the global. Persist first, so a version anyone has
seen survives a crash (a failed save is logged; the version is still published, its
round's updates stay on disk). A version is published before its evaluation is known:
:meth:`GlobalModel.record_evaluation` adds it to that version's history record later, in
memory and in ``history.json`` (when that version is the saved one), so it survives a
restart; a crash before then leaves the record without evaluation (when the saved
``history.json`` already holds it -- a newer version's save took it along -- nothing is
written again).
:meth:`GlobalModel.record_fields` does the same for other fields of a version's record
(the federated evaluation's ``federated_eval_*``, :mod:`server.fedeval`). Writes of
``history.json`` are serialized (one at a time, each from the latest saved snapshot), so an
older write never lands after a newer one. The one encoding made by ``prepare`` (or the
document the aggregate was computed into, :mod:`server.document`) is the bytes saved,
the safetensors bytes sent to devices and their SHA-256: never encoded twice. A server
optimizer's state for the new version (``prepare``'s ``optimizer_state``) is written by
``prepare`` too, after the weights and before ``history.json`` names both; a version
whose optimizer state cannot be written is not saved (as when its weights cannot be).
:attr:`GlobalModel.optimizer_state` is the state saved with the adopted version.
:meth:`GlobalModel.encoded` encodes the current version once per other format (in a
thread) and caches it until the next version. Owned by the server's one event loop;
blocking work (encoding, hashing, saving) runs in threads (:meth:`GlobalModel.
prepare_blocking` is ``prepare``'s work for a caller already in a worker thread: the
coordinator's aggregation, one hop for both).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from client.protocol import DEFAULT_CHUNK_BYTES, WeightFormat
from client.weights import Layout, StateDict, encode, sha256_hex
from server.document import Document
from server.status import RoundRecord
from server.store import Saved, Store

log = logging.getLogger(__name__)

#: A new version's document at least this large is written while it is hashed (a thread
#: of :data:`_WRITES`); a smaller one after, in the same thread (a hand-off costs more).
SIDE_BY_SIDE_BYTES = 8 << 20
_WRITES = ThreadPoolExecutor(max_workers=1, thread_name_prefix="global-write")

#: One encoding of the global: (version, bytes, sha256 hex). A safetensors document written
#: in place (:mod:`server.document`) is a read-only view of the buffer it was computed into.
Encoded = tuple[int, bytes | memoryview, str]


@dataclass(frozen=True)
class Prepared:
    """A new version between :meth:`GlobalModel.prepare` and :meth:`GlobalModel.publish`."""

    version: int
    state: StateDict
    encoded: bytes | memoryview  # safetensors, the one encoding (never changed)
    sha256: str
    weights_file: str | None  # None: the weights (or optimizer) file could not be written
    optimizer_file: str | None = None  # None: no optimizer state
    optimizer_sha256: str | None = None


@dataclass(frozen=True)
class _SavedHistory:
    """The contents of the last ``history.json`` this process wrote."""

    version: int
    rounds_completed: int
    weights_file: str
    sha256: str
    history: list[RoundRecord]
    optimizer_file: str | None = None
    optimizer_sha256: str | None = None


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if np.isfinite(v)}


def _with_evaluation(
    history: list[RoundRecord], version: int, metrics: dict[str, float]
) -> list[RoundRecord] | None:
    """``history`` with ``metrics`` in version ``version``'s completed record; None when
    it holds no such record."""
    return _with_fields(
        history,
        version,
        {"eval_loss": metrics.get("evalLoss"), "eval_accuracy": metrics.get("evalAccuracy")},
    )


def _with_fields(
    history: list[RoundRecord], version: int, update: dict[str, object]
) -> list[RoundRecord] | None:
    """``history`` with ``update`` (RoundRecord fields) in version ``version``'s completed
    record; None when it holds no such record."""
    for i, rec in enumerate(history):
        if rec.outcome == "completed" and rec.version == version:
            updated = rec.model_copy(update=update)
            return [*history[:i], updated, *history[i + 1 :]]
    return None


class GlobalModel:
    """The global weights of one task and what the federation has done with them."""

    def __init__(self, store: Store, task: str) -> None:
        self._store = store
        self._task = task
        self.state: StateDict = {}
        self.layout: Layout = {}
        self.version = 0
        self.rounds_completed = 0
        self.history: list[RoundRecord] = []
        #: What is known about the current version (sent with weights:global): its round's
        #: trainLoss from publish on, evalLoss/evalAccuracy once its evaluation is recorded.
        self.metrics: dict[str, float] = {}
        self.round_id: str | None = None
        #: The server optimizer's state saved with the adopted version (empty: none).
        self.optimizer_state: StateDict = {}
        self._encoded: dict[WeightFormat, Encoded] = {}
        # What history.json holds now (written by this process), and one writer at a time.
        self._saved: _SavedHistory | None = None
        self._history_lock = asyncio.Lock()

    def adopt(self, state: StateDict, layout: Layout, saved: Saved | None) -> None:
        """Start from ``saved`` (a restart) or, when None, from ``state`` as version 0."""
        self.layout = layout
        if saved is None:
            self.state = state
            return
        self.state = saved.state
        self.optimizer_state = saved.optimizer
        self.version = saved.version
        self.rounds_completed = saved.rounds_completed
        self.history = saved.history
        if saved.history:
            self.round_id = saved.history[-1].round_id

    def final_metrics(self) -> dict[str, float]:
        """The evaluation of the current version, from the last completed round's record."""
        done = [r for r in self.history if r.outcome == "completed"]
        if not done:
            return {}
        last = done[-1]
        scores = {"evalLoss": last.eval_loss, "evalAccuracy": last.eval_accuracy}
        return {k: v for k, v in scores.items() if v is not None and np.isfinite(v)}

    def record_abandoned(self, record: RoundRecord) -> None:
        """An abandoned attempt joins the history (kept in memory until the next save)."""
        self.history.append(record)

    async def prepare(
        self, state: StateDict, version: int, optimizer_state: StateDict | None = None
    ) -> Prepared:
        """Encode and hash ``state`` once and write it as version ``version``'s weights
        file, then ``optimizer_state`` (if any) as its optimizer file (not yet fsynced:
        :meth:`persist` does; a failure is logged and leaves ``weights_file`` None). One
        thread hop for all of it."""
        return await asyncio.to_thread(self.prepare_blocking, state, version, optimizer_state)

    def prepare_blocking(
        self,
        state: StateDict,
        version: int,
        optimizer_state: StateDict | None = None,
        document: Document | None = None,
    ) -> Prepared:
        """:meth:`prepare` in the caller's thread (blocking: call it from a worker thread,
        e.g. the one that computed ``state``, to save a hop). Reads and changes no state of
        this object. When ``state`` is ``document.views`` (the aggregate was computed into
        the document, :mod:`server.document`), the document is the encoding: checked as
        ``encode`` checks, never copied."""
        if document is not None and state is document.views:
            encoded: bytes | memoryview = document.finish()
            if len(encoded) <= DEFAULT_CHUNK_BYTES:
                encoded = bytes(encoded)  # a small one rides inline: bytes, copied once here
        else:
            encoded = encode(state, "safetensors")
        # A large document is written (to the page cache) while it is hashed: both leave
        # the GIL, so they run side by side.
        writing = (
            _WRITES.submit(self._store.place_weights, version, encoded)
            if len(encoded) >= SIDE_BY_SIDE_BYTES
            else None
        )
        digest = sha256_hex(encoded)
        opt_name: str | None = None
        opt_digest: str | None = None
        try:
            name: str | None = (
                self._store.place_weights(version, encoded) if writing is None else writing.result()
            )
            if optimizer_state:
                opt_data = encode(optimizer_state, "safetensors")
                opt_digest = sha256_hex(opt_data)
                opt_name = self._store.place_optimizer(version, opt_data)
        except OSError as exc:
            log.error("could not save version %d to %s: %s", version, self._store.state_dir, exc)
            name = None
        return Prepared(version, state, encoded, digest, name, opt_name, opt_digest)

    async def persist(self, prepared: Prepared, record: RoundRecord) -> bool:
        """Save version ``record.version`` with ``record`` in the history (not yet the
        global: call :meth:`publish` next); whether it was saved."""
        if prepared.weights_file is None:
            return False
        saved = _SavedHistory(
            version=record.version,
            rounds_completed=record.number,
            weights_file=prepared.weights_file,
            sha256=prepared.sha256,
            history=[*self.history, record],
            optimizer_file=prepared.optimizer_file,
            optimizer_sha256=prepared.optimizer_sha256,
        )
        try:
            await self._write_history(saved, new_version=True)
        except OSError as exc:
            log.error(
                "could not save version %d to %s: %s", record.version, self._store.state_dir, exc
            )
            return False
        return True

    def publish(self, prepared: Prepared, record: RoundRecord, metrics: dict[str, float]) -> None:
        """Make version ``record.version`` the global (after :meth:`persist`); ``metrics``
        is what is known about it now (e.g. trainLoss; its evaluation comes later)."""
        self.state = prepared.state
        self.version = record.version
        self.rounds_completed = record.number
        self.history = [*self.history, record]
        self._encoded = {"safetensors": (record.version, prepared.encoded, prepared.sha256)}
        self.metrics = _finite(metrics)
        self.round_id = record.round_id

    async def record_evaluation(self, version: int, metrics: dict[str, float]) -> bool:
        """Add version ``version``'s evaluation (``evalLoss``/``evalAccuracy``; non-finite
        values are dropped) to its history record, and to ``history.json`` if that record
        is saved there; whether it was saved (a failure is logged)."""
        metrics = _finite(metrics)
        if not metrics:
            return False
        history = _with_evaluation(self.history, version, metrics)
        if history is not None:
            self.history = history
        if version == self.version:
            self.metrics = {**self.metrics, **metrics}
        async with self._history_lock:
            saved = self._saved
            written = None if saved is None else _with_evaluation(saved.history, version, metrics)
            if saved is None or written is None:
                return False
            if written == saved.history:
                return True  # already saved (a newer version's save took it along)
            try:
                await self._write_history(
                    _SavedHistory(
                        saved.version,
                        saved.rounds_completed,
                        saved.weights_file,
                        saved.sha256,
                        written,
                        saved.optimizer_file,
                        saved.optimizer_sha256,
                    ),
                    locked=True,
                )
            except OSError as exc:
                log.error(
                    "could not save the evaluation of version %d to %s: %s",
                    version,
                    self._store.state_dir,
                    exc,
                )
                return False
        return True

    async def record_fields(self, version: int, update: dict[str, object]) -> bool:
        """Set RoundRecord fields ``update`` (e.g. the federated evaluation's
        ``federated_eval_*``) in version ``version``'s history record, in memory and in
        ``history.json`` when that record is saved there (as :meth:`record_evaluation`);
        whether it was saved. False, changing nothing, when the record does not exist."""
        history = _with_fields(self.history, version, update)
        if history is None:
            return False
        self.history = history
        async with self._history_lock:
            saved = self._saved
            written = None if saved is None else _with_fields(saved.history, version, update)
            if saved is None or written is None:
                return False
            if written == saved.history:
                return True  # already saved (a newer version's save took it along)
            try:
                await self._write_history(dataclasses.replace(saved, history=written), locked=True)
            except OSError as exc:
                log.error(
                    "could not save the federated evaluation of version %d to %s: %s",
                    version,
                    self._store.state_dir,
                    exc,
                )
                return False
        return True

    async def _write_history(
        self, saved: _SavedHistory, *, locked: bool = False, new_version: bool = False
    ) -> None:
        """Write ``saved`` as ``history.json`` (one writer at a time); ``new_version``:
        its files were placed by :meth:`prepare`, not yet fsynced
        (:meth:`server.store.Store.commit_version`). Raises OSError."""
        if not locked:
            async with self._history_lock:
                await self._write_history(saved, locked=True, new_version=new_version)
            return
        if new_version:
            write = self._store.commit_version
        else:  # the saved version's history again: its save removed the older files
            write = functools.partial(self._store.save_history, prune=False)
        await asyncio.to_thread(
            write,
            task=self._task,
            version=saved.version,
            rounds_completed=saved.rounds_completed,
            weights_name=saved.weights_file,
            weights_sha256=saved.sha256,
            history=saved.history,
            optimizer_name=saved.optimizer_file,
            optimizer_sha256=saved.optimizer_sha256,
        )
        self._saved = saved

    async def encoded(self, fmt: WeightFormat) -> Encoded:
        """The current version encoded as ``fmt`` (cached per version)."""
        version, state = self.version, self.state
        cached = self._encoded.get(fmt)
        if cached is not None and cached[0] == version:
            return cached
        data = await asyncio.to_thread(encode, state, fmt)
        entry = (version, data, sha256_hex(data))
        if self.version == version:
            self._encoded[fmt] = entry
        return entry
