"""The server's wiring: Socket.IO handlers, HTTP routes and the round loop on one port.

Contract: :class:`FedServer` owns one python-socketio ``AsyncServer`` (aiohttp mode) and
one aiohttp application. :meth:`FedServer.start` loads the task, restores or creates the
global model (persisting version 0 on a first start, so a restart never re-initialises
weights that devices already hold), binds the port (``port=0`` picks a free one; the real
port is returned) and starts the round loop. :meth:`FedServer.stop` cancels the loop,
tells devices still training to stop, disconnects everyone and releases the port.
``finished`` is set when ``config.rounds`` rounds are complete.

Handlers never raise: every event gets its positive ack or an ``ErrorAck`` (a malformed
payload is ``bad_request``, an event before ``device:register`` is ``not_registered``,
an unknown event is ``bad_request``), a line is logged, and the server keeps serving
everyone else. Tokens are never logged (they are registered with the log redactor).
With ``certfile``/``keyfile`` the port serves HTTPS and WSS. Every connection has an
event budget (:mod:`server.ratelimit`), checked before a payload is parsed: over it, an
event is answered ``rate_limited``; a connection that keeps flooding is disconnected.
Torch work (initial model, evaluation), weight
decoding and aggregation of large updates run in threads so heartbeats keep flowing.

Partitioning: in each round, the selected devices get parts ``0..n-1`` of ``n`` (in
selection order) of the task's training split, with the server's seed and scheme.

Surviving a crash (even ``kill -9``): partial uploads are kept on disk in
``state_dir/blobs`` (:class:`client.transfer.BlobStore` with a spill dir), so a device
that reconnects resumes from the bytes the server already holds. The open round is kept
in ``state_dir/round.json`` and each accepted update in ``state_dir/round/``, written
before the update is acknowledged (:mod:`server.roundstore`). On start, a saved round whose
base is the saved global version and whose deadline has not passed is restored under
the SAME round id: its saved updates are folded into the strategy again (each counted
once), and the slots of devices that had not reported wait up to
:data:`RETURN_GRACE_S` (or the deadline) for their devices to reconnect, which are then
offered their part again (a device that already holds the trained update just sends
it). Any other saved round is discarded with a log line saying why. The round's files
are removed only after the round's new global version and history are saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, get_args

import numpy as np
import socketio
from aiohttp import web

from client import __version__
from client.errors import FedtrayError
from client.logsetup import add_secret
from client.protocol import (
    EV_BLOB_CHUNK,
    EV_BLOB_STATUS,
    EV_HEARTBEAT,
    EV_REGISTER,
    EV_REGISTERED,
    EV_TRAINING_CANCEL,
    EV_TRAINING_ERROR,
    EV_TRAINING_PROGRESS,
    EV_TRAINING_START,
    EV_WEIGHTS_GLOBAL,
    EV_WEIGHTS_SUBMIT,
    PROTOCOL_VERSION,
    BlobChunk,
    BlobStatus,
    DeviceRegister,
    DeviceRegistered,
    ErrorAck,
    Heartbeat,
    OkAck,
    Partition,
    PauseReason,
    SubmitAccepted,
    TrainingCancel,
    TrainingConfig,
    TrainingError,
    TrainingProgress,
    TrainingStart,
    TrainingStartAck,
    WeightFormat,
    WeightsGlobal,
    WeightsSubmit,
    error_ack,
    parse,
)
from client.tasks import Task, get_task
from client.transfer import BlobStore, send_blob, weights_ref_for
from client.weights import Layout, StateDict, decode, encode, layout_of, sha256_hex
from server.aggregation import FedAvg, Strategy, weighted_mean
from server.auth import UNAUTHORIZED_MESSAGE, TokenChecker
from server.config import ServerConfig
from server.model import evaluate_state, initial_state
from server.ratelimit import CHUNK_EVENT, ConnectionLimiter, Verdict
from server.registry import DeviceRecord, Registry
from server.rounds import Round, Slot, select_devices
from server.roundstore import RoundStore, SavedRound, SavedSlot
from server.status import (
    CurrentRound,
    RoundRecord,
    ServerStatus,
    build_status,
    current_from_round,
)
from server.store import Store, StoreError
from server.tls import TLSConfigError, server_ssl_context

log = logging.getLogger(__name__)

DASHBOARD_FILE = Path(__file__).with_name("dashboard.html")
#: After a restart, how long (at least) a restored round waits for its devices to return.
RETURN_GRACE_S = 10.0
Handler = Callable[..., Awaitable[Any]]


class StartupError(Exception):
    """The server cannot start (bad task, unusable state dir, port in use); one line."""


def _short(value: object, limit: int = 80) -> str:
    """A value safe and short enough for a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_error_ack(ack: object) -> bool:
    return isinstance(ack, dict) and ack.get("ok") is False


class FedServer:
    """One running reference server (see the module docstring)."""

    def __init__(self, config: ServerConfig, *, strategy: Strategy | None = None) -> None:
        self.config = config
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp",
            max_http_buffer_size=config.max_message_bytes,
            logger=False,
            engineio_logger=False,
        )
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
        self._limiters: dict[str, ConnectionLimiter] = {}
        self.strategy: Strategy = strategy if strategy is not None else FedAvg()
        self.store = Store(config.state_dir)
        self.round_store = RoundStore(config.state_dir)
        self.port: int = 0
        self.version = 0
        self.rounds_completed = 0
        self.history: list[RoundRecord] = []
        self.round: Round | None = None
        self.finished = asyncio.Event()
        self._task: Task | None = None
        self._global: StateDict = {}
        self._layout: Layout = {}
        self._last_metrics: dict[str, float] = {}
        self._last_round_id: str | None = None
        self._test_data: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None
        self._encoded: dict[WeightFormat, tuple[int, bytes, str]] = {}
        self._waiting: CurrentRound | None = None
        self._round_phase: str = "starting"
        self._rng = random.Random(config.seed)
        # Distinguishes this process's round ids from a previous run's after a restart.
        self._run_tag = secrets.token_hex(4)
        # The round before the current one, so a resend whose ack was lost as that round
        # closed is answered ``duplicate`` (counted) rather than ``round_closed``.
        self._previous_round: Round | None = None
        # A round restored from round.json, run first by the round loop.
        self._restored: Round | None = None
        self._return_grace_until = 0.0
        self._send_locks: dict[str, asyncio.Lock] = {}
        self._agg_lock = asyncio.Lock()
        self._round_changed = asyncio.Event()
        self._devices_changed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._device_work: dict[str, set[asyncio.Task[Any]]] = {}
        self._loops: list[asyncio.Task[Any]] = []
        self._runner: web.AppRunner | None = None
        self._register_handlers()

    # ================================================================== lifecycle

    @property
    def task(self) -> Task:
        if self._task is None:
            raise RuntimeError("the server is not started")
        return self._task

    @property
    def url(self) -> str:
        return f"{self.config.scheme}://{self.config.host}:{self.port}"

    async def start(self) -> int:
        """Load the task and state, bind, start the round loop; return the bound port."""
        cfg = self.config
        ssl_context = None
        if cfg.certfile is not None and cfg.keyfile is not None:
            # First, so a bad certificate is reported before seconds of model building.
            try:
                ssl_context = server_ssl_context(cfg.certfile, cfg.keyfile)
            except TLSConfigError as exc:
                raise StartupError(str(exc)) from None
        try:
            task = get_task(cfg.task, cfg.model_params)
        except FedtrayError as exc:
            raise StartupError(f"task {cfg.task!r}: {exc.message}") from None
        self._task = task
        try:
            self._training_config(0)  # the task's recommendation merged with the flags
        except ValueError as exc:
            raise StartupError(f"training settings for task {cfg.task!r}: {exc}") from None
        try:
            fresh = await asyncio.to_thread(initial_state, task, task.params, cfg.seed)
        except ImportError as exc:
            raise StartupError(f"the server needs torch to build the model: {exc}") from None
        except FedtrayError as exc:
            raise StartupError(f"task {cfg.task!r}: {exc.message}") from None
        self._layout = layout_of(fresh)
        try:
            saved = await asyncio.to_thread(self.store.load, cfg.task, self._layout)
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        if saved is None:
            self._global = fresh
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
            self._global = saved.state
            self.version = saved.version
            self.rounds_completed = saved.rounds_completed
            self.history = saved.history
            if saved.history:
                self._last_round_id = saved.history[-1].round_id
            log.info(
                "resuming task %s from %s: version %d after %d completed rounds",
                cfg.task,
                cfg.state_dir,
                self.version,
                self.rounds_completed,
            )
        self._test_data = await asyncio.to_thread(task.load_data, "test", None)
        try:
            held = await asyncio.to_thread(self.blobs.restore, time.monotonic())
        except OSError as exc:
            raise StartupError(f"cannot read partial uploads in {cfg.state_dir}: {exc}") from None
        if held:
            log.info("kept %d partial uploads from the previous run", held)
        self._restored = await asyncio.to_thread(self._restore_round)
        if self._restored is not None:
            self.round = self._restored

        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((cfg.host, cfg.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {cfg.host}:{cfg.port}: {exc}") from None
        self.port = int(sock.getsockname()[1])
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()
        self._loops = [
            asyncio.create_task(self._round_loop(), name="round-loop"),
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

    async def stop(self) -> None:
        """Stop rounds, disconnect everyone, release the port.

        An open round is not cancelled: it is on disk (:mod:`server.roundstore`), so after a
        restart before its deadline the devices finish it and their updates count; past
        the deadline they are refused as late. Every step is bounded in time, so a stuck
        peer cannot keep the server alive.
        """
        pending = [*self._loops, *self._background]
        for work in pending:
            work.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        self._loops = []
        sids = [r.sid for r in self.registry.connected() if r.sid is not None]
        if sids:
            await asyncio.wait(
                [asyncio.ensure_future(self.sio.disconnect(sid)) for sid in sids], timeout=5
            )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sio.shutdown(), 5)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("server stopped")

    def _spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, device_id: str | None = None
    ) -> None:
        """Run ``coro`` in the background; keep a reference; log if it fails.

        Work for a device (``device_id``) is cancelled when that device disconnects, so a
        transfer to a vanished peer does not wait out its ack timeout.
        """
        bg = asyncio.create_task(coro, name=name)
        self._background.add(bg)
        if device_id is not None:
            self._device_work.setdefault(device_id, set()).add(bg)

        def _done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if device_id is not None:
                self._device_work.get(device_id, set()).discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s failed", name, exc_info=t.exception())

        bg.add_done_callback(_done)

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
        return web.json_response(self.status().model_dump(by_alias=True, mode="json"))

    async def _http_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def status(self) -> ServerStatus:
        """The status document (what ``GET /api/status`` returns)."""
        now_mono, now_unix = time.monotonic(), time.time()
        rnd = self.round
        current: CurrentRound | None
        if rnd is not None and rnd.phase != "closed":
            current = current_from_round(
                rnd, "training" if rnd.phase == "training" else "starting", now_mono, now_unix
            )
        elif rnd is not None and self._round_phase == "aggregating":
            current = current_from_round(rnd, "aggregating", now_mono, now_unix)
        else:
            current = self._waiting
        return build_status(
            server_version=__version__,
            protocol=PROTOCOL_VERSION,
            task=self.config.task,
            global_version=self.version,
            rounds_target=self.config.rounds,
            current=current,
            history=self.history,
            registry=self.registry,
            now_mono=now_mono,
            now_unix=now_unix,
        )

    # ================================================================== Socket.IO

    def _register_handlers(self) -> None:
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self._on_disconnect)
        table: dict[str, Handler] = {
            EV_REGISTER: self._on_register,
            EV_HEARTBEAT: self._on_heartbeat,
            EV_TRAINING_PROGRESS: self._on_progress,
            EV_TRAINING_ERROR: self._on_training_error,
            EV_WEIGHTS_SUBMIT: self._on_submit,
            EV_BLOB_CHUNK: self._on_blob_chunk,
            EV_BLOB_STATUS: self._on_blob_status,
        }
        for event, handler in table.items():
            self.sio.on(event, self._guarded(event, handler))
        self.sio.on("*", self._on_unknown)

    def _guarded(self, event: str, handler: Handler) -> Handler:
        """Wrap a handler: exactly one payload object, and errors become an ErrorAck."""

        async def guarded(sid: str, *args: Any) -> Any:
            refusal = self._admit(sid, event, args)
            if refusal is not None:
                return refusal
            try:
                if len(args) != 1:
                    raise FedtrayError(
                        "bad_request", f"{event} takes exactly one payload object, got {len(args)}"
                    )
                return await handler(sid, args[0])
            except FedtrayError as exc:
                record = self.registry.by_sid(sid)
                who = record.name if record else f"sid {sid}"
                log.info("%s from %s refused: %s: %s", event, who, exc.code, exc.message)
                return error_ack(exc.code, exc.message)
            except Exception:
                log.exception("bug while handling %s from sid %s", event, sid)
                return error_ack("internal_error", f"the server failed to handle {event}")

        return guarded

    def _admit(self, sid: str, event: str, args: tuple[Any, ...]) -> dict[str, Any] | None:
        """None when ``sid`` may send ``event`` now; else the ``rate_limited`` ErrorAck.

        Checked before anything is parsed or buffered. A connection that keeps flooding
        after being refused is disconnected; refusals are logged once per connection, so
        a flood cannot flood the log either.
        """
        limiter = self._limiters.get(sid)
        if limiter is None:
            # The connection is gone (events still queued after its disconnect): nobody
            # reads the answer, so do no work and log nothing.
            return error_ack("rate_limited", "this connection is closed")
        size = 0
        if event == CHUNK_EVENT and len(args) == 1 and isinstance(args[0], dict):
            data = args[0].get("data")
            size = len(data) if isinstance(data, bytes | str) else 0
        verdict: Verdict = limiter.admit(event, time.monotonic(), size)
        if verdict == "ok":
            return None
        record = self.registry.by_sid(sid)
        who = record.name if record else f"sid {sid}"
        if verdict == "limited" and limiter.refused == 1:
            log.warning("%s is sending too fast: answering rate_limited", who)
        elif verdict == "disconnect":
            log.warning(
                "%s kept flooding after %d rate_limited answers; disconnecting it",
                who,
                limiter.refused,
            )
            self._spawn(self.sio.disconnect(sid), f"disconnect-flooder-{sid}")
        return error_ack("rate_limited", "too many events; slow down")

    async def _on_unknown(self, event: Any, sid: str, *args: Any) -> Any:
        refusal = self._admit(sid, str(event), args)
        if refusal is not None:
            return refusal
        log.info("unknown event %s from sid %s answered with bad_request", _short(event), sid)
        return error_ack("bad_request", f"unknown event {_short(event, 64)}")

    async def _on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        if not self.auth.check(auth):
            log.warning(
                "refused a connection from %s: no valid token",
                environ.get("REMOTE_ADDR", "an unknown address"),
            )
            raise socketio.exceptions.ConnectionRefusedError(UNAUTHORIZED_MESSAGE)
        self._limiters[sid] = ConnectionLimiter(self.config.rate_limits, time.monotonic())

    async def _on_disconnect(self, sid: str, reason: Any = None) -> None:
        self._limiters.pop(sid, None)
        try:
            record = self.registry.disconnect(sid)
            if record is None:
                return
            log.info("device %s (%s) disconnected", record.name, record.device_id)
            for work in list(self._device_work.get(record.device_id, ())):
                work.cancel()
            rnd = self.round
            if rnd is not None and rnd.mark(record.device_id, "dropped", "disconnected"):
                log.info("round %s: slot of %s freed (disconnected)", rnd.round_id, record.name)
            self._round_changed.set()
            self._devices_changed.set()
        except Exception:
            log.exception("bug while handling a disconnect of sid %s", sid)

    def _require(self, sid: str) -> DeviceRecord:
        record = self.registry.by_sid(sid)
        if record is None:
            raise FedtrayError("not_registered", "send device:register first")
        self.registry.touch(record.device_id, time.monotonic())
        return record

    async def _on_register(self, sid: str, payload: Any) -> dict[str, Any]:
        if isinstance(payload, dict) and payload.get("protocol", PROTOCOL_VERSION) != (
            PROTOCOL_VERSION
        ):
            raise FedtrayError(
                "unsupported_protocol",
                f"this server speaks protocol {PROTOCOL_VERSION}, "
                f"not {_short(payload.get('protocol'), 20)}",
            )
        reg = parse(DeviceRegister, payload)
        record, replaced = self.registry.register(reg, sid, time.monotonic())
        if replaced is not None:
            log.info(
                "device %s (%s) reconnected; dropping its old connection", reg.name, reg.device_id
            )
            self._spawn(self.sio.disconnect(replaced), f"disconnect-{replaced}")
        else:
            log.info(
                "device %s (%s, %s, %s) registered; tasks: %s",
                reg.name,
                reg.device_id,
                reg.device_type,
                reg.platform.os,
                ", ".join(reg.capabilities.tasks) or "none",
            )
        ack = DeviceRegistered(
            device_id=reg.device_id,
            heartbeat_interval_sec=self.config.heartbeat_interval,
            server_version=__version__,
            limits=self.config.limits,
            task=self.config.task,
            global_version=self.version,
        ).to_wire()
        await self.sio.emit(EV_REGISTERED, ack, to=sid)
        if record.weights_version != self.version:
            self._spawn(self._ensure_global(record), f"global-to-{reg.device_id}", reg.device_id)
        self._reoffer_round(record)
        self._devices_changed.set()
        return ack

    def _reoffer_round(self, record: DeviceRecord) -> None:
        """Offer a device that reconnects its part of the open round again (same round id,
        partition and deadline), so it can resume from its checkpoint."""
        rnd = self.round
        if rnd is None or record.state == "paused":
            return
        index = rnd.reoffer(record.device_id, time.monotonic())
        if index is None:
            return
        log.info("round %s: %s is back; offering its part again", rnd.round_id, record.name)
        self._spawn(
            self._start_device(rnd, record.device_id, index, len(rnd.slots), rnd.deadline_unix),
            f"restart-{record.device_id}",
            record.device_id,
        )

    async def _on_heartbeat(self, sid: str, payload: Any) -> dict[str, Any]:
        record = self._require(sid)
        hb = parse(Heartbeat, payload)
        was = record.state
        self.registry.heartbeat(record.device_id, hb, time.monotonic())
        if hb.state == "paused" and was != "paused":
            log.info(
                "device %s paused: %s%s",
                record.name,
                hb.pause_reason or "unknown reason",
                f" ({hb.pause_detail})" if hb.pause_detail else "",
            )
        self._devices_changed.set()
        return OkAck().to_wire()

    async def _on_progress(self, sid: str, payload: Any) -> None:
        record = self._require(sid)
        progress = parse(TrainingProgress, payload)
        self.registry.progress(record.device_id, progress, time.monotonic())
        self._devices_changed.set()

    async def _on_training_error(self, sid: str, payload: Any) -> None:
        record = self._require(sid)
        err = parse(TrainingError, payload)
        log.warning(
            "device %s reported a training error in round %s: %s: %s",
            record.name,
            err.round_id,
            err.code,
            err.message,
        )
        record.state = "idle"
        rnd = self.round
        if rnd is not None and err.round_id == rnd.round_id:
            rnd.mark(record.device_id, "failed", f"{err.code}: {err.message}")
            self._round_changed.set()

    async def _on_blob_chunk(self, sid: str, payload: Any) -> dict[str, Any]:
        record = self._require(sid)
        chunk = parse(BlobChunk, payload)
        return self.blobs.accept_chunk(record.device_id, chunk, time.monotonic()).to_wire()

    async def _on_blob_status(self, sid: str, payload: Any) -> dict[str, Any]:
        record = self._require(sid)
        query = parse(BlobStatus, payload)
        return self.blobs.status(record.device_id, query.blob_id, time.monotonic()).to_wire()

    def _round_for(self, round_id: str) -> Round | None:
        """The current round, or the previous one when ``round_id`` names it."""
        previous = self._previous_round
        if previous is not None and previous.round_id == round_id:
            return previous
        return self.round

    async def _on_submit(self, sid: str, payload: Any) -> dict[str, Any]:
        record = self._require(sid)
        sub = parse(WeightsSubmit, payload)
        rnd = self._round_for(sub.round_id)
        if rnd is None:
            raise FedtrayError("round_closed", f"round {sub.round_id} is closed or unknown")
        rnd.check_submit(record.device_id, sub.round_id, sub.base_version, time.monotonic())
        data = self.blobs.take(record.device_id, sub.weights)
        state = await asyncio.to_thread(
            decode,
            data,
            sub.weights.format,
            expected=self._layout,
            max_bytes=self.config.limits.max_blob_bytes,
        )
        del data
        # On disk before it is counted and acknowledged: an acknowledged update survives a
        # server crash (the device deletes its copy on the ack).
        try:
            update = await asyncio.to_thread(encode, state, "safetensors")
            await asyncio.to_thread(self.round_store.save_update, record.device_id, update)
            del update
        except OSError as exc:
            log.error("cannot save the update of %s: %s", record.name, exc)
            raise FedtrayError(
                "internal_error", "the server cannot store the update now; send it again later"
            ) from None
        async with self._agg_lock:
            # The round may have closed, or a concurrent duplicate been counted, meanwhile.
            if self.round is not rnd:
                raise FedtrayError("round_closed", f"round {sub.round_id} is closed")
            rnd.check_submit(record.device_id, sub.round_id, sub.base_version, time.monotonic())
            saved = self._saved_round(rnd)
            saved.slots[record.device_id] = SavedSlot(
                index=rnd.slots[record.device_id].index,
                reported=True,
                num_samples=sub.num_samples,
                metrics=dict(sub.metrics),
                update_file=self.round_store.update_file_name(record.device_id),
            )
            try:
                await asyncio.to_thread(self.round_store.save, saved)
            except OSError as exc:
                log.error("cannot save round %s: %s", rnd.round_id, exc)
                raise FedtrayError(
                    "internal_error", "the server cannot store the update now; send it again later"
                ) from None
            await asyncio.to_thread(self.strategy.add, state, sub.num_samples)
            received = rnd.record_report(record.device_id, sub.num_samples, sub.metrics)
        record.state = "idle"
        record.progress = None
        log.info(
            "round %s: update from %s accepted (%d samples; %d of %d reported)",
            rnd.round_id,
            record.name,
            sub.num_samples,
            received,
            len(rnd.slots),
        )
        self._round_changed.set()
        return SubmitAccepted(round_id=rnd.round_id, received=received).to_wire()

    # ================================================================== weights out

    def _training_config(self, round_number: int) -> TrainingConfig:
        """The task's recommended training settings, overridden by the operator's flags."""
        fields = {**self.task.default_config, **self.config.training_overrides()}
        fields["seed"] = self.config.seed + round_number
        return TrainingConfig.model_validate(fields)

    def _format_for(self, record: DeviceRecord) -> WeightFormat:
        formats = record.capabilities.weight_formats
        return "safetensors" if "safetensors" in formats else formats[0]

    async def _encoded_global(self, fmt: WeightFormat) -> tuple[int, bytes, str]:
        version, state = self.version, self._global
        cached = self._encoded.get(fmt)
        if cached is not None and cached[0] == version:
            return cached
        data = await asyncio.to_thread(encode, state, fmt)
        entry = (version, data, sha256_hex(data))
        if self.version == version:
            self._encoded[fmt] = entry
        return entry

    async def _ensure_global(self, record: DeviceRecord) -> bool:
        """Send the current global weights unless the device holds them; True on success."""
        lock = self._send_locks.setdefault(record.device_id, asyncio.Lock())
        async with lock:
            if record.weights_version == self.version:
                return True
            sid = record.sid
            if sid is None:
                return False
            fmt = self._format_for(record)
            version, data, digest = await self._encoded_global(fmt)
            chunk = min(self.config.limits.max_chunk_bytes, record.capabilities.max_chunk_bytes)
            ref = weights_ref_for(data, fmt, inline_limit=chunk, sha256=digest)
            timeout = self.config.ack_timeout

            async def call(event: str, payload: dict[str, Any]) -> Any:
                return await self.sio.call(event, payload, to=sid, timeout=timeout)

            message = WeightsGlobal(
                version=version,
                task=self.config.task,
                round_id=self._last_round_id,
                metrics=self._last_metrics,
                weights=ref,
            )
            try:
                if ref.blob_id is not None:
                    await send_blob(
                        call,
                        data,
                        blob_id=ref.blob_id,
                        chunk_bytes=chunk,
                        window=self.config.limits.max_inflight_chunks,
                        sha256=digest,
                    )
                ack = await call(EV_WEIGHTS_GLOBAL, message.to_wire())
            except FedtrayError as exc:
                log.warning(
                    "sending version %d to %s failed: %s: %s",
                    version,
                    record.name,
                    exc.code,
                    exc.message,
                )
                return False
            except Exception as exc:  # timeouts and disconnects of the transport
                log.warning(
                    "sending version %d to %s failed: %s",
                    version,
                    record.name,
                    type(exc).__name__,
                )
                return False
            if _is_error_ack(ack):
                try:
                    err = ErrorAck.model_validate(ack)
                    why = f"{err.code}: {err.message}"
                except ValueError:
                    why = _short(ack)
                log.warning("device %s refused version %d: %s", record.name, version, why)
                return False
            record.weights_version = version
            log.debug("device %s now holds version %d", record.name, version)
            return True

    async def _broadcast_global(self) -> None:
        """Send the new version to every connected device, concurrently."""
        for record in self.registry.connected():
            if record.weights_version != self.version:
                self._spawn(
                    self._ensure_global(record), f"global-to-{record.device_id}", record.device_id
                )

    async def _cancel_devices(self, rnd: Round, device_ids: list[str], reason: str) -> None:
        message = TrainingCancel(round_id=rnd.round_id, reason=reason).to_wire()
        sends = []
        for device_id in device_ids:
            record = self.registry.get(device_id)
            if record is not None and record.sid is not None:
                sends.append(self.sio.emit(EV_TRAINING_CANCEL, message, to=record.sid))
        await asyncio.gather(*sends, return_exceptions=True)

    # ================================================================== rounds

    async def _round_loop(self) -> None:
        cfg = self.config
        attempt = 0
        number = 0
        restored, self._restored = self._restored, None
        if restored is not None:
            number, attempt = restored.number, restored.attempt
            self._return_grace_until = time.monotonic() + max(RETURN_GRACE_S, cfg.stale_after)
            if not await self._drive_round(restored, []):
                await asyncio.sleep(cfg.effective_retry_delay)
        while True:
            if cfg.rounds and self.rounds_completed >= cfg.rounds:
                log.info(
                    "all %d rounds are complete (version %d); stopping", cfg.rounds, self.version
                )
                self._waiting = None
                self.finished.set()
                return
            if number != self.rounds_completed + 1:
                number, attempt = self.rounds_completed + 1, 0
            candidates = await self._wait_for_devices(number)
            attempt += 1
            completed = await self._run_round(number, attempt, candidates)
            if not completed:
                self._waiting = CurrentRound(
                    number=number,
                    phase="waiting",
                    waiting_reason="retrying after an abandoned round",
                )
                await asyncio.sleep(cfg.effective_retry_delay)

    async def _wait_for_devices(self, number: int) -> list[DeviceRecord]:
        """Eligible devices once there are enough; logs why it waits, never silently."""
        cfg = self.config
        last_reason: str | None = None
        last_logged = 0.0
        while True:
            self._devices_changed.clear()
            now = time.monotonic()
            eligible = self.registry.eligible(cfg.task, now)
            if len(eligible) >= cfg.min_clients:
                self._waiting = None
                return eligible
            reason = self.registry.waiting_summary(cfg.task, now, cfg.min_clients)
            self._waiting = CurrentRound(number=number, phase="waiting", waiting_reason=reason)
            if reason != last_reason or now - last_logged >= cfg.wait_log_interval:
                log.info("round %d waiting: %s", number, reason)
                last_reason, last_logged = reason, now
            # Staleness changes with time alone, so wake up now and then even without events.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._devices_changed.wait(), timeout=min(cfg.heartbeat_interval, 5.0)
                )

    async def _run_round(self, number: int, attempt: int, candidates: list[DeviceRecord]) -> bool:
        cfg = self.config
        chosen = select_devices([d.device_id for d in candidates], cfg.clients_per_round, self._rng)
        round_id = f"r{number}-{attempt}-{self._run_tag}"
        now = time.monotonic()
        deadline_unix = time.time() + cfg.round_timeout
        rnd = Round.open(
            round_id=round_id,
            number=number,
            attempt=attempt,
            base_version=self.version,
            selected=chosen,
            now=now,
            timeout=cfg.round_timeout,
            required=cfg.required_reports(len(chosen)),
            deadline_unix=deadline_unix,
        )
        self.strategy.begin(self._global)
        self._round_phase = "starting"
        if self.round is not None:
            self._previous_round = self.round
        self.round = rnd
        try:
            await asyncio.to_thread(self._persist_open_round, rnd)
        except OSError as exc:
            log.error("cannot save round %s in %s: %s", round_id, cfg.state_dir, exc)
        names = ", ".join(self._name(d) for d in chosen)
        log.info(
            "round %d started (%s): %d selected [%s], %d reports needed, deadline in %.0f s",
            number,
            round_id,
            len(chosen),
            names,
            rnd.required,
            cfg.round_timeout,
        )
        starters = [
            asyncio.create_task(self._start_device(rnd, device_id, i, len(chosen), deadline_unix))
            for i, device_id in enumerate(chosen)
        ]
        return await self._drive_round(rnd, starters)

    async def _drive_round(self, rnd: Round, starters: list[asyncio.Task[None]]) -> bool:
        """Wait for an open round's reports, then close it; True when it completed."""
        cfg = self.config
        number, round_id, chosen = rnd.number, rnd.round_id, rnd.selected
        rnd.phase = "training"
        try:
            while True:
                self._round_changed.clear()
                now = time.monotonic()
                self._drop_stale(rnd, now)
                if now >= rnd.deadline or (
                    (rnd.settled or not rnd.can_still_succeed)
                    and not self._awaiting_return(rnd, now)
                ):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._round_changed.wait(),
                        timeout=min(rnd.deadline - now, cfg.heartbeat_interval),
                    )
        finally:
            for starter in starters:
                starter.cancel()
            await asyncio.gather(*starters, return_exceptions=True)
        async with self._agg_lock:
            self._round_phase = "aggregating"
            working = rnd.close()
        seconds = time.monotonic() - rnd.started_at
        if working:
            await self._cancel_devices(rnd, working, "the round is closed")
        if not rnd.succeeded:
            detail = self._abandon_detail(rnd, time.monotonic())
            log.warning(
                "round %d abandoned (%s): %d of %d reported, %d needed; %s; retrying",
                number,
                round_id,
                len(rnd.reported),
                len(chosen),
                rnd.required,
                detail,
            )
            self.history.append(
                RoundRecord(
                    round_id=round_id,
                    number=number,
                    outcome="abandoned",
                    version=self.version,
                    clients_selected=len(chosen),
                    clients_reported=len(rnd.reported),
                    train_loss=None,
                    seconds=round(seconds, 3),
                    finished_at=time.time(),
                    detail=detail,
                )
            )
            await self._forget_round()
            self._round_phase = "starting"
            return False
        await self._complete_round(rnd)
        return True

    def _awaiting_return(self, rnd: Round, now: float) -> bool:
        """True while a restored round still waits for a device not yet back since the
        restart (within the grace), so the round is not closed before it can return."""
        if now >= self._return_grace_until:
            return False
        return any(
            slot.state == "dropped"
            and slot.detail == "disconnected"
            and self.registry.get(device_id) is None
            for device_id, slot in rnd.slots.items()
        )

    def _saved_round(self, rnd: Round) -> SavedRound:
        """What ``round.json`` holds for ``rnd`` (reported slots name their update file)."""
        slots: dict[str, SavedSlot] = {}
        for device_id, slot in rnd.slots.items():
            reported = slot.state == "reported"
            slots[device_id] = SavedSlot(
                index=slot.index,
                reported=reported,
                num_samples=slot.num_samples if reported else 0,
                metrics=dict(slot.metrics) if reported else {},
                update_file=self.round_store.update_file_name(device_id) if reported else None,
            )
        return SavedRound(
            task=self.config.task,
            round_id=rnd.round_id,
            number=rnd.number,
            attempt=rnd.attempt,
            base_version=rnd.base_version,
            started_unix=time.time() - (time.monotonic() - rnd.started_at),
            deadline_unix=rnd.deadline_unix,
            required=rnd.required,
            slots=slots,
        )

    def _persist_open_round(self, rnd: Round) -> None:
        """A new round replaces whatever round files a previous round left."""
        self.round_store.clear()
        self.round_store.save(self._saved_round(rnd))

    async def _forget_round(self) -> None:
        """Remove the closed round's files (after its outcome is saved, if it completed)."""
        try:
            await asyncio.to_thread(self.round_store.clear)
        except OSError as exc:
            log.warning("cannot remove the closed round's files: %s", exc)

    def _restore_round(self) -> Round | None:
        """The open round a previous run saved, if it can go on; else None (files removed).

        Runs in a thread at start, after the global weights are loaded.
        """
        try:
            saved = self.round_store.load()
        except StoreError as exc:
            log.warning("discarding the saved open round: %s", exc)
            self.round_store.clear()
            return None
        if saved is None:
            return None
        now_unix = time.time()
        why: str | None = None
        if saved.task != self.config.task:
            why = f"it trains task {saved.task}"
        elif saved.base_version != self.version or saved.number != self.rounds_completed + 1:
            why = (
                f"it is round {saved.number} from version {saved.base_version}, but the saved "
                f"global is version {self.version} after {self.rounds_completed} rounds"
            )
        elif saved.deadline_unix <= now_unix:
            why = "its deadline has passed"
        elif self.config.rounds and self.rounds_completed >= self.config.rounds:
            why = "all rounds are complete"
        if why is not None:
            log.info("discarding the saved open round %s: %s", saved.round_id, why)
            self.round_store.clear()
            return None
        slots: dict[str, Slot] = {}
        self.strategy.begin(self._global)
        try:
            for device_id, kept in saved.slots.items():
                if kept.reported and kept.update_file is not None:
                    update = self.round_store.load_update(kept.update_file, self._layout)
                    self.strategy.add(update, kept.num_samples)
                    slots[device_id] = Slot(
                        state="reported",
                        index=kept.index,
                        num_samples=kept.num_samples,
                        metrics=dict(kept.metrics),
                    )
                else:
                    # Offered its part again when it reconnects (see _reoffer_round).
                    slots[device_id] = Slot(
                        state="dropped", detail="disconnected", index=kept.index
                    )
        except (StoreError, ValueError) as exc:
            log.warning("discarding the saved open round %s: %s", saved.round_id, exc)
            self.round_store.clear()
            return None
        now = time.monotonic()
        rnd = Round(
            round_id=saved.round_id,
            number=saved.number,
            attempt=saved.attempt,
            base_version=saved.base_version,
            deadline=now + (saved.deadline_unix - now_unix),
            started_at=now - max(0.0, now_unix - saved.started_unix),
            required=saved.required,
            slots=slots,
            phase="training",
            deadline_unix=saved.deadline_unix,
        )
        log.info(
            "restored round %d (%s) after a restart: %d of %d reported, %d needed, "
            "deadline in %.0f s",
            rnd.number,
            rnd.round_id,
            len(rnd.reported),
            len(rnd.slots),
            rnd.required,
            saved.deadline_unix - now_unix,
        )
        return rnd

    async def _complete_round(self, rnd: Round) -> None:
        cfg = self.config
        new_state = await asyncio.to_thread(self.strategy.result)
        metrics: dict[str, float] = {}
        try:
            assert self._test_data is not None
            x_test, y_test = self._test_data
            scores = await asyncio.to_thread(
                evaluate_state, self.task, self.task.params, new_state, x_test, y_test
            )
            metrics = {"evalLoss": float(scores["loss"]), "evalAccuracy": float(scores["accuracy"])}
        except Exception:
            log.exception("evaluation of round %d failed; continuing without it", rnd.number)
        train_loss = weighted_mean(
            [
                (slot.metrics["trainLoss"], slot.num_samples)
                for slot in rnd.slots.values()
                if slot.state == "reported" and "trainLoss" in slot.metrics
            ]
        )
        new_version = self.version + 1
        seconds = time.monotonic() - rnd.started_at
        record = RoundRecord(
            round_id=rnd.round_id,
            number=rnd.number,
            outcome="completed",
            version=new_version,
            clients_selected=len(rnd.slots),
            clients_reported=len(rnd.reported),
            train_loss=train_loss,
            eval_loss=metrics.get("evalLoss"),
            eval_accuracy=metrics.get("evalAccuracy"),
            seconds=round(seconds, 3),
            finished_at=time.time(),
        )
        history = [*self.history, record]
        encoded = await asyncio.to_thread(encode, new_state, "safetensors")
        # Persist first, then publish: a version anyone has seen survives a crash.
        try:
            await asyncio.to_thread(
                self.store.save,
                task=cfg.task,
                version=new_version,
                rounds_completed=rnd.number,
                state=new_state,
                history=history,
                encoded=encoded,
            )
        except OSError as exc:
            log.error("could not save version %d to %s: %s", new_version, cfg.state_dir, exc)
        else:
            # Only now: until the new version is saved, the round's updates live in its files.
            await self._forget_round()
        for device_id in rnd.reported:
            device = self.registry.get(device_id)
            if device is not None:
                device.rounds_completed += 1
        self._global = new_state
        self.version = new_version
        self.rounds_completed = rnd.number
        self.history = history
        self._encoded = {"safetensors": (new_version, encoded, sha256_hex(encoded))}
        self._last_metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
        self._last_round_id = rnd.round_id
        self._round_phase = "starting"
        log.info(
            "round %d: %d selected, %d reported, train loss %s, eval loss %s, "
            "eval accuracy %s, %.1f s (version %d)",
            rnd.number,
            len(rnd.slots),
            len(rnd.reported),
            _fmt(train_loss),
            _fmt(metrics.get("evalLoss")),
            _fmt(metrics.get("evalAccuracy")),
            seconds,
            self.version,
        )
        await self._broadcast_global()

    def _drop_stale(self, rnd: Round, now: float) -> None:
        for device_id in rnd.working:
            record = self.registry.get(device_id)
            if record is None or not record.connected:
                rnd.mark(device_id, "dropped", "disconnected")
            elif self.registry.is_stale(record, now):
                rnd.mark(device_id, "dropped", "stale (missed 3 heartbeats)")
                log.info("round %s: slot of %s freed (stale)", rnd.round_id, record.name)

    def _abandon_detail(self, rnd: Round, now: float) -> str:
        parts = []
        for device_id, slot in rnd.slots.items():
            if slot.state != "reported":
                parts.append(
                    f"{self._name(device_id)} {slot.state}"
                    + (f" ({slot.detail})" if slot.detail else "")
                )
        if now >= rnd.deadline:
            parts.insert(0, "timed out")
        return "; ".join(parts) or "no report"

    def _name(self, device_id: str) -> str:
        record = self.registry.get(device_id)
        return record.name if record is not None else device_id

    async def _start_device(
        self, rnd: Round, device_id: str, index: int, count: int, deadline_unix: float
    ) -> None:
        """Bring one selected device up to date and start it; free its slot on failure."""
        cfg = self.config
        try:
            record = self.registry.get(device_id)
            if record is None or record.sid is None:
                rnd.mark(device_id, "dropped", "disconnected")
                return
            if not await self._ensure_global(record):
                rnd.mark(device_id, "failed", "could not send the global weights")
                return
            sid = record.sid
            if sid is None:
                rnd.mark(device_id, "dropped", "disconnected")
                return
            start = TrainingStart(
                round_id=rnd.round_id,
                task=cfg.task,
                model_params=dict(self.task.params),
                config=self._training_config(rnd.number),
                partition=Partition(index=index, count=count, seed=cfg.seed, scheme=cfg.partition),
                base_version=rnd.base_version,
                deadline=deadline_unix,
                weight_format=self._format_for(record),
            )
            try:
                ack = await self.sio.call(
                    EV_TRAINING_START, start.to_wire(), to=sid, timeout=cfg.ack_timeout
                )
            except Exception as exc:  # timeout or disconnect
                rnd.mark(
                    device_id, "dropped", f"no answer to training:start ({type(exc).__name__})"
                )
                return
            try:
                answer = parse(TrainingStartAck, ack)
            except FedtrayError as exc:
                log.warning("device %s answered training:start badly: %s", record.name, exc.message)
                rnd.mark(device_id, "failed", "bad answer to training:start")
                return
            if answer.accepted:
                rnd.mark(device_id, "training")
                record.state = "training"
                record.pause_reason = None
                record.pause_detail = None
                return
            rnd.mark(device_id, "refused", answer.reason)
            log.info(
                "round %s: %s refused to train: %s%s",
                rnd.round_id,
                record.name,
                answer.reason or "no reason given",
                f" ({answer.detail})" if answer.detail else "",
            )
            pause = _PAUSE_REASONS.get(answer.reason or "")
            if pause is not None:
                # Not eligible again until a heartbeat says it is back.
                record.state = "paused"
                record.pause_reason = pause
                record.pause_detail = answer.detail
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bug while starting %s in round %s", device_id, rnd.round_id)
            rnd.mark(device_id, "failed", "server error")
        finally:
            self._round_changed.set()


_PAUSE_REASONS: dict[str, PauseReason] = {r: r for r in get_args(PauseReason)}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
