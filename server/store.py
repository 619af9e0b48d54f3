"""Persistence of the server's progress: global weights and round history.

Contract: :class:`Store` keeps, in its state directory, the current global weights as a
safetensors file written by the codec (``global-v<version>.safetensors``; never a pickle)
and ``history.json`` naming that file, its SHA-256, the version, the number of completed
rounds, the task and the round history. Every file is written atomically (temporary file
in the same directory, fsync, ``os.replace``), and the weights file is written before
``history.json`` points to it, so a crash at any moment leaves the previous consistent
state. :meth:`Store.load` returns None when the directory holds no state, and raises
:class:`StoreError` with a one-line message when the state is unreadable, corrupt, or
belongs to another task or model layout. Older versions' weights files are removed after
a save (never a newer version's, which may be on its way to being saved).
A save is two steps the server may run apart (:meth:`Store.save_weights`, then
:meth:`Store.save_history`); only ``history.json`` makes a version the saved one.
:meth:`Store.save_history` may be called again for the same weights file with an updated
history (a version's evaluation, recorded after the version was published).
The server's own path to a new version shares the fsyncs instead (two one after the other,
not four): :meth:`Store.place_weights` / :meth:`Store.place_optimizer` write a version's
files under their names *without* fsync (no ``history.json`` names them yet: a torn one
after a power cut is never read, and is replaced when that version is saved again), and
:meth:`Store.commit_version` makes them the saved state: side by side the fsync of each
placed file, of ``history.json``'s temporary file (written first) and of the state
directory (their renames); only then ``history.json`` is renamed and the directory
fsynced again. So ``history.json`` never names a file whose bytes or name are not durable.
``history.json``'s records are serialized by pydantic (a non-finite float is written as
``null``, read back as None).
A server optimizer's state (FedAvgM's momentum, FedAdam's moments) is saved beside the
version it goes with, as ``optimizer-v<version>.safetensors`` (float64 tensors, written by
:meth:`Store.save_optimizer` before ``history.json`` names it with its SHA-256, removed
like old weights files), and :meth:`Store.load` returns it (``Saved.optimizer``; empty
when the version has none), so a restarted server steps from exactly the state an
uninterrupted one would.
The open round (its accepted updates) is kept apart, by :mod:`server.roundstore`.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from client.atomicfile import fsync_dir, fsync_file, write_all, write_atomic
from client.weights import Layout, StateDict, WeightsError, decode, encode, sha256_hex
from server.status import RoundRecord

HISTORY_FILE = "history.json"
STATE_FORMAT = 1
#: A version's files: ``<prefix><version>.safetensors``.
_WEIGHTS_PREFIX = "global-v"
_OPTIMIZER_PREFIX = "optimizer-v"
_SUFFIX = ".safetensors"


class StoreError(Exception):
    """The state directory cannot be used; the message says why and what to do."""


@dataclass
class Saved:
    """What a previous run left behind."""

    task: str
    version: int
    rounds_completed: int
    state: StateDict
    history: list[RoundRecord]
    #: The server optimizer's state saved with this version (empty: none).
    optimizer: StateDict = field(default_factory=dict)


class Store:
    """The state directory of one server."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._records = HistoryJson()

    def load(self, task: str, layout: Layout) -> Saved | None:
        """The saved state, checked against ``task`` and the model ``layout``."""
        meta_path = self.state_dir / HISTORY_FILE
        if not meta_path.exists():
            return None
        hint = "; move it away or pass another --state-dir"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
                raise StoreError(f"{meta_path} is not a fedtray-server state file{hint}")
            saved_task = str(meta["task"])
            version = int(meta["version"])
            rounds_completed = int(meta["roundsCompleted"])
            weights_name = str(meta["weightsFile"])
            weights_sha = str(meta["weightsSha256"])
            history = [RoundRecord.model_validate(r) for r in meta["history"]]
            optimizer_name = meta.get("optimizerFile")
            optimizer_sha = meta.get("optimizerSha256")
        except StoreError:
            raise
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            raise StoreError(f"cannot read {meta_path}: {exc}{hint}") from None
        if saved_task != task:
            raise StoreError(
                f"{self.state_dir} holds training state for task {saved_task!r}, not {task!r}{hint}"
            )
        weights_path = self.state_dir / Path(weights_name).name
        try:
            data = weights_path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {weights_path}: {exc}{hint}") from None
        if sha256_hex(data) != weights_sha:
            raise StoreError(f"{weights_path} does not match its checksum in {meta_path}{hint}")
        try:
            state = decode(data, "safetensors", expected=layout)
        except WeightsError as exc:
            raise StoreError(
                f"{weights_path} does not fit the current model ({exc.code}: {exc.message}){hint}"
            ) from None
        optimizer: StateDict = {}
        if optimizer_name is not None:
            optimizer = self._load_optimizer(str(optimizer_name), str(optimizer_sha), hint)
        return Saved(saved_task, version, rounds_completed, state, history, optimizer)

    def _load_optimizer(self, name: str, sha: str, hint: str) -> StateDict:
        path = self.state_dir / Path(name).name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}{hint}") from None
        if sha256_hex(data) != sha:
            raise StoreError(f"{path} does not match its checksum in {HISTORY_FILE}{hint}")
        try:
            return decode(data, "safetensors", max_bytes=len(data) + 1)
        except WeightsError as exc:
            raise StoreError(f"cannot read {path} ({exc.code}: {exc.message}){hint}") from None

    def save(
        self,
        *,
        task: str,
        version: int,
        rounds_completed: int,
        state: StateDict,
        history: list[RoundRecord],
        encoded: bytes | None = None,
    ) -> None:
        """Persist a new global version (``encoded`` = its safetensors bytes, if at hand)."""
        data = encoded if encoded is not None else encode(state, "safetensors")
        digest = sha256_hex(data)
        name = self.save_weights(version, data)
        self.save_history(
            task=task,
            version=version,
            rounds_completed=rounds_completed,
            weights_name=name,
            weights_sha256=digest,
            history=history,
        )

    def save_weights(self, version: int, data: bytes) -> str:
        """Write version ``version``'s safetensors document (fsynced); its file name. Not
        yet the saved state: :meth:`save_history` naming it makes it so."""
        return self._write_version_file(_WEIGHTS_PREFIX, version, data, durable=True)

    def save_optimizer(self, version: int, data: bytes) -> str:
        """Write version ``version``'s optimizer state (safetensors, fsynced); its file
        name. Saved once :meth:`save_history` names it."""
        return self._write_version_file(_OPTIMIZER_PREFIX, version, data, durable=True)

    def save_history(
        self,
        *,
        task: str,
        version: int,
        rounds_completed: int,
        weights_name: str,
        weights_sha256: str,
        history: list[RoundRecord],
        optimizer_name: str | None = None,
        optimizer_sha256: str | None = None,
        prune: bool = True,
    ) -> None:
        """Write ``history.json`` naming a weights file :meth:`save_weights` wrote (fsynced)
        and the optimizer file :meth:`save_optimizer` wrote for it (if any), then remove
        the older weights and optimizer files (``prune=False``: a rewrite of the saved
        version's history, whose save removed them already, lists nothing)."""
        meta = _meta(
            task,
            version,
            rounds_completed,
            weights_name,
            weights_sha256,
            history,
            optimizer_name,
            optimizer_sha256,
            self._records,
        )
        write_atomic(self.state_dir / HISTORY_FILE, meta)
        if prune:
            self._remove_older(version)

    def place_weights(self, version: int, data: bytes | bytearray | memoryview) -> str:
        """Write version ``version``'s safetensors document under its name, NOT fsynced
        (:meth:`commit_version` makes it durable before ``history.json`` names it); its
        file name. Raises OSError."""
        return self._write_version_file(_WEIGHTS_PREFIX, version, data, durable=False)

    def place_optimizer(self, version: int, data: bytes) -> str:
        """As :meth:`place_weights`, for version ``version``'s optimizer state."""
        return self._write_version_file(_OPTIMIZER_PREFIX, version, data, durable=False)

    def commit_version(
        self,
        *,
        task: str,
        version: int,
        rounds_completed: int,
        weights_name: str,
        weights_sha256: str,
        history: list[RoundRecord],
        optimizer_name: str | None = None,
        optimizer_sha256: str | None = None,
    ) -> None:
        """Make the files :meth:`place_weights` / :meth:`place_optimizer` wrote the saved
        state: ``history.json``'s temporary file written, then side by side the fsyncs
        of the placed files, of that temporary file and of the state directory; then
        ``history.json`` renamed and the directory fsynced (module docstring); then the
        older versions' files removed. Raises OSError (no temporary file left behind)."""
        meta = _meta(
            task,
            version,
            rounds_completed,
            weights_name,
            weights_sha256,
            history,
            optimizer_name,
            optimizer_sha256,
            self._records,
        )
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f".{HISTORY_FILE}.", suffix=".tmp")
        try:
            try:
                write_all(fd, meta)
            finally:
                os.close(fd)
            placed = [weights_name] + ([optimizer_name] if optimizer_name is not None else [])
            paths = [self.state_dir / Path(name).name for name in placed] + [Path(tmp)]
            _fsync_side_by_side(paths, self.state_dir)
            os.replace(tmp, self.state_dir / HISTORY_FILE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(self.state_dir)
        self._remove_older(version)

    def _write_version_file(
        self, prefix: str, version: int, data: bytes | bytearray | memoryview, *, durable: bool
    ) -> str:
        """Write ``<prefix><version>.safetensors`` (fsynced when ``durable``); its name."""
        name = f"{prefix}{version}{_SUFFIX}"
        write_atomic(self.state_dir / name, data, durable=durable)
        return name

    def _remove_older(self, version: int) -> None:
        # Only older versions' files: a newer version's files may be written already (its
        # round is being saved while this version's evaluation is recorded).
        # One listing of the directory, plain strings (this runs every round).
        with os.scandir(self.state_dir) as entries:
            for entry in entries:
                name = entry.name
                if not name.endswith(_SUFFIX):
                    continue
                for prefix in (_WEIGHTS_PREFIX, _OPTIMIZER_PREFIX):
                    number = name[len(prefix) : -len(_SUFFIX)]
                    if name.startswith(prefix) and number.isdigit() and int(number) < version:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)


def _meta(
    task: str,
    version: int,
    rounds_completed: int,
    weights_name: str,
    weights_sha256: str,
    history: list[RoundRecord],
    optimizer_name: str | None,
    optimizer_sha256: str | None,
    records: HistoryJson,
) -> bytes:
    """``history.json``'s bytes: the history serialized by pydantic (the same JSON as
    ``model_dump`` + ``json.dumps``, several times less CPU), each record once while it
    stays unchanged (``records``): it is written every round and grows with the rounds."""
    meta: dict[str, Any] = {
        "format": STATE_FORMAT,
        "task": task,
        "version": version,
        "roundsCompleted": rounds_completed,
        "weightsFile": weights_name,
        "weightsSha256": weights_sha256,
    }
    if optimizer_name is not None:
        meta["optimizerFile"] = optimizer_name
        meta["optimizerSha256"] = optimizer_sha256
    head = json.dumps(meta, indent=1).encode("utf-8")
    return head[:-2] + b',\n "history": ' + records.dump(history) + b"\n}"


_RECORD = TypeAdapter(RoundRecord)


class HistoryJson:
    """The JSON of a round history, each record serialized once (thread-safe).

    :meth:`dump` returns exactly what pydantic writes for the list (``indent=1``): each
    record's bytes are kept for as long as the same record object is in the history, so a
    write costs the new records, not the whole history (it grows by one every round).
    Records are replaced, never changed in place (``model_copy``), except a completed
    round's ``timing.publishedAt``, which the coordinator sets after the record's first
    save: a record whose timing has none yet is serialized again at every dump, and so are
    the last :data:`FRESH` records. The leading records that no dump has seen replaced
    are kept joined (the *prefix*): a dump checks them by identity, in one pass in C, and
    copies their bytes once, so its Python work does not grow with the history."""

    #: The newest records, serialized again at every dump.
    FRESH = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[int, tuple[RoundRecord, bytes]] = {}
        #: The leading records whose parts are joined in _prefix_bytes, and where each
        #: record's part ends there.
        self._prefix: list[RoundRecord] = []
        self._prefix_bytes = b""
        self._ends: list[int] = []

    def dump(self, history: list[RoundRecord]) -> bytes:
        """``history`` as pydantic's ``dump_json(by_alias=True, indent=1)`` writes it."""
        if not history:
            return b"[]"
        with self._lock:
            fresh_from = len(history) - self.FRESH
            self._keep_prefix(history)
            kept = self._kept
            now: dict[int, tuple[RoundRecord, bytes]] = {}
            parts: list[bytes] = []
            for i in range(len(self._prefix), len(history)):
                rec = history[i]
                hit = kept.get(id(rec))
                unpublished = rec.timing is not None and rec.timing.published_at is None
                if hit is None or hit[0] is not rec or i >= fresh_from or unpublished:
                    # One level deeper than alone: every line of it indented once more.
                    text = _RECORD.dump_json(rec, by_alias=True, indent=1)
                    hit = (rec, b" " + text.replace(b"\n", b"\n "))
                if unpublished:  # its publishedAt is still to be set in place
                    pass
                elif i < fresh_from and len(self._prefix) == i:
                    self._extend_prefix(rec, hit[1])
                    continue
                else:
                    now[id(rec)] = hit
                parts.append(hit[1])
            self._kept = now
            prefix = self._prefix_bytes
        if prefix and parts:
            return b"[\n" + prefix + b",\n" + b",\n".join(parts) + b"\n]"
        return b"[\n" + (prefix or b",\n".join(parts)) + b"\n]"

    def _keep_prefix(self, history: list[RoundRecord]) -> None:
        """Cut the prefix at the first record ``history`` no longer holds there."""
        same = list(map(operator.is_, self._prefix, history))
        # ``history`` may also be shorter than the prefix (all the same, then)
        cut = len(same) if all(same) else same.index(False)
        cut = min(cut, max(0, len(history) - self.FRESH))  # the newest stay out of it
        if cut < len(self._prefix):
            del self._prefix[cut:]
            del self._ends[cut:]
            self._prefix_bytes = self._prefix_bytes[: self._ends[-1]] if self._ends else b""

    def _extend_prefix(self, rec: RoundRecord, part: bytes) -> None:
        self._prefix_bytes = self._prefix_bytes + b",\n" + part if self._prefix else part
        self._prefix.append(rec)
        self._ends.append(len(self._prefix_bytes))


#: Threads for fsyncs run side by side (an fsync waits on the disk, not the CPU).
_SYNCS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-fsync")


def _fsync_side_by_side(files: list[Path], directory: Path) -> None:
    """fsync ``files`` and ``directory`` at the same time; raises the first OSError (after
    every fsync has ended, so none is left running)."""
    futures = [_SYNCS.submit(fsync_file, path) for path in files[1:]]
    futures.append(_SYNCS.submit(_fsync_dir_strict, directory))
    errors: list[BaseException] = []
    try:
        fsync_file(files[0])
    except OSError as exc:
        errors.append(exc)
    for future in futures:
        failed = future.exception()
        if failed is not None:
            errors.append(failed)
    if errors:
        raise errors[0]


def _fsync_dir_strict(directory: Path) -> None:
    """fsync a directory; OSError where it cannot be opened is ignored as in
    :func:`client.atomicfile.fsync_dir` (Windows), an fsync failure is raised."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
