"""A cluster worker's round service: what the device handlers call, the round agent, the
intake of updates, the partial sum, and following new versions.

Contract: :class:`ClusterRounds` is what :class:`server.handlers.DeviceNamespace` calls in
cluster mode where the single-process server has its round coordinator
(:class:`server.handlers.RoundService`). It decides nothing about rounds (the elected
:mod:`server.cluster.coordinator` does, in PostgreSQL); it carries the decisions out for the
devices connected to THIS worker:

* the round agent (:meth:`ClusterRounds.run`): on each notification of the workers' channel
  (``round:<id>``, ``version:<n>``) and every ``poll`` seconds, it reads the open round and
  sends ``training:start`` (the same round id, part ``index`` of ``count``, base version and
  deadline; :class:`server.starter.RoundStarter`) to each of its connected devices with an
  assignment (``assigned``, ``started`` or ``dropped``) that this connection was not yet
  offered -- so a device that (re)registers here while its part is open, e.g. after its
  worker died, is offered it again; the answer is recorded with
  :meth:`~server.cluster.contracts.ClusterDB.set_assignment` (``started``, ``refused``,
  ``failed``, ``dropped``);
* intake (:meth:`ClusterRounds.accept_update`): ``weights:submit`` for the open round from an
  assigned device is received and checked as the single-process server does (the blob store,
  the layout, SHA-256), stored in shared storage, recorded with
  :meth:`~server.cluster.contracts.ClusterDB.record_update` and only then folded into this
  worker's partial FedAvg sum (not when the coordinator reads every update back instead:
  :func:`server.cluster.aggregate.reads_every_update`) and acknowledged with the round's
  count of reports (:meth:`~server.cluster.contracts.ClusterDB.count_updates`); a resend
  after a lost ack is answered accepted again and counted once (the database row decides);
* when the round turns ``closing`` the partial sum is written to shared storage and
  recorded (:meth:`~server.cluster.contracts.ClusterDB.record_partial`); recording an update
  and writing the partial exclude each other, so a partial names exactly the updates in it;
* on a new version it fetches the blob (verified), makes it this worker's global and sends
  ``weights:global`` to its connected devices (:class:`server.distribution.Distributor`);
* the end (:attr:`ClusterRounds.end`, :class:`server.cluster.ending.FederationEnd`): while
  no round is open or closing the agent checks whether the federation is finished; once it
  is, its devices get the final global and ``federation:finished``, and a device that
  registers later gets both instead of being brought up to date.

Never raises into a handler except :class:`client.errors.FedtrayError`; an engine that fails
(:class:`~server.cluster.contracts.ClusterError`) refuses an update with ``internal_error``
(the device sends it again later) and the agent retries on its next tick. Federated
evaluation (``--evaluate-every N``) is carried out by :class:`server.cluster.fedeval.
WorkerFederated` on each tick; when it is off its events are refused with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from client.errors import FedtrayError
from client.protocol import (
    EvaluationFailed,
    EvaluationResult,
    SubmitAccepted,
    TrainingError,
    WeightsSubmit,
)
from client.tasks import Task
from client.transfer import BlobStore
from client.weights import Layout, StateDict, decode, layout_of
from server.background import Background
from server.cluster.aggregate import reads_every_update
from server.cluster.contracts import (
    Assignment,
    AssignmentState,
    ClusterDB,
    ClusterError,
    PartialRow,
    RoundRow,
    SharedBlobs,
    UpdateRow,
    VersionRow,
)
from server.cluster.ending import FederationEnd
from server.cluster.fedeval import WorkerFederated
from server.cluster.partial import PartialSum
from server.config import ServerConfig
from server.distribution import Distributor
from server.globalmodel import GlobalModel, Prepared
from server.intake import receive_update, unsaved_error
from server.registry import DeviceRecord, Registry
from server.rounds import Round, Slot, SlotState
from server.roundstore import RoundStore
from server.starter import RoundStarter
from server.status import RoundRecord

log = logging.getLogger(__name__)

#: Assignment states whose device is offered its part when it is connected here.
OFFERED_STATES: frozenset[AssignmentState] = frozenset({"assigned", "started", "dropped"})

#: A local slot's outcome after ``training:start`` -> the assignment state recorded.
_OUTCOME: dict[SlotState, AssignmentState] = {
    "training": "started",
    "refused": "refused",
    "failed": "failed",
    "dropped": "dropped",
}

FEDERATED_OFF = "federated evaluation is off in cluster mode"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _FederatedOff:
    """Federated evaluation's events when it is off (``--evaluate-every 0``): refused."""

    async def tick(self) -> None:
        """Nothing is asked."""

    async def on_result(self, record: DeviceRecord, result: EvaluationResult) -> None:
        raise FedtrayError("bad_request", FEDERATED_OFF)

    def on_failed(self, record: DeviceRecord, failed: EvaluationFailed) -> None:
        raise FedtrayError("bad_request", FEDERATED_OFF)


@dataclass
class _Folding:
    """This worker's partial sum for one round."""

    round_id: str
    partial: PartialSum
    written: bool = False


class ClusterRounds:
    """The round service of one worker (see the module docstring)."""

    def __init__(
        self,
        *,
        worker_id: str,
        config: ServerConfig,
        task: Task,
        registry: Registry,
        model: GlobalModel,
        blobs: BlobStore,
        distributor: Distributor,
        starter: RoundStarter,
        background: Background,
        db: ClusterDB,
        shared: SharedBlobs,
        work_dir: Path,
        mirror: Callable[[str], None],
        poll: float = 1.0,
        federated: WorkerFederated | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._config = config
        self._task = task
        self._registry = registry
        self._model = model
        self._blobs = blobs
        self._distributor = distributor
        self._starter = starter
        self._background = background
        self._db = db
        self._shared = shared
        self._incoming = RoundStore(work_dir)
        self._versions_dir = work_dir / "versions"
        self._poll = poll
        self._mirror = mirror
        #: Federated evaluation (server.cluster.fedeval); refused when off.
        self.federated: WorkerFederated | _FederatedOff = federated or _FederatedOff()
        #: The end of the federation as this worker carries it out.
        self.end = FederationEnd(
            task=config.task,
            rounds=config.rounds,
            db=db,
            model=model,
            distributor=distributor,
            background=background,
        )
        #: The round as last read from the database (None: no round open or closing).
        self.round: RoundRow | None = None
        self._local: Round | None = None  # the starter's view of the round: our devices
        self._offered: dict[str, str] = {}  # device id -> the sid offered its part
        self._folding: _Folding | None = None
        self._fold_lock = asyncio.Lock()
        #: Whether updates are summed here (the coordinator reads them back otherwise).
        self._sums = not reads_every_update(config.strategy)
        self._wake = asyncio.Event()
        self._version_lock = asyncio.Lock()

    # ============================================================ the handlers' service

    @property
    def version(self) -> int:
        return self._model.version

    @property
    def layout(self) -> Layout:
        return self._model.layout

    def devices_changed(self) -> None:
        """A heartbeat or progress (the worker mirrors presence from its handlers)."""

    def welcome(self, record: DeviceRecord) -> None:
        """A device (re)registered: bring it up to date; the agent offers its part (once
        finished: the final global and ``federation:finished``)."""
        self._mirror(record.device_id)
        if self.end.welcome(record):
            return
        self._distributor.send_global_later(record)
        self._wake.set()

    def heard_training(self, record: DeviceRecord, round_id: str) -> None:
        """Nothing: a worker's view of the open round follows the database by up to one
        poll, so judged by it a device could be told to stop the round just opened (one
        that moved here from a killed worker). A device training a closed round is told
        by the worker that started it, and otherwise finishes and is refused."""

    def device_left(self, record: DeviceRecord) -> None:
        self._mirror(record.device_id)
        self._offered.pop(record.device_id, None)

    def training_failed(self, record: DeviceRecord, err: TrainingError) -> None:
        self._registry.training_failed(record.device_id)
        self._mirror(record.device_id)
        row = self.round
        if row is not None and err.round_id == row.round_id:
            self._background.spawn(
                self._set_assignment(
                    row.round_id, record.device_id, "failed", f"{err.code}: {err.message}"
                ),
                f"failed-{record.device_id}",
            )

    async def accept_update(self, record: DeviceRecord, sub: WeightsSubmit) -> SubmitAccepted:
        """Count a ``weights:submit`` exactly once (in the database); the ack."""
        row = await self._open_round(sub.round_id)
        assignment = await self._assignment(row.round_id, record.device_id)
        if assignment is None or assignment.state == "refused":
            raise FedtrayError(
                "not_selected", f"this device was not selected for round {sub.round_id}"
            )
        if assignment.state == "reported":
            return SubmitAccepted(round_id=row.round_id, received=await self._received(row))
        if sub.base_version != row.base_version:
            raise FedtrayError(
                "stale_base",
                f"the update was trained from version {sub.base_version}, but round "
                f"{row.round_id} starts from version {row.base_version}",
            )
        incoming = await self._receive(record, sub)
        try:
            sha = await asyncio.to_thread(_sha256_file, incoming)
            try:
                key = await self._shared.put_file(incoming, sha)
            except ClusterError as exc:
                log.error("cannot store the update of %s: %s", record.name, exc)
                raise unsaved_error() from None
            update = await asyncio.to_thread(self._load, incoming)
        finally:
            incoming.unlink(missing_ok=True)
        new = await self._record_and_fold(record, sub, row, key, sha, update)
        self._registry.update_accepted(record.device_id)
        self._mirror(record.device_id)
        received = await self._received(row)
        if new:
            log.info(
                "round %s: update from %s accepted here (%d samples; %d reported)",
                row.round_id,
                record.name,
                sub.num_samples,
                received,
            )
        return SubmitAccepted(round_id=row.round_id, received=received)

    async def _open_round(self, round_id: str) -> RoundRow:
        try:
            row = await self._db.current_round()
        except ClusterError as exc:
            log.error("cannot read the open round: %s", exc)
            raise unsaved_error() from None
        if row is None or row.round_id != round_id or row.state != "open":
            raise FedtrayError(
                "round_closed", f"round {round_id} is closed or unknown; the update is not counted"
            )
        if time.time() > row.deadline:
            raise FedtrayError("round_closed", f"round {round_id} is past its deadline")
        return row

    async def _assignment(self, round_id: str, device_id: str) -> Assignment | None:
        try:
            return await self._db.assignment_of(round_id, device_id)
        except ClusterError as exc:
            log.error("cannot read the assignment of %s: %s", device_id, exc)
            raise unsaved_error() from None

    async def _received(self, row: RoundRow) -> int:
        try:
            return await self._db.count_updates(row.round_id)
        except ClusterError:
            return 0

    async def _receive(self, record: DeviceRecord, sub: WeightsSubmit) -> Path:
        """The update as a checked safetensors file (as the single server's intake)."""
        return await receive_update(
            self._blobs,
            self._incoming,
            record,
            sub,
            layout=self._model.layout,
            max_bytes=self._config.limits.max_blob_bytes,
        )

    def _load(self, path: Path) -> StateDict:
        return decode(
            path.read_bytes(),
            "safetensors",
            expected=self._model.layout,
            max_bytes=self._config.limits.max_blob_bytes,
        )

    async def _record_and_fold(
        self,
        record: DeviceRecord,
        sub: WeightsSubmit,
        row: RoundRow,
        key: str,
        sha: str,
        update: StateDict,
    ) -> bool:
        """Record the update (once), then fold it; True when it is counted now."""
        async with self._fold_lock:
            folding = self._folding_for(row.round_id)
            if folding.written:
                raise FedtrayError("round_closed", f"round {row.round_id} is closing")
            try:
                new = await self._db.record_update(
                    UpdateRow(
                        round_id=row.round_id,
                        device_id=record.device_id,
                        num_samples=sub.num_samples,
                        worker_id=self.worker_id,
                        blob_key=key,
                        sha256=sha,
                        metrics=dict(sub.metrics),
                    )
                )
            except ClusterError as exc:
                # The round closed meanwhile, or the database failed: not counted.
                log.warning("update of %s for %s not recorded: %s", record.name, row.round_id, exc)
                current = await self._safe_current()
                if current is None or current.round_id != row.round_id or current.state != "open":
                    raise FedtrayError("round_closed", f"round {row.round_id} is closed") from None
                raise unsaved_error() from None
            if new:
                if self._sums:
                    await asyncio.to_thread(
                        folding.partial.add, record.device_id, update, sub.num_samples
                    )
            else:
                with contextlib.suppress(ClusterError):
                    await self._shared.delete(key)  # the first copy is the one recorded
            return new

    def _folding_for(self, round_id: str) -> _Folding:
        folding = self._folding
        if folding is None or folding.round_id != round_id:
            folding = _Folding(round_id, PartialSum(self._model.layout))
            self._folding = folding
        return folding

    # ============================================================ the agent

    def wake(self) -> None:
        """Look at the database now (a notification arrived)."""
        self._wake.set()

    async def run(self) -> None:
        """The round agent: forever; a failing engine is retried on the next tick."""
        while True:
            self._wake.clear()
            try:
                await self.tick()
            except ClusterError as exc:
                log.warning("round agent: %s; retrying", exc)
            except Exception:
                log.exception("bug in the round agent; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll)

    async def tick(self) -> None:
        """One look at the versions and the open round."""
        await self.follow_version()
        await self.federated.tick()
        row = await self._db.current_round()
        previous, self.round = self.round, row
        if previous is not None and (row is None or row.round_id != previous.round_id):
            await self._round_gone(previous)
        if row is None:
            await self.end.check()
            return
        if row.state == "closing":
            await self._write_partial(row.round_id)
            return
        if row.state != "open":
            return
        if self._local is None or self._local.round_id != row.round_id:
            self._local = self._local_round(row)
            self._offered.clear()
        await self._offer_parts(row)

    async def _safe_current(self) -> RoundRow | None:
        with contextlib.suppress(ClusterError):
            return await self._db.current_round()
        return None

    def _local_round(self, row: RoundRow) -> Round:
        now, wall = time.monotonic(), time.time()
        return Round(
            round_id=row.round_id,
            number=row.number,
            attempt=row.attempt,
            base_version=row.base_version,
            deadline=now + max(0.0, row.deadline - wall),
            started_at=now - max(0.0, wall - row.opened_at),
            required=row.required,
            deadline_unix=row.deadline,
        )

    async def _offer_parts(self, row: RoundRow) -> None:
        local = self._local
        assert local is not None
        if self._model.version != row.base_version:
            return  # the round's base is not here yet: the next tick, after follow_version
        for part in await self._db.assignments(row.round_id):
            if part.state not in OFFERED_STATES:
                continue
            record = self._registry.get(part.device_id)
            if record is None or record.sid is None or record.state == "paused":
                continue
            if self._offered.get(part.device_id) == record.sid:
                continue
            self._offered[part.device_id] = record.sid
            local.slots[part.device_id] = Slot(index=part.index)
            log.info(
                "round %s: starting %s (part %d of %d)",
                row.round_id,
                record.name,
                part.index,
                part.count,
            )
            self._background.spawn(
                self._start(local, part), f"start-{part.device_id}", part.device_id
            )

    async def _start(self, local: Round, part: Assignment) -> None:
        await self._starter.start(self._task, local, part.device_id, part.index, part.count)
        slot = local.slots.get(part.device_id)
        if slot is None:
            return
        state = _OUTCOME.get(slot.state)
        if state is not None:
            await self._set_assignment(local.round_id, part.device_id, state, slot.detail)

    async def _set_assignment(
        self, round_id: str, device_id: str, state: AssignmentState, detail: str | None
    ) -> None:
        try:
            await self._db.set_assignment(round_id, device_id, state, detail)
        except ClusterError as exc:
            log.warning("cannot record %s of %s in %s: %s", state, device_id, round_id, exc)

    async def _round_gone(self, previous: RoundRow) -> None:
        """The round we knew is no longer open or closing: stop our devices' work on it."""
        local = self._local
        if local is not None and local.round_id == previous.round_id:
            working = [d for d in local.working]
            for device_id in working:
                local.mark(device_id, "dropped", "the round is closed")
            self._local = None
            self._offered.clear()
            if working:
                await self._starter.cancel(local.round_id, working, "the round is closed")

    async def _write_partial(self, round_id: str) -> None:
        """Write this worker's partial sum for a closing round (once)."""
        async with self._fold_lock:
            folding = self._folding
            if folding is None or folding.round_id != round_id or folding.written:
                return
            partial = folding.partial
            if not partial.count:
                folding.written = True
                return
            data = await asyncio.to_thread(folding.partial.to_bytes)
            sha = hashlib.sha256(data).hexdigest()
            key = await self._shared.put_bytes(data, sha)
            await self._db.record_partial(
                PartialRow(
                    round_id=round_id,
                    worker_id=self.worker_id,
                    device_ids=partial.device_ids,
                    total_samples=partial.total_samples,
                    blob_key=key,
                    sha256=sha,
                )
            )
            folding.written = True
            log.info(
                "round %s: partial sum of %d updates (%d samples) written",
                round_id,
                partial.count,
                partial.total_samples,
            )

    # ============================================================ versions

    async def follow_version(self) -> bool:
        """Adopt the latest published version if it is newer; True when one was adopted."""
        async with self._version_lock:
            row = await self._db.latest_version()
            if row is None or (row.version <= self._model.version and self._model.layout):
                return False
            data, state = await self._fetch(row)
            self._adopt(row, data, state)
        log.info("version %d adopted; sending it to this worker's devices", row.version)
        self._distributor.broadcast()
        return True

    async def _fetch(self, row: VersionRow) -> tuple[bytes, StateDict]:
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        dest = self._versions_dir / f"v{row.version}.safetensors"
        await self._shared.get_file(row.blob_key, row.sha256, dest)
        try:
            data = await asyncio.to_thread(dest.read_bytes)
        finally:
            dest.unlink(missing_ok=True)
        expected = self._model.layout or None
        max_bytes = max(len(data), self._config.limits.max_blob_bytes)
        state = await asyncio.to_thread(
            decode, data, "safetensors", expected=expected, max_bytes=max_bytes
        )
        return data, state

    def _adopt(self, row: VersionRow, data: bytes, state: StateDict) -> None:
        model = self._model
        if not model.layout:
            model.adopt(state, layout_of(state), None)
        record = RoundRecord(
            round_id=row.round_id or f"v{row.version}",
            number=row.version,
            outcome="completed",
            version=row.version,
            clients_selected=0,
            clients_reported=0,
            train_loss=row.metrics.get("trainLoss"),
            seconds=0.0,
            finished_at=row.created_at,
        )
        prepared = Prepared(
            version=row.version,
            state=state,
            encoded=data,
            sha256=row.sha256,
            weights_file=None,
        )
        model.publish(prepared, record, dict(row.metrics))
        model.history = model.history[-1:]  # only the current version matters here
