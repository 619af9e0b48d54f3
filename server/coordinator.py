"""The round coordinator: runs rounds from waiting to a new global version, and the end.

Contract: :class:`RoundCoordinator` owns the federation's one round phase (a
:class:`server.phase.PhaseMachine`; the status API reads it from :attr:`phase`), the round
loop and everything that decides a round: selection (random, with the server's seed),
partitioning (the selected devices get parts ``0..n-1`` of ``n`` in selection order),
``training:start``/``training:cancel`` (:mod:`server.starter`), counting updates exactly
once (:meth:`accept_update`, :mod:`server.intake`: saved on disk before it is acknowledged,
kept as the verified safetensors document received, checked in place, never re-encoded),
closing, aggregating
and publishing the new version (:class:`server.globalmodel.GlobalModel`), then evaluating
it off the critical path on the server; on the devices (:mod:`server.fedeval`, every
``--evaluate-every`` versions) the next round opens once that evaluation is settled.

A new version is published (``history.json`` saved, the next round free to start) as soon
as it is saved. While it is being saved, a document over one chunk already goes to the
connected devices (:meth:`server.distribution.Distributor.presend`): all of it but its
last chunk, which goes only once the save is over, so no device completes it and nothing
names it before it is durable (or its save failed: logged, and it is published all the
same, as every new version whose save fails is). It is sent to every connected device as
the next round starts: the devices that round starts get it inside ``training:start`` when
it is small (or ``weights:global`` first, :mod:`server.starter`), the others by
``weights:global`` at once (all of them when no round starts at once; a version due for
federated evaluation reaches the devices asked to evaluate it by ``weights:global``
first); its ``weights:global`` carries what is known then (the round's sample-weighted
``trainLoss``). Its evaluation on the server's test split (one kept model,
:class:`server.model.Evaluator`) runs in the background, one at a time, stale versions
skipped, within a CPU budget (:class:`server.evaluation.EvaluationQueue`: at most a share
of one core, so at rounds faster than it versions in between go unevaluated; the final
version is always evaluated), and is recorded into that version's history record (and
``history.json``) when ready; a later ``weights:global`` of that version carries it too.
The status API may show a new version before its evaluation. A crash or stop before it is
recorded leaves the record without one. Device records change only through the registry's
named transitions.

Before each round it waits for ``--min-clients`` eligible devices on the registry's
incremental counts (:mod:`server.device_wait`): woken when the eligible count crosses
``min_clients`` or a device may have turned stale, never by a heartbeat; the waiting reason
follows the counts. The round's files are ordered by :mod:`server.roundfiles`. A device
that disconnects has its slot freed and its ``training:start`` still awaiting an answer
cancelled (it cannot be answered; waiting out the ack timeout would hold up the part
offered again when the device is back).

The end is a state: after ``config.rounds`` rounds (and the final version's evaluation:
the end waits for it, so ``federation:finished`` carries it) the phase becomes ``finished``, every
connected device gets the final ``weights:global`` and then ``federation:finished``
(:meth:`finished_message`), and :attr:`finished` is set; a device that registers later
gets both too (:meth:`welcome`). The server goes on serving until it is stopped.

Surviving a crash: the open round is kept in ``state_dir/round.json`` (first saved while
its devices are being started, not before: no update of it is taken in, and its files are
never removed, before that save is done) and each accepted update in ``state_dir/round/``
(:mod:`server.roundstore`); a round restored at start
(:mod:`server.restore`) runs first, under the SAME round id, and the slots of devices that
had not reported wait for their devices to reconnect for :func:`server.restore.return_grace`
(derived from the client's reconnect ceiling, :mod:`client.backoff`, so a device in its
longest backoff is still expected), never past the round's deadline; a device back in
time is offered its part again and resumes its upload. The round's files are removed only
after its new version is saved.

Never raises into a handler except :class:`client.errors.FedtrayError` (the refusal to
answer); torch work, decoding and aggregation run in threads so heartbeats keep flowing
(but the aggregate of a model of at most :data:`server.intake.INLINE_WORK_BYTES`, when the
strategy does not read every kept update again: less work than the thread hop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from typing import Any

import numpy as np
import socketio

from client.protocol import (
    FederationFinished,
    SubmitAccepted,
    TrainingError,
    WeightsSubmit,
)
from client.tasks import Task
from client.transfer import BlobStore
from client.weights import StateDict
from server.aggregation import weighted_mean
from server.background import Background
from server.config import ServerConfig
from server.device_wait import DeviceWait
from server.distribution import Distributor
from server.document import IN_PLACE_MIN_BYTES, blank_document, data_bytes
from server.evaluation import EvaluationQueue, Metrics
from server.fedeval import FederatedEvaluation
from server.globalmodel import GlobalModel, Prepared
from server.intake import UpdateIntake, aggregate_runs_inline
from server.model import Evaluator, ModelEvaluator
from server.phase import PhaseMachine
from server.registry import DeviceRecord, Registry
from server.restore import return_grace
from server.roundfiles import RoundFiles
from server.rounds import Round, abandon_detail, awaiting_return, drop_stale, select_devices
from server.roundstore import RoundStore
from server.starter import RoundStarter, StrayTraining
from server.status import abandoned_record, completed_record
from server.strategies import Aggregate, FileUpdates, Strategy
from server.taskfile import PackageTask

log = logging.getLogger(__name__)

TestData = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class RoundCoordinator:
    """Runs the rounds of one federation (see the module docstring)."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        sio: socketio.AsyncServer,
        registry: Registry,
        model: GlobalModel,
        strategy: Strategy,
        round_store: RoundStore,
        blobs: BlobStore,
        distributor: Distributor,
        background: Background,
    ) -> None:
        self._config = config
        self._sio = sio
        self._registry = registry
        self._model = model
        self.strategy = strategy
        self._round_store = round_store
        self._blobs = blobs
        self._distributor = distributor
        self._background = background
        self._starter = RoundStarter(sio, config, registry, distributor)
        self._strays = StrayTraining(self._starter, background)
        self.phase = PhaseMachine()
        self.finished = asyncio.Event()
        self._rng = random.Random(config.seed)
        # Distinguishes this process's round ids from a previous run's after a restart.
        self._run_tag = secrets.token_hex(4)
        self._task: Task | None = None
        self._test_data: TestData | None = None
        self._evaluator: ModelEvaluator | None = None
        self._evaluations = EvaluationQueue(
            evaluate=self._evaluate, record=self._record_evaluation, background=background
        )
        #: Federated evaluation of new versions on the devices (server.fedeval).
        self.federated = FederatedEvaluation(
            config=config,
            sio=sio,
            registry=registry,
            model=model,
            distributor=distributor,
            background=background,
        )
        self._restored: Round | None = None
        # The open round's first training:start of each device, until the round ends.
        self._starters: dict[str, asyncio.Task[None]] = {}
        self._round_changed = asyncio.Event()
        # The open round's first save (round.json) runs beside its devices' starts; an
        # update is taken in only once it is done (it clears the round's folder).
        self._files = RoundFiles(round_store, config.task, config.state_dir)
        self._intake = UpdateIntake(
            config=config,
            phase=self.phase,
            files=self._files,
            round_store=round_store,
            blobs=blobs,
            model=model,
            registry=registry,
            strategy=strategy,
            on_counted=self._round_changed.set,
        )
        # A new version waits to be broadcast: to the devices the next round does not
        # start (those get it with training:start), or to all when no round starts at once.
        self._broadcast_due = False
        self._return_grace_until = 0.0
        #: The devices welcomed since a round was restored, while it waits for them
        #: (from :meth:`prepare` on, so none registering before :meth:`run` is missed).
        self._welcomed: set[str] = set()
        #: The wait for enough eligible devices before each round (server.device_wait).
        self.waiting = DeviceWait(
            config=config,
            registry=registry,
            phase=self.phase,
            before_waiting=lambda: self._broadcast(frozenset()),
        )

    def prepare(self, task: Task, test_data: TestData | None, restored: Round | None) -> None:
        """Set up before :meth:`run`: the task, its test split (None: new globals are not
        evaluated), a round restored from disk."""
        self._task, self._test_data = task, test_data
        saved_state = self._model.optimizer_state
        try:
            self.strategy.load_optimizer_state(saved_state, self._model.state)
        except ValueError as exc:
            log.warning("%s; %s starts with a fresh optimizer state", exc, self.strategy.name)
        if saved_state:
            log.info(
                "%s goes on with the optimizer state saved with version %d",
                self.strategy.name,
                self._model.version,
            )
        if restored is not None:
            self._restored = restored
            self.phase.open(restored)

    def use_evaluator(self, evaluator: ModelEvaluator) -> None:
        """Evaluate the next new globals with ``evaluator`` (built from the task when none
        is given; tests inject a slow one)."""
        self._evaluator = evaluator

    async def evaluations_drained(self) -> None:
        """Return once no evaluation runs or waits."""
        await self._evaluations.drained()

    @property
    def task(self) -> Task:
        if self._task is None:
            raise RuntimeError("the server is not started")
        return self._task

    @property
    def round(self) -> Round | None:
        return self.phase.round

    def _package_bytes(self) -> int | None:
        """The size of the task's package; None for an installed task."""
        task = self._task
        return task.package.size if isinstance(task, PackageTask) else None

    @property
    def version(self) -> int:
        """The current global version."""
        return self._model.version

    # ============================================================ events from devices

    def devices_changed(self) -> None:
        """Look again at who is eligible now. Device transitions need no call: the
        registry's counts wake the wait when they cross ``min_clients``
        (:mod:`server.device_wait`); a heartbeat wakes nothing."""
        self.waiting.nudge()

    def heard_training(self, record: DeviceRecord, round_id: str) -> None:
        """A heartbeat says the device trains ``round_id``: unless that is the open
        round, it is told to stop (:class:`server.starter.StrayTraining`)."""
        rnd = self.phase.round  # or the last one, once closed: then none is open
        open_round = rnd.round_id if rnd is not None and not rnd.closed else None
        self._strays.heard(record, round_id, open_round)

    def device_left(self, record: DeviceRecord) -> None:
        """A device disconnected: free its slot in the open round."""
        self._strays.forget(record.device_id)
        rnd = self.phase.round
        if rnd is not None and rnd.mark(record.device_id, "dropped", "disconnected"):
            log.info("round %s: slot of %s freed (disconnected)", rnd.round_id, record.name)
        # Its training:start cannot be answered any more: waiting out the ack timeout
        # would hold up the part offered again when it is back (a global it carries
        # blocks every send of the global to the device until answered).
        starter = self._starters.pop(record.device_id, None)
        if starter is not None:
            starter.cancel()
        self._round_changed.set()

    def training_failed(self, record: DeviceRecord, err: TrainingError) -> None:
        """A device reported ``training:error``: its slot has failed."""
        self._registry.training_failed(record.device_id)
        rnd = self.phase.round
        if rnd is not None and err.round_id == rnd.round_id:
            rnd.mark(record.device_id, "failed", f"{err.code}: {err.message}")
            self._round_changed.set()

    def welcome(self, record: DeviceRecord) -> None:
        """A device (re)registered: bring it up to date, re-offer its part of the open round,
        or, once finished, send it the final global and ``federation:finished``."""
        if self.phase.finished:
            self._background.spawn(
                self._distributor.deliver_final(record, self.finished_message()),
                f"final-to-{record.device_id}",
                record.device_id,
            )
            return
        if self._restored is not None or self._return_grace_until:
            self._welcomed.add(record.device_id)
        self._distributor.send_global_later(record)
        self._reoffer(record)

    def _reoffer(self, record: DeviceRecord) -> None:
        """Offer a device that reconnects its part of the open round again (same round id,
        partition and deadline), so it can resume from its checkpoint."""
        rnd = self.phase.round
        if rnd is None or record.state == "paused":
            return
        index = rnd.reoffer(record.device_id, time.monotonic())
        if index is None:
            return
        log.info("round %s: %s is back; offering its part again", rnd.round_id, record.name)
        self._background.spawn(
            self._start_device(rnd, record.device_id, index, len(rnd.slots)),
            f"restart-{record.device_id}",
            record.device_id,
        )

    async def accept_update(self, record: DeviceRecord, sub: WeightsSubmit) -> SubmitAccepted:
        """Count a ``weights:submit`` exactly once; the ack. Raises FedtrayError to refuse
        (:class:`server.intake.UpdateIntake`)."""
        return await self._intake.accept(record, sub)

    # ============================================================ the loop

    def finished_message(self) -> FederationFinished:
        """What ``federation:finished`` says."""
        return FederationFinished(
            task=self._config.task,
            rounds_completed=self._model.rounds_completed,
            version=self._model.version,
            metrics=self._model.final_metrics(),
        )

    async def run(self) -> None:
        """The round loop: until the configured rounds are complete (forever with 0)."""
        cfg = self._config
        attempt = 0
        number = 0
        restored, self._restored = self._restored, None
        if restored is not None:
            number, attempt = restored.number, restored.attempt
            now = time.monotonic()
            self._return_grace_until = now + return_grace(cfg.stale_after)
            log.info(
                "restored round %s waits up to %.1f s for its devices to return",
                restored.round_id,
                max(0.0, min(self._return_grace_until, restored.deadline) - now),
            )
            completed = await self._drive_round(restored, [])
            self._return_grace_until, self._welcomed = 0.0, set()
            if not completed:
                await asyncio.sleep(cfg.effective_retry_delay)
        while True:
            if cfg.rounds and self._model.rounds_completed >= cfg.rounds:
                await self._finish()
                return
            if number != self._model.rounds_completed + 1:
                number, attempt = self._model.rounds_completed + 1, 0
            candidates = await self._wait_for_devices(number)
            attempt += 1
            if not await self._run_round(number, attempt, candidates):
                self.phase.wait(number, "retrying after an abandoned round")
                await asyncio.sleep(cfg.effective_retry_delay)

    async def _finish(self) -> None:
        cfg, model = self._config, self._model
        log.info(
            "all %d rounds are complete (version %d); the federation is finished",
            cfg.rounds,
            model.version,
        )
        self._broadcast_due = False  # deliver_final_to_all sends the final version
        # federation:finished carries the final version's evaluation: wait for it.
        await self._evaluations.drained()
        self.phase.finish()
        await self._distributor.deliver_final_to_all(self.finished_message())
        self.finished.set()

    async def _wait_for_devices(self, number: int) -> list[DeviceRecord]:
        """Eligible devices once there are enough (:class:`server.device_wait.DeviceWait`)."""
        return await self.waiting.wait(number, self._package_bytes())

    async def _run_round(self, number: int, attempt: int, candidates: list[DeviceRecord]) -> bool:
        cfg = self._config
        chosen = select_devices([d.device_id for d in candidates], cfg.clients_per_round, self._rng)
        self._broadcast(frozenset(chosen))
        round_id = f"r{number}-{attempt}-{self._run_tag}"
        rnd = Round.open(
            round_id=round_id,
            number=number,
            attempt=attempt,
            base_version=self._model.version,
            selected=chosen,
            now=time.monotonic(),
            timeout=cfg.round_timeout,
            required=cfg.required_reports(len(chosen)),
            deadline_unix=time.time() + cfg.round_timeout,
        )
        self.strategy.begin(self._model.state)
        self.phase.open(rnd)
        # Saved beside the devices' starts, not before them: nothing of the round is
        # counted before it is saved (accept_update waits for it, RoundFiles.opened).
        self._files.open(rnd)
        log.info(
            "round %d started (%s): %d selected [%s], %d reports needed, deadline in %.0f s",
            number,
            round_id,
            len(chosen),
            ", ".join(self._registry.name_of(d) for d in chosen),
            rnd.required,
            cfg.round_timeout,
        )
        self._starters = {
            device_id: asyncio.create_task(self._start_device(rnd, device_id, i, len(chosen)))
            for i, device_id in enumerate(chosen)
        }
        try:
            return await self._drive_round(rnd, list(self._starters.values()))
        finally:
            self._starters = {}

    async def _drive_round(self, rnd: Round, starters: list[asyncio.Task[None]]) -> bool:
        """Wait for an open round's reports, then close it; True when it completed."""
        cfg = self._config
        self.phase.train()
        try:
            while True:
                self._round_changed.clear()
                now = time.monotonic()
                for name in drop_stale(rnd, self._registry, now):
                    log.info("round %s: slot of %s freed (stale)", rnd.round_id, name)
                if now >= rnd.deadline or (
                    (rnd.settled or not rnd.can_still_succeed)
                    and not (
                        now < self._return_grace_until and awaiting_return(rnd, self._welcomed)
                    )
                ):
                    break
                # asyncio.timeout, not wait_for: no task per wake-up (one per start and
                # per update counted).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(rnd.deadline - now, cfg.heartbeat_interval)):
                        await self._round_changed.wait()
        finally:
            for starter in starters:
                starter.cancel()
            await asyncio.gather(*starters, return_exceptions=True)
        collected_at = time.time()
        await self._files.opened(rnd)  # its files are removed below: never before they are saved
        async with self._intake.lock:
            working = self.phase.aggregate()
        if working:
            await self._starter.cancel(rnd.round_id, working, "the round is closed")
        if not rnd.succeeded:
            self._abandon(rnd)
            await self._files.forget()
            self.phase.close()
            return False
        await self._complete_round(rnd, collected_at)
        self.phase.close()
        self._broadcast_due = True  # sent as the next round starts (_broadcast)
        self.federated.published(self.task, self._model.version)
        # Fit, then evaluate (as Flower's rounds): the next round opens once the devices
        # asked to evaluate this version are done, so none is asked to train meanwhile.
        await self.federated.settled(self._model.version)
        return True

    def _broadcast(self, starting: frozenset[str]) -> None:
        """Send a new version to every connected device but those in ``starting``."""
        if self._broadcast_due:
            self._broadcast_due = False
            self._distributor.broadcast(exclude=starting)

    def _abandon(self, rnd: Round) -> None:
        now = time.monotonic()
        detail = abandon_detail(rnd, self._registry, now)
        log.warning(
            "round %d abandoned (%s): %d of %d reported, %d needed; %s; retrying",
            rnd.number,
            rnd.round_id,
            len(rnd.reported),
            len(rnd.slots),
            rnd.required,
            detail,
        )
        self._model.record_abandoned(
            abandoned_record(rnd, self._model.version, detail, now, time.time())
        )

    async def _complete_round(self, rnd: Round, collected_at: float) -> None:
        kept = FileUpdates(
            self._round_store,
            self._model.layout,
            [
                (self._round_store.update_file_name(device_id), slot.num_samples)
                for device_id, slot in rnd.slots.items()
                if slot.state == "reported"
            ],
        )
        version = self._model.version + 1

        model_bytes = data_bytes(self._model.layout)
        in_place = model_bytes >= IN_PLACE_MIN_BYTES

        def aggregate_and_prepare() -> tuple[Aggregate, Prepared]:
            # One thread hop for both: the new state is computed into its own safetensors
            # document where the strategy can (server.document: never copied), hashed and
            # written where it was computed (GlobalModel.prepare_blocking).
            document = blank_document(self._model.layout) if in_place else None
            result = self.strategy.result(kept, None if document is None else document.views)
            return result, self._model.prepare_blocking(
                result.weights, version, result.optimizer_state, document
            )

        # Less than the thread hop it saves on the round's critical path.
        if aggregate_runs_inline(model_bytes, self.strategy, len(rnd.reported)):
            aggregate, prepared = aggregate_and_prepare()
        else:
            aggregate, prepared = await asyncio.to_thread(aggregate_and_prepare)
        new_state = aggregate.weights
        train_loss = weighted_mean(
            [
                (slot.metrics["trainLoss"], slot.num_samples)
                for slot in rnd.slots.values()
                if slot.state == "reported" and "trainLoss" in slot.metrics
            ]
        )
        record = completed_record(
            rnd, version, train_loss, collected_at, time.monotonic(), time.time()
        )
        timing = record.timing
        assert timing is not None
        # Persist first, then publish: a version anyone has seen survives a crash. Its
        # bytes go to the devices meanwhile, all but the last chunk (Distributor.presend):
        # no device completes it, nothing names it, before its save is over.
        presend = self._distributor.presend(version, prepared.encoded, prepared.sha256)
        try:
            saved = await self._model.persist(prepared, record)
        except BaseException:
            presend.abandon()
            raise
        presend.durable()
        self._registry.rounds_counted(rnd.reported)
        self._model.publish(
            prepared, record, {} if train_loss is None else {"trainLoss": train_loss}
        )
        self.strategy.commit(aggregate)  # the optimizer state now goes with this version
        timing.published_at = time.time()  # the published record's own timing (status only)
        if saved:
            # Only now: until the new version is saved, the round's updates live in its
            # files. Removed after publishing, off the round's path (a leftover after a
            # crash is a round of an older version: discarded at restart); the next
            # round's first save waits for it.
            self._files.forget_later()
        log.info(
            "round %d: %d selected, %d reported, train loss %s, %.1f s (version %d)",
            rnd.number,
            len(rnd.slots),
            len(rnd.reported),
            _fmt(train_loss),
            record.seconds,
            self._model.version,
        )
        if self._test_data is not None:
            self._evaluations.submit(version, new_state)

    async def _evaluate(self, version: int, state: StateDict) -> Metrics:
        """``evalLoss``/``evalAccuracy`` of ``state`` on the test split (raises on failure;
        the queue logs it). One model is kept for every version
        (:class:`server.model.Evaluator`)."""
        if self._test_data is None:
            return {}
        x_test, y_test = self._test_data
        if self._evaluator is None:
            self._evaluator = Evaluator(self.task, self.task.params)
        scores = await asyncio.to_thread(self._evaluator.evaluate, state, x_test, y_test)
        return {"evalLoss": float(scores["loss"]), "evalAccuracy": float(scores["accuracy"])}

    async def _record_evaluation(self, version: int, metrics: Metrics) -> None:
        """Record version ``version``'s evaluation into its history record (and on disk)."""
        await self._model.record_evaluation(version, metrics)
        log.info(
            "version %d evaluated: eval loss %s, eval accuracy %s",
            version,
            _fmt(metrics.get("evalLoss")),
            _fmt(metrics.get("evalAccuracy")),
        )

    async def _start_device(self, rnd: Round, device_id: str, index: int, count: int) -> None:
        try:
            await self._starter.start(self.task, rnd, device_id, index, count)
        finally:
            self._round_changed.set()
