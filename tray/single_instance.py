"""One tray per user: an exclusive lock on a file in the user's state folder.

Contract:

* :func:`acquire` takes a non-blocking exclusive lock (``fcntl.flock`` on POSIX,
  ``msvcrt.locking`` on Windows) on ``tray.lock`` and writes this process id into it;
  it returns an :class:`InstanceLock` to hold for the life of the process (the OS
  drops the lock when the process dies, even on a crash, so a stale file never
  blocks a new start). When another process holds it, it raises
  :class:`AlreadyRunningError` carrying that process's id, after leaving a *show request*
  for it. Disk problems raise :class:`OSError`.
* The running tray calls :meth:`InstanceLock.take_show_request` now and then; True
  means a second launch asked it to show itself (it then notifies the user).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Final

import platformdirs

__all__ = [
    "LOCK_FILENAME",
    "SHOW_REQUEST_FILENAME",
    "AlreadyRunningError",
    "InstanceLock",
    "acquire",
]

LOCK_FILENAME: Final = "tray.lock"
SHOW_REQUEST_FILENAME: Final = "tray.show-request"


class AlreadyRunningError(Exception):
    """Another fedtray tray holds the lock; ``pid`` is its process id when known."""

    def __init__(self, pid: int | None, lock_path: Path) -> None:
        who = f" (process {pid})" if pid is not None else ""
        super().__init__(
            f"fedtray is already running{who}; look for its icon in the system tray "
            f"(lock file: {lock_path})"
        )
        self.pid = pid
        self.lock_path = lock_path


def default_dir() -> Path:
    """The folder for the lock (``platformdirs.user_state_dir``; honours XDG_STATE_HOME)."""
    return Path(platformdirs.user_state_dir("fedtray", appauthor=False))


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class InstanceLock:
    """The held lock; :meth:`release` (or process exit) lets another tray start."""

    def __init__(self, fd: int, directory: Path) -> None:
        self._fd: int | None = fd
        self.directory = directory

    @property
    def show_request_path(self) -> Path:
        return self.directory / SHOW_REQUEST_FILENAME

    def take_show_request(self) -> bool:
        """True (once) when a second launch asked this tray to show itself."""
        try:
            self.show_request_path.unlink()
        except FileNotFoundError:
            return False
        except OSError:
            return False
        return True

    def release(self) -> None:
        """Drop the lock; a second call does nothing."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases flock/msvcrt locks


def acquire(directory: Path | None = None) -> InstanceLock:
    """Take the per-user tray lock in ``directory`` (default :func:`default_dir`)."""
    folder = directory if directory is not None else default_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        locked = _try_lock(fd)
    except BaseException:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        # Ask the running tray to show itself; if this fails the message still explains.
        with contextlib.suppress(OSError):
            (folder / SHOW_REQUEST_FILENAME).touch()
        raise AlreadyRunningError(_read_pid(path), path)
    # Stale show requests from before this start must not pop a notice now.
    with contextlib.suppress(OSError):
        (folder / SHOW_REQUEST_FILENAME).unlink()
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return InstanceLock(fd, folder)
