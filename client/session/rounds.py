"""Local rounds: accepting ``training:start``, driving the worker, reporting progress,
keeping results.

Contract (a loop-only object; the worker's events arrive from any thread and are moved
onto the loop; disk work runs in worker threads, or on the loop when the model is small:
:func:`client.session.offload.run_disk`):

* A ``training:start`` carrying ``baseWeights`` (a small global inline) has them taken
  first, exactly as a ``weights:global`` (``take_global``: verified, validated, stored),
  unless that version is held already; weights refused there answer the
  ``training:start`` with that ErrorAck.
* ``training:start`` is acked accepted or refused as :func:`client.session.decisions.
  refuse_round` says (paused, ``busy``, ``unknown_task``, ``missing_base``,
  ``deadline_passed``); a packaged round (``package`` set) is then refused
  ``missing_package`` unless :meth:`client.session.package_cache.TaskFiles.locate`
  finds its package and data share in the cache, and its job names those files.
  A round offered again that is being trained, or whose update
  is pending, is accepted without new work (the update is sent). ``training:cancel``
  cancels the round being trained; one that arrives while that round's
  ``training:start`` is still being handled (its global taken, its work folder
  prepared) has the start refused ``busy`` instead of trained; any other is ignored.
* Jobs are built by the one owner of the work folder, :class:`client.workfiles.WorkDir`
  (:meth:`~client.workfiles.WorkDir.job`), which keys them by the training work, not the
  round id: a round re-offered, or retried under a new id with the same partition and
  base, resumes the same checkpoint. Starting a round has the owner delete the work
  files of other work (:meth:`~client.workfiles.WorkDir.prepare`), never those of
  results being kept (:meth:`Rounds.busy_keys`). This module never creates, moves or
  deletes a work file itself. The worker checkpoints every ``checkpoint_interval``
  seconds of training, so even a ``kill -9`` loses at most that much.
* Progress: each :class:`client.worker_messages.ProgressEvent` goes to the snapshot and
  the server as it arrives (the worker's child is THE throttle: the first once the job
  has run 0.5 s, then at most one per 0.5 s, plus the last of the round). A round that
  ends sooner sends the server no progress (its ``training:start`` ack and its update
  say all): the last progress its :class:`client.worker_messages.Done` carries goes to
  the snapshot only. The one progress shape,
  :class:`client.worker_messages.TrainProgress`, is what the snapshot shows;
  :func:`wire_progress` is THE conversion to the wire; a progress sent while the
  applied decision is a pause says ``paused``. A pause reaches the worker
  (:meth:`Rounds.pause_changed`), which checkpoints at its next batch boundary; the
  server gets a ``paused`` progress at once, with the latest position.
* A finished update is converted to the round's weight format in place and handed to
  the :class:`client.pending.PendingStore` FIRST (through
  :meth:`client.workfiles.JobFiles.handing_over_output`), then the uploader is kicked at
  once: the store fsyncs the entry while the uploader sends it, and the uploader holds
  back the blob's last byte and the ``weights:submit`` until it is durable
  (:meth:`client.pending.PendingStore.wait_durable`). Its bytes are hashed once: by the
  trainer as it wrote them (the :class:`client.worker_messages.TrainResult` carries size
  and SHA-256), or here when converting; the held global is not hashed again by the
  worker (the job carries the file's identity from
  :class:`client.global_store.GlobalWeights`).
* :meth:`Rounds.warm_worker` (called when the session starts, before it connects, and
  again when the device registers) has the worker start its process ahead of the first
  round, unless simulating, paused or built with
  ``warm_worker=False``; the worker keeps
  it, and the built model, across rounds until idle for its idle timeout.
* The worker's evaluation events (:class:`client.worker_messages.EvalDone`,
  :class:`~client.worker_messages.EvalFailed`) are not rounds: they are handed to
  :attr:`Rounds.on_eval_event` (set by :mod:`client.session.evaluations`).
* Worker failures and disk errors are sent as ``training:error`` and the session keeps
  running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.config import data_dir
from client.errors import ErrorCode, FedtrayError
from client.global_store import GlobalWeights
from client.pending import PendingStore
from client.protocol import (
    EV_TRAINING_ERROR,
    EV_TRAINING_PROGRESS,
    TrainingCancel,
    TrainingError,
    TrainingProgress,
    TrainingStart,
    TrainingStartAck,
    WeightsGlobal,
)
from client.session.decisions import HeldBase, refuse_round
from client.session.hub import SnapshotHub
from client.session.offload import is_small, run_disk
from client.session.package_cache import LocatedFiles, TaskFiles
from client.session.tasks import TaskSet
from client.session.worker_seam import OnWorkerEvent, Worker, WorkerFactory
from client.snapshot import PauseDecision
from client.tasks import BUILTIN_TASKS, available_tasks
from client.weights import decode, encode
from client.worker_messages import (
    Cancelled,
    Done,
    EvalDone,
    EvalFailed,
    Failed,
    Paused,
    ProgressEvent,
    Resumed,
    TrainJob,
    TrainProgress,
    TrainResult,
    WorkerEvent,
)
from client.workfiles import JobFiles, WorkDir

if TYPE_CHECKING:
    from client.worker import BudgetLike

__all__ = ["ActiveRound", "Rounds", "default_work_dir", "wire_progress"]

log = logging.getLogger(__name__)


def default_work_dir() -> Path:
    """``<user data dir>/work``: the worker's outputs and checkpoints."""
    return data_dir() / "work"


def wire_progress(progress: TrainProgress, pause: PauseDecision) -> TrainingProgress:
    """THE wire message of ``progress``: ``paused`` (with the reason) under a pause.

    Raises ``ValueError`` for a progress the wire cannot carry.
    """
    paused = not pause.allowed
    return TrainingProgress(
        **dataclasses.asdict(progress),
        state="paused" if paused else "training",
        pause_reason=pause.reason if paused else None,
        pause_detail=(pause.detail or None) if paused else None,
    )


@dataclasses.dataclass
class ActiveRound:
    """The round being trained here and the latest progress of it (before the first
    report: epoch 0 of ``config.epochs``)."""

    start: TrainingStart
    job: TrainJob
    key: str
    progress: TrainProgress


class Rounds:
    """The local side of rounds (see the module docstring).

    Collaborators: ``held`` (the base weights), ``pause`` (the applied pause decision),
    ``emit`` (an unacked event to the server), ``kick_uploads`` and ``state_changed``
    (told whenever :attr:`current` changes or the worker pauses/resumes).
    """

    def __init__(
        self,
        hub: SnapshotHub,
        *,
        worker_factory: WorkerFactory,
        work: WorkDir,
        checkpoint_interval: float,
        pending: PendingStore,
        held: Callable[[], GlobalWeights | None],
        pause: Callable[[], PauseDecision],
        emit: Callable[[str, dict[str, Any]], None],
        kick_uploads: Callable[[], None],
        state_changed: Callable[[], None],
        task_files: TaskFiles | None = None,
        warm_worker: bool = True,
        take_global: Callable[[WeightsGlobal], Awaitable[object]] | None = None,
    ) -> None:
        self._hub = hub
        self._warm_worker = warm_worker
        self._budget: BudgetLike | None = None
        self._worker_factory = worker_factory
        self._work = work
        self._checkpoint_interval = checkpoint_interval
        self._pending = pending
        self._held = held
        self._pause = pause
        self._emit = emit
        self._kick_uploads = kick_uploads
        self._state_changed = state_changed
        self._task_files = task_files
        self._take_global = take_global
        self.worker: Worker | None = None
        self.simulation = False
        self.current: ActiveRound | None = None
        # Work keys of finished rounds whose output is still being kept (handed to
        # pending): no cleanup may touch their files meanwhile.
        self._keeping: set[str] = set()
        #: Round ids whose training:start is being handled -> how many handlers are at
        #: it, and those the server cancelled meanwhile (then not handed to the worker).
        self._starting: dict[str, int] = {}
        self._cancelled_starting: set[str] = set()
        self._background = TaskSet()
        #: Where the worker's evaluation events go (set by client.session.evaluations).
        self.on_eval_event: OnWorkerEvent | None = None

    @property
    def round_id(self) -> str | None:
        return self.current.start.round_id if self.current else None

    def busy_keys(self) -> set[str]:
        """Work no cleanup may touch now: results being kept, the round in training."""
        busy = set(self._keeping)
        if self.current is not None:
            busy.add(self.current.key)
        return busy

    def files_in_use(self) -> set[str]:
        """SHA-256 of the task files of the round being trained (never evicted)."""
        rnd = self.current
        if rnd is None:
            return set()
        refs = (rnd.start.package, rnd.start.data)
        return {ref.sha256 for ref in refs if ref is not None}

    # -- the worker -------------------------------------------------------------------

    async def start_worker(self) -> None:
        """Build the worker (off the loop: it may start a process)."""
        loop = asyncio.get_running_loop()
        self.worker = await asyncio.to_thread(
            self._worker_factory, lambda ev: self._from_worker_thread(loop, ev)
        )
        self.simulation = bool(getattr(self.worker, "simulation", False))
        if self._budget is not None:
            self.worker.set_budget(self._budget)

    def set_budget(self, budget: BudgetLike) -> None:
        """How hard training may work (cores, CPU share): the worker keeps it from its next
        batch boundary; remembered for a worker built later."""
        self._budget = budget
        if self.worker is not None:
            self.worker.set_budget(budget)

    def warm_worker(self) -> None:
        """Have the worker get ready to train, in the background (module docstring)."""
        worker = self.worker
        if not self._warm_worker or worker is None or self.simulation:
            return
        if not self._pause().allowed or worker.is_busy:
            return
        self._background.spawn(asyncio.to_thread(worker.warm))

    async def stop_worker(self) -> None:
        """Shut the worker down (it checkpoints a running round first, so the same round
        offered again resumes)."""
        if self.worker is not None:
            worker, self.worker = self.worker, None
            await asyncio.to_thread(worker.shutdown)

    def _from_worker_thread(self, loop: asyncio.AbstractEventLoop, event: WorkerEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the session ended
            loop.call_soon_threadsafe(self.on_worker_event, event)

    def on_worker_event(self, event: WorkerEvent) -> None:
        rnd = self.current
        match event:
            case ProgressEvent(progress=progress):
                self._on_progress(progress)
            case Paused() | Resumed():
                self._state_changed()
            case Done(result=result, progress=last):
                self.current = None
                if rnd is None:
                    log.warning("the worker finished an unknown round; ignoring its result")
                else:
                    if last is not None and last.round_id == rnd.start.round_id:
                        self._hub.publish(progress=last)  # the snapshot only (docstring)
                    self._keeping.add(rnd.key)
                    self._background.spawn(self._keep_result(rnd, result))
                self._state_changed()
            case Failed(code=code, message=message):
                self.current = None
                self.report_error(rnd.start.round_id if rnd else None, code, message)
                self._state_changed()
            case Cancelled():
                self.current = None
                log.info("round %s cancelled", rnd.start.round_id if rnd else "-")
                self._state_changed()
            case EvalDone() | EvalFailed():
                if self.on_eval_event is not None:
                    self.on_eval_event(event)

    def report_error(self, round_id: str | None, code: ErrorCode, message: str) -> None:
        log.error("round %s failed (%s): %s", round_id or "-", code, message)
        self._emit(
            EV_TRAINING_ERROR,
            TrainingError(round_id=round_id, code=code, message=message[:1000]).to_wire(),
        )

    # -- handlers ---------------------------------------------------------------------

    async def on_training_start(self, start: TrainingStart) -> TrainingStartAck:
        round_id = start.round_id
        self._starting[round_id] = self._starting.get(round_id, 0) + 1
        try:
            return await self._on_training_start(start)
        finally:
            left = self._starting.pop(round_id) - 1
            if left:
                self._starting[round_id] = left
            else:
                self._cancelled_starting.discard(round_id)

    async def _on_training_start(self, start: TrainingStart) -> TrainingStartAck:
        base = start.base_weights
        if base is not None and self._take_global is not None:
            held = self._held()
            if held is None or (held.version, held.task) != (base.version, base.task):
                # Taken as a weights:global first; a refusal raises (answered an ErrorAck).
                await self._take_global(base)
        # The same round offered again (after a reconnect or a server restart) is
        # accepted, not refused as ``busy``: a refusal would free the slot and the update
        # would then be answered ``not_selected``. Already trained: it is sent (resumed
        # from the server's offset); still training: the training goes on.
        if self.current is not None and self.current.start.round_id == start.round_id:
            log.info("round %s offered again; still training it", start.round_id)
            return TrainingStartAck(accepted=True)
        held = self._held()
        if (
            start.package is None
            and held is not None
            and self.worker is not None
            and self._refusal(start, held) is None
        ):
            return await self._start_plain(start, held, self.worker)
        if await asyncio.to_thread(self._pending.get, start.round_id) is not None:
            log.info("round %s offered again; its update is trained, sending it", start.round_id)
            self._kick_uploads()
            return TrainingStartAck(accepted=True)
        held = self._held()
        refusal = self._refusal(start, held)
        if refusal is not None:
            log.info("refused round %s: %s (%s)", start.round_id, refusal.reason, refusal.detail)
            return refusal
        assert self.worker is not None and held is not None
        files: LocatedFiles | None = None
        if start.package is not None:
            if self._task_files is None or self.simulation:
                return TrainingStartAck(
                    accepted=False,
                    reason="missing_package",
                    detail="this device does not train task packages",
                )
            located = await self._task_files.locate(start)
            if isinstance(located, TrainingStartAck):
                log.info("refused round %s: %s", start.round_id, located.detail)
                return located
            files = located
        if self.current is not None or self.worker.is_busy:  # changed while locating
            return TrainingStartAck(accepted=False, reason="busy", detail="training another round")
        return await self._start(start, held, self.worker, files)

    def _refusal(self, start: TrainingStart, held: GlobalWeights | None) -> TrainingStartAck | None:
        """Whether ``start`` is refused now (:func:`refuse_round`), pending aside."""
        return refuse_round(
            start,
            pause=self._pause(),
            training=self.round_id,
            worker_busy=self.worker is None or self.worker.is_busy,
            tasks=_tasks_to_check(start.task),
            held=HeldBase(version=held.version, task=held.task) if held else None,
            now=time.time(),
        )

    async def _start_plain(
        self, start: TrainingStart, held: GlobalWeights, worker: Worker
    ) -> TrainingStartAck:
        """A round without a package that nothing refuses: ONE step off the loop (on it for
        a small model) looks for its pending update (then it is sent, as
        :meth:`on_training_start` does) and, when there is none, prepares the work folder;
        the refusal is checked again after it when it ran in a thread."""
        job = self._job(start, held)
        pending, work, busy = self._pending, self._work, set(self._keeping)

        def pending_or_prepare() -> bool:
            if pending.get(start.round_id) is not None:
                return True
            work.prepare(job, busy=busy)
            return False

        try:
            # The work folder holds files of the held model's size.
            if await run_disk(held.size, pending_or_prepare):
                log.info(
                    "round %s offered again; its update is trained, sending it", start.round_id
                )
                self._kick_uploads()
                return TrainingStartAck(accepted=True)
        except OSError as exc:
            return TrainingStartAck(
                accepted=False, reason="busy", detail=f"cannot prepare the work folder: {exc}"
            )
        # What changed during the hop; none when the step ran on the loop (no await
        # came between the caller's check and here).
        refusal = None if is_small(held.size) else self._refusal(start, held)
        if refusal is not None:
            log.info("refused round %s: %s (%s)", start.round_id, refusal.reason, refusal.detail)
            return refusal
        return self._submit(start, job, worker)

    def _job(
        self, start: TrainingStart, held: GlobalWeights, files: LocatedFiles | None = None
    ) -> TrainJob:
        # Keyed by the work, not the round id: the same work offered again (after a
        # restart, or retried under a new id) resumes from its checkpoint.
        return self._work.job(
            round_id=start.round_id,
            task=start.task,
            model_params=start.model_params,
            config=start.config,
            partition=start.partition,
            base_weights_path=held.path,
            base_version=start.base_version,
            base_sha256=held.sha256,
            base_identity=held.identity,
            checkpoint_interval=self._checkpoint_interval,
            package_path=files.package if files else None,
            package_sha256=files.package_sha256 if files else None,
            data_path=files.data if files else None,
            data_sha256=files.data_sha256 if files else None,
        )

    async def _start(
        self,
        start: TrainingStart,
        held: GlobalWeights,
        worker: Worker,
        files: LocatedFiles | None = None,
    ) -> TrainingStartAck:
        job = self._job(start, held, files)
        try:
            # Checkpoints of other work can never be resumed: only this one's is kept.
            await asyncio.to_thread(self._work.prepare, job, busy=set(self._keeping))
        except OSError as exc:
            return TrainingStartAck(
                accepted=False, reason="busy", detail=f"cannot prepare the work folder: {exc}"
            )
        return self._submit(start, job, worker)

    def _submit(self, start: TrainingStart, job: TrainJob, worker: Worker) -> TrainingStartAck:
        """Hand ``job`` (its work folder prepared) to the worker; the round is current.
        Not when the server cancelled the round while it was being started."""
        assert job.work_key is not None  # WorkDir.job always computes it
        if start.round_id in self._cancelled_starting:
            return TrainingStartAck(
                accepted=False,
                reason="busy",
                detail="the server cancelled this round while it was being started",
            )
        try:
            worker.submit(job)
        except OSError as exc:
            return TrainingStartAck(
                accepted=False, reason="busy", detail=f"cannot start the worker: {exc}"
            )
        except FedtrayError as exc:
            return TrainingStartAck(accepted=False, reason="busy", detail=exc.message)
        before_first = TrainProgress(
            round_id=start.round_id,
            epoch=0,
            epochs=start.config.epochs,
            step=0,
            steps=1,
            fraction=0.0,
        )
        self.current = ActiveRound(start=start, job=job, key=job.work_key, progress=before_first)
        self._hub.publish(progress=before_first)
        self._state_changed()
        log.info(
            "round %s: training %s for %d epoch(s) from global v%d",
            start.round_id,
            start.task,
            start.config.epochs,
            start.base_version,
        )
        return TrainingStartAck(accepted=True)

    async def on_training_cancel(self, cancel: TrainingCancel) -> None:
        if self.current is not None and self.current.start.round_id == cancel.round_id:
            log.info("round %s cancelled by the server: %s", cancel.round_id, cancel.reason)
            if self.worker is not None:
                self.worker.cancel()
        elif cancel.round_id in self._starting:
            self._cancelled_starting.add(cancel.round_id)
            log.info(
                "round %s cancelled by the server while starting it: %s",
                cancel.round_id,
                cancel.reason,
            )
        else:
            log.info("ignoring cancel of round %s (not training it)", cancel.round_id)

    # -- pausing ----------------------------------------------------------------------

    def pause_changed(self, decision: PauseDecision, was_allowed: bool) -> None:
        """The applied pause decision changed: pause/resume the worker, tell the server."""
        rnd = self.current
        if not decision.allowed:
            if rnd is not None and self.worker is not None and was_allowed:
                self.worker.pause()
            if rnd is not None:
                self._send_progress(rnd.progress, decision)
        elif not was_allowed and rnd is not None and self.worker is not None:
            self.worker.resume()

    # -- progress ---------------------------------------------------------------------

    def _on_progress(self, progress: TrainProgress) -> None:
        rnd = self.current
        if rnd is None or progress.round_id != rnd.start.round_id:
            log.debug("ignoring progress of a round not being trained: %r", progress)
            return
        rnd.progress = progress
        self._hub.publish(progress=progress)
        self._send_progress(progress, self._pause())

    def _send_progress(self, progress: TrainProgress, pause: PauseDecision) -> None:
        try:
            message = wire_progress(progress, pause)
        except ValueError as exc:
            log.debug("unreportable progress %r: %s", progress, exc)
            return
        self._emit(EV_TRAINING_PROGRESS, message.to_wire())

    # -- keeping results --------------------------------------------------------------

    async def _keep_result(self, rnd: ActiveRound, result: TrainResult) -> None:
        try:
            await self._keep_result_files(rnd, result)
        finally:
            self._keeping.discard(rnd.key)

    async def _keep_result_files(self, rnd: ActiveRound, result: TrainResult) -> None:
        start = rnd.start
        files = self._work.files(rnd.key)
        pending = self._pending

        def keep() -> None:  # one step: convert (when needed), then hand over
            pending.add(
                files,
                round_id=start.round_id,
                task=start.task,
                base_version=start.base_version,
                num_samples=result.num_samples,
                metrics=result.metrics,
                fmt=start.weight_format,
                created=time.time(),
                digest=_convert_if_needed(files, start, result),
                durable=False,  # fsynced while it is sent (client.session.uploader)
            )

        # On the loop for a small update already in the round's format (no conversion).
        size = result.size if start.weight_format == "safetensors" else None
        try:
            await run_disk(size, keep)
        except (OSError, FedtrayError) as exc:
            self.report_error(
                start.round_id, "internal_error", f"cannot keep the trained update on disk: {exc}"
            )
            return
        log.info(
            "round %s: trained on %d samples (%s); sending the update",
            start.round_id,
            result.num_samples,
            ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()),
        )
        self._kick_uploads()


def _convert_if_needed(
    files: JobFiles, start: TrainingStart, result: TrainResult
) -> tuple[int, str] | None:
    """The output in the round's format; its (size, SHA-256) when known, else ``None``."""
    if start.weight_format == "safetensors":
        if result.sha256 is None or result.size is None:
            return None
        return result.size, result.sha256
    state = decode(files.output.read_bytes(), "safetensors")
    data = encode(state, start.weight_format)
    return len(data), files.write_output(data)


def _tasks_to_check(task: str) -> frozenset[str] | list[str]:
    """The installed tasks ``refuse_round`` checks ``task`` against: a built-in one is
    always installed, so the plugins (entry points: a scan of the installed packages,
    milliseconds) are listed only for another name."""
    return BUILTIN_TASKS if task in BUILTIN_TASKS else available_tasks()
