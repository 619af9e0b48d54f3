"""Persistence of the open round, so a server crash (even ``kill -9``) loses no update.

Contract: :class:`RoundStore` keeps, in the server's state directory, ``round.json``
(:class:`SavedRound`: round id, number, attempt, base version, wall-clock start and
deadline, required reports, and per selected device its partition index and, once it
reported, its sample count, metrics and update file) and ``round/`` (each accepted
update, as the safetensors document the device sent, byte for byte; never a pickle, never
decoded and re-encoded). ``round.json`` is written atomically
(:func:`client.atomicfile.write_atomic`: temporary file, fsync, replace).

An update arrives as an *incoming* file in ``round/`` (:meth:`RoundStore.incoming_path`:
the verified blob file moved there, or :meth:`RoundStore.write_incoming` for bytes held
in memory), is checked where it lies (:meth:`RoundStore.check_update`: header, layout,
finite values, through a read-only memory map, no copy), renamed to its device's update
file (:meth:`RoundStore.place_update`, not yet durable) and committed by
:class:`server.roundcommit.RoundCommits`: its bytes fsynced, ``round/`` fsynced
(:meth:`RoundStore.sync_round_dir`) and a ``round.json`` naming it written and fsynced
(:meth:`RoundStore.stage`) side by side, then that ``round.json`` installed
(:meth:`RoundStore.install`: renamed, the state directory fsynced). (The one-by-one
path, :meth:`RoundStore.sync` then :meth:`RoundStore.commit_update` with its directory
fsynced then :meth:`RoundStore.save`, does the same serially.) Only then does the server
acknowledge the update; it clears both only after
the round's new global version and history are saved (:class:`server.store.Store` first,
then :meth:`RoundStore.clear`), so at any moment a crash either keeps the update here or
has already folded it into a saved version. A leftover incoming file (a crash before the
ack) is named by no ``round.json`` and removed with the round. :meth:`RoundStore.fold_update`
hands an update's tensors as read-only views over its mapped file to a callable.
:meth:`RoundStore.load` and :meth:`RoundStore.load_update` raise
:class:`server.store.StoreError` with one line when the files are unreadable; deciding
whether a saved round may go on is the server's job.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import mmap
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from client.atomicfile import fsync_dir, write_all, write_atomic
from client.weights import Layout, StateDict, WeightsError, decode, decode_views
from server.store import StoreError

T = TypeVar("T")

ROUND_FILE = "round.json"
ROUND_DIR = "round"
ROUND_FORMAT = 1


class _Saved(BaseModel):
    # camelCase on disk, like history.json and the wire.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SavedSlot(_Saved):
    """One selected device of the open round, as persisted."""

    index: int = Field(ge=0)
    reported: bool = False
    num_samples: int = Field(default=0, ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    update_file: str | None = None


class SavedRound(_Saved):
    """The open round, as persisted in ``round.json``."""

    format: int = ROUND_FORMAT
    task: str
    round_id: str
    number: int = Field(ge=1)
    attempt: int = Field(ge=1)
    base_version: int = Field(ge=0)
    started_unix: float
    deadline_unix: float
    required: int = Field(ge=1)
    slots: dict[str, SavedSlot]


class RoundStore:
    """The open round's files in one server's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    @staticmethod
    def update_file_name(device_id: str) -> str:
        """The file name (in ``round/``) of a device's accepted update."""
        return _update_file_name(device_id)

    def save_update(self, device_id: str, data: bytes) -> str:
        """Persist one accepted update (safetensors bytes); return its file name."""
        name = self.update_file_name(device_id)
        write_atomic(self.state_dir / ROUND_DIR / name, data)
        return name

    def incoming_path(self, device_id: str) -> Path:
        """A fresh path in ``round/`` for an update being checked (the folder exists)."""
        folder = self.state_dir / ROUND_DIR
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass  # the usual case: one system call, no second stat
        except FileNotFoundError:
            folder.mkdir(parents=True, exist_ok=True)
        stem = self.update_file_name(device_id).removesuffix(".safetensors")
        return folder / f"{stem}.{secrets.token_hex(4)}.incoming"

    @staticmethod
    def write_incoming(path: Path, data: bytes | bytearray | memoryview) -> None:
        """Write an update's bytes to its incoming file (fsynced later, by :meth:`sync`)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    @staticmethod
    def check_update(path: Path, layout: Layout, max_bytes: int) -> None:
        """Check an incoming update where it lies (WeightsError as the codec's ``decode``)."""
        with _mapped(path) as data:
            decode_views(data, expected=layout, max_bytes=max_bytes)

    @staticmethod
    def sync(path: Path) -> None:
        """fsync an incoming file's bytes, so its rename can be made durable."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def place_update(self, device_id: str, incoming: Path) -> str:
        """Rename a checked incoming file to the device's update file, NOT yet durable
        (:class:`server.roundcommit.RoundCommits` fsyncs its bytes and ``round/`` before a
        ``round.json`` names it); return its name."""
        name = self.update_file_name(device_id)
        os.replace(incoming, self.state_dir / ROUND_DIR / name)
        return name

    def update_path(self, name: str) -> Path:
        """Where the update file ``name`` lies."""
        return self.state_dir / ROUND_DIR / Path(name).name

    def sync_round_dir(self) -> None:
        """fsync ``round/``, so the renames made in it so far are durable."""
        fsync_dir(self.state_dir / ROUND_DIR)

    @staticmethod
    def round_json(saved: SavedRound) -> bytes:
        """``round.json``'s bytes for ``saved`` (pure: made on the loop, so the thread
        that writes them does only the system calls)."""
        return saved.model_dump_json(indent=1, by_alias=True).encode("utf-8")

    def stage(self, saved: SavedRound | bytes) -> Path:
        """Write ``saved`` (or its :meth:`round_json` bytes) to a fresh temporary file
        beside ``round.json`` and fsync it; :meth:`install` makes it ``round.json``.
        Raises OSError (nothing left behind)."""
        data = saved if isinstance(saved, bytes) else self.round_json(saved)
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f".{ROUND_FILE}.", suffix=".tmp")
        try:
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return Path(tmp)

    def install(self, staged: Path) -> None:
        """Replace ``round.json`` with a file :meth:`stage` wrote; the state directory is
        fsynced after, so the new ``round.json`` is durable when this returns."""
        try:
            os.replace(staged, self.state_dir / ROUND_FILE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise
        fsync_dir(self.state_dir)

    def commit_update(self, device_id: str, incoming: Path) -> str:
        """Rename a checked, fsynced incoming file to the device's update file (directory
        fsynced); return its name."""
        name = self.update_file_name(device_id)
        folder = self.state_dir / ROUND_DIR
        os.replace(incoming, folder / name)
        fsync_dir(folder)
        return name

    def fold_update(self, name: str, layout: Layout, use: Callable[[StateDict], T]) -> T:
        """``use(update)`` with a committed update as read-only views over its mapped file
        (the structure is checked again, the values were at intake); the map is closed
        after, unless ``use`` kept a view."""
        with self.mapped_update(name, layout) as views:
            return use(views)

    @contextlib.contextmanager
    def mapped_update(self, name: str, layout: Layout) -> Iterator[StateDict]:
        """A committed update as read-only views over its mapped file, while open (as
        :meth:`fold_update`; robust strategies hold every update of the round at once)."""
        with _mapped(self.state_dir / ROUND_DIR / Path(name).name) as data:
            views = decode_views(data, expected=layout, finite=False)
            try:
                yield views
            finally:
                del views

    def save(self, saved: SavedRound | bytes) -> None:
        """Persist the open round (atomically replacing the previous ``round.json``);
        ``saved`` may be its :meth:`round_json` bytes."""
        data = saved if isinstance(saved, bytes) else self.round_json(saved)
        write_atomic(self.state_dir / ROUND_FILE, data)

    def load(self) -> SavedRound | None:
        """The open round a previous run left, or None; StoreError when unreadable."""
        path = self.state_dir / ROUND_FILE
        if not path.exists():
            return None
        try:
            saved = SavedRound.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None
        if saved.format != ROUND_FORMAT:
            raise StoreError(f"{path} has format {saved.format}, not {ROUND_FORMAT}")
        return saved

    def load_update(self, name: str, layout: Layout) -> StateDict:
        """One persisted update, checked against the model ``layout``."""
        path = self.state_dir / ROUND_DIR / Path(name).name
        try:
            return decode(path.read_bytes(), "safetensors", expected=layout)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None
        except WeightsError as exc:
            raise StoreError(f"{path} does not fit the model ({exc.code}: {exc.message})") from None

    def clear(self) -> None:
        """Forget the open round: ``round.json`` first, then the updates (idempotent)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.state_dir, ROUND_FILE))
        try:
            entries = os.scandir(os.path.join(self.state_dir, ROUND_DIR))
        except (FileNotFoundError, NotADirectoryError):
            return
        with entries:  # plain strings, no Path per file: this runs twice a round
            for entry in entries:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


@functools.lru_cache(maxsize=4096)
def _update_file_name(device_id: str) -> str:
    """:meth:`RoundStore.update_file_name` (pure; asked several times per update)."""
    return hashlib.sha256(device_id.encode("utf-8")).hexdigest()[:32] + ".safetensors"


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    """A file's bytes as a read-only memory map (an empty file as ``b""``)."""
    with path.open("rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            mapped: bytes | mmap.mmap = b""
        else:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield mapped
    finally:
        if isinstance(mapped, mmap.mmap):
            # A view still alive keeps the map exported; it is then freed with the view.
            with contextlib.suppress(BufferError):
                mapped.close()
