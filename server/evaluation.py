"""Evaluation of new globals off the round's critical path: one at a time, latest first.

Contract: :class:`EvaluationQueue` evaluates the versions handed to :meth:`submit` one at
a time, in the background (a task spawned on the server's :class:`server.background.
Background`, so stopping the server cancels it), and hands each result to its ``record``
callback (``record(version, metrics)``; ``metrics`` is ``{}`` when the evaluation failed,
which is logged). A version is published before its evaluation is known; nobody waits for
an evaluation except :meth:`drained` (the end of a federation waits there so that
``federation:finished`` carries the final version's evaluation).

Stale versions are skipped, never queued: while one evaluation runs at most one version
waits, and a newer :meth:`submit` replaces it (logged), so memory holds at most two
states and the evaluation never falls further behind than one version. The version being
evaluated is always finished and recorded; a skipped version's record keeps no
evaluation. The newest version is always evaluated. An evaluation lost to a stop or a
crash is not redone: its version's record keeps no evaluation.

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
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from client.tasks import Task
from client.weights import StateDict
from server.background import Background
from server.taskfile import PackageTask

log = logging.getLogger(__name__)

#: A task's test split: inputs and labels.
TestSplit = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


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


class EvaluationQueue:
    """Evaluates successive globals one at a time, skipping stale ones."""

    def __init__(
        self,
        *,
        evaluate: Callable[[int, StateDict], Awaitable[Metrics]],
        record: Callable[[int, Metrics], Awaitable[None]],
        background: Background,
    ) -> None:
        self._evaluate = evaluate
        self._record = record
        self._background = background
        self._pending: tuple[int, StateDict] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def busy(self) -> bool:
        """Whether an evaluation runs or waits."""
        return not self._idle.is_set()

    def submit(self, version: int, state: StateDict) -> None:
        """Evaluate ``version`` (holding ``state``) when the evaluator is free."""
        if self._pending is not None:
            log.info(
                "skipping the evaluation of version %d: version %d is newer",
                self._pending[0],
                version,
            )
        self._pending = (version, state)
        if self._idle.is_set():
            self._idle.clear()
            self._background.spawn(self._work(), f"evaluate-v{version}")

    async def drained(self) -> None:
        """Return once nothing is being evaluated or waits (the newest version is recorded)."""
        await self._idle.wait()

    async def _work(self) -> None:
        try:
            while self._pending is not None:
                version, state = self._pending
                self._pending = None
                try:
                    metrics = await self._evaluate(version, state)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("evaluation of version %d failed; it keeps none", version)
                    metrics = {}
                del state
                await self._record(version, metrics)
        finally:
            self._pending = None
            self._idle.set()
