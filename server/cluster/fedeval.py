"""Federated evaluation in cluster mode (``--evaluate-every N``): devices evaluate new
versions on their own test splits, asked through PostgreSQL.

Contract (the single-process server's rules, :mod:`server.fedeval`, over the shared engines):

* :class:`CoordinatorFederated` (the elected coordinator, after publishing a version that is
  due: :func:`server.fedeval.due`): selects up to ``clients_per_round`` of the fleet's
  eligible devices (Presence, by device id: :func:`server.fedeval.select_evaluators`), records
  one ask each (part ``i`` of ``n``, deadline ``round_timeout`` from now;
  :meth:`~server.cluster.contracts.ClusterDB.ask_evaluation`) and returns once the
  evaluation is settled -- every ask ``reported`` or ``done`` -- or at the deadline, so the
  next round opens only then (as Flower's fit-then-evaluate rounds). An ask whose device is
  gone from Presence for ``stale_after`` is set ``done``. Engine failures are logged and end
  the wait (the rounds go on).
* :class:`WorkerFederated` (every worker's round agent, :meth:`tick`): for the current
  version, each ``asked`` device connected HERE (once per connection) is brought up to date
  (:meth:`server.distribution.Distributor.ensure_global`; skipped, ``done``, if it then
  holds another version) and sent ``evaluation:start``; accepted -> ``accepted``, anything
  else -> ``done`` (a paused refusal marks the device paused in the registry, as a training
  refusal does). ``evaluation:result`` from an asked device is counted once
  (:meth:`~server.cluster.contracts.ClusterDB.record_federated_result`, which merges the
  version's sample-weighted means into its metrics: ``federatedEvalLoss``,
  ``federatedEvalAccuracy``, ``federatedEvalSamples``, ``federatedEvalDevices``), whichever
  worker it arrives at; a result not expected (or a repeat) is dropped and logged;
  ``evaluation:failed`` sets the ask ``done``.

Never raises into a handler except :class:`client.errors.FedtrayError`; background work logs
its failures. No torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import socketio

from client.protocol import (
    EvaluationFailed,
    EvaluationResult,
)
from client.tasks import Task
from server.background import Background
from server.cluster.contracts import ClusterDB, ClusterError, EvalAsk, EvalAskState, Presence
from server.config import ServerConfig
from server.distribution import Distributor
from server.fedeval import EvaluationAsk, ask_device, due, select_evaluators
from server.globalmodel import GlobalModel
from server.registry import DeviceRecord, Registry

__all__ = ["CoordinatorFederated", "WorkerFederated"]

log = logging.getLogger(__name__)

SETTLED: frozenset[EvalAskState] = frozenset({"reported", "done"})


class CoordinatorFederated:
    """Asks the fleet to evaluate due versions and waits until settled (module doc)."""

    def __init__(
        self, *, config: ServerConfig, db: ClusterDB, presence: Presence, poll: float = 0.5
    ) -> None:
        self._config = config
        self._db = db
        self._presence = presence
        self._poll = poll

    async def evaluate(self, version: int) -> None:
        """Ask for ``version``'s federated evaluation when due; return once settled."""
        cfg = self._config
        if not due(version, cfg.evaluate_every):
            return
        try:
            eligible = await self._presence.eligible_devices()
            chosen = select_evaluators(
                [(device_id, None) for device_id, _ in eligible], version, cfg.clients_per_round
            )
            if not chosen:
                log.info("version %d: no device can evaluate it now", version)
                return
            deadline = time.time() + cfg.round_timeout
            asks = [EvalAsk(version, d, i, len(chosen), deadline) for i, d in enumerate(chosen)]
            await self._db.ask_evaluation(asks)
            log.info("version %d: asking %d device(s) to evaluate it", version, len(chosen))
            await self._settle(version, deadline)
        except ClusterError as exc:
            log.error("federated evaluation of version %d: %s; going on", version, exc)

    async def _settle(self, version: int, deadline: float) -> None:
        absent_since: dict[str, float] = {}
        while True:
            asks = await self._db.evaluation_asks(version)
            waiting = [a for a in asks if a.state not in SETTLED]
            if not waiting:
                log.info("version %d: federated evaluation settled", version)
                return
            if time.time() >= deadline:
                log.info(
                    "version %d: evaluation deadline passed; %d device(s) did not report",
                    version,
                    len(waiting),
                )
                return
            now = time.monotonic()
            for ask in waiting:
                if await self._presence.worker_of(ask.device_id) is not None:
                    absent_since.pop(ask.device_id, None)
                elif now - absent_since.setdefault(ask.device_id, now) >= self._config.stale_after:
                    await self._db.set_ask_state(version, ask.device_id, "done")
            await asyncio.sleep(max(0.0, min(self._poll, deadline - time.time())))


class WorkerFederated:
    """Carries out the asks for this worker's devices and counts results (module doc)."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        task: Task,
        sio: socketio.AsyncServer,
        registry: Registry,
        model: GlobalModel,
        distributor: Distributor,
        background: Background,
        db: ClusterDB,
    ) -> None:
        self._config = config
        self._task = task
        self._sio = sio
        self._registry = registry
        self._model = model
        self._distributor = distributor
        self._background = background
        self._db = db
        self._version = -1  # the version the asks below are of
        self._offered: dict[str, str] = {}  # device id -> the sid asked
        self._settled = False

    async def tick(self) -> None:
        """Ask this worker's ``asked`` devices to evaluate the current version."""
        version = self._model.version
        if not due(version, self._config.evaluate_every):
            return
        if version != self._version:
            self._version, self._offered, self._settled = version, {}, False
        if self._settled:
            return
        asks = await self._db.evaluation_asks(version)
        if not asks:
            return  # not asked (yet)
        if all(a.state in SETTLED for a in asks) or time.time() > asks[0].deadline:
            self._settled = True
            return
        for ask in asks:
            if ask.state != "asked":
                continue
            record = self._registry.get(ask.device_id)
            if (
                record is None
                or record.sid is None
                or self._offered.get(ask.device_id) == record.sid
            ):
                continue
            self._offered[ask.device_id] = record.sid
            self._background.spawn(
                self._ask(ask, record), f"evaluate-v{version}-{ask.device_id}", ask.device_id
            )

    async def _ask(self, ask: EvalAsk, record: DeviceRecord) -> None:
        state: EvalAskState = "done"
        try:
            state = await self._ask_one(ask, record)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bug while asking %s to evaluate version %d", record.name, ask.version)
        finally:
            with contextlib.suppress(ClusterError):
                await self._db.set_ask_state(ask.version, ask.device_id, state)

    async def _ask_one(self, ask: EvalAsk, record: DeviceRecord) -> EvalAskState:
        asked = EvaluationAsk(ask.version, ask.index, ask.count, ask.deadline)
        accepted = await ask_device(
            self._sio, self._registry, self._distributor, self._config, self._task, record, asked
        )
        return "accepted" if accepted else "done"

    async def on_result(self, record: DeviceRecord, result: EvaluationResult) -> None:
        """``evaluation:result``: counted once, in PostgreSQL."""
        if result.task != self._config.task:
            log.info("dropping %s's evaluation of task %s: not asked", record.name, result.task)
            return
        try:
            counted = await self._db.record_federated_result(
                result.version, record.device_id, result.loss, result.accuracy, result.num_samples
            )
        except ClusterError as exc:
            log.error("the evaluation result of %s is not recorded: %s", record.name, exc)
            return
        if not counted:
            log.info(
                "dropping %s's evaluation of version %d: not expected from it (or a repeat)",
                record.name,
                result.version,
            )
            return
        log.info(
            "version %d: %s evaluated it: loss %.4f, accuracy %.4f on %d samples",
            result.version,
            record.name,
            result.loss,
            result.accuracy,
            result.num_samples,
        )

    def on_failed(self, record: DeviceRecord, failed: EvaluationFailed) -> None:
        """``evaluation:failed``: nothing more will come from the device (logged)."""
        log.info(
            "version %d: %s could not evaluate it (%s): %s",
            failed.version,
            record.name,
            failed.code,
            failed.message,
        )
        self._background.spawn(
            self._done(failed.version, record.device_id), f"evaluation-failed-{record.device_id}"
        )

    async def _done(self, version: int, device_id: str) -> None:
        with contextlib.suppress(ClusterError):
            await self._db.set_ask_state(version, device_id, "done")
