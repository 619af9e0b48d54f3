"""Evaluation of new globals off the round's critical path: one at a time, latest first,
within a CPU budget.

Contract: :class:`EvaluationQueue` evaluates the versions handed to :meth:`submit` one at
a time, in the background (a task spawned on the server's :class:`server.background.
Background`, so stopping the server cancels it), and hands each result to its ``record``
callback (``record(version, metrics)``; ``metrics`` is ``{}`` when the evaluation failed,
which is logged). A version is published before its evaluation is known; nobody waits for
an evaluation except :meth:`drained` (the end of a federation waits there so that
``federation:finished`` carries the final version's evaluation).

Stale versions are skipped, never queued: while one evaluation runs or waits for its
budget at most one version waits, and a newer :meth:`submit` replaces it (logged at
debug level), so memory holds at most two states and the evaluation never falls further
behind than one version. The version being evaluated is always finished and recorded;
a skipped version's record keeps no evaluation. The newest version is always evaluated.
An evaluation lost to a stop or a crash is not redone: its version's record keeps no
evaluation.

The CPU budget (:class:`EvaluationBudget`, pure): evaluations use at most ``cpu_share`` of
one core over time (default :data:`EVALUATION_CPU_SHARE`): after an evaluation that cost
``t`` seconds, the next one starts no sooner than ``t * (1 / cpu_share - 1)`` seconds
after it ended. Its cost is the process's CPU time over the evaluation and its
``record`` (the history write), at most their wall time (:class:`Clock`): their own CPU
when they are the only work (a round's work done meanwhile counts too, so a busy server
evaluates less, never more). The first evaluation is free (it builds the model, and
imports torch: a one-time cost, not a rate). Once the budget allows, a waiting version is
evaluated at the next :meth:`submit` (right after a version is published: the newest one
then), or when no version comes for as long again as the rest was; so an evaluation
starts as a round starts (the server waits on the devices there), not in the middle of a
later round's intake or aggregation. At a round every few seconds (an evaluation of
milliseconds) every version is evaluated at once; at rounds faster than the budget,
versions in between are skipped. :meth:`drained` never waits for the budget:
the versions waiting are evaluated at once (the end of a federation, say).

Owned by the server's one event loop; not thread-safe. ``evaluate`` runs the blocking
work in a thread itself.

:func:`test_split` is the one rule of what new globals are evaluated on, for the single
process and the cluster's coordinator (blocking: call it in a thread): the task's test
split, or None for a package without server test data or a server without torch.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import numpy as np

from client.tasks import Task
from client.weights import StateDict
from server.background import Background
from server.taskfile import PackageTask

log = logging.getLogger(__name__)

#: A task's test split: inputs and labels.
TestSplit = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]

#: The share of one core the server's evaluations may use over time (see the module doc).
#: Measured (2 cores, load 8-10): a 0.4 MB version's evaluation and record cost ~5 ms, so
#: at the benchmark's ~0.06-0.08 s rounds about one version in three is evaluated (at 5 %:
#: two in three, little saved); a 100 MB version's ~0.09 s rests 2.8 s, under that size's
#: ~3.7 s round: every version; at a round per second or slower, every version of a
#: model whose evaluation takes under 30 ms.
EVALUATION_CPU_SHARE = 0.03


def test_split(task: Task) -> TestSplit | None:
    """The test split new globals are evaluated on (blocking); None when the server does
    not evaluate (a package without server test data, or no torch to run it)."""
    if isinstance(task, PackageTask):
        if task.package.test is None or len(task.package.test[1]) == 0:
            log.info("the package carries no test data: new globals are not evaluated")
            return None
        if importlib.util.find_spec("torch") is None:
            log.info("no torch on this server: new globals are not evaluated")
            return None
    return task.load_data("test", None)


Metrics = dict[str, float]


class EvaluationBudget:
    """When the next evaluation may start (pure; see the module doc)."""

    def __init__(self, cpu_share: float) -> None:
        if not (math.isfinite(cpu_share) and 0.0 < cpu_share <= 1.0):
            raise ValueError(f"the evaluation CPU share must be in (0, 1], got {cpu_share!r}")
        self._rest_per_second = 1.0 / cpu_share - 1.0
        self._earliest = -math.inf
        self._first = True

    def spent(self, ended_at: float, cost: float) -> None:
        """An evaluation that cost ``cost`` seconds ended at ``ended_at`` (the first one
        is not counted: see the module doc)."""
        if self._first:
            self._first = False
            return
        self._earliest = ended_at + max(0.0, cost) * self._rest_per_second

    def delay(self, now: float) -> float:
        """Seconds from ``now`` until the next evaluation may start (0: at once)."""
        return max(0.0, self._earliest - now)


class Clock(Protocol):
    """The time the queue reads and waits on (tests inject a controllable one)."""

    def now(self) -> float:
        """Monotonic wall seconds."""
        ...

    def cpu(self) -> float:
        """CPU seconds this process has used."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """:func:`time.monotonic`, :func:`time.process_time` and :func:`asyncio.sleep`."""

    def now(self) -> float:
        return time.monotonic()

    def cpu(self) -> float:
        return time.process_time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class EvaluationQueue:
    """Evaluates successive globals one at a time, skipping stale ones, within a budget."""

    def __init__(
        self,
        *,
        evaluate: Callable[[int, StateDict], Awaitable[Metrics]],
        record: Callable[[int, Metrics], Awaitable[None]],
        background: Background,
        cpu_share: float = EVALUATION_CPU_SHARE,
        clock: Clock | None = None,
    ) -> None:
        self._evaluate = evaluate
        self._record = record
        self._background = background
        self._budget = EvaluationBudget(cpu_share)
        self._clock: Clock = SystemClock() if clock is None else clock
        self._pending: tuple[int, StateDict] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Set by drained(): the versions waiting are evaluated without waiting for the budget.
        self._hurry = asyncio.Event()
        # Set by submit(): a version was just published (when a rested queue starts).
        self._submitted = asyncio.Event()

    @property
    def busy(self) -> bool:
        """Whether an evaluation runs or waits (for the evaluator or its budget)."""
        return not self._idle.is_set()

    def submit(self, version: int, state: StateDict) -> None:
        """Evaluate ``version`` (holding ``state``) when the evaluator and its budget allow."""
        if self._pending is not None:
            # Debug: at rounds faster than the budget this is most rounds.
            log.debug(
                "skipping the evaluation of version %d: version %d is newer",
                self._pending[0],
                version,
            )
        self._pending = (version, state)
        self._submitted.set()
        if self._idle.is_set():
            self._idle.clear()
            self._background.spawn(self._work(), f"evaluate-v{version}")

    async def drained(self) -> None:
        """Return once nothing is being evaluated or waits (the newest version is
        recorded); what waits for the budget is evaluated at once."""
        if self.busy:
            self._hurry.set()
        await self._idle.wait()

    async def _allowed(self) -> None:
        """Wait until the budget allows the next evaluation, then for the next
        :meth:`submit` (at most as long again): see the module doc. :meth:`drained` ends
        either wait."""
        delay = self._budget.delay(self._clock.now())
        if delay <= 0.0 or self._hurry.is_set():
            return
        await self._until(self._clock.sleep(delay))
        if self._hurry.is_set():
            return
        self._submitted.clear()
        await self._until(self._submitted.wait(), self._clock.sleep(delay))

    async def _until(self, *waits: Coroutine[Any, Any, Any]) -> None:
        """Return once the first of ``waits`` or :meth:`drained`'s hurry is done."""
        tasks = [asyncio.ensure_future(w) for w in (*waits, self._hurry.wait())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()

    async def _work(self) -> None:
        try:
            while self._pending is not None:
                await self._allowed()
                version, state = self._pending  # the newest one waiting now
                self._pending = None
                wall, cpu = self._clock.now(), self._clock.cpu()
                try:
                    metrics = await self._evaluate(version, state)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("evaluation of version %d failed; it keeps none", version)
                    metrics = {}
                del state
                await self._record(version, metrics)
                ended = self._clock.now()
                self._budget.spent(ended, min(ended - wall, self._clock.cpu() - cpu))
        finally:
            self._pending = None
            self._hurry.clear()
            self._idle.set()
