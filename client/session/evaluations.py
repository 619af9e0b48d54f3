"""Federated evaluation on the device: ``evaluation:start`` to ``evaluation:result``.

Contract (a loop-only object; worker events arrive on the loop through
:class:`client.session.rounds.Rounds`, which forwards :class:`EvalDone` and
:class:`EvalFailed` here):

* ``evaluation:start`` is acked at once, accepted or refused as
  :func:`client.session.decisions.refuse_evaluation` says (paused: the pause's reason
  and words; ``busy`` while a round is trained or another evaluation runs: an
  evaluation never runs beside training and is never queued behind it; ``unknown_task``;
  ``missing_base`` unless the device holds exactly that version; ``deadline_passed``); a
  packaged task is refused ``missing_package`` unless its files are in the cache.
* An accepted evaluation is ONE worker job (:class:`client.worker_messages.EvalJob`,
  :meth:`client.worker.TrainingWorker.submit_eval`) on the held global file (verified on
  arrival; the job carries its identity): lighter than training: no checkpoint, no
  work file, nothing kept in the pending store, no upload. When it finishes,
  ``evaluation:result`` (version, loss, accuracy, numSamples) is sent, unacknowledged; a
  failed or abandoned evaluation sends ``evaluation:failed`` (code, message; logged), so
  the server stops waiting for it.
* A pause while evaluating abandons the evaluation (the worker is told to cancel; the
  server stops waiting at its deadline). A ``training:start`` that arrives while an
  evaluation runs waits for it (:meth:`Evaluations.settle`, at most
  :data:`SETTLE_TIMEOUT` seconds), so training is never refused because of one.
* Never raises into the guard except through the ack; never touches the work folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from client.errors import ErrorCode, FedtrayError
from client.global_store import GlobalWeights
from client.protocol import (
    EV_EVALUATION_FAILED,
    EV_EVALUATION_RESULT,
    EvaluationFailed,
    EvaluationResult,
    EvaluationStart,
    EvaluationStartAck,
    TrainingStartAck,
)
from client.session.decisions import HeldBase, refuse_evaluation
from client.session.package_cache import LocatedFiles, TaskFiles
from client.session.rounds import Rounds
from client.snapshot import PauseDecision
from client.tasks import available_tasks
from client.worker_messages import EvalDone, EvalFailed, EvalJob, WorkerEvent

__all__ = ["SETTLE_TIMEOUT", "EvalWorker", "Evaluations"]

log = logging.getLogger(__name__)

#: The longest failure text sent in ``evaluation:failed`` (the wire's ShortText limit).
MAX_FAILURE_TEXT: Final = 1000

#: Longest a ``training:start`` waits for an evaluation in progress to end.
SETTLE_TIMEOUT: Final = 60.0


class EvalWorker(Protocol):
    """What evaluations need of the worker (:class:`client.worker.TrainingWorker`)."""

    def submit_eval(self, job: EvalJob) -> object: ...
    def cancel(self) -> object: ...


class Evaluations:
    """The device side of federated evaluation (see the module docstring)."""

    def __init__(
        self,
        rounds: Rounds,
        *,
        held: Callable[[], GlobalWeights | None],
        pause: Callable[[], PauseDecision],
        emit: Callable[[str, dict[str, Any]], None],
        task_files: TaskFiles | None = None,
    ) -> None:
        self._rounds = rounds
        self._held = held
        self._pause = pause
        self._emit = emit
        self._task_files = task_files
        #: The evaluation running here, and its task; None when idle.
        self.current: EvalJob | None = None
        self._task = ""
        self._idle = asyncio.Event()
        self._idle.set()
        rounds.on_eval_event = self.on_worker_event

    def _worker(self) -> EvalWorker | None:
        worker = self._rounds.worker
        if worker is None or not callable(getattr(worker, "submit_eval", None)):
            return None
        eval_worker: EvalWorker = worker  # type: ignore[assignment]
        return eval_worker

    async def on_evaluation_start(self, start: EvaluationStart) -> EvaluationStartAck:
        held = self._held()
        worker = self._rounds.worker
        refusal = refuse_evaluation(
            start,
            pause=self._pause(),
            training=self._rounds.round_id,
            evaluating=self.current.version if self.current else None,
            worker_busy=worker is None or worker.is_busy,
            simulation=self._rounds.simulation or self._worker() is None,
            tasks=available_tasks(),
            held=HeldBase(version=held.version, task=held.task) if held else None,
            now=time.time(),
        )
        if refusal is not None:
            log.info(
                "refused to evaluate v%d: %s (%s)", start.version, refusal.reason, refusal.detail
            )
            return refusal
        assert held is not None
        files: LocatedFiles | None = None
        if start.package is not None:
            if self._task_files is None:
                return EvaluationStartAck(
                    accepted=False, reason="missing_package", detail="no task package cache"
                )
            located = await self._task_files.locate(start)
            if isinstance(located, TrainingStartAck):
                return EvaluationStartAck(**located.model_dump())
            files = located
        eval_worker = self._worker()
        if self.current is not None or self._rounds.round_id is not None or eval_worker is None:
            return EvaluationStartAck(accepted=False, reason="busy", detail="busy meanwhile")
        job = EvalJob(
            eval_id=f"e{start.version}-{secrets.token_hex(3)}",
            version=start.version,
            task=start.task,
            model_params=dict(start.model_params),
            partition=start.partition,
            base_weights_path=held.path,
            base_sha256=held.sha256,
            base_identity=held.identity,
            package_path=files.package if files else None,
            package_sha256=files.package_sha256 if files else None,
            data_path=files.data if files else None,
            data_sha256=files.data_sha256 if files else None,
        )
        try:
            eval_worker.submit_eval(job)
        except FedtrayError as exc:
            return EvaluationStartAck(accepted=False, reason="busy", detail=exc.message)
        self.current, self._task = job, start.task
        self._idle.clear()
        log.info("evaluating global v%d of %s", start.version, start.task)
        return EvaluationStartAck(accepted=True)

    def on_worker_event(self, event: WorkerEvent) -> None:
        """An evaluation's end (forwarded by :class:`Rounds`)."""
        job = self.current
        match event:
            case EvalDone(result=result):
                if job is None or result.eval_id != job.eval_id:
                    log.warning("the worker finished an unknown evaluation; ignoring it")
                    return
                self._finished()
                log.info(
                    "evaluated v%d: loss %.4g, accuracy %.4g on %d %s samples",
                    result.version,
                    result.loss,
                    result.accuracy,
                    result.num_samples,
                    "holdout" if result.holdout else "test",
                )
                try:
                    message = EvaluationResult(
                        version=result.version,
                        task=self._task,
                        loss=result.loss,
                        accuracy=result.accuracy,
                        num_samples=result.num_samples,
                    )
                except ValueError as exc:
                    log.warning("cannot report the evaluation of v%d: %s", result.version, exc)
                    self._failed(result.version, "training_failed", f"cannot report it: {exc}")
                    return
                self._emit(EV_EVALUATION_RESULT, message.to_wire())
            case EvalFailed(eval_id=eval_id, code=code, message=text):
                if job is None or eval_id != job.eval_id:
                    return
                self._finished()
                log.info(
                    "evaluation of v%d ended without a result (%s): %s", job.version, code, text
                )
                self._failed(job.version, code, text)
            case _:
                pass

    def _failed(self, version: int, code: ErrorCode, text: str) -> None:
        """Tell the server an accepted evaluation ended without a result (it stops
        waiting for this device)."""
        message = EvaluationFailed(
            version=version, task=self._task, code=code, message=text[:MAX_FAILURE_TEXT]
        )
        self._emit(EV_EVALUATION_FAILED, message.to_wire())

    def _finished(self) -> None:
        self.current = None
        self._idle.set()

    def pause_changed(self, decision: PauseDecision) -> None:
        """A pause abandons the evaluation in progress (module docstring)."""
        if not decision.allowed and self.current is not None:
            worker = self._worker()
            if worker is not None:
                log.info("paused: abandoning the evaluation of v%d", self.current.version)
                worker.cancel()

    async def settle(self) -> None:
        """Return once no evaluation runs (at most :data:`SETTLE_TIMEOUT` seconds)."""
        if self.current is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), SETTLE_TIMEOUT)
