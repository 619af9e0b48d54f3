"""Local rounds: accepting ``training:start``, driving the worker, reporting progress,
keeping results.

Contract (a loop-only object; the worker's events arrive from any thread and are moved
onto the loop; disk work runs in worker threads):

* ``training:start`` is acked accepted or refused as :func:`client.session.decisions.
  refuse_round` says (paused, ``busy``, ``unknown_task``, ``missing_base``,
  ``deadline_passed``). A round offered again that is being trained, or whose update
  is pending, is accepted without new work (the update is sent). ``training:cancel``
  cancels the round being trained (any other is ignored).
* Work files are named by the training work, not the round id
  (:func:`client.workfiles.work_stem`): a round re-offered, or retried under a new id
  with the same partition and base, resumes the same checkpoint. Starting a round
  deletes the work files of other work, never those of results being kept
  (:meth:`Rounds.busy_stems`). The worker checkpoints every ``checkpoint_interval``
  seconds of training, so even a ``kill -9`` loses at most that much.
* Progress goes to the snapshot at once and to the server at most every
  :data:`PROGRESS_INTERVAL_S` (the last one of a burst is never lost). A pause reaches
  the worker (:meth:`Rounds.pause_changed`), which checkpoints at its next batch
  boundary; the server gets a ``paused`` progress at once.
* A finished update is moved into the :class:`client.pending.PendingStore` FIRST
  (converted to the round's weight format), then the uploader is kicked.
* Worker failures and disk errors are sent as ``training:error`` and the session keeps
  running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

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
    parse,
)
from client.session.decisions import HeldBase, refuse_round
from client.session.hub import SnapshotHub
from client.session.tasks import TaskSet
from client.snapshot import PauseDecision, Progress
from client.tasks import available_tasks
from client.trainer import TrainJob, TrainResult
from client.weights import decode, encode
from client.workfiles import remove_stale, work_stem

__all__ = [
    "PROGRESS_INTERVAL_S",
    "ActiveRound",
    "Rounds",
    "Worker",
    "WorkerFactory",
    "default_work_dir",
    "default_worker_factory",
]

log = logging.getLogger(__name__)

#: At most 2 progress messages per second to the server.
PROGRESS_INTERVAL_S: Final = 0.5


class Worker(Protocol):
    """What the session needs of :class:`client.worker.TrainingWorker`."""

    @property
    def is_busy(self) -> bool: ...

    def submit(self, job: TrainJob) -> object: ...
    def pause(self) -> object: ...
    def resume(self) -> object: ...
    def cancel(self) -> object: ...
    def shutdown(self) -> object: ...


#: Builds the worker; its ``on_event`` callback may be called from any thread.
WorkerFactory = Callable[[Callable[[object], None]], Worker]


def default_worker_factory(on_event: Callable[[object], None]) -> Worker:
    from client.worker import TrainingWorker

    worker: Worker = TrainingWorker(on_event=on_event)
    return worker


def default_work_dir() -> Path:
    """``<user data dir>/work``: the worker's outputs and checkpoints."""
    return data_dir() / "work"


@dataclasses.dataclass
class ActiveRound:
    """The round being trained here."""

    start: TrainingStart
    job: TrainJob


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
        work_dir: Path,
        checkpoint_interval: float,
        pending: PendingStore,
        held: Callable[[], GlobalWeights | None],
        pause: Callable[[], PauseDecision],
        emit: Callable[[str, dict[str, Any]], None],
        kick_uploads: Callable[[], None],
        state_changed: Callable[[], None],
    ) -> None:
        self._hub = hub
        self._worker_factory = worker_factory
        self.work_dir = work_dir
        self._checkpoint_interval = checkpoint_interval
        self._pending = pending
        self._held = held
        self._pause = pause
        self._emit = emit
        self._kick_uploads = kick_uploads
        self._state_changed = state_changed
        self.worker: Worker | None = None
        self.simulation = False
        self.current: ActiveRound | None = None
        # Stems of finished rounds whose output is still being kept (moved to pending):
        # no cleanup may touch their files meanwhile.
        self._keeping: set[str] = set()
        self._background = TaskSet()
        self._progress_sent_at = 0.0
        self._progress_pending: TrainingProgress | None = None
        self._progress_flush: asyncio.TimerHandle | None = None

    @property
    def round_id(self) -> str | None:
        return self.current.start.round_id if self.current else None

    def busy_stems(self) -> set[str]:
        """Work files no cleanup may delete now: results being kept, the round in training."""
        busy = set(self._keeping)
        if self.current is not None:
            busy.add(self.current.job.checkpoint_path.stem)
        return busy

    # -- the worker -------------------------------------------------------------------

    async def start_worker(self) -> None:
        """Build the worker (off the loop: it may start a process)."""
        loop = asyncio.get_running_loop()
        self.worker = await asyncio.to_thread(
            self._worker_factory, lambda ev: self._from_worker_thread(loop, ev)
        )
        self.simulation = bool(getattr(self.worker, "simulation", False))

    async def stop_worker(self) -> None:
        """Send the last progress and shut the worker down (it checkpoints a running round
        first, so the same round offered again resumes)."""
        self.flush_progress()
        if self.worker is not None:
            worker, self.worker = self.worker, None
            await asyncio.to_thread(worker.shutdown)

    def _from_worker_thread(self, loop: asyncio.AbstractEventLoop, event: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the session ended
            loop.call_soon_threadsafe(self.on_worker_event, event)

    def on_worker_event(self, event: object) -> None:
        from client import worker as w

        rnd = self.current
        if isinstance(event, w.Progress):
            self._on_progress(event)
        elif isinstance(event, w.Paused | w.Resumed):
            self._state_changed()
        elif isinstance(event, w.Done):
            self.flush_progress()
            self.current = None
            if rnd is None:
                log.warning("the worker finished an unknown round; ignoring its result")
            else:
                self._keeping.add(rnd.job.checkpoint_path.stem)
                self._background.spawn(self._keep_result(rnd, event.result))
            self._state_changed()
        elif isinstance(event, w.Failed):
            self.current = None
            self.report_error(rnd.start.round_id if rnd else None, event.code, event.message)
            self._state_changed()
        elif isinstance(event, w.Cancelled):
            self.current = None
            log.info("round %s cancelled", rnd.start.round_id if rnd else "-")
            self._state_changed()
        else:
            log.debug("ignoring worker event %r", event)

    def report_error(self, round_id: str | None, code: ErrorCode, message: str) -> None:
        log.error("round %s failed (%s): %s", round_id or "-", code, message)
        self._emit(
            EV_TRAINING_ERROR,
            TrainingError(round_id=round_id, code=code, message=message[:1000]).to_wire(),
        )

    # -- handlers ---------------------------------------------------------------------

    async def on_training_start(self, payload: object) -> dict[str, Any]:
        start = parse(TrainingStart, payload)
        # The same round offered again (after a reconnect or a server restart) is
        # accepted, not refused as ``busy``: a refusal would free the slot and the update
        # would then be answered ``not_selected``. Already trained: it is sent (resumed
        # from the server's offset); still training: the training goes on.
        if self.current is not None and self.current.start.round_id == start.round_id:
            log.info("round %s offered again; still training it", start.round_id)
            return TrainingStartAck(accepted=True).to_wire()
        if await asyncio.to_thread(self._pending.get, start.round_id) is not None:
            log.info("round %s offered again; its update is trained, sending it", start.round_id)
            self._kick_uploads()
            return TrainingStartAck(accepted=True).to_wire()
        held = self._held()
        refusal = refuse_round(
            start,
            pause=self._pause(),
            training=self.round_id,
            worker_busy=self.worker is None or self.worker.is_busy,
            tasks=available_tasks(),
            held=HeldBase(version=held.version, task=held.task) if held else None,
            now=time.time(),
        )
        if refusal is not None:
            log.info("refused round %s: %s (%s)", start.round_id, refusal.reason, refusal.detail)
            return refusal.to_wire()
        assert self.worker is not None and held is not None
        return await self._start(start, held, self.worker)

    async def _start(
        self, start: TrainingStart, held: GlobalWeights, worker: Worker
    ) -> dict[str, Any]:
        # Named by the work, not the round id: the same work offered again (after a
        # restart, or retried under a new id) resumes from its checkpoint.
        stem = work_stem(
            task=start.task,
            model_params=start.model_params,
            config=start.config,
            partition=start.partition,
            base_version=start.base_version,
            base_sha256=held.sha256,
        )
        job = TrainJob(
            round_id=start.round_id,
            task=start.task,
            model_params=dict(start.model_params),
            config=start.config,
            partition=start.partition,
            base_weights_path=held.path,
            output_path=self.work_dir / f"{stem}.safetensors",
            checkpoint_path=self.work_dir / f"{stem}.ckpt",
            checkpoint_interval=self._checkpoint_interval,
        )
        try:
            await asyncio.to_thread(self.work_dir.mkdir, parents=True, exist_ok=True)
            # Checkpoints of other work can never be resumed: only this one's is kept.
            await asyncio.to_thread(
                remove_stale, self.work_dir, keep={stem}, busy=set(self._keeping)
            )
            worker.submit(job)
        except OSError as exc:
            return TrainingStartAck(
                accepted=False, reason="busy", detail=f"cannot prepare the work folder: {exc}"
            ).to_wire()
        except FedtrayError as exc:
            return TrainingStartAck(accepted=False, reason="busy", detail=exc.message).to_wire()
        self.current = ActiveRound(start=start, job=job)
        self._progress_sent_at = 0.0
        self._progress_pending = None
        self._hub.publish(progress=Progress(epochs=start.config.epochs))
        self._state_changed()
        log.info(
            "round %s: training %s for %d epoch(s) from global v%d",
            start.round_id,
            start.task,
            start.config.epochs,
            start.base_version,
        )
        return TrainingStartAck(accepted=True).to_wire()

    async def on_training_cancel(self, payload: object) -> None:
        cancel = parse(TrainingCancel, payload)
        if self.current is not None and self.current.start.round_id == cancel.round_id:
            log.info("round %s cancelled by the server: %s", cancel.round_id, cancel.reason)
            if self.worker is not None:
                self.worker.cancel()
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
                snap = self._hub.current.progress
                self.flush_progress()
                with contextlib.suppress(ValueError):
                    self._send_progress(
                        TrainingProgress(
                            round_id=rnd.start.round_id,
                            epoch=snap.epoch,
                            epochs=max(1, snap.epochs or rnd.start.config.epochs),
                            step=0,
                            steps=1,
                            fraction=snap.fraction,
                            loss=snap.loss,
                            state="paused",
                            pause_reason=decision.reason,
                            pause_detail=decision.detail or None,
                        )
                    )
        elif not was_allowed and rnd is not None and self.worker is not None:
            self.worker.resume()

    # -- progress ---------------------------------------------------------------------

    def _on_progress(self, event: Any) -> None:
        rnd = self.current
        if rnd is None:
            return
        try:
            message = TrainingProgress.model_validate(
                {**event.progress, "round_id": rnd.start.round_id, "state": "training"}
            )
        except ValueError as exc:
            log.debug("unreportable progress %r: %s", event, exc)
            return
        self._hub.publish(
            progress=Progress(
                fraction=message.fraction,
                epoch=message.epoch,
                epochs=message.epochs,
                loss=message.loss,
                samples_per_sec=message.samples_per_sec,
            )
        )
        self._throttle_progress(message)

    def _throttle_progress(self, message: TrainingProgress) -> None:
        now = time.monotonic()
        wait = self._progress_sent_at + PROGRESS_INTERVAL_S - now
        if wait <= 0:
            self._send_progress(message)
            return
        # Too soon: keep the latest and send it when the interval is up (so the last
        # update of a burst is never lost).
        self._progress_pending = message
        if self._progress_flush is None:
            loop = asyncio.get_running_loop()
            self._progress_flush = loop.call_later(wait, self.flush_progress)

    def flush_progress(self) -> None:
        if self._progress_flush is not None:
            self._progress_flush.cancel()
            self._progress_flush = None
        pending, self._progress_pending = self._progress_pending, None
        if pending is not None:
            self._send_progress(pending)

    def _send_progress(self, message: TrainingProgress) -> None:
        self._progress_sent_at = time.monotonic()
        self._emit(EV_TRAINING_PROGRESS, message.to_wire())

    # -- keeping results --------------------------------------------------------------

    async def _keep_result(self, rnd: ActiveRound, result: TrainResult) -> None:
        try:
            await self._keep_result_files(rnd, result)
        finally:
            self._keeping.discard(rnd.job.checkpoint_path.stem)

    async def _keep_result_files(self, rnd: ActiveRound, result: TrainResult) -> None:
        start = rnd.start
        try:
            await asyncio.to_thread(_convert_if_needed, result.output_path, start)
            await asyncio.to_thread(
                self._pending.add,
                result.output_path,
                round_id=start.round_id,
                task=start.task,
                base_version=start.base_version,
                num_samples=result.num_samples,
                metrics=result.metrics,
                fmt=start.weight_format,
                created=time.time(),
            )
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


def _convert_if_needed(path: Path, start: TrainingStart) -> None:
    if start.weight_format == "safetensors":
        return
    from client.atomicfile import write_atomic

    state = decode(path.read_bytes(), "safetensors")
    write_atomic(path, encode(state, start.weight_format))
