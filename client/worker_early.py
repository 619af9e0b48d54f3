"""The training process started before the session exists: :func:`start_early`.

Contract:

* :func:`start_early` starts THE training process of this OS process ahead of any
  :class:`client.worker.TrainingWorker` (the CLI calls it before it imports the session,
  so the child's import of torch overlaps the session's own start-up), through the
  worker's own spawn (:func:`client.worker.spawn_child`: at the training priority from
  the moment it exists), and sends it :class:`client.worker_messages.Warm`. It returns
  the child's pid, or None when an early child is already waiting for a worker or none
  could start; it never raises.
* :func:`take_early` hands the waiting child to the worker being built when its
  ``simulation`` and ``progress_interval`` are the child's (the worker then owns it: its
  idle clock and ``shutdown`` apply), else stops it and returns None; with none waiting
  it returns None. Each early child is handed out at most once.
* A child never taken is a daemon process: it ends with this process.
"""

from __future__ import annotations

import logging
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from client.worker_messages import Warm

__all__ = ["start_early", "take_early"]

log = logging.getLogger(__name__)


class _EarlySlot:
    """The child :func:`start_early` started and its settings, until a worker takes it
    (one writer at a time: the lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: tuple[BaseProcess, Connection, bool, float] | None = None


_EARLY = _EarlySlot()


def start_early(
    *, simulation: bool | None = None, progress_interval: float | None = None
) -> int | None:
    """Start the training process now and have it warm up (module docstring);
    ``simulation`` None: when torch is not installed; ``progress_interval`` None: the
    worker's default."""
    from client import worker  # the seam's spawn (its child_main is the one to start)

    if simulation is None:
        simulation = not worker.torch_available()
    if progress_interval is None:
        progress_interval = worker.DEFAULT_PROGRESS_INTERVAL
    with _EARLY.lock:
        if _EARLY.waiting is not None:
            return None
        try:
            proc, conn = worker.spawn_child(simulation, progress_interval)
            conn.send(Warm())
        except Exception:
            log.warning("could not start the training process early", exc_info=True)
            return None
        _EARLY.waiting = (proc, conn, simulation, progress_interval)
    log.info("started training process %s early", proc.pid)
    return proc.pid


def take_early(simulation: bool, progress_interval: float) -> tuple[BaseProcess, Connection] | None:
    """The waiting early child when it suits a worker with these settings (module
    docstring)."""
    with _EARLY.lock:
        early, _EARLY.waiting = _EARLY.waiting, None
    if early is None:
        return None
    proc, conn, early_simulation, early_interval = early
    if (early_simulation, early_interval) == (simulation, progress_interval) and proc.is_alive():
        return proc, conn
    from client import worker

    log.info("training process %s (started early) does not suit; stopping it", proc.pid)
    worker.stop_child(proc, conn)
    return None
