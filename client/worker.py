"""The training process and its owner: :class:`TrainingWorker`.

Training runs in ONE child process started with the ``spawn`` start method (safe with
``multiprocessing.freeze_support`` and on every OS), so the session process never imports
torch and a crash or a ``kill -9`` of training cannot take the session down.

Contract (parent side, :class:`TrainingWorker`, torch-free):

* ``submit(job)`` hands a :class:`client.trainer.TrainJob` to the child, starting it when
  it is not running; it raises :class:`client.errors.FedtrayError` ``busy`` while a job
  runs and ``internal_error`` after :meth:`TrainingWorker.shutdown`.
* ``pause()``, ``resume()`` and ``cancel()`` reach the child at its next batch boundary;
  they do nothing when no job runs.
* Events go to ``on_event`` from ONE reader thread owned by the worker, in order:
  :class:`Progress` (at most one per ``progress_interval``, default 0.5 s, plus the last
  one of the round), :class:`Paused` (after the checkpoint is written), :class:`Resumed`,
  and exactly one of :class:`Done`, :class:`Failed`, :class:`Cancelled` per job.
  ``is_busy`` is already ``False`` when that final event is delivered, so the callback may
  submit the next job. An exception raised by ``on_event`` is logged and ignored.
* A job that raises gives ``Failed(code, message)`` (a :class:`FedtrayError` keeps its
  code, anything else is ``training_failed``); a child that dies (e.g. ``kill -9``) gives
  ``Failed("training_failed", "the training process exited unexpectedly (signal 9)")``.
  Either way the worker stays usable: the next ``submit`` starts a fresh child.
* The child stays alive between jobs and is told to exit after ``idle_timeout`` seconds
  without a job (the parent keeps that clock, so an exit never races a submit).
* ``shutdown(timeout)`` first pauses a running job (so its checkpoint is written and a
  later run of the same round resumes from it), then stops the child, killing it if it
  does not exit in time. No events are delivered after ``shutdown`` returns.
* Simulation (``simulation=True``, or automatically when torch is not installed): the
  child runs :func:`client.simulation.simulate_round` on the base weights instead of
  :class:`client.trainer.LocalTrainer`, with the same events (``Paused(False)``: there is
  nothing to checkpoint) and never imports torch.

Child side (:func:`_child_main`, a module-level function importable without side
effects): it lowers its own OS priority (``nice 10`` on Unix, below-normal priority class
on Windows), sets torch's thread count to ``job.torch_threads`` or all cores but one,
and reads control messages on a thread that sets the flags the trainer checks. Its
``client.*`` log records of level INFO and above (e.g. the trainer's ``resuming round
...``) are sent to the parent and logged there under the same logger name, so they reach
the session's log; they are not events.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import psutil

from client import trainer
from client.atomicfile import write_atomic
from client.errors import ErrorCode, FedtrayError
from client.trainer import Command, TrainJob, TrainResult

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_PROGRESS_INTERVAL",
    "Cancelled",
    "Done",
    "Failed",
    "Paused",
    "Progress",
    "ProgressThrottle",
    "Resumed",
    "TrainingWorker",
    "WorkerEvent",
    "torch_available",
]

log = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_PROGRESS_INTERVAL = 0.5
_POLL_SECONDS = 0.2
_SIMULATED_SAMPLES = 100


# -- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Training progress: a dict with the fields of :class:`client.protocol.TrainingProgress`
    (snake_case keys; ``epoch`` and ``step`` count from 1)."""

    progress: dict[str, Any]


@dataclass(frozen=True)
class Paused:
    """The job is paused; ``checkpointed`` is True when a checkpoint was written first."""

    checkpointed: bool
    round_id: str | None = None


@dataclass(frozen=True)
class Resumed:
    """The paused job runs again."""

    round_id: str | None = None


@dataclass(frozen=True)
class Done:
    """The job finished; the weights are at ``result.output_path``."""

    result: TrainResult


@dataclass(frozen=True)
class Failed:
    """The job failed; ``code`` is an :data:`client.errors.ErrorCode`."""

    code: ErrorCode
    message: str
    round_id: str | None = None


@dataclass(frozen=True)
class Cancelled:
    """The job stopped after :meth:`TrainingWorker.cancel`."""

    round_id: str | None = None


WorkerEvent = Progress | Paused | Resumed | Done | Failed | Cancelled


def torch_available() -> bool:
    """Whether torch is installed (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


# -- parent side ----------------------------------------------------------------------


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
        self._ctx = multiprocessing.get_context("spawn")
        self._cond = threading.Condition()
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._job: TrainJob | None = None
        self._paused = False
        self._closed = False
        self._idle_since = time.monotonic()
        self._paused_seen = threading.Event()
        self._reader: threading.Thread | None = None

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
    def pid(self) -> int | None:
        """The child's process id, or None when no child is running."""
        with self._cond:
            return self._proc.pid if self._proc is not None else None

    # -- commands --

    def submit(self, job: TrainJob) -> None:
        """Start ``job``; raises ``FedtrayError('busy')`` if a job is running."""
        with self._cond:
            if self._closed:
                raise FedtrayError("internal_error", "the training worker was shut down")
            if self._job is not None:
                raise FedtrayError("busy", f"already training round {self._job.round_id}")
            if self._proc is None or not self._proc.is_alive():
                self._discard_child()
                self._start_child()
            assert self._conn is not None
            self._job = job
            self._paused = False
            self._paused_seen.clear()
            try:
                self._conn.send(("job", job))
            except Exception as exc:  # a dead pipe, or a job that cannot be pickled
                self._job = None
                raise FedtrayError(
                    "training_failed", f"cannot hand the job to the training process: {exc}"
                ) from exc
            if self._reader is None:
                self._reader = threading.Thread(
                    target=self._read_loop, name="fedtray-worker-reader", daemon=True
                )
                self._reader.start()
            self._cond.notify_all()

    def pause(self) -> None:
        """Ask the running job to checkpoint and wait (no effect when no job runs)."""
        self._control("pause")

    def resume(self) -> None:
        """Let a paused job go on (no effect when no job runs)."""
        self._control("resume")

    def cancel(self) -> None:
        """Stop the running job, deleting its checkpoint (no effect when no job runs)."""
        self._control("cancel")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the child within about ``timeout`` seconds; see the module docstring."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                return
            running = self._job is not None and not self._paused
        if running and self._control("pause"):
            self._paused_seen.wait(timeout / 2)
        with self._cond:
            self._closed = True
            proc, conn = self._proc, self._conn
            self._cond.notify_all()
        if proc is not None and conn is not None:
            _stop_process(proc, conn, max(0.5, deadline - time.monotonic()))
        with self._cond:
            self._discard_child()
            self._job = None
            self._cond.notify_all()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(max(0.5, deadline - time.monotonic()))

    # -- internals --

    def _control(self, kind: str) -> bool:
        with self._cond:
            if self._job is None or self._conn is None or self._closed:
                return False
            try:
                self._conn.send((kind,))
            except (OSError, ValueError):
                return False  # the reader thread reports the dead child
            return True

    def _start_child(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_child_main,
            args=(child_conn, self._simulation, self._progress_interval),
            name="fedtray-training",
            daemon=True,
        )
        proc.start()
        # Close our copy of the child's end, so its death shows as EOF here.
        child_conn.close()
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

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "log":
            level, name, text = message[1:]
            logging.getLogger(str(name)).log(int(level), "%s", text)
            return
        event: WorkerEvent
        with self._cond:
            if self._closed:
                return
            round_id = self._job.round_id if self._job is not None else None
            if kind == "progress":
                event = Progress(message[1])
            elif kind == "paused":
                self._paused = True
                self._paused_seen.set()
                event = Paused(bool(message[1]), round_id)
            elif kind == "resumed":
                self._paused = False
                event = Resumed(round_id)
            else:
                self._job = None
                self._paused = False
                self._idle_since = time.monotonic()
                if kind == "done":
                    event = Done(message[1])
                elif kind == "failed":
                    event = Failed(message[1], message[2], round_id)
                else:
                    event = Cancelled(round_id)
        self._emit(event)

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
        if job is not None:
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


def _stop_process(proc: BaseProcess, conn: Connection, timeout: float) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send(("shutdown",))
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(2.0)


# -- child side -----------------------------------------------------------------------


class ProgressThrottle:
    """Forwards at most one progress report per ``interval`` seconds; :meth:`flush` sends
    the last one held back. The first report is held until ``interval`` has passed since
    creation, so ``N`` seconds give at most ``2N`` reports plus the flushed last one."""

    def __init__(
        self,
        send: Callable[[dict[str, Any]], None],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._interval = interval
        self._clock = clock
        self._last = clock()
        self._pending: dict[str, Any] | None = None

    def __call__(self, progress: dict[str, Any]) -> None:
        now = self._clock()
        if now - self._last >= self._interval:
            self._last = now
            self._pending = None
            self._send(progress)
        else:
            self._pending = progress

    def flush(self) -> None:
        """Send the report held back, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._send(pending)


class _ChildControl:
    """The trainer's :class:`client.trainer.TrainControl`, fed by the child's reader thread."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None], checkpointing: bool) -> None:
        self._send = send
        self._checkpointing = checkpointing
        self._cond = threading.Condition()
        self._paused = False
        self._cancelled = False

    def reset(self) -> None:
        with self._cond:
            self._paused = self._cancelled = False

    def set(self, kind: str) -> None:
        with self._cond:
            if kind == "pause":
                self._paused = True
            elif kind == "resume":
                self._paused = False
            elif kind == "cancel":
                self._cancelled = True
            self._cond.notify_all()

    def check(self) -> Command:
        with self._cond:
            if self._cancelled:
                return "cancel"
            return "pause" if self._paused else "run"

    def wait_while_paused(self) -> None:
        self._send(("paused", self._checkpointing))
        with self._cond:
            while self._paused and not self._cancelled:
                self._cond.wait()
            cancelled = self._cancelled
        if not cancelled:
            self._send(("resumed",))


def _lower_priority() -> None:
    """Make training yield the CPU to everything the owner runs."""
    try:
        if sys.platform == "win32":
            psutil.Process().nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
        else:
            os.nice(10)
    except (OSError, psutil.Error):
        log.warning("could not lower the training process priority", exc_info=True)


class _PipeLogHandler(logging.Handler):
    """Sends the child's log records to the parent (see the module docstring)."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(logging.INFO)
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        # OSError/ValueError: the parent is gone, nobody to tell.
        with contextlib.suppress(OSError, ValueError):
            self._send(("log", record.levelno, record.name, self.format(record)))


def _child_main(conn: Connection, simulation: bool, progress_interval: float) -> None:
    """Entry point of the training process (spawned; see the module docstring)."""
    _lower_priority()
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    client_log = logging.getLogger("client")
    client_log.addHandler(_PipeLogHandler(send))
    client_log.setLevel(logging.INFO)

    control = _ChildControl(send, checkpointing=not simulation)
    jobs: queue.Queue[TrainJob | None] = queue.Queue()
    running = threading.Event()

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("shutdown",)  # the parent is gone
            kind = message[0]
            if kind == "job":
                control.reset()
                running.set()
                jobs.put(message[1])
            elif kind == "shutdown":
                if running.is_set():
                    # Leave without the cancel path, which would delete the checkpoint.
                    os._exit(0)
                jobs.put(None)
                return
            else:
                control.set(kind)

    threading.Thread(target=read, name="fedtray-control", daemon=True).start()
    while (job := jobs.get()) is not None:
        try:
            reply = _run_job(job, control, send, simulation, progress_interval)
        finally:
            running.clear()
        try:
            send(reply)
        except (OSError, ValueError):
            break
    conn.close()


def _run_job(
    job: TrainJob,
    control: _ChildControl,
    send: Callable[[tuple[Any, ...]], None],
    simulation: bool,
    progress_interval: float,
) -> tuple[Any, ...]:
    throttle = ProgressThrottle(lambda p: send(("progress", p)), progress_interval)
    try:
        if simulation:
            result = _simulate(job, control, throttle)
        else:
            import torch

            torch.set_num_threads(job.torch_threads or max(1, (os.cpu_count() or 2) - 1))
            result = trainer.LocalTrainer().run(job, control, throttle)
        throttle.flush()
        return ("done", result)
    except trainer.Cancelled:
        return ("cancelled",)
    except FedtrayError as exc:
        return ("failed", exc.code, exc.message)
    except Exception as exc:
        log.exception("training round %s failed", job.round_id)
        return ("failed", "training_failed", f"{type(exc).__name__}: {exc}")


def _simulate(job: TrainJob, control: _ChildControl, throttle: ProgressThrottle) -> TrainResult:
    from client.simulation import simulate_round
    from client.weights import decode, encode

    if job.base_weights_path is None:
        raise FedtrayError("training_failed", "simulated training needs the global weights")
    try:
        raw = job.base_weights_path.read_bytes()
    except OSError as exc:
        raise FedtrayError("training_failed", f"cannot read the base weights: {exc}") from exc
    state, samples, metrics = simulate_round(
        decode(raw, "safetensors"),
        job.config,
        control,
        throttle,
        seed=job.config.seed * 1_000_003 + job.partition.index,
        round_id=job.round_id,
        num_samples=_SIMULATED_SAMPLES,
    )
    write_atomic(job.output_path, encode(state, "safetensors"))
    return TrainResult(
        round_id=job.round_id,
        output_path=job.output_path,
        num_samples=samples,
        metrics=metrics,
        batch_size=int(metrics["batchSize"]),
    )
