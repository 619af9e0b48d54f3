"""The training process's owner: :class:`TrainingWorker` (parent side, torch-free).

Training runs in ONE child process (:mod:`client.worker_child`) started with the
``spawn`` start method (safe with ``multiprocessing.freeze_support`` and on every OS), so
the session process never imports torch and a crash or a ``kill -9`` of training cannot
take the session down. Parent and child talk only in the typed values of
:mod:`client.worker_messages` (commands one way, events and log records the other).

Contract:

* ``submit(job)`` hands a :class:`client.worker_messages.TrainJob` to the child, starting
  it when it is not running; it raises :class:`client.errors.FedtrayError` ``busy`` while
  a job runs and ``internal_error`` after :meth:`TrainingWorker.shutdown`.
* ``submit_eval(job)`` hands a :class:`client.worker_messages.EvalJob` (federated
  evaluation) to the child the same way, with the same ``busy`` rule (one job at a time,
  training or evaluation); it is answered by exactly one of :class:`EvalDone` or
  :class:`EvalFailed` (a dead child gives ``EvalFailed("training_failed", ...)``).
* ``pause()``, ``resume()`` and ``cancel()`` reach the child at its next batch boundary;
  they do nothing when no job runs.
* Events (:data:`client.worker_messages.WorkerEvent`) go to ``on_event`` from ONE reader
  thread owned by the worker, in order, as the child sent them: :class:`ProgressEvent`
  (throttled in the child -- the only throttle -- to the first once the job has run for
  ``progress_interval``, default 0.5 s, then at most one per ``progress_interval``, plus
  the last one of the round; a shorter job sends none and its :class:`Done` carries its
  last progress), :class:`Paused`
  (after the checkpoint is written), :class:`Resumed`, and exactly one of :class:`Done`,
  :class:`Failed`, :class:`Cancelled` per job. ``is_busy`` is already ``False`` when that
  final event is delivered, so the callback may submit the next job. An exception raised
  by ``on_event`` is logged and ignored. The child's :class:`LogRecord` values are logged
  here under the same logger name (so the trainer's ``resuming round ...`` reaches the
  session's log); they are not events.
* A job that raises gives ``Failed(code, message)`` (a :class:`FedtrayError` keeps its
  code, anything else is ``training_failed``); a child that dies (e.g. ``kill -9``) gives
  ``Failed("training_failed", "the training process exited unexpectedly (signal 9)")``.
  Either way the worker stays usable: the next ``submit`` starts a fresh child.
* ``warm()`` starts the child ahead of the first job (when none runs) and has it import
  the trainer and torch while idle, at its low priority; it never raises (a child that
  cannot start is reported by the next ``submit``). The child stays alive between jobs,
  keeping the trainer and its built model, and is told to exit after ``idle_timeout``
  seconds (:data:`DEFAULT_IDLE_TIMEOUT`) without a job since the last job or warm-up
  (the parent keeps that clock, so an exit never races a submit).
* ``set_budget(budget)`` (anything with ``cores`` and ``cpu_percent``, e.g. the
  session's budget; ``ValueError`` unless ``cores >= 1`` and ``1 <= cpu_percent <= 100``)
  is remembered and sent to the child at once when one runs, and to every child started
  later before its first job or warm-up (a restart after a crash or an idle release keeps
  it). The child keeps it from its next batch boundary on (:mod:`client.worker_child`):
  ``cores`` torch threads and at most ``cores * cpu_percent / 100`` CPU-seconds per
  wall-second, so "1 core at 50 %" uses at most half of one core on average. Without a
  budget a job runs as before (its ``torch_threads`` or all cores but one, no sleeping).
* ``shutdown(timeout)`` first pauses a running job (so its checkpoint is written and a
  later run of the same work resumes from it), then stops the child, killing it if it
  does not exit in time. A child without a job (idle, or still warming up: importing
  torch can take seconds on a busy machine, and it reads no command meanwhile) has
  nothing to save: it gets :data:`NO_JOB_EXIT_GRACE_S`, not the whole ``timeout``, so
  quitting right after start is quick. No events are delivered after ``shutdown`` returns.
* Its child runs at the training priority from the moment it exists: right after the
  spawn the parent lowers it (:func:`client.worker_child.lower_priority`; the child
  checks again), so the child's imports never compete with the session at full priority.
* :func:`start_early` (:mod:`client.worker_early`) starts THE training process before
  any worker exists; the next :class:`TrainingWorker` built with the same
  ``simulation`` and ``progress_interval`` adopts it at construction (its idle clock and
  ``shutdown`` then apply to it as to any child); a worker built with other settings
  stops it and starts its own when needed.
* Simulation (``simulation=True``, or automatically when torch is not installed): the
  child trains with :class:`client.simulation.SimulatedTrainer` instead of
  :class:`client.trainer.LocalTrainer`, with the same events (``Paused(False)``: there is
  nothing to checkpoint) and never imports torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Protocol

import psutil

from client.errors import FedtrayError
from client.worker_child import ProgressThrottle, child_main, low_priority_nice, lower_priority
from client.worker_early import start_early, take_early
from client.worker_messages import (
    Cancel,
    Cancelled,
    Done,
    EvalDone,
    EvalFailed,
    EvalJob,
    Evaluate,
    Exit,
    Failed,
    LogRecord,
    Pause,
    Paused,
    ProgressEvent,
    Resume,
    Resumed,
    SetBudget,
    Submit,
    TrainJob,
    Warm,
    WorkerEvent,
)

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_PROGRESS_INTERVAL",
    "NO_JOB_EXIT_GRACE_S",
    "BudgetLike",
    "Cancelled",
    "Done",
    "Failed",
    "Paused",
    "ProgressEvent",
    "ProgressThrottle",
    "Resumed",
    "SetBudget",
    "TrainingWorker",
    "WorkerEvent",
    "spawn_child",
    "start_early",
    "stop_child",
    "torch_available",
]

log = logging.getLogger(__name__)

#: Seconds without a job after which the warm training process is released.
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_PROGRESS_INTERVAL = 0.5
#: Seconds a child without a job is given to exit on shutdown before it is killed.
NO_JOB_EXIT_GRACE_S = 1.0
_POLL_SECONDS = 0.2


def torch_available() -> bool:
    """Whether torch is installed (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


class BudgetLike(Protocol):
    """A CPU budget as the session holds it: ``cores`` at ``cpu_percent``."""

    @property
    def cores(self) -> int: ...

    @property
    def cpu_percent(self) -> int: ...


class TrainingWorker:
    """Owns the training child process; thread-safe. See the module docstring."""

    def __init__(
        self,
        on_event: Callable[[WorkerEvent], None],
        *,
        simulation: bool | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
    ) -> None:
        self._on_event = on_event
        self._simulation = (not torch_available()) if simulation is None else simulation
        self._idle_timeout = idle_timeout
        self._progress_interval = progress_interval
        self._cond = threading.Condition()
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._job: TrainJob | EvalJob | None = None
        self._paused = False
        self._closed = False
        self._idle_since = time.monotonic()
        self._paused_seen = threading.Event()
        self._reader: threading.Thread | None = None
        self._budget: SetBudget | None = None
        early = take_early(self._simulation, progress_interval)
        if early is not None:
            self._proc, self._conn = early
            log.info("training process %s (started early) adopted", early[0].pid)
            self._ensure_reader()

    # -- properties --

    @property
    def simulation(self) -> bool:
        """True when jobs are simulated instead of trained."""
        return self._simulation

    @property
    def is_busy(self) -> bool:
        """True from ``submit`` until the job's Done/Failed/Cancelled event."""
        with self._cond:
            return self._job is not None

    @property
    def is_paused(self) -> bool:
        """True between a Paused and the next Resumed (or the end of the job)."""
        with self._cond:
            return self._paused

    @property
    def budget(self) -> SetBudget | None:
        """The CPU budget given last (None: none given; jobs run unbudgeted)."""
        with self._cond:
            return self._budget

    @property
    def pid(self) -> int | None:
        """The child's process id, or None when no child is running."""
        with self._cond:
            return self._proc.pid if self._proc is not None else None

    # -- commands --

    def submit(self, job: TrainJob) -> None:
        """Start ``job``; raises ``FedtrayError('busy')`` if a job is running."""
        with self._cond:
            self._hand_over(job, Submit(job))

    def submit_eval(self, job: EvalJob) -> None:
        """Start the evaluation ``job``; raises ``FedtrayError('busy')`` if a job is running."""
        with self._cond:
            self._hand_over(job, Evaluate(job))

    def _hand_over(self, job: TrainJob | EvalJob, command: Submit | Evaluate) -> None:
        """Send ``command`` for ``job`` to the child (under the lock)."""
        if self._closed:
            raise FedtrayError("internal_error", "the training worker was shut down")
        if self._job is not None:
            raise FedtrayError("busy", f"already {_label(self._job)}")
        self._ensure_child()
        assert self._conn is not None
        self._job = job
        self._paused = False
        self._paused_seen.clear()
        try:
            self._conn.send(command)
        except Exception as exc:  # a dead pipe, or a job that cannot be pickled
            self._job = None
            raise FedtrayError(
                "training_failed", f"cannot hand the job to the training process: {exc}"
            ) from exc
        self._ensure_reader()
        self._cond.notify_all()

    def warm(self) -> None:
        """Start the child and let it import torch now, while idle (module docstring)."""
        with self._cond:
            if self._closed or self._job is not None:
                return
            try:
                self._ensure_child()
                assert self._conn is not None
                self._conn.send(Warm())
            except Exception:
                log.warning("could not start the training process ahead of time", exc_info=True)
                return
            self._idle_since = time.monotonic()
            self._ensure_reader()
            self._cond.notify_all()

    def pause(self) -> None:
        """Ask the running job to checkpoint and wait (no effect when no job runs)."""
        self._control(Pause())

    def resume(self) -> None:
        """Let a paused job go on (no effect when no job runs)."""
        self._control(Resume())

    def cancel(self) -> None:
        """Stop the running job, deleting its checkpoint (no effect when no job runs)."""
        self._control(Cancel())

    def set_budget(self, budget: BudgetLike) -> None:
        """Keep ``budget`` from the child's next batch boundary on (module docstring)."""
        wanted = SetBudget(budget.cores, budget.cpu_percent)
        with self._cond:
            if self._closed or wanted == self._budget:
                return
            self._budget = wanted
            if self._conn is None:
                return  # the next child gets it when it starts
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(wanted)  # else the reader thread reports the dead child

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the child within about ``timeout`` seconds; see the module docstring."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                return
            has_job = self._job is not None
            running = has_job and not self._paused
        if running and self._control(Pause()):
            self._paused_seen.wait(timeout / 2)
        with self._cond:
            self._closed = True
            proc, conn = self._proc, self._conn
            self._cond.notify_all()
        if proc is not None and conn is not None:
            left = deadline - time.monotonic()
            _stop_process(proc, conn, max(0.5, left if has_job else min(left, NO_JOB_EXIT_GRACE_S)))
        with self._cond:
            self._discard_child()
            self._job = None
            self._cond.notify_all()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(max(0.5, deadline - time.monotonic()))

    # -- internals --

    def _control(self, command: Pause | Resume | Cancel) -> bool:
        with self._cond:
            if self._job is None or self._conn is None or self._closed:
                return False
            try:
                self._conn.send(command)
            except (OSError, ValueError):
                return False  # the reader thread reports the dead child
            return True

    def _ensure_child(self) -> None:
        """A running child (under the lock): the one there is, or a new one."""
        if self._proc is None or not self._proc.is_alive():
            self._discard_child()
            self._start_child()

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = threading.Thread(
                target=self._read_loop, name="fedtray-worker-reader", daemon=True
            )
            self._reader.start()

    def _start_child(self) -> None:
        proc, parent_conn = spawn_child(self._simulation, self._progress_interval)
        if self._budget is not None:
            parent_conn.send(self._budget)  # before any job or warm-up
        self._proc, self._conn = proc, parent_conn
        log.info("started training process %s", proc.pid)

    def _discard_child(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(0)
            if not self._proc.is_alive():
                self._proc.close()
        self._proc, self._conn = None, None

    def _emit(self, event: WorkerEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("the training event handler raised")

    def _read_loop(self) -> None:
        while True:
            with self._cond:
                while self._proc is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                proc, conn = self._proc, self._conn
            assert proc is not None and conn is not None
            try:
                ready = wait([conn, proc.sentinel], timeout=_POLL_SECONDS)
            except (OSError, ValueError):
                # shutdown or an idle stop closed this child meanwhile; look again.
                time.sleep(0.01)
                continue
            if conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError, ValueError):
                    self._child_died(proc)
                    continue
                self._handle(message)
            elif ready:
                self._child_died(proc)
            else:
                self._maybe_idle_stop(proc, conn)

    def _handle(self, message: object) -> None:
        if isinstance(message, LogRecord):
            logging.getLogger(message.name).log(message.level, "%s", message.text)
            return
        if not isinstance(
            message,
            ProgressEvent | Paused | Resumed | Done | Failed | Cancelled | EvalDone | EvalFailed,
        ):
            log.warning("ignoring an unknown message from the training process: %r", message)
            return
        with self._cond:
            if self._closed:
                return
            if isinstance(message, Paused):
                self._paused = True
                self._paused_seen.set()
            elif isinstance(message, Resumed):
                self._paused = False
            elif isinstance(message, Done | Failed | Cancelled | EvalDone | EvalFailed):
                self._job = None
                self._paused = False
                self._idle_since = time.monotonic()
        self._emit(message)

    def _child_died(self, proc: BaseProcess) -> None:
        try:
            proc.join(1.0)
            code = proc.exitcode
        except ValueError:  # closed by shutdown meanwhile
            return
        with self._cond:
            if self._proc is not proc or self._closed:
                return
            job = self._job
            self._job = None
            self._paused = False
            self._idle_since = time.monotonic()
            self._discard_child()
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        log.warning("training process exited unexpectedly (%s)", how)
        if isinstance(job, EvalJob):
            self._emit(
                EvalFailed(
                    job.eval_id,
                    "training_failed",
                    f"the training process exited unexpectedly ({how})",
                )
            )
        elif job is not None:
            self._emit(
                Failed(
                    "training_failed",
                    f"the training process exited unexpectedly ({how})",
                    job.round_id,
                )
            )

    def _maybe_idle_stop(self, proc: BaseProcess, conn: Connection) -> None:
        with self._cond:
            idle = self._job is None and time.monotonic() - self._idle_since >= self._idle_timeout
            if not idle or self._proc is not proc:
                return
            # Forget the child under the lock: a submit from now on starts a new one.
            self._proc, self._conn = None, None
        log.info("training process idle for %.0f s; stopping it", self._idle_timeout)
        _stop_process(proc, conn, 5.0)
        conn.close()
        proc.close()


def _label(job: TrainJob | EvalJob) -> str:
    """What the worker is busy with, in words."""
    if isinstance(job, EvalJob):
        return f"evaluating version {job.version}"
    return f"training round {job.round_id}"


def _stop_process(proc: BaseProcess, conn: Connection, timeout: float) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send(Exit())
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(2.0)


def stop_child(proc: BaseProcess, conn: Connection) -> None:
    """Stop a child that has no job (as :meth:`TrainingWorker.shutdown` does) and close it."""
    _stop_process(proc, conn, NO_JOB_EXIT_GRACE_S)
    conn.close()
    proc.close()


def spawn_child(simulation: bool, progress_interval: float) -> tuple[BaseProcess, Connection]:
    """A new training process running :func:`child_main` (this module's: tests may replace
    it), already at the training priority, and the parent's end of its pipe."""
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=child_main,
        args=(child_conn, simulation, progress_interval),
        name="fedtray-training",
        daemon=True,
    )
    proc.start()
    # Close our copy of the child's end, so its death shows as EOF here.
    child_conn.close()
    assert proc.pid is not None
    try:
        own = psutil.Process().nice() if sys.platform != "win32" else 0
        lower_priority(proc.pid, low_priority_nice(own))
    except (OSError, psutil.Error):  # the child lowers it itself
        log.debug("could not lower the training process priority from here", exc_info=True)
    return proc, parent_conn
