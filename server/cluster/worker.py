"""One worker process of the multi-process server (``python -m server.cluster.worker``).

Contract: :class:`ClusterWorker` holds Socket.IO connections on the shared port (bound with
``SO_REUSEPORT``: the kernel spreads connections over the workers of a machine), with the
same message limits as the single-process server and a
``socketio.AsyncRedisManager`` so emits and rooms are shared; it reuses the device handlers
(:class:`server.handlers.DeviceNamespace`) over a LOCAL registry of its own connections and
the cluster round service (:class:`server.cluster.service.ClusterRounds`). Each registry
transition of a device is mirrored to Redis (:class:`~server.cluster.contracts.Presence`;
the latest state of a device is written, one writer, all pending devices in one pipeline,
retried every ``poll`` seconds while Redis is down; when Redis answers again -- perhaps
restarted empty, seen by a failed write or by its liveness key being gone -- the worker
announces itself and writes every connected device at once). A heartbeat writes only when
what a reader needs changed (eligibility, version) or the device's key was last refreshed
more than ``stale_after / 3`` ago -- those TTL refreshes go in one pipeline every
``stale_after / 6`` s -- so Redis sees about one write per device per ``stale_after / 3``
(or per two heartbeats), not one per heartbeat; a heartbeating device's key is refreshed
within ``stale_after / 3 + interval + stale_after / 6`` of the last refresh (before its TTL,
``stale_after``), and a device that stops heartbeating vanishes within ``stale_after``.
The worker is a candidate for the coordinator lock every ``lock_retry`` seconds;
the holder runs :class:`server.cluster.coordinator.ClusterCoordinator` in-process (a
killed holder's PostgreSQL connection ends and another worker takes over). Routes:
``GET /healthz``; ``GET /`` (the single-process dashboard, ``server/dashboard.html``);
``GET /api/status`` -- the single-process status document
(:class:`server.status.ServerStatus`), the same whichever worker answers, assembled from
PostgreSQL and Redis (:class:`server.cluster.status_view.ClusterStatusView`; 503 with
``{"error": ...}`` when PostgreSQL fails), with header ``X-Fedtray-Worker`` naming the
worker that answered; ``GET /api/cluster`` -- this worker's cluster facts (worker id,
devices here, eligible devices of the fleet, the round, the version, whether it
coordinates, whether the federation is finished, and the newest versions with their
evaluation: :func:`server.cluster.ending.federation_status`). The coordinator evaluates each
version it publishes on the server's test split off the round's path
(:mod:`server.cluster.evaluation`) and, once its rounds are complete, records the end
(:func:`server.cluster.ending.finish_federation`) that every worker carries out for its
devices (:attr:`ClusterRounds.end`; ``--exit-when-done`` waits for it).

The port is bound and served as the single-process server does (:mod:`server.serving`).
:meth:`ClusterWorker.start` opens the engines, starts the lock candidate, waits for the
first version of the global model (made by whichever worker coordinates), then listens
(the engines are opened by :func:`server.cluster.engines.open_engines`; the command line is
:mod:`server.cluster.worker_cli`); it raises :class:`server.serving.StartupError` (one line)
when it cannot. Cluster mode trains an installed task or a task package
(``--task-file``, :mod:`server.cluster.package`: every worker opens the same package and
serves it, with each device's share of its data, as the single-process server does --
only to devices that take packages -- and version 0 is the package's weights) with any
strategy of the single-process server (:mod:`server.cluster.aggregate`). Federated
evaluation runs when ``--evaluate-every N`` is given (:mod:`server.cluster.fedeval`; off
by default here).
:meth:`ClusterWorker.stop` is bounded in time. Never unpickles or executes anything received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import socketio
from aiohttp import web

from client.errors import FedtrayError
from client.protocol import Heartbeat, OkAck, TrainingProgress, events as ev
from client.tasks import Task, get_task
from client.transfer import BlobStore
from client.weights import StateDict, layout_of
from server.app import DASHBOARD_FILE
from server.auth import TokenChecker
from server.background import Background
from server.cluster.contracts import (
    ClusterError,
    DeviceSeen,
)
from server.cluster.coordinator import ClusterCoordinator, task_initial_weights
from server.cluster.ending import federation_status, finish_federation
from server.cluster.engines import LOCK_RETRY_S, ClusterSettings, Engines, open_engines
from server.cluster.evaluation import ClusterEvaluation
from server.cluster.fedeval import CoordinatorFederated, WorkerFederated
from server.cluster.package import check_layout, package_bytes
from server.cluster.service import ClusterRounds
from server.cluster.status_board import connect_board
from server.cluster.status_view import SNAPSHOT_S, ClusterStatusView, StatusQueries
from server.config import ServerConfig
from server.distribution import Distributor
from server.globalmodel import GlobalModel
from server.handlers import DeviceNamespace, handles
from server.registry import DeviceRecord, Registry
from server.served_task import package_task
from server.serving import (
    StartupError,
    bind_socket,
    close_serving,
    device_server,
    serve_on,
    tls_context,
)
from server.starter import RoundStarter, training_config
from server.store import Store
from server.taskfile import PackageTask, ServedPackage

__all__ = ["LOCK_RETRY_S", "ClusterSettings", "ClusterWorker"]

log = logging.getLogger(__name__)


class ClusterNamespace(DeviceNamespace):
    """The device handlers, refreshing presence after heartbeats and progress too."""

    def __init__(self, *, refresh: Any, **kwargs: Any) -> None:
        self._refresh = refresh
        super().__init__(**kwargs)

    @handles(ev.HEARTBEAT)
    async def on_device_heartbeat(self, sid: str, hb: Heartbeat) -> OkAck:
        await super().on_device_heartbeat(sid, hb)
        self._refresh(self._record(sid).device_id)
        return OkAck()

    @handles(ev.TRAINING_PROGRESS)
    async def on_training_progress(self, sid: str, progress: TrainingProgress) -> None:
        await super().on_training_progress(sid, progress)
        self._refresh(self._record(sid).device_id)


class ClusterWorker:
    """One worker process (see the module docstring)."""

    def __init__(
        self,
        config: ServerConfig,
        settings: ClusterSettings,
        *,
        package: ServedPackage | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        #: The checked package of ``config.task_file`` (opened at start when not given).
        self._package = package
        #: The package's size for eligibility (None: an installed task); set at start.
        self._package_bytes: int | None = None
        # As the single-process server, emits and rooms shared through Redis.
        self.sio = device_server(
            config, client_manager=socketio.AsyncRedisManager(settings.redis_url)
        )
        self.app = web.Application()
        self.sio.attach(self.app)
        self.app.router.add_get("/", self._http_index)
        self.app.router.add_get("/api/status", self._http_status)
        self.app.router.add_get("/api/cluster", self._http_cluster)
        self.app.router.add_get("/healthz", self._http_health)
        self.registry = Registry(config.stale_after)
        self.work_dir = config.state_dir / f"worker-{settings.worker_id}"
        limits = config.limits
        self.blobs = BlobStore(
            max_chunk_bytes=limits.max_chunk_bytes,
            max_blob_bytes=limits.max_blob_bytes,
            ttl_sec=config.blob_ttl,
            spill_dir=self.work_dir / "blobs",
        )
        self.auth = TokenChecker(config.tokens)
        self.model = GlobalModel(Store(self.work_dir), config.task)
        self.background = Background()
        self.distributor = Distributor(self.sio, config, self.registry, self.model, self.background)
        self.port = 0
        self.engines: Engines | None = None
        self.rounds: ClusterRounds | None = None
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        #: device id -> (eligible, version, monotonic time) last written to Redis.
        self._written: dict[str, tuple[bool, int | None, float]] = {}
        #: Seconds after which a heartbeat rewrites an unchanged device (its key's TTL is
        #: ``stale_after``; a third of it leaves two refreshes' margin).
        self._refresh_after = config.stale_after / 3
        self._loops: list[asyncio.Task[Any]] = []
        self._runner: web.AppRunner | None = None
        self._coordinating = False
        self._status: ClusterStatusView | None = None
        self._evaluation: ClusterEvaluation | None = None

    # ================================================================== lifecycle

    def _check_mode(self) -> Task:
        cfg = self.config
        if cfg.task_file is not None:
            return package_task(cfg, self._package)
        try:
            task = get_task(cfg.task, cfg.model_params)
            training_config(task, cfg, 0)
        except FedtrayError as exc:
            raise StartupError(f"task {cfg.task!r}: {exc.message}") from None
        except ValueError as exc:
            raise StartupError(f"training settings for task {cfg.task!r}: {exc}") from None
        return task

    async def start(self, version_timeout: float = 300.0) -> int:
        """Open the engines, wait for the first version, listen; the bound port."""
        cfg = self.config
        task = self._check_mode()
        ssl_context = tls_context(cfg)
        # The shared port: the kernel spreads connections over the workers of a machine.
        sock = bind_socket(cfg.host, cfg.port, reuse_port=True)
        self.port = int(sock.getsockname()[1])
        try:
            try:
                self.engines = await open_engines(self.settings, cfg.stale_after)
            except ClusterError as exc:
                raise StartupError(str(exc)) from None
            engines = self.engines
            self._package_bytes = package_bytes(task)
            package = task.package.ref if isinstance(task, PackageTask) else None
            self._status = await self._status_view(engines)
            self.distributor.describe_model(dict(task.params), package)
            self.rounds = ClusterRounds(
                worker_id=self.settings.worker_id,
                config=cfg,
                task=task,
                registry=self.registry,
                model=self.model,
                blobs=self.blobs,
                distributor=self.distributor,
                starter=RoundStarter(self.sio, cfg, self.registry, self.distributor),
                background=self.background,
                db=engines.db,
                shared=engines.blobs,
                work_dir=self.work_dir,
                mirror=self.mirror,
                poll=self.settings.poll,
                federated=None
                if not cfg.evaluate_every
                else WorkerFederated(
                    config=cfg,
                    task=task,
                    sio=self.sio,
                    registry=self.registry,
                    model=self.model,
                    distributor=self.distributor,
                    background=self.background,
                    db=engines.db,
                ),
            )
            self.sio.register_namespace(
                ClusterNamespace(
                    refresh=self.refresh,
                    config=cfg,
                    auth=self.auth,
                    registry=self.registry,
                    blobs=self.blobs,
                    coordinator=self.rounds,
                    distributor=self.distributor,
                    background=self.background,
                )
            )
            self._loops.append(asyncio.create_task(self._candidate(task), name="lock-candidate"))
            await self._first_version(version_timeout)
            check_layout(task, self.model.layout)
            self._set_transfer_budget()
            self._runner = await serve_on(
                self.app, sock, ssl_context, backlog=1024, where=f"port {self.port}"
            )
        except BaseException:
            sock.close()
            raise
        self._loops += [
            asyncio.create_task(self.rounds.run(), name="round-agent"),
            asyncio.create_task(self._notifications(), name="notifications"),
            asyncio.create_task(self._presence_writer(), name="presence"),
            asyncio.create_task(self._alive(), name="alive"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(self._status.run(), name="status-snapshots"),
        ]
        log.info(
            "worker %s serving task %s on port %d (pid %d)",
            self.settings.worker_id,
            cfg.task,
            self.port,
            os.getpid(),
        )
        return self.port

    async def _status_view(self, engines: Engines) -> ClusterStatusView:
        """The status document's view (its Redis board closed with the engines)."""
        if not isinstance(engines.db, StatusQueries):
            raise StartupError("the cluster database cannot answer the status document")
        try:
            board = await connect_board(
                self.settings.redis_url, self.settings.worker_id, ttl=3 * SNAPSHOT_S
            )
        except ClusterError as exc:
            raise StartupError(f"status board: {exc}") from None
        engines.closers.append(board)
        return ClusterStatusView(
            worker_id=self.settings.worker_id,
            config=self.config,
            registry=self.registry,
            db=engines.db,
            presence=engines.presence,
            board=board,
        )

    async def _first_version(self, timeout: float) -> None:
        assert self.rounds is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.rounds.follow_version():
                    return
            except ClusterError as exc:
                log.info("waiting for the first version: %s", exc)
            if time.monotonic() > deadline:
                raise StartupError(f"no version of the global model within {timeout:.0f} s")
            await asyncio.sleep(self.settings.poll / 2)

    def _set_transfer_budget(self) -> None:
        model_bytes = sum(int(arr.nbytes) for arr in self.model.state.values())
        budget = self.config.transfer_budget(model_bytes)
        self.blobs.set_budget(
            max_peer_bytes=budget.per_device,
            max_total_bytes=budget.total,
            max_open_per_peer=budget.open_per_device,
        )

    async def stop(self) -> None:
        """Stop everything, disconnect everyone, release the port and the engines."""
        await self.background.cancel_all(self._loops, timeout=5)
        self._loops = []
        sids = [r.sid for r in self.registry.connected() if r.sid is not None]
        await close_serving(self.sio, sids, self._runner)
        self._runner = None
        if self.engines is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.engines.lock.release(), 5)
            for closer in self.engines.closers:
                close = getattr(closer, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(close(), 5)
        log.info("worker %s stopped", self.settings.worker_id)

    # ================================================================== loops

    def mirror(self, device_id: str) -> None:
        """Write the device's presence soon (the latest state wins)."""
        self._dirty.add(device_id)
        self._dirty_event.set()

    def refresh(self, device_id: str) -> None:
        """A heartbeat or progress: write the device's presence at once if what a reader
        needs (eligibility, version) changed; if only its key was last refreshed more than
        ``stale_after / 3`` ago, refresh it with the writer's next batch (every
        ``stale_after / 6`` s); O(1), no Redis call here."""
        record = self.registry.get(device_id)
        written = self._written.get(device_id)
        if record is None or written is None:
            self.mirror(device_id)
            return
        now = time.monotonic()
        eligible = self._ineligibility(record, now) is None
        if (eligible, record.weights_version) != written[:2]:
            self.mirror(device_id)  # a reader needs it now
        elif now - written[2] >= self._refresh_after:
            self._dirty.add(device_id)  # only the TTL: with the next batch (within a tick)

    def _ineligibility(self, record: DeviceRecord, now: float) -> str | None:
        return self.registry.ineligibility(record, self.config.task, now, self._package_bytes)

    def _rewrite_all(self) -> None:
        """Redis lost this worker's keys (restarted, or they expired): write every
        connected device again."""
        self._written.clear()
        for connected in self.registry.connected():
            self.mirror(connected.device_id)

    async def _presence_writer(self) -> None:
        """The one writer of presence: every pending device in one pipeline per batch."""
        assert self.engines is not None
        presence = self.engines.presence
        failing = False
        while True:
            # Woken by a change at once; TTL refreshes wait for the next tick and go together.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty_event.wait(), self._refresh_after / 2)
            self._dirty_event.clear()
            if not self._dirty:
                continue
            batch, self._dirty = self._dirty, set()
            now = time.monotonic()
            seen: list[DeviceSeen] = []
            gone: list[str] = []
            for device_id in batch:
                record = self.registry.get(device_id)
                if record is None or record.sid is None:
                    gone.append(device_id)
                else:
                    eligible = self._ineligibility(record, now) is None
                    seen.append(DeviceSeen(device_id, eligible, record.weights_version))
            try:
                await presence.devices_changed(seen, gone)
                for one in seen:
                    self._written[one.device_id] = (one.eligible, one.version, now)
                for device_id in gone:
                    self._written.pop(device_id, None)
                if failing:
                    # Redis is back (perhaps restarted empty): announce this worker and
                    # write every connected device again at once.
                    await presence.worker_alive()
                    failing = False
                    log.info("presence written to Redis again")
                    self._rewrite_all()
            except ClusterError as exc:
                if not failing:
                    log.warning("cannot write presence: %s; retrying", exc)
                    failing = True
                self._dirty |= batch
                self._dirty_event.set()
                await asyncio.sleep(self.settings.poll)

    async def _alive(self) -> None:
        assert self.engines is not None
        while True:
            try:
                kept = await self.engines.presence.worker_alive()
            except ClusterError:
                await asyncio.sleep(self.settings.poll)  # retried sooner: Redis may be back
                continue
            if not kept:
                self._rewrite_all()
            await asyncio.sleep(self.settings.alive_every)

    async def _notifications(self) -> None:
        assert self.engines is not None and self.rounds is not None
        while True:
            try:
                async for _payload in self.engines.db.notifications():
                    self.rounds.wake()
            except ClusterError as exc:
                log.warning("notifications: %s; the agent polls meanwhile", exc)
            await asyncio.sleep(self.settings.poll)

    async def _candidate(self, task: Task) -> None:
        """Try the coordinator lock every ``lock_retry`` s; run the coordinator when held."""
        assert self.engines is not None
        engines = self.engines
        while True:
            try:
                if await engines.lock.try_acquire():
                    log.info("worker %s holds the coordinator lock", self.settings.worker_id)
                    self._coordinating = True
                    coordinator = await self._coordinator(task)
                    await coordinator.run()
                    log.info("the coordinator finished its rounds")
                    await finish_federation(engines.db, self._evaluation)
                    return
            except ClusterError as exc:
                log.warning("coordinator lock: %s; retrying", exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the coordinator failed; giving up the lock")
            finally:
                if self._coordinating:
                    self._coordinating = False
                    with contextlib.suppress(Exception):
                        await engines.lock.release()
            await asyncio.sleep(self.settings.lock_retry)

    async def _coordinator(self, task: Task) -> ClusterCoordinator:
        """The coordinator, with the model's layout (built from the task when this worker
        has no version yet: the first start of a federation)."""
        assert self.engines is not None
        cfg = self.config
        # Version 0: a package's own weights, else the task's model built with the seed.
        initial = task_initial_weights(task, cfg.seed)
        layout = self.model.layout
        if not layout:
            fresh = await asyncio.to_thread(initial)
            layout = layout_of(fresh)

            def keep() -> StateDict:
                return fresh

            initial = keep

        work_dir = self.work_dir / "coordinator"
        await asyncio.to_thread(work_dir.mkdir, parents=True, exist_ok=True)
        if self._evaluation is None:
            self._evaluation = ClusterEvaluation(
                task=task, db=self.engines.db, background=self.background
            )
        evaluation = self._evaluation
        federated = CoordinatorFederated(
            config=cfg, db=self.engines.db, presence=self.engines.presence
        )

        async def published(version: int, state: StateDict) -> None:
            evaluation.submit(version, state)  # on the server's test split, in the background
            await federated.evaluate(version)  # on the devices, when due: the next round waits

        return ClusterCoordinator(
            config=cfg,
            db=self.engines.db,
            presence=self.engines.presence,
            blobs=self.engines.blobs,
            layout=layout,
            initial_weights=initial,
            work_dir=work_dir,
            published=published,
        )

    async def _housekeeping(self) -> None:
        period = min(60.0, self.config.blob_ttl / 2)
        while True:
            await asyncio.sleep(period)
            self.blobs.expire(time.monotonic())

    # ================================================================== HTTP

    async def _http_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _http_index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(DASHBOARD_FILE)

    async def _http_status(self, request: web.Request) -> web.Response:
        headers = {"X-Fedtray-Worker": self.settings.worker_id}
        try:
            if self._status is None:
                raise ClusterError("the worker is not serving yet")
            text = await self._status.document_json()
        except ClusterError as exc:
            return web.json_response({"error": str(exc)}, status=503, headers=headers)
        return web.Response(text=text, content_type="application/json", headers=headers)

    async def _http_cluster(self, request: web.Request) -> web.Response:
        return web.json_response(await self.status())

    async def status(self) -> dict[str, Any]:
        """This worker's cluster facts (what ``GET /api/cluster`` returns)."""
        eligible: int | None = None
        if self.engines is not None:
            with contextlib.suppress(ClusterError):
                eligible = await self.engines.presence.eligible_count()
        row = self.rounds.round if self.rounds is not None else None
        federation: dict[str, Any] = {"finished": False, "versions": None}
        if self.engines is not None:
            end = self.rounds.end if self.rounds is not None else None
            federation = await federation_status(self.engines.db, end)
        return {
            "mode": "cluster",
            "workerId": self.settings.worker_id,
            "pid": os.getpid(),
            "task": self.config.task,
            "coordinator": self._coordinating,
            "devicesHere": len(self.registry.connected()),
            "eligibleFleet": eligible,
            "globalVersion": self.model.version,
            "round": None
            if row is None
            else {
                "roundId": row.round_id,
                "number": row.number,
                "state": row.state,
                "baseVersion": row.base_version,
                "deadline": row.deadline,
            },
            **federation,
        }


if __name__ == "__main__":
    from server.cluster.worker_cli import main

    raise SystemExit(main())
