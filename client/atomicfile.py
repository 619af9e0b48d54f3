"""Crash-safe file writes: a reader sees the old file or the new one, never a torn mix.

Contract:

* :func:`write_atomic` writes to a temporary file in the target's directory, then
  ``os.replace``s it over the target (atomic on POSIX and Windows). With
  ``durable=True`` (the default) it fsyncs the file before the rename and best-effort
  fsyncs the directory after, so the new file also survives a power cut; with
  ``durable=False`` it does neither: the file survives a ``kill -9`` of any process (the
  OS holds the data) but maybe not a power cut -- for files that can be recomputed or
  fetched again, whose readers check them. ``fresh=True`` deletes the old file before
  the rename, so the rename never replaces a file (which costs ext4 a flush of the new
  data, ``auto_da_alloc``): a crash between the two leaves no file at all, so only for
  files whose absence is safe (fetched again).
* :func:`move_into` moves a file to a target path the same way, copying when the source
  is on another filesystem; with ``durable=True`` (the default) the moved data is fsynced
  before it appears under the target name (so a file written with ``durable=False`` is
  made durable by the move that hands it over) and the target directory after.
* :func:`leftover_temp_target` recognises a temporary file an earlier run left mid-write.
* :func:`write_all` writes bytes to an open file descriptor, to their end.
* :func:`file_identity` is a file's :class:`FileIdentity` (size, modification time,
  inode): a file replaced by :func:`write_atomic` or :func:`move_into` gets a new
  identity, so an unchanged identity means the same bytes as when it was taken.
* They raise :class:`OSError` when the disk refuses and never leave a temporary file
  behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "FileIdentity",
    "file_identity",
    "leftover_temp_target",
    "move_into",
    "write_all",
    "write_atomic",
]


@dataclass(frozen=True)
class FileIdentity:
    """Which file a path named when it was looked at (see :func:`file_identity`)."""

    size: int
    mtime_ns: int
    inode: int


def file_identity(path: Path | int) -> FileIdentity:
    """The identity of the file at ``path`` (or open as file descriptor ``path``) now;
    raises ``OSError`` (e.g. missing)."""
    st = os.stat(path)
    return FileIdentity(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened on Windows.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk (raises OSError)."""
    # Read-write: Windows cannot flush a file opened read-only.
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path,
    data: bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview],
    *,
    mode: int = 0o600,
    durable: bool = True,
    fresh: bool = False,
) -> None:
    """Replace ``path`` with ``data`` (or a list of pieces, written in order) atomically;
    creates the parent directory if needed.

    The file gets ``mode`` (default 0600: private, as mkstemp creates it) before it
    appears under its name, so it is never readable by others even for a moment.
    ``durable``: fsync the file and the directory (module docstring). ``fresh``: the old
    file is deleted first (module docstring).
    """
    fd, tmp = _open_temp(path)
    try:
        try:
            pieces = [data] if isinstance(data, bytes | bytearray | memoryview) else data
            for piece in pieces:
                write_all(fd, piece)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if mode != 0o600:
            os.chmod(tmp, mode)
        if fresh:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


#: Flags of a new private temporary file (as :func:`tempfile.mkstemp` opens one).
_TEMP_FLAGS: Final = (
    os.O_RDWR
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_BINARY", 0)
    | getattr(os, "O_NOINHERIT", 0)
)
_temp_numbers = itertools.count()


def _temp_name(target: str, pid: int, number: int) -> str:
    """THE name of a temporary file for ``target`` (:data:`_TEMP_NAME` reads it back)."""
    return f".{target}.{pid}-{number}.tmp"


_TEMP_NAME: Final = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)-\d+\.tmp")


def leftover_temp_target(name: str) -> str | None:
    """The name of the file a temporary file named ``name`` was written for, when it is one
    of :func:`write_atomic`'s that another process left (a crashed earlier run: this
    process's own are never taken for one); else None."""
    match = _TEMP_NAME.fullmatch(name)
    if match is None or int(match["pid"]) == os.getpid():
        return None
    return match["target"]


def _open_temp(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (``.<name>.<pid>-<n>.tmp``: named as crash
    leftovers are recognised), created private and open for writing; creates the
    directory when missing. Cheaper than :func:`tempfile.mkstemp` (no random names:
    this process's id and a counter are unique, a leftover of the same name is skipped)."""
    for _ in range(10_000):
        tmp = os.path.join(path.parent, _temp_name(path.name, os.getpid(), next(_temp_numbers)))
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o600), tmp
        except FileExistsError:
            continue
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(tmp, _TEMP_FLAGS, 0o600), tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to an open file descriptor with plain system calls, to its end (no
    buffered file object: its fstat, ioctl and lseek cost more than a small file's write);
    raises :class:`OSError` as ``os.write`` does."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _replace_making_parent(source: Path, target: Path) -> None:
    """``os.replace(source, target)``, making ``target``'s directory when it is missing
    (looked at only then: the usual move costs no ``mkdir``)."""
    try:
        os.replace(source, target)
    except FileNotFoundError:
        if not os.path.lexists(source):
            raise
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


def move_into(source: Path, target: Path, *, durable: bool = True) -> None:
    """Move ``source`` to ``target`` atomically (copy + replace across filesystems);
    makes ``target``'s directory when it is missing.

    The source is removed only once the target is complete. ``durable``: the data is
    fsynced before it appears as ``target``, and the directory after (module docstring).
    """
    if durable:
        fsync_file(source)
    try:
        _replace_making_parent(source, target)
    except OSError:
        if not source.is_file():
            raise
        # Most likely another filesystem (EXDEV): copy to a temp beside the target first.
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                if durable:
                    os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        source.unlink()
    if durable:
        fsync_dir(target.parent)
