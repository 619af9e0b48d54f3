"""Trained updates waiting to be accepted by the server, kept on disk until acknowledged.

Contract:

* :meth:`PendingStore.add` takes a finished job's output from the work directory's
  owner (:meth:`client.workfiles.JobFiles.handing_over_output`: this module never moves
  or deletes a work file itself) into the pending directory FIRST and then its
  JSON sidecar (round id, task, base version, sample count, metrics, size, SHA-256,
  format), both atomically and durably: the sidecar is written to a temporary file and
  fsynced while the output is fsynced, the output renamed in, then the sidecar, then the
  pending directory fsynced once for both renames. So once ``add`` returns the entry
  survives a ``kill -9`` and a power cut; a crash during it leaves at most leftovers
  that :meth:`PendingStore.entries` removes (never a sidecar naming unsynced bytes).
  An entry exists only once its sidecar exists.
* ``add(..., durable=False)`` renames the output and the sidecar in the same order
  without waiting for any fsync, and returns at once; the fsyncs (the data, the sidecar,
  the directory) run on the store's one sync thread meanwhile, so the update can be sent
  while they run. Until they are done the entry survives a ``kill -9`` (the OS holds the
  bytes) but not a power cut: after one, the entry may name bytes never written, which
  its recorded SHA-256 catches when it is read or sent (it is then discarded: the update
  is lost, as it is today when the power goes before ``add`` returns).
* THE durability promise, :meth:`PendingStore.wait_durable`: it returns only once the
  entry's data, its sidecar and the directory are fsynced by this process (at once for an
  entry this process made durable already; an entry it did not make, such as one left by
  an earlier run, is fsynced again, which costs nothing for bytes already on disk); it
  raises ``OSError`` when the disk refuses (the entry stays, to be tried again). The
  uploader awaits it before an update's last byte and before its ``weights:submit``, so
  the server never counts an update that a power cut could still take from this device.
  The size
  and SHA-256 are the ones the trainer computed while writing the output, when given
  (the file is then not read again here), else they are computed from the file;
  :meth:`PendingStore.read` checks them before anything is sent (an update over one
  chunk is checked as it is sent instead, by :func:`client.transfer.send_file_blob`,
  which holds back its last byte until the whole file matched). On a disk error
  it raises :class:`OSError`, and the update is left where it was (the owner moves it
  back when the sidecar could not be written).
* :meth:`PendingStore.entries` lists complete entries, oldest first. Leftovers of a
  crash (a data file without sidecar, a sidecar without data, temp files) are removed
  with a log line; a sidecar that does not validate is renamed ``*.corrupt`` (kept for
  inspection, never submitted) with a log line.
* :meth:`PendingStore.get` is the complete entry of one round (its sidecar validates and
  its data file exists), looking at that round's two files only, or ``None``.
* :meth:`PendingStore.read` returns the bytes only when they still match the recorded
  size and SHA-256 (else :class:`client.errors.FedtrayError` ``checksum_mismatch`` /
  ``size_mismatch``); bytes this process kept are trusted by their file's identity
  (``PendingUpdate.identity``, unchanged before and after the read) instead of hashed
  again, as the uploader trusts a streamed one.
* :attr:`PendingStore.generation` and :meth:`PendingStore.sole_entry_after` let the
  uploader find the one entry added since it saw the store empty without listing the
  directory.
* :meth:`PendingStore.remove` deletes an entry (idempotent). Only the session calls it,
  after the server acknowledged the update (accepted, ``duplicate`` or ``round_closed``).
* File names are derived from a hash of the round id, so any round id is a safe name.

Owned by the session's event loop (its methods run in worker threads, one at a time per
entry); the record of which entries are durable is behind a lock, so
:meth:`PendingStore.wait_durable` may run beside :meth:`PendingStore.add`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from client.atomicfile import FileIdentity, file_identity, fsync_dir, fsync_file, write_atomic
from client.config import data_dir
from client.errors import FedtrayError
from client.protocol import Identifier, Metrics, NonNegInt, PosInt, Sha256Hex, WeightFormat
from client.workfiles import JobFiles

log = logging.getLogger(__name__)

SIDECAR_SUFFIX: Final = ".json"
DATA_SUFFIX: Final = ".update"
CORRUPT_SUFFIX: Final = ".corrupt"


def default_pending_dir() -> Path:
    """``<user data dir>/pending`` (honours ``XDG_DATA_HOME``; computed per call)."""
    return data_dir() / "pending"


class _Sidecar(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    round_id: Identifier
    task: Identifier
    base_version: NonNegInt
    num_samples: PosInt
    metrics: Metrics = Field(default_factory=dict)
    size: NonNegInt
    sha256: Sha256Hex
    format: WeightFormat
    created: float


@dataclass(frozen=True)
class PendingUpdate:
    """One update on disk, ready to send."""

    round_id: str
    task: str
    base_version: int
    num_samples: int
    metrics: dict[str, float]
    size: int
    sha256: str
    format: WeightFormat
    created: float
    path: Path
    sidecar: Path
    #: The data file's identity when this process kept it (its SHA-256 known to hold: the
    #: trainer hashed the bytes as it wrote them); None for an entry found on disk.
    identity: FileIdentity | None = field(default=None, compare=False)


def _stem(round_id: str) -> str:
    return hashlib.sha256(round_id.encode("utf-8")).hexdigest()[:32]


def _stage(target: Path, data: bytes) -> Path:
    """``data`` in a fresh temporary file beside ``target`` (named as crash leftovers are
    recognised), fsynced; raises OSError (nothing left behind)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _unlink(Path(tmp))
        raise
    return Path(tmp)


#: The one thread that stages sidecars beside the output's fsync and makes entries added
#: with ``durable=False`` durable, kept for the process (its thread starts on first use),
#: so keeping an update does not start a thread.
_SIDECAR_POOL: Final = concurrent.futures.ThreadPoolExecutor(1, "pending-sidecar")


def _make_durable(data_path: Path, sidecar_path: Path) -> None:
    """The entry's data and sidecar fsynced, then their directory (both renames)."""
    fsync_file(data_path)
    fsync_file(sidecar_path)
    fsync_dir(data_path.parent)


def _file_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(1024 * 1024):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


class PendingStore:
    """The pending-updates directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else default_pending_dir()
        self._lock = threading.Lock()
        #: Data files this process made durable, and those being made durable.
        self._durable: set[Path] = set()
        self._syncing: dict[Path, concurrent.futures.Future[None]] = {}
        #: The identity of each data file this process kept (see PendingUpdate.identity).
        self._identities: dict[Path, FileIdentity] = {}
        #: How many entries this process added, and the last one (see sole_entry_after).
        self._generation = 0
        self._last_added: PendingUpdate | None = None
        self._last_paths: tuple[str, tuple[Path, Path]] | None = None

    def _paths(self, round_id: str) -> tuple[Path, Path]:
        # The last round's are kept: a round's entry is looked for, added, read and
        # removed by the same names (a pure function of the round id).
        last = self._last_paths
        if last is not None and last[0] == round_id:
            return last[1]
        stem = _stem(round_id)
        paths = self.directory / f"{stem}{DATA_SUFFIX}", self.directory / f"{stem}{SIDECAR_SUFFIX}"
        self._last_paths = (round_id, paths)
        return paths

    def add(
        self,
        source: JobFiles,
        *,
        round_id: str,
        task: str,
        base_version: int,
        num_samples: int,
        metrics: dict[str, float],
        fmt: WeightFormat,
        created: float,
        digest: tuple[int, str] | None = None,
        durable: bool = True,
    ) -> PendingUpdate:
        """Take ``source``'s output into the store and record its sidecar; raise OSError
        on disk errors (the output is then back in the work directory).

        ``digest``: the output's (size, SHA-256) as computed while writing it; ``None``
        hashes the file. An earlier entry for the same round is replaced (a round is
        trained once per base). ``durable=False``: return before the fsyncs, which run
        meanwhile (module docstring; :meth:`wait_durable`).
        """
        data_path, sidecar_path = self._paths(round_id)
        size, sha = digest if digest is not None else _file_sha256(source.output)
        sidecar = _Sidecar(
            round_id=round_id,
            task=task,
            base_version=base_version,
            num_samples=num_samples,
            metrics=dict(metrics),
            size=size,
            sha256=sha,
            format=fmt,
            created=created,
        )
        if not durable:
            # Both writes make the directory when it is missing (no mkdir per add).
            return self._add_now(source, sidecar, data_path, sidecar_path)
        self.directory.mkdir(parents=True, exist_ok=True)
        # The sidecar's bytes are fsynced while the output's are; one directory fsync for
        # both renames (module docstring).
        staged = _SIDECAR_POOL.submit(
            _stage, sidecar_path, sidecar.model_dump_json().encode("utf-8")
        )
        try:
            sidecar_staged = staged.result()
            # The lock first: whoever lists the directory never sees the output without
            # its sidecar (it would remove it as a leftover).
            with self._lock, source.handing_over_output(data_path, sync_dir=False):
                os.replace(sidecar_staged, sidecar_path)
                fsync_dir(self.directory)
                self._identities[data_path] = file_identity(data_path)
                self._durable.add(data_path)
                return self._added(sidecar, data_path, sidecar_path)
        except BaseException:
            with contextlib.suppress(Exception):
                _unlink(staged.result())  # not installed (gone if it was)
            raise

    def _added(self, sidecar: _Sidecar, data_path: Path, sidecar_path: Path) -> PendingUpdate:
        """The entry just installed, counted as added (the lock held: whoever lists the
        directory and then reads :attr:`generation` sees both or neither)."""
        entry = self._new_entry(sidecar, data_path, sidecar_path, self._identities.get(data_path))
        self._generation += 1
        self._last_added = entry
        return entry

    @property
    def generation(self) -> int:
        """How many entries this process has added (read it before listing: see
        :meth:`sole_entry_after`)."""
        with self._lock:
            return self._generation

    def sole_entry_after(self, generation: int) -> PendingUpdate | None:
        """The entry added since the store held nothing at ``generation`` (a
        :attr:`generation` read when the store was known empty), when exactly one was
        added since; else ``None`` (then list with :meth:`entries`). Exact because this
        process is the store's only writer: entries are removed only by
        :meth:`remove`, which its caller knows of."""
        with self._lock:
            if self._generation != generation + 1:
                return None
            return self._last_added

    def syncing(self, update: PendingUpdate) -> concurrent.futures.Future[None] | None:
        """The fsyncs of ``update`` under way on the sync thread (``add(durable=False)``),
        or ``None`` when there are none (then :meth:`wait_durable` decides). Awaiting it
        spares a thread blocked on it; :meth:`wait_durable` still records the outcome."""
        with self._lock:
            return self._syncing.get(update.path)

    def _add_now(
        self, source: JobFiles, sidecar: _Sidecar, data_path: Path, sidecar_path: Path
    ) -> PendingUpdate:
        """``add(durable=False)``: both renames now, their fsyncs on the sync thread."""
        # The lock first: whoever lists the directory never sees the output without its
        # sidecar (it would remove it as a leftover), and finds its fsyncs under way.
        with self._lock, source.handing_over_output(data_path, durable=False):
            write_atomic(sidecar_path, sidecar.model_dump_json().encode("utf-8"), durable=False)
            self._durable.discard(data_path)
            self._syncing[data_path] = _SIDECAR_POOL.submit(_make_durable, data_path, sidecar_path)
            self._identities[data_path] = file_identity(data_path)
            return self._added(sidecar, data_path, sidecar_path)

    def is_durable(self, update: PendingUpdate) -> bool:
        """Whether this process made ``update`` durable (no waiting, no I/O; no lock
        either: one set lookup, which an add holding the lock across its fsyncs must not
        hold up on the event loop)."""
        return update.path in self._durable

    def wait_durable(self, update: PendingUpdate) -> None:
        """Return once ``update`` is durable (module docstring); raises OSError."""
        with self._lock:
            if update.path in self._durable:
                return
            syncing = self._syncing.get(update.path)
        if syncing is not None:
            try:
                syncing.result()
            except OSError as exc:  # reported once, forgotten, and tried again below
                log.warning(
                    "making the update of round %s durable failed: %s", update.round_id, exc
                )
                with self._lock:
                    if self._syncing.get(update.path) is syncing:
                        del self._syncing[update.path]
                syncing = None
            else:
                self._made_durable(update.path, syncing)
                return
        _make_durable(update.path, update.sidecar)
        self._made_durable(update.path, syncing)

    def record_durable(
        self, update: PendingUpdate, syncing: concurrent.futures.Future[None]
    ) -> bool:
        """Record ``update`` durable when ``syncing`` (from :meth:`syncing`) ended well and
        is still its fsyncs (not replaced by a newer add); ``False`` otherwise (then
        :meth:`wait_durable` decides, in a thread). Never blocks, never does I/O."""
        if not syncing.done() or syncing.cancelled() or syncing.exception() is not None:
            return False
        with self._lock:
            if self._syncing.get(update.path) is not syncing:
                return update.path in self._durable
            del self._syncing[update.path]
            self._durable.add(update.path)
            return True

    def _made_durable(self, path: Path, syncing: concurrent.futures.Future[None] | None) -> None:
        with self._lock:
            if self._syncing.get(path) is syncing:  # not replaced by a newer add meanwhile
                self._syncing.pop(path, None)
                self._durable.add(path)

    def entries(self) -> list[PendingUpdate]:
        """Complete entries, oldest first; cleans up crash leftovers (see module docstring)."""
        if not self.directory.is_dir():
            return []
        found: list[PendingUpdate] = []
        # Under the lock: an entry being added (its data in, its sidecar not yet) is not
        # taken for a leftover.
        with self._lock:
            sidecars = {p.name[: -len(SIDECAR_SUFFIX)]: p for p in self.directory.glob("*.json")}
            for path in sorted(self.directory.iterdir()):
                name = path.name
                if name.startswith(".") and name.endswith(".tmp"):
                    log.info("removing an unfinished temporary file %s", path)
                    _unlink(path)
                elif name.endswith(DATA_SUFFIX) and name[: -len(DATA_SUFFIX)] not in sidecars:
                    log.warning("removing update %s: its description was never written", path)
                    _unlink(path)
        for stem, sidecar_path in sorted(sidecars.items()):
            data_path = self.directory / f"{stem}{DATA_SUFFIX}"
            try:
                sidecar = _Sidecar.model_validate_json(sidecar_path.read_bytes())
            except (OSError, ValidationError) as exc:
                log.warning(
                    "pending update %s has an unreadable description (%s); set aside as %s",
                    sidecar_path,
                    str(exc).splitlines()[0],
                    CORRUPT_SUFFIX,
                )
                for p in (sidecar_path, data_path):
                    with contextlib.suppress(OSError):
                        os.replace(p, p.with_name(p.name + CORRUPT_SUFFIX))
                continue
            if not data_path.is_file():
                log.warning(
                    "pending update for round %s lost its data file; forgetting it",
                    sidecar.round_id,
                )
                _unlink(sidecar_path)
                continue
            found.append(self._entry(sidecar, data_path, sidecar_path))
        found.sort(key=lambda u: u.created)
        return found

    def get(self, round_id: str) -> PendingUpdate | None:
        """The complete entry of ``round_id``, if any: its own two files are looked at
        (named from the round id), not the whole directory, and nothing is cleaned up."""
        data_path, sidecar_path = self._paths(round_id)
        try:
            sidecar = _Sidecar.model_validate_json(sidecar_path.read_bytes())
        except (OSError, ValidationError):
            return None  # missing; or unreadable, which entries() sets aside
        if sidecar.round_id != round_id or not data_path.is_file():
            return None
        return self._entry(sidecar, data_path, sidecar_path)

    def read(self, update: PendingUpdate) -> bytes:
        """The update's bytes, verified against its sidecar; raises FedtrayError or OSError.

        Bytes this process kept are not hashed again while their file keeps the identity
        it was kept with (``update.identity``, before and after the read: the trainer
        hashed them as it wrote them); any other file is hashed."""
        with update.path.open("rb") as fh:
            before = file_identity(fh.fileno())
            data = fh.read()
            trusted = update.identity is not None and (
                before == update.identity == file_identity(fh.fileno())
            )
        if len(data) != update.size:
            raise FedtrayError(
                "size_mismatch",
                f"pending update for round {update.round_id} is {len(data)} bytes, "
                f"expected {update.size}",
            )
        if not trusted and hashlib.sha256(data).hexdigest() != update.sha256:
            raise FedtrayError(
                "checksum_mismatch",
                f"pending update for round {update.round_id} changed on disk",
            )
        return data

    def remove(self, update: PendingUpdate) -> None:
        """Delete an entry (data first, then the sidecar); missing files are fine."""
        _unlink(update.path)
        _unlink(update.sidecar)
        with self._lock:
            self._durable.discard(update.path)
            self._syncing.pop(update.path, None)
            self._identities.pop(update.path, None)

    def distrust(self, update: PendingUpdate) -> None:
        """Forget the identity ``update`` was kept with: the receiver found its bytes not
        matching their SHA-256, so the next send hashes the file again (and discards it
        when it no longer matches)."""
        with self._lock:
            self._identities.pop(update.path, None)

    def _entry(self, sidecar: _Sidecar, data_path: Path, sidecar_path: Path) -> PendingUpdate:
        with self._lock:
            identity = self._identities.get(data_path)
        return self._new_entry(sidecar, data_path, sidecar_path, identity)

    @staticmethod
    def _new_entry(
        sidecar: _Sidecar, data_path: Path, sidecar_path: Path, identity: FileIdentity | None
    ) -> PendingUpdate:
        return PendingUpdate(
            round_id=sidecar.round_id,
            task=sidecar.task,
            base_version=sidecar.base_version,
            num_samples=sidecar.num_samples,
            metrics=dict(sidecar.metrics),
            size=sidecar.size,
            sha256=sidecar.sha256,
            format=sidecar.format,
            created=sidecar.created,
            path=data_path,
            sidecar=sidecar_path,
            identity=identity,
        )


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
