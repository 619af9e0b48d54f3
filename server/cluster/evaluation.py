"""The cluster's evaluation of new versions on the server's test split, off the round's path.

Contract: :class:`ClusterEvaluation` is what the elected coordinator
(:class:`server.cluster.coordinator.ClusterCoordinator`, its ``published`` hook) hands each
version it published, with the version's weights. As the single-process server
(:mod:`server.coordinator`), it evaluates them one at a time in the background, latest
first, stale versions skipped, within the same CPU budget
(:class:`server.evaluation.EvaluationQueue`, :data:`server.evaluation.EVALUATION_CPU_SHARE`
of one core; :meth:`drained` never waits for it), the blocking
work in a thread (torch is imported there, by :class:`server.model.Evaluator`, as the
single-process server does), and records ``evalLoss``/``evalAccuracy`` into the version's
row in PostgreSQL (:meth:`EvaluationRecorder.record_evaluation`) when ready: a version is
published (and sent to devices) before its evaluation is known. :meth:`drained` returns once
nothing is evaluated or waits (the end of a federation waits there, so
``federation:finished`` carries the final version's evaluation).

The test split is read once, in a thread, on the first evaluation
(:func:`test_split`: a package without server test data, or no torch, evaluates nothing).
An evaluation that fails is logged and records nothing; one lost with its process (a
killed coordinator) is not redone. Recording failures (an engine down) are logged, never
raised. Owned by the coordinating worker's event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from client.tasks import Task
from client.weights import StateDict
from server.background import Background
from server.cluster.contracts import ClusterError
from server.evaluation import Clock, EvaluationQueue, Metrics, TestSplit, test_split

__all__ = ["ClusterEvaluation", "EvaluationRecorder"]

log = logging.getLogger(__name__)

#: ``evaluate(state, x, y) -> {"loss", "accuracy"}`` (blocking; :class:`server.model.Evaluator`).
Scorer = Callable[[StateDict, np.ndarray[Any, Any], np.ndarray[Any, Any]], dict[str, float]]


class EvaluationRecorder(Protocol):
    async def record_evaluation(self, version: int, metrics: dict[str, float]) -> bool:
        """Merge ``metrics`` into the version's metrics; False when the version is unknown."""
        ...


class ClusterEvaluation:
    """Evaluates published versions in the background and records them (see the module doc)."""

    def __init__(
        self,
        *,
        task: Task,
        db: EvaluationRecorder,
        background: Background,
        scorer: Scorer | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._task = task
        self._db = db
        self._scorer = scorer
        self._split: TestSplit | None = None
        self._split_read = False
        self._queue = EvaluationQueue(
            evaluate=self._evaluate, record=self._record, background=background, clock=clock
        )

    def submit(self, version: int, state: StateDict) -> None:
        """Evaluate ``version`` (holding ``state``) when the evaluator is free."""
        self._queue.submit(version, state)

    async def drained(self) -> None:
        """Return once nothing is evaluated or waits (the newest version is recorded)."""
        await self._queue.drained()

    async def _evaluate(self, version: int, state: StateDict) -> Metrics:
        if not self._split_read:
            self._split = await asyncio.to_thread(test_split, self._task)
            self._split_read = True
        if self._split is None:
            return {}
        if self._scorer is None:
            from server.model import Evaluator  # torch, only when a version is evaluated

            self._scorer = Evaluator(self._task, self._task.params).evaluate
        x, y = self._split
        scores = await asyncio.to_thread(self._scorer, state, x, y)
        return {"evalLoss": float(scores["loss"]), "evalAccuracy": float(scores["accuracy"])}

    async def _record(self, version: int, metrics: Metrics) -> None:
        finite = {k: v for k, v in metrics.items() if np.isfinite(v)}
        if not finite:
            return
        try:
            known = await self._db.record_evaluation(version, finite)
        except ClusterError as exc:
            log.error("the evaluation of version %d is not recorded: %s", version, exc)
            return
        if not known:
            log.warning("version %d is unknown: its evaluation is not recorded", version)
            return
        log.info(
            "version %d evaluated: eval loss %.4f, eval accuracy %.4f",
            version,
            finite.get("evalLoss", float("nan")),
            finite.get("evalAccuracy", float("nan")),
        )
