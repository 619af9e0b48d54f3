"""The server's wiring: one port for Socket.IO, the dashboard and the status API.

Contract: :class:`FedServer` composes the parts and owns their lifecycle; it decides
nothing about rounds or devices itself:

* :class:`server.handlers.DeviceNamespace` -- the Socket.IO handlers;
* :class:`server.coordinator.RoundCoordinator` -- the round loop and the one round phase;
* :class:`server.distribution.Distributor` -- getting the global model to devices;
* :class:`server.registry.Registry` -- the devices and every change of their state;
* :class:`server.globalmodel.GlobalModel` -- the global weights, version and history;
* :class:`server.transport.DeviceServer` -- python-socketio's server, heartbeats handled
  inline and Engine.IO's ping derived from the heartbeat interval
  (:func:`server.transport.transport_timing`), built, bound and served as a cluster
  worker's is (:mod:`server.serving`).

:meth:`FedServer.start` first checks the TLS files and binds the port (``port=0`` picks
a free one; the real port is returned), so a port in use is reported before anything is
built or written (no state dir is created); it then loads the task (or, with
``config.task_file``, checks the task package and trains it: its weights are version 0,
:mod:`server.taskfile`), restores or creates the global model (persisting version 0 on a
first start, so a restart never re-initialises weights that devices already hold), sets
the budget of partial uploads from the model's size
(:meth:`server.config.ServerConfig.transfer_budget`), restores an open round saved by a
previous run, then listens (with ``certfile``/``keyfile`` it serves HTTPS and WSS) and
starts the round loop; it raises :class:`StartupError` (one line) when it cannot, the
port released. :meth:`FedServer.stop` cancels the loop and background work, disconnects
everyone and releases the port; every step is bounded in time. :attr:`FedServer.finished`
is set once ``config.rounds`` rounds are complete and every connected device has been
sent the final global and ``federation:finished``; the server keeps serving (status
phase ``finished``) until stopped. Routes: ``GET /`` (dashboard), ``GET /api/status``,
``GET /healthz``. Partial uploads are kept in ``state_dir/blobs`` so an upload
interrupted by a crash resumes. Tokens are registered with the log redactor.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from client import __version__
from client.errors import FedtrayError
from client.logsetup import add_secret
from client.protocol import PROTOCOL_VERSION
from client.tasks import Task, get_task
from client.transfer import BlobStore
from client.weights import layout_of
from server.auth import TokenChecker
from server.background import Background
from server.config import ServerConfig
from server.coordinator import RoundCoordinator, TestData
from server.distribution import Distributor
from server.evaluation import test_split
from server.globalmodel import GlobalModel
from server.handlers import DeviceNamespace
from server.model import initial_state
from server.registry import Registry
from server.restore import restore_round
from server.rounds import Round
from server.roundstore import RoundStore
from server.served_task import package_task
from server.serving import (
    StartupError,
    bind_socket,
    close_serving,
    device_server,
    serve_on,
    tls_context,
)
from server.starter import training_config
from server.status import RoundRecord, ServerStatus, build_status
from server.store import Store, StoreError
from server.strategies import Strategy, build_strategy
from server.taskfile import PackageTask, ServedPackage

__all__ = ["FedServer", "StartupError"]

log = logging.getLogger(__name__)

DASHBOARD_FILE = Path(__file__).with_name("dashboard.html")


class FedServer:
    """One running reference server (see the module docstring)."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        strategy: Strategy | None = None,
        package: ServedPackage | None = None,
    ) -> None:
        self.config = config
        #: The checked package of ``config.task_file`` (read at start when not given).
        self._package = package
        self.sio = device_server(config)
        self.app = web.Application()
        self.sio.attach(self.app)
        self.app.router.add_get("/", self._http_index)
        self.app.router.add_get("/api/status", self._http_status)
        self.app.router.add_get("/healthz", self._http_health)
        self.registry = Registry(config.stale_after)
        limits = config.limits
        self.blobs = BlobStore(
            max_chunk_bytes=limits.max_chunk_bytes,
            max_blob_bytes=limits.max_blob_bytes,
            ttl_sec=config.blob_ttl,
            # On disk, so an upload interrupted by a server crash resumes where it stopped.
            spill_dir=config.state_dir / "blobs",
        )
        self.auth = TokenChecker(config.tokens)
        for token in config.tokens:
            add_secret(token)  # redacted from every log line, whoever started the server
        self.store = Store(config.state_dir)
        self.round_store = RoundStore(config.state_dir)
        self.model = GlobalModel(self.store, config.task)
        self.background = Background()
        self.distributor = Distributor(self.sio, config, self.registry, self.model, self.background)
        self.coordinator = RoundCoordinator(
            config=config,
            sio=self.sio,
            registry=self.registry,
            model=self.model,
            strategy=strategy if strategy is not None else build_strategy(config.strategy),
            round_store=self.round_store,
            blobs=self.blobs,
            distributor=self.distributor,
            background=self.background,
        )
        self.sio.register_namespace(
            DeviceNamespace(
                config=config,
                auth=self.auth,
                registry=self.registry,
                blobs=self.blobs,
                coordinator=self.coordinator,
                distributor=self.distributor,
                background=self.background,
            )
        )
        self.port: int = 0
        self._loops: list[asyncio.Task[Any]] = []
        self._runner: web.AppRunner | None = None

    # ================================================================== read-only views

    @property
    def strategy(self) -> Strategy:
        return self.coordinator.strategy

    @property
    def finished(self) -> asyncio.Event:
        """Set when every round is complete and devices were told (the server still serves)."""
        return self.coordinator.finished

    @property
    def round(self) -> Round | None:
        return self.coordinator.round

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def rounds_completed(self) -> int:
        return self.model.rounds_completed

    @property
    def history(self) -> list[RoundRecord]:
        return self.model.history

    @property
    def task(self) -> Task:
        return self.coordinator.task

    @property
    def url(self) -> str:
        return f"{self.config.scheme}://{self.config.host}:{self.port}"

    # ================================================================== lifecycle

    async def start(self) -> int:
        """Load the task and state, bind, start the round loop; return the bound port."""
        cfg = self.config
        # First, so a bad certificate is reported before seconds of model building.
        ssl_context = tls_context(cfg)
        # Bound before anything is built or written: a port in use leaves nothing behind.
        sock = bind_socket(cfg.host, cfg.port)
        self.port = int(sock.getsockname()[1])
        try:
            await self._prepare()
            await self._listen(sock, ssl_context)
        except BaseException:
            sock.close()
            raise
        self._loops = [
            asyncio.create_task(self.coordinator.run(), name="round-loop"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
        ]
        log.info(
            "serving task %s on %s (tokens %s, TLS %s, %s)",
            cfg.task,
            self.url,
            "required" if self.auth.enabled else "off",
            "on" if ssl_context is not None else "off",
            f"{cfg.rounds} rounds" if cfg.rounds else "rounds forever",
        )
        return self.port

    async def _prepare(self) -> None:
        """The task, the model, the transfer budget, partial uploads and an open round."""
        cfg = self.config
        task = await self._load_task()
        package = task.package.ref if isinstance(task, PackageTask) else None
        self.distributor.describe_model(dict(task.params), package)
        await self._load_model(task)
        self._set_transfer_budget()
        test_data = await self._test_data(task)
        try:
            held = await asyncio.to_thread(self.blobs.restore, time.monotonic())
        except OSError as exc:
            raise StartupError(f"cannot read partial uploads in {cfg.state_dir}: {exc}") from None
        if held:
            log.info("kept %d partial uploads from the previous run", held)
        restored = await asyncio.to_thread(
            restore_round,
            self.round_store,
            self.coordinator.strategy,
            task=cfg.task,
            version=self.model.version,
            rounds_completed=self.model.rounds_completed,
            rounds_target=cfg.rounds,
            global_state=self.model.state,
            layout=self.model.layout,
        )
        self.coordinator.prepare(task, test_data, restored)

    def _set_transfer_budget(self) -> None:
        """Bound partial uploads by the model's size (see ServerConfig.transfer_budget)."""
        model_bytes = sum(int(arr.nbytes) for arr in self.model.state.values())
        budget = self.config.transfer_budget(model_bytes)
        self.blobs.set_budget(
            max_peer_bytes=budget.per_device,
            max_total_bytes=budget.total,
            max_open_per_peer=budget.open_per_device,
        )
        log.info(
            "partial uploads: at most %d per device, %d bytes per device, %d bytes in all",
            budget.open_per_device,
            budget.per_device,
            budget.total,
        )

    async def _load_task(self) -> Task:
        cfg = self.config
        if cfg.task_file is not None:
            return await self._load_package(cfg.task_file)
        try:
            task = get_task(cfg.task, cfg.model_params)
        except FedtrayError as exc:
            raise StartupError(f"task {cfg.task!r}: {exc.message}") from None
        try:
            training_config(task, cfg, 0)  # the task's recommendation merged with the flags
        except ValueError as exc:
            raise StartupError(f"training settings for task {cfg.task!r}: {exc}") from None
        return task

    async def _load_package(self, path: Path) -> PackageTask:
        """The package of ``--task-file``, checked; its task (named by its manifest)."""
        return await asyncio.to_thread(package_task, self.config, self._package)

    async def _test_data(self, task: Task) -> TestData | None:
        """The test split new globals are evaluated on (:func:`server.evaluation.test_split`)."""
        return await asyncio.to_thread(test_split, task)

    async def _load_model(self, task: Task) -> None:
        """The saved global model, or a new one saved as version 0 (a package's weights)."""
        cfg = self.config
        try:
            if isinstance(task, PackageTask):
                fresh = task.package.weights
            else:
                fresh = await asyncio.to_thread(initial_state, task, task.params, cfg.seed)
        except ImportError as exc:
            raise StartupError(f"the server needs torch to build the model: {exc}") from None
        except FedtrayError as exc:
            raise StartupError(f"task {cfg.task!r}: {exc.message}") from None
        layout = layout_of(fresh)
        try:
            saved = await asyncio.to_thread(self.store.load, cfg.task, layout)
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        self.model.adopt(fresh, layout, saved)
        if saved is None:
            try:
                await asyncio.to_thread(
                    self.store.save,
                    task=cfg.task,
                    version=0,
                    rounds_completed=0,
                    state=fresh,
                    history=[],
                )
            except OSError as exc:
                raise StartupError(f"cannot write to state dir {cfg.state_dir}: {exc}") from None
            log.info("new federation for task %s: version 0 saved in %s", cfg.task, cfg.state_dir)
        else:
            log.info(
                "resuming task %s from %s: version %d after %d completed rounds",
                cfg.task,
                cfg.state_dir,
                saved.version,
                saved.rounds_completed,
            )

    async def _listen(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        """Serve on the bound socket (connections are taken from here on)."""
        cfg = self.config
        self._runner = await serve_on(
            self.app, sock, ssl_context, backlog=128, where=f"{cfg.host}:{cfg.port}"
        )

    async def stop(self) -> None:
        """Stop rounds, disconnect everyone, release the port.

        An open round is not cancelled: it is on disk (:mod:`server.roundstore`), so after a
        restart before its deadline the devices finish it and their updates count; past
        the deadline they are refused as late. Every step is bounded in time, so a stuck
        peer cannot keep the server alive.
        """
        await self.background.cancel_all(self._loops, timeout=5)
        self._loops = []
        sids = [r.sid for r in self.registry.connected() if r.sid is not None]
        await close_serving(self.sio, sids, self._runner)
        self._runner = None
        log.info("server stopped")

    async def _housekeeping(self) -> None:
        """Expire abandoned partial blobs."""
        period = min(60.0, self.config.blob_ttl / 2)
        while True:
            await asyncio.sleep(period)
            dropped = self.blobs.expire(time.monotonic())
            if dropped:
                log.info(
                    "dropped %d partial transfers idle for %.0f s", dropped, self.config.blob_ttl
                )

    # ================================================================== HTTP

    async def _http_index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(DASHBOARD_FILE)

    async def _http_status(self, request: web.Request) -> web.Response:
        # Serialized by pydantic in one call (the same JSON as model_dump + json.dumps,
        # several times less CPU: it holds the whole round history).
        body = self.status().model_dump_json(by_alias=True)
        return web.Response(body=body.encode("utf-8"), content_type="application/json")

    async def _http_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def status(self) -> ServerStatus:
        """The status document (what ``GET /api/status`` returns)."""
        now_mono, now_unix = time.monotonic(), time.time()
        phase = self.coordinator.phase
        return build_status(
            server_version=__version__,
            protocol=PROTOCOL_VERSION,
            task=self.config.task,
            global_version=self.model.version,
            rounds_target=self.config.rounds,
            phase=phase.phase,
            current=phase.current(now_mono, now_unix),
            history=self.model.history,
            registry=self.registry,
            now_mono=now_mono,
            now_unix=now_unix,
            strategy=self.strategy.settings,
        )
