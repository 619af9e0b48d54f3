"""The session's wiring: builds the parts, gives each its narrow collaborators, runs them.

Contract (a loop-only object, built by :class:`client.session.DistributedClient` on the
caller's thread and run on the session loop; the facade calls it only through the loop):

* Owns the parts: :class:`~client.session.live_settings.LiveSettings` (the settings in
  use), :class:`~client.session.pause.PauseBoard` with its sources,
  :class:`~client.session.base_weights.BaseWeights`, :class:`~client.session.
  package_cache.TaskFiles` (task packages and data shares, cached under
  ``<data dir>/packages``), :class:`~client.session.rounds.Rounds`,
  :class:`~client.session.uploader.Uploader` and :class:`~client.session.link.ServerLink`.
  The parts never know each other; they get callables from here.
* :meth:`SessionCore.handlers` is THE one table of the server events the session
  handles; :meth:`SessionCore._pause_applied` is THE one place a pause decision takes
  effect (worker, ``paused`` progress, snapshot, heartbeat); :meth:`SessionCore.
  apply_budget` is THE one place a CPU budget takes effect (today: snapshot and
  heartbeat, marked requested; the worker's seam);
  :meth:`SessionCore._settings_changed` is THE one place new settings take effect,
  whoever changed them (the snapshot shows them, pause sources re-decide, connection
  settings reconnect at once).
* :meth:`run` describes the device at once (its GPU found in the background and
  reported in a heartbeat, :mod:`client.session.hardware`), reads the held weights and
  builds the worker off the loop,
  starts the pause sources (the battery is read before connecting), has the worker warm
  up (:meth:`~client.session.rounds.Rounds.warm_worker`: its training process imports
  torch while this one connects; again on every registration, in case it was released)
  and starts the settings watch, then connects until :meth:`shutdown`. An unexpected
  exception is logged and shown as ``last_error`` rather than hanging; the snapshot
  always ends ``stopped``.
* :meth:`shutdown` pauses (checkpoints) the round instead of cancelling it, so the same
  round offered again after a restart resumes from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from client.activity import ActivityProbe, default_probe
from client.backoff import Backoff
from client.config import Settings
from client.device import DeviceInfo
from client.global_store import GlobalStore
from client.pending import PendingStore
from client.power_monitor import PowerMonitor
from client.protocol import (
    Capabilities,
    CpuBudget,
    DeviceRegister,
    DeviceState,
    FederationFinished,
    Heartbeat,
    TrainingStart,
    TrainingStartAck,
    events,
)
from client.protocol.events import A, EventSpec, P
from client.protocol.guard import guard
from client.resources import BatterySource, ResourceMonitor
from client.session.base_weights import CLIENT_MAX_CHUNK_BYTES, BaseWeights
from client.session.decisions import device_state
from client.session.evaluations import Evaluations
from client.session.expected_layout import ExpectedLayouts
from client.session.filecache import FileCache
from client.session.hardware import DeviceDescription
from client.session.hub import SnapshotHub
from client.session.link import Guarded, ServerLink
from client.session.live_settings import LiveSettings
from client.session.package_cache import DEFAULT_PACKAGE_CACHE_BYTES, SUFFIX, TaskFiles
from client.session.pause import PauseBoard, PowerPause, UserPause
from client.session.politeness import (
    CpuSampler,
    FullscreenPause,
    HeatPause,
    InUsePause,
    PollIntervals,
    SchedulePause,
    StepAsidePause,
    default_cpu_sampler,
    read_cpu_temperature,
)
from client.session.rounds import Rounds, default_work_dir
from client.session.uploader import Uploader
from client.session.worker_seam import WorkerFactory
from client.snapshot import Budget, FederationResult, PauseDecision
from client.tasks import available_tasks
from client.transfer import BlobStore
from client.workfiles import WorkDir

__all__ = ["SessionCore"]

log = logging.getLogger(__name__)


class SessionCore:
    """The parts of one session, wired (see the module docstring)."""

    def __init__(
        self,
        hub: SnapshotHub,
        settings: LiveSettings,
        *,
        no_reconnect: bool,
        worker_factory: WorkerFactory,
        device_info: DeviceInfo | None,
        data_dir: Path | None,
        backoff: Backoff,
        battery_source: BatterySource,
        power_poll_interval: float,
        checkpoint_interval: float,
        package_cache_bytes: int = DEFAULT_PACKAGE_CACHE_BYTES,
        warm_worker: bool = True,
        activity_probe: ActivityProbe | None = None,
        cpu_sampler: CpuSampler | None = None,
        temperature_reader: Callable[[], float | None] | None = None,
        poll_intervals: PollIntervals | None = None,
    ) -> None:
        self.hub = hub
        self.settings = settings
        settings.on_change = self._settings_changed
        settings.on_report = lambda report: hub.publish(settings_report=report)
        self.device = DeviceDescription(device_info, on_found=self._hardware_found)
        power = PowerMonitor(battery_source, power_poll_interval)
        # Heartbeats report the power monitor's last reading: reading the battery again
        # on the loop could block it.
        self._monitor = ResourceMonitor(battery_source=power.cached_reading)
        self.pauses = PauseBoard(self._pause_applied)
        # Order = priority: the user's own pause is what the user sees first.
        self.user_pause = UserPause(settings, self.pauses.set)
        self.pauses.register(self.user_pause)
        self.pauses.register(PowerPause(settings, power, self.pauses.set))
        # The politeness rules (client.session.politeness), most pressing first.
        probe = activity_probe or default_probe()
        report, show = self.pauses.set, hub.publish
        every = poll_intervals or PollIntervals()
        read = temperature_reader or read_cpu_temperature
        self.pauses.register(HeatPause(settings, report, show, read=read, interval=every.heat))
        self.pauses.register(SchedulePause(settings, report, check_s=every.schedule_check))
        self.pauses.register(FullscreenPause(settings, probe, report, interval=every.fullscreen))
        in_use = InUsePause(settings, probe, report, self.apply_budget, show, interval=every.in_use)
        self.pauses.register(in_use)
        sampler = cpu_sampler or default_cpu_sampler()
        window = every.step_aside_window
        self.pauses.register(StepAsidePause(settings, sampler, report, show, window_s=window))
        work = WorkDir(data_dir / "work" if data_dir else default_work_dir())
        # Built in dependency order; the link's callbacks reach later parts through
        # this object's methods.
        self.link = ServerLink(
            hub,
            settings,
            backoff=backoff,
            no_reconnect=no_reconnect,
            handlers=self.handlers,
            register_payload=self._register_payload,
            heartbeat=self._heartbeat,
            heartbeat_acked=self.device.acked,
            on_heartbeat=self._heartbeat_sent,
            on_connected=self._connected,
            on_disconnected=self._disconnected,
        )
        self.uploads = Uploader(
            hub,
            PendingStore(data_dir / "pending" if data_dir else None),
            caller=self.link.caller,
            spawn=self.link.spawn,
            limits=lambda: self.link.limits,
            state_changed=self.publish_state,
        )
        file_cache = FileCache(
            (data_dir if data_dir else default_work_dir().parent) / "packages",
            package_cache_bytes,
        )
        self.weights = BaseWeights(
            hub,
            GlobalStore(data_dir / "global" if data_dir else None),
            work=work,
            busy_keys=self._busy_keys,
            expected=ExpectedLayouts(lambda sha: file_cache.path(sha, SUFFIX["package"])).of,
        )
        self.task_files = TaskFiles(
            self.weights.blobs,
            file_cache,
            in_use=self._files_in_use,
            task_data=lambda: self.settings.value.task_data,
        )
        self.rounds = Rounds(
            hub,
            worker_factory=worker_factory,
            work=work,
            checkpoint_interval=checkpoint_interval,
            pending=self.uploads.pending,
            held=lambda: self.weights.held,
            pause=lambda: self.pauses.applied,
            emit=self.link.emit_soon,
            kick_uploads=self.uploads.kick,
            state_changed=self.publish_state,
            task_files=self.task_files,
            warm_worker=warm_worker,
            take_global=self.weights.on_weights_global,
        )
        self.evaluations = Evaluations(
            self.rounds,
            held=lambda: self.weights.held,
            pause=lambda: self.pauses.applied,
            emit=self.link.emit_soon,
            task_files=self.task_files,
        )
        handled = set(self.handlers())
        expected = {spec.name for spec in events.handled_by("device")}
        if handled != expected:  # a bug: the table and the session drifted apart
            raise TypeError(
                f"the session handles {sorted(handled)}, the protocol {sorted(expected)}"
            )

    def _busy_keys(self) -> set[str]:
        return self.rounds.busy_keys()

    def _files_in_use(self) -> set[str]:
        return self.rounds.files_in_use()

    @property
    def blobs(self) -> BlobStore:
        """Transfers from the server in progress (tests check it stays bounded)."""
        return self.weights.blobs

    def handlers(self) -> Mapping[str, Guarded]:
        """THE table of the server events this session handles, each behind the shared
        guard (:func:`client.protocol.guard.guard`: parse, refusals as ErrorAcks, never
        raising into python-socketio); it covers exactly the events the protocol's table
        sends to a device (checked when the session is built)."""
        return dict(
            (
                _on(events.REGISTERED, self.link.on_registered_event),
                _on(events.WEIGHTS_GLOBAL, self.weights.on_weights_global),
                _on(events.TASK_FILE, self.task_files.on_task_file),
                _on(events.TRAINING_START, self._on_training_start),
                _on(events.EVALUATION_START, self.evaluations.on_evaluation_start),
                _on(events.TRAINING_CANCEL, self.rounds.on_training_cancel),
                _on(events.BLOB_CHUNK, self.weights.on_blob_chunk),
                _on(events.BLOB_STATUS, self.weights.on_blob_status),
                _on(events.FEDERATION_FINISHED, self._on_federation_finished),
            )
        )

    async def _on_training_start(self, start: TrainingStart) -> TrainingStartAck:
        """A round waits for an evaluation in progress (never refused because of one)."""
        await self.evaluations.settle()
        return await self.rounds.on_training_start(start)

    async def _on_federation_finished(self, end: FederationFinished) -> None:
        """The server says every round is complete: a state the snapshot keeps (until a
        new round starts), not a disconnect."""
        log.info("the federation finished: %s, %d rounds", end.task, end.rounds_completed)
        self.hub.publish(
            finished=FederationResult(
                task=end.task,
                rounds=end.rounds_completed,
                accuracy=end.metrics.get("evalAccuracy"),
            )
        )

    def _heartbeat_sent(self) -> None:
        self.weights.expire()

    def _connected(self) -> None:
        self.uploads.kick()
        self.rounds.warm_worker()

    def _disconnected(self) -> None:
        self.uploads.connection_ended()

    # -- what the device reports ------------------------------------------------------

    def device_state(self) -> DeviceState:
        return device_state(
            uploading=self.uploads.uploading is not None,
            allowed=self.pauses.applied.allowed,
            training=self.rounds.current is not None,
        )

    def _round_id(self) -> str | None:
        return self.rounds.round_id or self.uploads.uploading

    def publish_state(self) -> None:
        applied = self.pauses.applied
        training = self.rounds.current is not None
        self.hub.publish(
            # A new round means a new federation: the finished one is history.
            finished=None if training else self.hub.current.finished,
            device_state=self.device_state(),
            pause_reason=applied.reason,
            pause_detail=applied.detail,
            round_id=self._round_id(),
        )

    def _hardware_found(self) -> None:
        self.link.heartbeat_soon()  # the registration update (Heartbeat.hardware)

    def _register_payload(self) -> dict[str, Any]:
        info = self.device.info
        settings = self.settings.value
        held = self.weights.held
        applied = self.pauses.applied
        simulation = self.rounds.simulation
        return DeviceRegister(
            device_id=settings.device_id,
            name=settings.device_name,
            device_type=info.device_type,
            platform=info.platform,
            hardware=self.device.for_registration(),
            resources=self._monitor.snapshot(),
            capabilities=Capabilities(
                torch_version=None if simulation else info.torch_version,
                simulation=simulation,
                tasks=available_tasks(),
                weight_formats=["safetensors", "json"],
                max_chunk_bytes=CLIENT_MAX_CHUNK_BYTES,
                task_packages=not simulation,
                package_cache_bytes=0 if simulation else self.task_files.cache.max_bytes,
            ),
            client_version=info.client_version,
            weights_version=held.version if held else None,
            state="paused" if not applied.allowed else "idle",
            pause_reason=applied.reason,
            pause_detail=applied.detail or None,
        ).to_wire()

    def _heartbeat(self) -> Heartbeat:
        held = self.weights.held
        applied = self.pauses.applied
        return Heartbeat(
            state=self.device_state(),
            pause_reason=applied.reason,
            pause_detail=applied.detail or None,
            round_id=self._round_id(),
            weights_version=held.version if held else None,
            resources=self._monitor.snapshot(),
            hardware=self.device.unreported(),
            budget=_wire_budget(self.hub.current.budget),
        )

    # -- pausing ----------------------------------------------------------------------

    def _pause_applied(self, old: PauseDecision, new: PauseDecision) -> None:
        """THE place where a pause decision takes effect (worker, progress, heartbeat)."""
        if not new.allowed:
            log.info("paused: %s", new.detail or new.reason)
        elif not old.allowed:
            log.info("resumed")
        self.rounds.pause_changed(new, old.allowed)
        self.evaluations.pause_changed(new)
        self.publish_state()
        self.link.heartbeat_soon()

    def set_pause_source(self, name: str, decision: PauseDecision) -> None:
        self.pauses.set(name, decision)

    def apply_budget(self, budget: Budget) -> None:
        """THE one place a CPU budget (how hard training may work, from
        :class:`~client.session.politeness.InUsePause`) takes effect: handed to the worker
        (:meth:`client.session.rounds.Rounds.set_budget`; kept from the child's next batch
        boundary, and by every child started later), then published with ``applied=True``
        (the snapshot's ``budget``, the heartbeat) and logged when it changed."""
        self.rounds.set_budget(budget)
        kept = dataclasses.replace(budget, applied=True)
        if kept != self.hub.current.budget:
            log.info("CPU budget: %s", kept.describe())
        self.hub.publish(budget=kept)
        self.link.heartbeat_soon()

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        try:
            # At once (no GPU probe); the GPU follows in a heartbeat when found.
            await self.device.detect()
            await self.weights.load()
            await self.rounds.start_worker()
            held = self.weights.held
            self.hub.publish(
                weights_version=held.version if held else None,
                task=held.task if held else None,
                simulation=self.rounds.simulation,
            )
            self.publish_state()
            await self.pauses.start()
            # The training process starts (and imports torch, at its low priority) while
            # this one connects and registers, not after (when allowed to train).
            self.rounds.warm_worker()
            await self.settings.start_watching()
            await self.link.run()
        except Exception as exc:  # a bug: log it and end visibly rather than hang
            log.exception("the session stopped on an unexpected error")
            self.hub.publish(last_error=f"internal error: {exc}")
        finally:
            await self._teardown()

    async def _settings_changed(self, old: Settings, new: Settings) -> None:
        self.hub.publish(settings=new)
        self.pauses.settings_changed(old, new)
        if _connection_key(old) != _connection_key(new):
            await self.link.reconnect_now()

    async def shutdown(self) -> None:
        # The round is NOT cancelled: the worker's shutdown pauses it first, so its
        # checkpoint is written and the same round, offered again after a restart,
        # resumes from it (see _teardown).
        if self.rounds.current is not None:
            log.info("stopping: round %s is checkpointed, not cancelled", self.rounds.round_id)
        await self.link.shutdown()

    async def _teardown(self) -> None:
        await self.device.stop()
        await self.pauses.stop()
        await self.settings.stop()
        await self.rounds.stop_worker()
        self.hub.publish(connection="stopped", next_retry_at=None, upload_fraction=None)


def _wire_budget(budget: Budget | None) -> CpuBudget | None:
    if budget is None:
        return None
    return CpuBudget(
        cores=budget.cores, cpu_percent=budget.cpu_percent, why=budget.why, applied=budget.applied
    )


def _connection_key(settings: Settings) -> tuple[object, ...]:
    """The settings a connection is made with: a change reconnects at once."""
    return (settings.server_url, settings.auth_token, settings.ca_file, settings.device_name)


def _on(spec: EventSpec[P, A], handler: Callable[[P], Awaitable[A | None]]) -> tuple[str, Guarded]:
    """One row of the session's handler table: the event's name and its guarded handler."""
    return spec.name, guard(spec, handler, logger=log)
