"""The end of a federation in cluster mode: recorded once by the coordinator, carried out
by every worker for its own devices.

Contract:

* :func:`finish_federation` (the coordinator's side, once its rounds are complete): waits
  until the evaluation of the final version is recorded (:class:`server.cluster.evaluation.
  ClusterEvaluation`, when it evaluates), then marks the federation finished with the
  latest version in PostgreSQL (:meth:`~server.cluster.contracts.ClusterDB.mark_finished`,
  idempotent: a coordinator that takes over after the last round marks it again, harmlessly).
* :class:`FederationEnd` (each worker's side, driven by its round agent): :meth:`check` reads
  whether the federation is finished -- a mark at a version of at least ``--rounds``
  (``--rounds 0`` never ends) -- and, once this worker holds that version, sends every
  device connected here the final ``weights:global`` and then ``federation:finished``
  (:meth:`server.distribution.Distributor.deliver_final_to_all`, at most once per
  connection) carrying the task, the rounds completed (the final version), the version and
  its evaluation (``evalLoss``/``evalAccuracy`` from the version's row, when recorded); then
  :attr:`FederationEnd.finished` is set (``--exit-when-done`` waits for it). A device that
  (re)registers afterwards gets both too (:meth:`welcome`), and is never started.

* :func:`federation_status`: the cluster status's ``finished`` (the end is carried out on
  this worker) and ``versions`` -- the newest :data:`STATUS_VERSIONS` versions, newest
  first, each ``{version, roundId, createdAt}`` and the :data:`STATUS_METRICS` (null
  until known; a version's evaluation appears once recorded), null when PostgreSQL does
  not answer.

As the single-process server, the devices stay connected (``federation:finished`` is a
state, not a disconnect). Once finished, :meth:`check` reads nothing more. Raises
:class:`~server.cluster.contracts.ClusterError` from the engines (the agent retries);
never blocks a handler.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from client.protocol import FederationFinished
from server.background import Background
from server.cluster.contracts import ClusterDB, ClusterError
from server.cluster.evaluation import ClusterEvaluation
from server.distribution import Distributor
from server.globalmodel import GlobalModel
from server.registry import DeviceRecord

__all__ = [
    "FINAL_METRICS",
    "STATUS_METRICS",
    "STATUS_VERSIONS",
    "FederationEnd",
    "federation_status",
    "final_metrics",
    "finish_federation",
]

log = logging.getLogger(__name__)

#: The version metrics ``federation:finished`` carries (as the single-process server).
FINAL_METRICS = ("evalLoss", "evalAccuracy")
#: Versions the cluster status lists.
STATUS_VERSIONS = 20
#: The version metrics the cluster status lists (null until known).
STATUS_METRICS = (
    "trainLoss",
    *FINAL_METRICS,
    "federatedEvalLoss",
    "federatedEvalAccuracy",
    "federatedEvalSamples",
    "federatedEvalDevices",
)


def final_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation a final version's metrics hold (finite values only)."""
    return {k: metrics[k] for k in FINAL_METRICS if k in metrics and math.isfinite(metrics[k])}


async def finish_federation(db: ClusterDB, evaluation: ClusterEvaluation | None) -> int | None:
    """Record the end once the final version's evaluation is recorded; the final version
    (None when there is no version)."""
    if evaluation is not None:
        await evaluation.drained()
    latest = await db.latest_version()
    if latest is None:
        return None
    await db.mark_finished(latest.version)
    log.info("the federation is finished with version %d", latest.version)
    return latest.version


class FederationEnd:
    """One worker's view of the end (see the module docstring)."""

    def __init__(
        self,
        *,
        task: str,
        rounds: int,
        db: ClusterDB,
        model: GlobalModel,
        distributor: Distributor,
        background: Background,
    ) -> None:
        self._task = task
        self._rounds = rounds
        self._db = db
        self._model = model
        self._distributor = distributor
        self._background = background
        #: What ``federation:finished`` says; None until the end is known here.
        self.message: FederationFinished | None = None
        #: Set once every device connected here when the end became known was told.
        self.finished = asyncio.Event()

    async def check(self) -> bool:
        """Whether the federation is finished; the first time it is, tell the devices here."""
        if self.message is not None:
            return True
        if self._rounds <= 0:
            return False
        version = await self._db.finished_version()
        if version is None or version < self._rounds or self._model.version < version:
            return False  # not finished, or the final version is not adopted here yet
        metrics: dict[str, float] = {}
        for row in await self._db.recent_versions(1):
            if row.version == version:
                metrics = final_metrics(row.metrics)
        self.message = FederationFinished(
            task=self._task, rounds_completed=version, version=version, metrics=metrics
        )
        log.info("the federation is finished (version %d): telling this worker's devices", version)
        await self._distributor.deliver_final_to_all(self.message)
        self.finished.set()
        return True

    def welcome(self, record: DeviceRecord) -> bool:
        """Once finished, send a device that (re)registers the final global and
        ``federation:finished``; True when it was (nothing else is offered to it)."""
        message = self.message
        if message is None:
            return False
        self._background.spawn(
            self._distributor.deliver_final(record, message),
            f"final-to-{record.device_id}",
            record.device_id,
        )
        return True


async def federation_status(db: ClusterDB, end: FederationEnd | None) -> dict[str, Any]:
    """The status fields of the versions and the end (see the module docstring)."""
    finished = end is not None and end.message is not None
    try:
        rows = await db.recent_versions(STATUS_VERSIONS)
    except ClusterError:
        return {"finished": finished, "versions": None}
    versions = [
        {
            "version": row.version,
            "roundId": row.round_id,
            "createdAt": row.created_at,
            **{k: _finite_or_none(row.metrics.get(k)) for k in STATUS_METRICS},
        }
        for row in rows
    ]
    return {"finished": finished, "versions": versions}


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
