"""The training process: :func:`child_main`, spawned by :class:`client.worker.TrainingWorker`.

Contract:

* Importable without side effects and without torch; torch is imported only when a real
  (non-simulated) job runs, or earlier on :class:`client.worker_messages.Warm` (sent
  when the session starts and when the device registers, or by
  :func:`client.worker.start_early`): the trainer is made then and torch's first-use costs paid
  (:func:`client.trainer.warm_up`), so the first round does not wait for them.
* It runs at a low OS priority (``nice 10`` on Unix -- ten above its parent's, at most
  19 -- and the below-normal priority class on Windows): the parent lowers it as soon as
  the process exists (:mod:`client.worker`), so even the child's own imports yield to the
  session; the child lowers it itself too when it is still higher (a parent that could
  not), never further. It reports ``training process ready ...`` (INFO, with its wall
  and CPU seconds since it started) once its trainer is made and warmed. It reads
  :data:`client.worker_messages.WorkerCommand` values on a thread that
  sets the flags the trainer checks at every batch boundary.
* It picks the trainer once per process (:func:`make_trainer`) and keeps it for every
  job: :class:`client.simulation.SimulatedTrainer` when simulating, else
  :class:`client.trainer.LocalTrainer` (which keeps its built model across jobs); torch's
  thread count is kept per job at ``job.torch_threads`` or all cores but one, unless a CPU
  budget is kept (next point); it is set only when it differs from the count set last.
  Torch's inter-op threads are set to 1 once per process,
  before any inter-op work (torch allows it only then; training uses none).
* The CPU budget (:class:`client.worker_messages.SetBudget`, remembered across jobs;
  the parent sends it to every child it starts before anything else) is kept at every
  batch boundary from the one after it arrives: torch threads
  (:func:`client.budget.threads_for`: the budget's cores, at most ``job.torch_threads``
  when set), and a duty cycle: the training thread sleeps so that this process's
  measured CPU time (``time.process_time``: all threads) stays within
  ``cores * cpu_percent / 100`` CPU-seconds per wall-second over the sliding window of
  :class:`client.budget.DutyCycle` (a new window per job, per budget and after a pause).
  The sleep is waited in slices of at most :data:`client.budget.MAX_SLEEP_SLICE_S` and
  ends at once on a pause, a cancel or a new budget, so those take effect at the batch
  boundary where training sleeps. Sleeping changes no result: weights are bit-identical
  with and without a budget for the same thread counts (a different thread count may
  change the float rounding of torch's parallel kernels).
* It sends only :data:`client.worker_messages.ChildMessage` values: per job
  :class:`ProgressEvent` (through THE progress throttle, :class:`ProgressThrottle`: the
  first once the job has run for ``progress_interval``, then at most one per
  ``progress_interval``, plus the last of the round; a job that ends within its first
  interval sends none, its :class:`Done` carries its last progress for the session's
  snapshot), :class:`Paused`, :class:`Resumed` and exactly one of :class:`Done`,
  :class:`Failed`, :class:`Cancelled`;
  and :class:`LogRecord` for its ``client.*`` log records of level INFO and above.
* :class:`client.worker_messages.Evaluate` runs the trainer's ``evaluate`` (federated
  evaluation, :class:`client.worker_messages.Evaluator`) with the same kept trainer and
  model, and answers exactly one :class:`EvalDone` or :class:`EvalFailed` (``paused``
  when a pause or cancel abandoned it; an evaluation is never checkpointed).
* :class:`Exit` while a job runs leaves at once without the cancel path, so the job's
  checkpoint stays (the parent pauses a job before it asks it to exit).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Generic, TypeVar

import psutil

from client.budget import MAX_SLEEP_SLICE_S, DutyCycle, Sample, threads_for
from client.errors import FedtrayError
from client.worker_messages import (
    Cancel,
    Cancelled,
    ChildMessage,
    Command,
    Done,
    EvalDone,
    EvalFailed,
    EvalJob,
    Evaluate,
    Evaluator,
    Exit,
    Failed,
    JobCancelled,
    LogRecord,
    Pause,
    Paused,
    ProgressEvent,
    Resume,
    Resumed,
    SetBudget,
    Submit,
    Trainer,
    TrainJob,
    TrainProgress,
    Warm,
    WorkerCommand,
)

__all__ = [
    "NICE_STEP",
    "ProgressThrottle",
    "child_main",
    "low_priority_nice",
    "lower_priority",
    "make_trainer",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class ProgressThrottle(Generic[T]):
    """Forwards at most one progress report per ``interval`` seconds, the first once the
    job has run for ``interval`` (the throttle is made when the job starts): a job that
    ends within its first interval sends none (its ``training:start`` ack and its update
    say all a progress would). ``N`` seconds give at most ``N / interval`` reports.

    :meth:`flush` (at the job's end) sends the last report held back when one was sent
    already (a long job's last position reaches the server); otherwise it returns it,
    unsent, for the job's :class:`client.worker_messages.Done` to carry to the session.
    """

    def __init__(
        self,
        send: Callable[[T], None],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._interval = interval
        self._clock = clock
        self._last = clock()  # the job's start opens the first interval
        self._sent = False
        self._pending: T | None = None

    def __call__(self, progress: T) -> None:
        now = self._clock()
        if now - self._last >= self._interval:
            self._last = now
            self._pending = None
            self._sent = True
            self._send(progress)
        else:
            self._pending = progress

    def flush(self) -> T | None:
        """Send the report held back when a report was sent already; else return it."""
        pending, self._pending = self._pending, None
        if pending is not None and self._sent:
            self._send(pending)
            return None
        return pending


class _ChildControl:
    """The trainer's :class:`client.worker_messages.TrainControl`, fed by the reader thread.

    It also keeps the CPU budget (:class:`SetBudget`) at every batch boundary, on the
    training thread: the thread count when the budget changes, then the duty-cycle sleep
    of :mod:`client.budget`, computed from this process's measured CPU time (all
    threads) and waited out in slices that a pause, a cancel or a new budget ends early.
    """

    def __init__(
        self,
        send: Callable[[ChildMessage], None],
        *,
        cpu_clock: Callable[[], float] = time.process_time,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._cond = threading.Condition()
        self._paused = False
        self._cancelled = False
        self._round_id: str | None = None
        self._checkpoints = True
        # The budget: written by the reader thread, kept by the training thread.
        self._budget: SetBudget | None = None
        self._budget_changed = False
        self._new_window = True
        self._job_threads: int | None = None
        self._set_threads: Callable[[int], None] | None = None
        self._threads_set: int | None = None
        self._duty = DutyCycle()
        self._cpu_clock = cpu_clock
        self._wall_clock = wall_clock
        self._cpus = os.cpu_count() or 2

    def reset(self, job: TrainJob | EvalJob) -> None:
        """A new job: not paused, not cancelled (called before the job is queued). An
        evaluation's id stands where a round's would (its Paused/Resumed name it)."""
        with self._cond:
            self._paused = self._cancelled = False
            self._round_id = job.round_id if isinstance(job, TrainJob) else job.eval_id
            self._job_threads = job.torch_threads
            self._new_window = True

    def use(self, trainer: Trainer, set_threads: Callable[[int], None] | None) -> None:
        """Whether pauses of the job checkpoint, as ``trainer`` does; ``set_threads`` sets
        the trainer's thread count (None: a simulated trainer has none). The job's thread
        count is set here, before the trainer builds anything."""
        with self._cond:
            self._checkpoints = trainer.checkpoints
            if set_threads != self._set_threads:
                # Another way to set them: the count it has is unknown. The same one (the
                # process's torch) keeps the count set last, set again only when it changes.
                self._set_threads = set_threads
                self._threads_set = None
        self._keep_threads()

    def apply(self, command: Pause | Resume | Cancel) -> None:
        with self._cond:
            if isinstance(command, Pause):
                self._paused = True
            elif isinstance(command, Resume):
                self._paused = False
                self._new_window = True  # time paused earns no credit
            else:
                self._cancelled = True
            self._cond.notify_all()

    def set_budget(self, budget: SetBudget) -> None:
        """Keep ``budget`` from the next batch boundary on (any thread)."""
        with self._cond:
            if budget == self._budget:
                return
            self._budget = budget
            self._budget_changed = True
            self._cond.notify_all()
        log.info("keeping a CPU budget of %s", budget.describe())

    def check(self) -> Command:
        self._keep_budget()
        with self._cond:
            if self._cancelled:
                return "cancel"
            return "pause" if self._paused else "run"

    def wait_while_paused(self) -> None:
        self._send(Paused(self._checkpoints, self._round_id))
        with self._cond:
            while self._paused and not self._cancelled:
                self._cond.wait()
            cancelled = self._cancelled
        if not cancelled:
            self._send(Resumed(self._round_id))

    # -- the budget, on the training thread --

    def _threads(self) -> int:
        """The thread count for the job and the budget (under the lock)."""
        cpus = self._cpus
        if self._budget is None:
            return self._job_threads or max(1, cpus - 1)
        return threads_for(self._budget.cores, self._job_threads, cpus)

    def _keep_threads(self) -> None:
        with self._cond:
            set_threads, threads = self._set_threads, self._threads()
            if set_threads is None or threads == self._threads_set:
                return
            self._threads_set = threads
        set_threads(threads)

    def _keep_budget(self) -> None:
        """The budget's thread count and duty-cycle sleep, at a batch boundary."""
        while True:
            with self._cond:
                budget = self._budget
                new_window = self._new_window or self._budget_changed
                self._new_window = self._budget_changed = False
            if new_window:
                self._keep_threads()
                self._duty.reset()
            if budget is None or budget.cpu_percent >= 100:
                return
            now = Sample(self._wall_clock(), self._cpu_clock())
            seconds = self._duty.sleep_for(now, budget.cores, budget.cpu_percent)
            if seconds <= 0 or not self._sleep(now.wall + seconds):
                return

    def _sleep(self, until: float) -> bool:
        """Wait until ``until`` (the wall clock) in slices; True when a new budget ended
        the wait early (keep it), False when the wait ran out or a pause or cancel came."""
        with self._cond:
            while not (self._paused or self._cancelled or self._budget_changed):
                left = until - self._wall_clock()
                if left <= 0:
                    return False
                self._cond.wait(min(left, MAX_SLEEP_SLICE_S))
            return self._budget_changed


#: How much lower than its parent's the training process's priority is (Unix niceness).
NICE_STEP = 10
_MAX_NICE = 19


def low_priority_nice(parent_nice: int) -> int:
    """The training process's Unix niceness under a parent running at ``parent_nice``."""
    return min(_MAX_NICE, parent_nice + NICE_STEP)


def lower_priority(pid: int, nice: int) -> None:
    """Give process ``pid`` the training priority: niceness ``nice`` on Unix (only ever
    raised: a process already at or above it is left alone), the below-normal priority
    class on Windows. Raises ``OSError`` or :class:`psutil.Error` when it cannot."""
    proc = psutil.Process(pid)
    if sys.platform == "win32":
        proc.nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
    elif proc.nice() < nice:
        proc.nice(nice)


def _lower_priority() -> None:
    """Make training yield the CPU to everything the owner runs: the training priority
    for the parent's (which this process started with; a no-op when the parent lowered
    it already)."""
    try:
        parent_nice = psutil.Process(os.getppid()).nice() if sys.platform != "win32" else 0
        lower_priority(os.getpid(), low_priority_nice(parent_nice))
    except (OSError, psutil.Error):
        log.warning("could not lower the training process priority", exc_info=True)


class _PipeLogHandler(logging.Handler):
    """Sends the child's log records to the parent (see the module docstring)."""

    def __init__(self, send: Callable[[ChildMessage], None]) -> None:
        super().__init__(logging.INFO)
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        # OSError/ValueError: the parent is gone, nobody to tell.
        with contextlib.suppress(OSError, ValueError):
            self._send(LogRecord(record.levelno, record.name, self.format(record)))


def make_trainer(simulation: bool) -> Trainer:
    """The trainer of this process: simulated, or torch's (importing torch)."""
    if simulation:
        from client.simulation import SimulatedTrainer

        return SimulatedTrainer()
    from client.trainer import LocalTrainer

    return LocalTrainer()


class _TrainerSlot:
    """The process's one trainer, made on first use (a job, or a :class:`Warm`)."""

    def __init__(self, simulation: bool) -> None:
        self._simulation = simulation
        self._trainer: Trainer | None = None

    def warm(self) -> Trainer:
        if self._trainer is None:
            self._trainer = make_trainer(self._simulation)
            if not self._simulation:
                import torch

                from client.trainer import warm_up

                # Once per process, before any inter-op work (torch refuses it later):
                # training uses no inter-op parallelism, the budget's cores are the
                # intra-op threads (set per job and per budget).
                with contextlib.suppress(RuntimeError):
                    torch.set_num_interop_threads(1)

                warm_up()  # torch's first-use costs, paid while idle
            log.info(
                "training process ready %.2f s after it started (%.2f s of CPU)",
                time.time() - psutil.Process().create_time(),
                time.process_time(),
            )
        return self._trainer

    def set_threads(self) -> Callable[[int], None] | None:
        """How to set the trainer's thread count (None when simulating)."""
        if self._simulation:
            return None
        import torch

        return torch.set_num_threads


def child_main(conn: Connection, simulation: bool, progress_interval: float) -> None:
    """Entry point of the training process (spawned; see the module docstring)."""
    _lower_priority()
    send_lock = threading.Lock()

    def send(message: ChildMessage) -> None:
        with send_lock:
            conn.send(message)

    client_log = logging.getLogger("client")
    client_log.addHandler(_PipeLogHandler(send))
    client_log.setLevel(logging.INFO)

    control = _ChildControl(send)
    jobs: queue.Queue[TrainJob | EvalJob | Warm | None] = queue.Queue()
    running = threading.Event()
    trainers = _TrainerSlot(simulation)

    def read() -> None:
        while True:
            command: WorkerCommand
            try:
                command = conn.recv()
            except (EOFError, OSError):
                command = Exit()  # the parent is gone
            if isinstance(command, Warm):
                jobs.put(command)
            elif isinstance(command, SetBudget):
                control.set_budget(command)
            elif isinstance(command, Submit | Evaluate):
                control.reset(command.job)
                running.set()
                jobs.put(command.job)
            elif isinstance(command, Exit):
                if running.is_set():
                    # Leave without the cancel path, which would delete the checkpoint.
                    os._exit(0)
                jobs.put(None)
                return
            elif isinstance(command, Pause | Resume | Cancel):
                control.apply(command)
            else:
                log.warning("ignoring an unknown worker command %r", command)

    threading.Thread(target=read, name="fedtray-control", daemon=True).start()
    while (job := jobs.get()) is not None:
        if isinstance(job, Warm):
            try:
                trainers.warm()
            except Exception:  # the job that follows reports it
                log.warning("could not get the trainer ready", exc_info=True)
            continue
        try:
            reply: Done | Failed | Cancelled | EvalDone | EvalFailed
            if isinstance(job, EvalJob):
                reply = _run_eval(job, control, trainers)
            else:
                reply = _run_job(job, control, send, trainers, progress_interval)
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
    send: Callable[[ChildMessage], None],
    trainers: _TrainerSlot,
    progress_interval: float,
) -> Done | Failed | Cancelled:
    throttle: ProgressThrottle[TrainProgress] = ProgressThrottle(
        lambda p: send(ProgressEvent(p)), progress_interval
    )
    try:
        trainer = trainers.warm()
        control.use(trainer, trainers.set_threads())
        result = trainer.run(job, control, throttle)
        return Done(result, throttle.flush())
    except JobCancelled:
        return Cancelled(job.round_id)
    except FedtrayError as exc:
        return Failed(exc.code, exc.message, job.round_id)
    except Exception as exc:
        log.exception("training round %s failed", job.round_id)
        return Failed("training_failed", f"{type(exc).__name__}: {exc}", job.round_id)


def _run_eval(
    job: EvalJob, control: _ChildControl, trainers: _TrainerSlot
) -> EvalDone | EvalFailed:
    """Evaluate ``job`` with the process's trainer (module docstring)."""
    try:
        trainer = trainers.warm()
        control.use(trainer, trainers.set_threads())
        evaluate = getattr(trainer, "evaluate", None)
        if evaluate is None:
            return EvalFailed(job.eval_id, "training_failed", "this trainer cannot evaluate")
        evaluator: Evaluator = trainer  # type: ignore[assignment]
        return EvalDone(evaluator.evaluate(job, control))
    except JobCancelled:
        return EvalFailed(job.eval_id, "paused", "the evaluation was abandoned")
    except FedtrayError as exc:
        return EvalFailed(job.eval_id, exc.code, exc.message)
    except Exception as exc:
        log.exception("evaluation %s failed", job.eval_id)
        return EvalFailed(job.eval_id, "training_failed", f"{type(exc).__name__}: {exc}")
