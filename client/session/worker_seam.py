"""The session's seam to the training worker: what it needs of one, and how it builds one.

Contract: :class:`Worker` is what :class:`client.session.rounds.Rounds` calls on
:class:`client.worker.TrainingWorker` (tests give it a stand-in); a
:data:`WorkerFactory` builds one from its event callback (:data:`OnWorkerEvent`, called
from any thread). :func:`default_worker_factory` builds the real one, importing
:mod:`client.worker` only when called. Nothing here starts a process or does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from client.worker_messages import TrainJob, WorkerEvent

if TYPE_CHECKING:
    from client.worker import BudgetLike

__all__ = ["OnWorkerEvent", "Worker", "WorkerFactory", "default_worker_factory"]


class Worker(Protocol):
    """What the session needs of :class:`client.worker.TrainingWorker`."""

    @property
    def is_busy(self) -> bool: ...

    def warm(self) -> object: ...
    def set_budget(self, budget: BudgetLike) -> object: ...
    def submit(self, job: TrainJob) -> object: ...
    def pause(self) -> object: ...
    def resume(self) -> object: ...
    def cancel(self) -> object: ...
    def shutdown(self) -> object: ...


#: The worker's event callback; it may be called from any thread.
OnWorkerEvent = Callable[[WorkerEvent], None]

#: Builds the worker from its event callback.
WorkerFactory = Callable[[OnWorkerEvent], Worker]


def default_worker_factory(on_event: OnWorkerEvent) -> Worker:
    from client.worker import TrainingWorker

    worker: Worker = TrainingWorker(on_event=on_event)
    return worker
