"""Crash-safe file writes: a reader sees the old file or the new one, never a torn mix.

Contract: :func:`write_atomic` writes to a temporary file in the target's directory,
fsyncs it, then ``os.replace``s it over the target (atomic on POSIX and Windows) and
best-effort fsyncs the directory. :func:`move_into` moves a file into a directory the
same way, copying when the source is on another filesystem. Both raise :class:`OSError`
when the disk refuses and never leave a temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened on Windows.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes | bytearray | memoryview, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically; creates the parent directory if needed.

    The file gets ``mode`` (default 0600: private, as mkstemp creates it) before it
    appears under its name, so it is never readable by others even for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode != 0o600:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def move_into(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` atomically (copy + fsync + replace across filesystems).

    The source is removed only once the target is complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except OSError:
        if not source.is_file():
            raise
        # Most likely another filesystem (EXDEV): copy to a temp beside the target first.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        source.unlink()
    fsync_dir(target.parent)
