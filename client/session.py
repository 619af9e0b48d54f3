"""The networked session: one device taking part in a federation, behind one facade.

Threading model (the contract every caller relies on):

* :class:`DistributedClient` is the ONE thread-safe facade. It owns a background thread
  ("fedtray-session") that runs an asyncio loop; the python-socketio ``AsyncClient``
  (over aiohttp), the training worker's events, the stores on disk and all session state
  live on that loop. Every facade method hands its work to the loop with
  ``asyncio.run_coroutine_threadsafe`` / ``loop.call_soon_threadsafe``; nothing else is
  shared between threads except the current :class:`client.snapshot.ClientSnapshot`,
  an immutable object whose reference is swapped atomically.
* Subscribers (:meth:`DistributedClient.subscribe`) are called ON THE SESSION THREAD,
  once at subscription with the current snapshot and then on every change. They must not
  block or call back into the facade synchronously waiting for a result; a GUI hands
  the snapshot to its own thread.

Behaviour:

* Connects with ``auth={"token": ...}`` when a token is set; on every (re)connect sends
  ``device:register`` (same ``deviceId`` each time) and then heartbeats at the server's
  ``heartbeatIntervalSec``. Reconnects forever with capped, fully jittered exponential
  backoff (:mod:`client.backoff`); the snapshot says when the next try is. A refusal
  whose message starts with ``unauthorized`` gives ``auth_failed`` and waits the maximum
  backoff (or until :meth:`DistributedClient.connect` / new settings). With
  ``no_reconnect=True`` a refused or lost connection ends the session (``stopped`` with
  ``last_error``).
* ``https://``/``wss://`` servers are verified against the system's CAs, or against
  ``ca_file`` when set; verification is never turned off. A certificate refusal is put
  in plain words in ``last_error`` (not trusted / hostname mismatch naming the
  certificate's names / expired) and retried with the usual backoff.
* Pausing is decided by sources (the user's persisted ``paused`` setting; others such
  as the power policy via :meth:`DistributedClient.set_pause_source`) combined by
  :func:`client.snapshot.effective_decision`; :meth:`_Session._apply_decision` is the one
  place that pauses/resumes the worker, reports ``paused`` progress, updates heartbeats
  and makes ``training:start`` refuse with the reason.
* A timed pause (``paused_until`` in the settings, from :meth:`DistributedClient.pause`
  with ``until``, ``fedtray-client pause --for`` or the tray's "Pause for 1 hour") says
  "Paused by you until 15:30" (local time) and ends by itself at the deadline: a loop
  task wakes at least once a second (a suspended laptop or a changed clock cannot make
  it miss), resumes, clears ``paused`` and ``paused_until`` in the settings file and
  logs it. A session started after its deadline starts unpaused and clears them too.
* Power: a :class:`client.power_monitor.PowerMonitor` reads the battery (injectable
  ``battery_source``) every ``power_poll_interval`` seconds on the loop (the reading in a
  worker thread) and sets the ``"power"`` source; new battery settings re-decide at once.
  A pause reaches the worker at its next batch boundary, where it checkpoints; the
  server gets a heartbeat and a ``paused`` progress at once.
* The settings file is polled (content hash) and its live keys applied, so
  ``fedtray-client pause`` / ``resume`` / ``config set`` reach a running client.
* :meth:`DistributedClient.stop` pauses (checkpoints) the round instead of cancelling
  it, so the same round offered again after a restart resumes from the checkpoint. The
  worker also checkpoints every ``checkpoint_interval`` seconds of training, so even a
  ``kill -9`` loses at most that much. Work files are named by the training work, not
  the round id (:func:`client.workfiles.work_stem`): a round re-offered, or retried
  under a new id with the same partition and base, resumes the same checkpoint. Starting
  a round deletes the work files of other work; a newer ``weights:global`` deletes
  those built on older bases (:func:`client.workfiles.remove_stale`).
* ``training:start`` is acked accepted or refused (paused, ``busy``, ``unknown_task``,
  ``missing_base``, ``deadline_passed``); a round offered again that is being trained,
  or whose update is pending, is accepted without new work (the update is sent);
  ``training:cancel`` cancels the round;
  ``weights:global`` (inline or via ``blob:chunk``) is verified, decoded with the codec
  and stored (:mod:`client.global_store`) as the base of the next round.
* A finished update is moved into :mod:`client.pending` FIRST, then sent (blob +
  ``weights:submit``) and deleted only after the server's answer (accepted,
  ``duplicate``, ``round_closed`` or another final refusal, each logged). Pending
  updates are resumed after every reconnect, from the server's blob offset.
* Worker failures and disk errors are sent as ``training:error`` and the session keeps
  running. Handlers validate with :func:`client.protocol.parse` and never raise into
  python-socketio: bad payloads get an ``ErrorAck`` (or a log line for unacked events).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp
import socketio

from client.backoff import MAX_DELAY_S, Backoff
from client.config import Settings, config_path, data_dir, save_settings
from client.device import DeviceInfo, detect_device
from client.errors import ErrorCode, FedtrayError
from client.global_store import GlobalStore, GlobalWeights
from client.pending import PendingStore, PendingUpdate
from client.power import PowerSettings
from client.power_monitor import DEFAULT_POLL_INTERVAL_S, PowerMonitor, power_settings
from client.protocol import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_BLOB_BYTES,
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
    BlobChunk,
    BlobStatus,
    Capabilities,
    DeviceRegister,
    DeviceRegistered,
    ErrorAck,
    Heartbeat,
    Limits,
    OkAck,
    SubmitAccepted,
    TrainingCancel,
    TrainingError,
    TrainingProgress,
    TrainingStart,
    TrainingStartAck,
    WeightsGlobal,
    WeightsSubmit,
    error_ack,
    parse,
)
from client.resources import BatterySource, ResourceMonitor, read_battery
from client.settings_watch import SettingsFileWatch, merge_live, parse_settings_bytes
from client.snapshot import (
    ALLOW,
    USER_PAUSED,
    ClientSnapshot,
    PauseDecision,
    Progress,
    effective_decision,
)
from client.tasks import available_tasks
from client.trainer import DEFAULT_CHECKPOINT_INTERVAL, TrainJob, TrainResult
from client.transfer import BlobStore, send_blob, weights_ref_for
from client.weights import decode, encode
from client.workfiles import remove_stale, work_stem

__all__ = [
    "ClientSnapshot",
    "DistributedClient",
    "PauseDecision",
    "Worker",
    "WorkerFactory",
    "user_decision",
]

log = logging.getLogger(__name__)

#: Largest blob chunk this device accepts from a server (advertised at registration).
CLIENT_MAX_CHUNK_BYTES: Final = DEFAULT_CHUNK_BYTES
CONNECT_TIMEOUT_S: Final = 10.0
ACK_TIMEOUT_S: Final = 30.0
SUBMIT_TIMEOUT_S: Final = 120.0
PROGRESS_INTERVAL_S: Final = 0.5
SETTINGS_POLL_INTERVAL_S: Final = 1.0  # at most 2 progress messages per second
#: Longest sleep of the timed-pause task: wall-clock jumps (suspend, NTP) are noticed within it.
DEADLINE_CHECK_S: Final = 1.0
UPLOAD_RETRIES: Final = 5
SERVER_PEER: Final = "server"

#: Refusals of an update that no retry can change: the update is deleted after them.
FINAL_SUBMIT_CODES: Final[frozenset[str]] = frozenset(
    {
        "duplicate",
        "round_closed",
        "not_selected",
        "stale_base",
        "bad_request",
        "unsupported_format",
        "malformed",
        "unknown_dtype",
        "bad_offsets",
        "truncated",
        "oversized",
        "non_finite",
        "layout_mismatch",
        "shape_mismatch",
        "dtype_mismatch",
        "unknown_task",
        "blob_too_large",
    }
)

AUTH_FAILED_WORDS: Final = (
    "The server refused this device's token. Check the auth_token setting "
    "(`fedtray-client config set auth_token ...`)."
)

T = TypeVar("T")
Subscriber = Callable[[ClientSnapshot], None]


def user_decision(settings: Settings, now: datetime) -> PauseDecision:
    """The user's pause source for ``settings`` at the aware time ``now`` (pure).

    A pause whose ``paused_until`` has passed allows training; one still running says
    until when, in local time ("Paused by you until 15:30").
    """
    if not settings.paused:
        return ALLOW
    until = settings.paused_until
    if until is None:
        return USER_PAUSED
    if until <= now:
        return ALLOW
    return dataclasses.replace(
        USER_PAUSED, detail=f"{USER_PAUSED.detail} until {until.astimezone():%H:%M}"
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Worker(Protocol):
    """What the session needs of :class:`client.worker.TrainingWorker`."""

    @property
    def is_busy(self) -> bool: ...

    def submit(self, job: TrainJob) -> object: ...
    def pause(self) -> object: ...
    def resume(self) -> object: ...
    def cancel(self) -> object: ...
    def shutdown(self) -> object: ...


#: Builds the worker; its ``on_event`` callback may be called from any thread.
WorkerFactory = Callable[[Callable[[object], None]], Worker]


def _default_worker_factory(on_event: Callable[[object], None]) -> Worker:
    from client.worker import TrainingWorker

    worker: Worker = TrainingWorker(on_event=on_event)
    return worker


def default_work_dir() -> Path:
    """``<user data dir>/work``: the worker's outputs and checkpoints."""
    return data_dir() / "work"


def _is_auth_refusal(message: str) -> bool:
    return message.strip().lower().startswith("unauthorized")


def _connect_error_words(message: str, url: str) -> str:
    """A socketio/engineio connection error in plain words."""
    text = message.strip()
    # engine.io reports every transport failure (refused, DNS, TLS, timeout) this way.
    if text in ("", "Connection error", "Unexpected connection error"):
        return f"cannot reach the server at {url} (nothing answered there)"
    return text


#: OpenSSL verify codes meaning "no trusted CA vouches for this certificate".
_UNTRUSTED_CODES: Final = frozenset({2, 18, 19, 20, 21})
_HOSTNAME_CODES: Final = frozenset({62, 64})  # hostname / IP address mismatch
_EXPIRED_CODE: Final = 10


def _cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a connection error, if that was it.

    engine.io turns a TLS failure into a bare "Connection error"; the cause survives in
    the exception chain (aiohttp's ``ClientConnectorCertificateError``).
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # aiohttp's wrapper also subclasses the ssl error but lacks its verify_code.
        if isinstance(current, ssl.SSLCertVerificationError) and hasattr(current, "verify_code"):
            return current
        todo.extend([current.__cause__, current.__context__])
        inner = getattr(current, "certificate_error", None)
        if isinstance(inner, BaseException):
            todo.append(inner)
    return None


def _tls_words(
    code: int | None, detail: str, host: str, ca_file: str | None, names: list[str]
) -> str:
    """A certificate refusal in plain words (pure; ``names``: the certificate's names)."""
    if code in _HOSTNAME_CODES:
        if names:
            return (
                f"the certificate is for {', '.join(names)}, not {host} (hostname mismatch): "
                "connect with a name the certificate lists"
            )
        return f"the server's certificate is not valid for {host} (hostname mismatch)"
    if code in _UNTRUSTED_CODES:
        if ca_file:
            return (
                f"the server's certificate is not trusted (self-signed or unknown CA): "
                f"the CA in ca_file {ca_file} did not sign it"
            )
        return (
            "the server's certificate is not trusted (self-signed or unknown CA): "
            "set ca_file to the CA that signed it "
            "(`fedtray-client config set ca_file /path/ca.pem`)"
        )
    if code == _EXPIRED_CODE:
        return "the server's certificate has expired (or this computer's clock is wrong)"
    return f"the server's certificate was refused: {detail or 'verification failed'}"


async def _certificate_names(url: str, ca_file: str | None) -> list[str]:
    """The DNS/IP names of the server's certificate, read without the hostname check.

    The chain is still verified, so this only reads what a trusted certificate claims;
    any failure gives ``[]`` (the caller then words the error without the names).
    """
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return []
    port = parts.port or 443
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.check_hostname = False
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), 5.0
        )
    except (OSError, ssl.SSLError, TimeoutError):
        return []
    try:
        cert = writer.get_extra_info("peercert") or {}
        return [str(value) for _, value in cert.get("subjectAltName", ())]
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _error_of(ack: object) -> ErrorAck | None:
    if isinstance(ack, dict) and ack.get("ok") is False:
        try:
            return ErrorAck.model_validate(ack)
        except ValueError:
            return ErrorAck(code="internal_error", message=f"unreadable refusal {ack!r:.200}")
    return None


# ---------------------------------------------------------------------------------------
# the session (lives on the session loop)


@dataclasses.dataclass
class _Round:
    start: TrainingStart
    job: TrainJob


class _Session:
    """All session state and logic; every method runs on the session loop."""

    def __init__(
        self,
        client: DistributedClient,
        settings: Settings,
        *,
        no_reconnect: bool,
        worker_factory: WorkerFactory,
        device_info: DeviceInfo | None,
        data_dir: Path | None,
        backoff: Backoff,
        save: Callable[[Settings], None],
        battery_source: BatterySource,
        power_poll_interval: float,
        settings_file: Path | None,
        settings_poll_interval: float,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
    ) -> None:
        self.client = client
        self.checkpoint_interval = checkpoint_interval
        # Stems of finished rounds whose output is still being kept (moved to pending):
        # no cleanup may touch their files meanwhile.
        self.keeping: set[str] = set()
        self.settings = settings
        self.no_reconnect = no_reconnect
        self.worker_factory = worker_factory
        self.device_info = device_info
        base = data_dir
        self.global_store = GlobalStore(base / "global" if base else None)
        self.pending = PendingStore(base / "pending" if base else None)
        self.work_dir = base / "work" if base else default_work_dir()
        self.backoff = backoff
        self.save = save
        self.power = PowerMonitor(battery_source, power_poll_interval)
        # Heartbeats report the power monitor's last reading: reading the battery again
        # on the loop could block it.
        self.monitor = ResourceMonitor(battery_source=self.power.cached_reading)
        self.settings_file = settings_file
        self.settings_poll_interval = settings_poll_interval
        self.watch_tasks: list[asyncio.Task[None]] = []
        self.blobs = BlobStore(
            max_chunk_bytes=CLIENT_MAX_CHUNK_BYTES, max_blob_bytes=DEFAULT_MAX_BLOB_BYTES
        )
        self.worker: Worker | None = None
        self.simulation = False
        self.held: GlobalWeights | None = None
        self.round: _Round | None = None
        # Order = priority: the user's own pause is what the user sees first.
        self.sources: dict[str, PauseDecision] = {
            "user": user_decision(settings, _utc_now()),
            "power": ALLOW,
        }
        self.deadline_task: asyncio.Task[None] | None = None
        self.applied: PauseDecision = effective_decision(self.sources.values())
        self.want_connected = True
        self.stopping = False
        self.wake = asyncio.Event()
        self.sio: socketio.AsyncClient | None = None
        self.registered: DeviceRegistered | None = None
        self.limits = Limits()
        self.conn_tasks: set[asyncio.Task[Any]] = set()
        self.bg_tasks: set[asyncio.Task[None]] = set()
        self.upload_task: asyncio.Task[None] | None = None
        self.uploading: str | None = None
        self.progress_sent_at = 0.0
        self.progress_pending: TrainingProgress | None = None
        self.progress_flush: asyncio.TimerHandle | None = None
        self.global_lock = asyncio.Lock()

    # -- snapshot ---------------------------------------------------------------------

    def publish(self, **changes: Any) -> None:
        self.client._set_snapshot(dataclasses.replace(self.client._snapshot, **changes))

    def device_state(self) -> Literal["idle", "training", "paused", "uploading"]:
        if self.uploading is not None:
            return "uploading"
        if not self.applied.allowed:
            return "paused"
        return "training" if self.round is not None else "idle"

    def publish_state(self) -> None:
        rid = self.round.start.round_id if self.round else self.uploading
        self.publish(
            device_state=self.device_state(),
            pause_reason=self.applied.reason,
            pause_detail=self.applied.detail,
            round_id=rid,
        )

    # -- main loop --------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.device_info is None:
                # The GPU probe may take seconds the first time: keep it off the loop.
                self.device_info = await asyncio.to_thread(detect_device)
            self.held = await asyncio.to_thread(self.global_store.current)
            self.worker = await asyncio.to_thread(
                self.worker_factory, lambda ev: self._from_worker_thread(loop, ev)
            )
            self.simulation = bool(getattr(self.worker, "simulation", False))
            self.publish(
                weights_version=self.held.version if self.held else None,
                task=self.held.task if self.held else None,
                simulation=self.simulation,
            )
            self.publish_state()
            if self.settings.paused and self.sources["user"] == ALLOW:
                log.info("the timed pause ended while fedtray was not running; resuming training")
                await self.set_user_paused(False)
            self._arm_deadline()
            await self._start_watching()
            await self._connection_loop()
        except Exception as exc:  # a bug: log it and end visibly rather than hang
            log.exception("the session stopped on an unexpected error")
            self.publish(last_error=f"internal error: {exc}")
        finally:
            await self._teardown()

    async def _connection_loop(self) -> None:
        while not self.stopping:
            if not self.want_connected:
                self.publish(connection="disconnected", next_retry_at=None)
                await self._sleep_until_woken(None)
                continue
            outcome = await self._connect_once()
            if self.stopping:
                break
            if not self.want_connected:
                continue
            if self.no_reconnect:
                log.info("not reconnecting (--no-reconnect): %s", self.client._snapshot.last_error)
                break
            delay = MAX_DELAY_S if outcome == "auth_failed" else self.backoff.next_delay()
            self.publish(next_retry_at=time.monotonic() + delay)
            log.info("reconnecting in %.1f s", delay)
            await self._sleep_until_woken(delay)
            self.publish(next_retry_at=None)

    async def _sleep_until_woken(self, delay: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), delay)
        self.wake.clear()

    async def _connect_once(self) -> Literal["auth_failed", "refused", "lost"]:
        # Any wake-up asked for before this attempt is answered by the attempt itself.
        self.wake.clear()
        settings = self.settings
        self.publish(connection="connecting", server_url=settings.server_url)
        http_session: aiohttp.ClientSession | None = None
        if settings.ca_file:
            try:
                ctx = ssl.create_default_context(cafile=settings.ca_file)
            except (OSError, ssl.SSLError) as exc:
                self.publish(
                    connection="disconnected",
                    last_error=f"cannot read the CA file {settings.ca_file}: {exc}",
                )
                return "refused"
            http_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))
        sio = (
            socketio.AsyncClient(reconnection=False, http_session=http_session)
            if http_session
            else socketio.AsyncClient(reconnection=False)
        )
        lost = asyncio.Event()
        refusal: list[str] = []
        self._install_handlers(sio, lost, refusal)
        try:
            try:
                await sio.connect(
                    settings.server_url,
                    auth={"token": settings.auth_token} if settings.auth_token else None,
                    transports=["websocket"],
                    wait_timeout=CONNECT_TIMEOUT_S,
                )
            except (socketio.exceptions.ConnectionError, ValueError, OSError) as exc:
                cert_error = _cert_error(exc)
                if cert_error is not None:
                    return await self._certificate_refused(cert_error)
                message = refusal[0] if refusal else str(exc)
                return self._refused(message)
            outcome = await self._registered_session(sio, lost)
            return outcome
        finally:
            for task in list(self.conn_tasks):
                task.cancel()
            if self.conn_tasks:
                await asyncio.gather(*self.conn_tasks, return_exceptions=True)
            self.conn_tasks.clear()
            self.sio = None
            self.registered = None
            with contextlib.suppress(Exception):
                await sio.disconnect()
            if http_session is not None:
                await http_session.close()
            if self.uploading is not None:
                self.uploading = None
                self.publish_state()

    async def _certificate_refused(self, err: ssl.SSLCertVerificationError) -> Literal["refused"]:
        url, ca_file = self.settings.server_url, self.settings.ca_file
        host = urlsplit(url).hostname or url
        code = err.verify_code
        names = await _certificate_names(url, ca_file) if code in _HOSTNAME_CODES else []
        words = _tls_words(code, err.verify_message or str(err), host, ca_file, names)
        log.warning("connection to %s refused by this client: %s", url, words)
        self.publish(connection="disconnected", last_error=words)
        return "refused"

    def _refused(self, message: str) -> Literal["auth_failed", "refused"]:
        if _is_auth_refusal(message):
            log.warning("the server refused this device's token: %s", message)
            self.publish(connection="auth_failed", last_error=AUTH_FAILED_WORDS)
            return "auth_failed"
        words = _connect_error_words(message, self.settings.server_url)
        log.info("connection to %s failed: %s", self.settings.server_url, words)
        self.publish(connection="disconnected", last_error=words)
        return "refused"

    async def _registered_session(
        self, sio: socketio.AsyncClient, lost: asyncio.Event
    ) -> Literal["auth_failed", "refused", "lost"]:
        try:
            ack = await sio.call(EV_REGISTER, self._register_payload(), timeout=ACK_TIMEOUT_S)
        except (socketio.exceptions.SocketIOError, TimeoutError) as exc:
            self.publish(connection="disconnected", last_error=f"registration failed: {exc}")
            return "lost"
        err = _error_of(ack)
        if err is not None:
            if err.code == "unauthorized":
                return self._refused(f"unauthorized: {err.message}")
            self.publish(
                connection="disconnected",
                last_error=f"the server refused the registration ({err.code}): {err.message}",
            )
            return "refused"
        try:
            registered = parse(DeviceRegistered, ack)
        except FedtrayError as exc:
            self.publish(connection="disconnected", last_error=exc.message)
            return "refused"
        self.sio = sio
        self._on_registered(registered)
        self.backoff.reset()
        self.publish(connection="connected", last_error=None, next_retry_at=None)
        log.info(
            "connected to %s as %s (%s)",
            self.settings.server_url,
            self.settings.device_name,
            self.settings.device_id,
        )
        self._spawn(self._heartbeat_loop())
        self.kick_uploads()
        await lost.wait()
        if not self.stopping and self.want_connected:
            self.publish(
                connection="disconnected", last_error="the connection to the server was lost"
            )
            log.warning("lost the connection to %s", self.settings.server_url)
        else:
            self.publish(connection="disconnected")
        return "lost"

    def _on_registered(self, registered: DeviceRegistered) -> None:
        self.registered = registered
        self.limits = registered.limits

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.conn_tasks.add(task)
        task.add_done_callback(self.conn_tasks.discard)
        return task

    def _register_payload(self) -> dict[str, Any]:
        info = self.device_info
        assert info is not None
        return DeviceRegister(
            device_id=self.settings.device_id,
            name=self.settings.device_name,
            device_type=info.device_type,
            platform=info.platform,
            hardware=info.hardware,
            resources=self.monitor.snapshot(),
            capabilities=Capabilities(
                torch_version=None if self.simulation else info.torch_version,
                simulation=self.simulation,
                tasks=available_tasks(),
                weight_formats=["safetensors", "json"],
                max_chunk_bytes=CLIENT_MAX_CHUNK_BYTES,
            ),
            client_version=info.client_version,
            weights_version=self.held.version if self.held else None,
            state="paused" if not self.applied.allowed else "idle",
            pause_reason=self.applied.reason,
            pause_detail=self.applied.detail or None,
        ).to_wire()

    async def _heartbeat_loop(self) -> None:
        while self.registered is not None:
            await self.send_heartbeat()
            self.blobs.expire(time.monotonic())
            await asyncio.sleep(self.registered.heartbeat_interval_sec)

    async def send_heartbeat(self) -> None:
        sio = self.sio
        if sio is None:
            return
        beat = Heartbeat(
            state=self.device_state(),
            pause_reason=self.applied.reason,
            pause_detail=self.applied.detail or None,
            round_id=self.round.start.round_id if self.round else self.uploading,
            weights_version=self.held.version if self.held else None,
            resources=self.monitor.snapshot(),
        )
        try:
            ack = await sio.call(EV_HEARTBEAT, beat.to_wire(), timeout=ACK_TIMEOUT_S)
        except (socketio.exceptions.SocketIOError, TimeoutError) as exc:
            log.debug("heartbeat not acknowledged: %s", exc)
            return
        err = _error_of(ack)
        if err is not None:
            log.warning("the server refused a heartbeat (%s): %s", err.code, err.message)

    async def emit(self, event: str, payload: dict[str, Any]) -> None:
        """Send an unacknowledged event if connected; a failure is logged, never raised."""
        sio = self.sio
        if sio is None:
            log.debug("not connected; %s dropped", event)
            return
        try:
            await sio.emit(event, payload)
        except socketio.exceptions.SocketIOError as exc:
            log.debug("could not send %s: %s", event, exc)

    def background(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` as a task that outlives connections (kept referenced until done)."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.bg_tasks.add(task)
        task.add_done_callback(self.bg_tasks.discard)

    def emit_soon(self, event: str, payload: dict[str, Any]) -> None:
        self.background(self.emit(event, payload))

    def report_error(self, round_id: str | None, code: ErrorCode, message: str) -> None:
        log.error("round %s failed (%s): %s", round_id or "-", code, message)
        self.emit_soon(
            EV_TRAINING_ERROR,
            TrainingError(round_id=round_id, code=code, message=message[:1000]).to_wire(),
        )

    # -- handlers ---------------------------------------------------------------------

    def _install_handlers(
        self, sio: socketio.AsyncClient, lost: asyncio.Event, refusal: list[str]
    ) -> None:
        async def on_connect_error(data: object = None) -> None:
            message = data.get("message") if isinstance(data, dict) else data
            refusal.append(str(message) if message is not None else "connection refused")

        async def on_disconnect(*_: object) -> None:
            lost.set()

        sio.on("connect_error", on_connect_error)
        sio.on("disconnect", on_disconnect)
        sio.on(EV_TRAINING_START, self._guard(self.on_training_start))
        sio.on(EV_TRAINING_CANCEL, self._guard(self.on_training_cancel))
        sio.on(EV_WEIGHTS_GLOBAL, self._guard(self.on_weights_global))
        sio.on(EV_BLOB_CHUNK, self._guard(self.on_blob_chunk))
        sio.on(EV_BLOB_STATUS, self._guard(self.on_blob_status))
        sio.on(EV_REGISTERED, self._guard(self.on_registered_event))

    @staticmethod
    def _guard(
        handler: Callable[[object], Awaitable[dict[str, Any] | None]],
    ) -> Callable[..., Awaitable[dict[str, Any] | None]]:
        """Never let an exception reach python-socketio: refusals become ErrorAcks."""

        async def wrapped(*args: object) -> dict[str, Any] | None:
            payload = args[0] if args else None
            try:
                return await handler(payload)
            except FedtrayError as exc:
                log.warning("refused %s: %s", handler.__name__, exc.message)
                return error_ack(exc.code, exc.message)
            except Exception as exc:
                log.exception("bug in %s", handler.__name__)
                return error_ack("internal_error", f"{type(exc).__name__}: {exc}")

        return wrapped

    async def on_registered_event(self, payload: object) -> None:
        self._on_registered(parse(DeviceRegistered, payload))

    async def on_training_start(self, payload: object) -> dict[str, Any]:
        start = parse(TrainingStart, payload)
        # The same round offered again (after a reconnect or a server restart) is
        # accepted, not refused as ``busy``: a refusal would free the slot and the update
        # would then be answered ``not_selected``. Already trained: it is sent (resumed
        # from the server's offset); still training: the training goes on.
        if self.round is not None and self.round.start.round_id == start.round_id:
            log.info("round %s offered again; still training it", start.round_id)
            return TrainingStartAck(accepted=True).to_wire()
        if await asyncio.to_thread(self.pending.get, start.round_id) is not None:
            log.info("round %s offered again; its update is trained, sending it", start.round_id)
            self.kick_uploads()
            return TrainingStartAck(accepted=True).to_wire()
        refusal = self._refusal_for(start)
        if refusal is not None:
            log.info("refused round %s: %s (%s)", start.round_id, refusal.reason, refusal.detail)
            return refusal.to_wire()
        assert self.worker is not None and self.held is not None
        # Named by the work, not the round id: the same work offered again (after a
        # restart, or retried under a new id) resumes from its checkpoint.
        stem = work_stem(
            task=start.task,
            model_params=start.model_params,
            config=start.config,
            partition=start.partition,
            base_version=start.base_version,
            base_sha256=self.held.sha256,
        )
        job = TrainJob(
            round_id=start.round_id,
            task=start.task,
            model_params=dict(start.model_params),
            config=start.config,
            partition=start.partition,
            base_weights_path=self.held.path,
            output_path=self.work_dir / f"{stem}.safetensors",
            checkpoint_path=self.work_dir / f"{stem}.ckpt",
            checkpoint_interval=self.checkpoint_interval,
        )
        try:
            await asyncio.to_thread(self.work_dir.mkdir, parents=True, exist_ok=True)
            # Checkpoints of other work can never be resumed: only this one's is kept.
            await asyncio.to_thread(
                remove_stale, self.work_dir, keep={stem}, busy=set(self.keeping)
            )
            self.worker.submit(job)
        except OSError as exc:
            return TrainingStartAck(
                accepted=False, reason="busy", detail=f"cannot prepare the work folder: {exc}"
            ).to_wire()
        except FedtrayError as exc:
            return TrainingStartAck(accepted=False, reason="busy", detail=exc.message).to_wire()
        self.round = _Round(start=start, job=job)
        self.progress_sent_at = 0.0
        self.progress_pending = None
        self.publish(progress=Progress(epochs=start.config.epochs))
        self.publish_state()
        log.info(
            "round %s: training %s for %d epoch(s) from global v%d",
            start.round_id,
            start.task,
            start.config.epochs,
            start.base_version,
        )
        return TrainingStartAck(accepted=True).to_wire()

    def _refusal_for(self, start: TrainingStart) -> TrainingStartAck | None:
        if not self.applied.allowed:
            return TrainingStartAck(
                accepted=False, reason=self.applied.reason, detail=self.applied.detail
            )
        if self.round is not None or self.worker is None or self.worker.is_busy:
            current = self.round.start.round_id if self.round else "another round"
            return TrainingStartAck(accepted=False, reason="busy", detail=f"training {current}")
        if start.task not in available_tasks():
            return TrainingStartAck(
                accepted=False,
                reason="unknown_task",
                detail=f"task {start.task} is not installed here",
            )
        held = self.held
        if held is None or held.version != start.base_version or held.task != start.task:
            have = f"v{held.version} of {held.task}" if held else "no global weights"
            return TrainingStartAck(
                accepted=False,
                reason="missing_base",
                detail=f"needs v{start.base_version} of {start.task}, holds {have}",
            )
        if start.deadline <= time.time():
            return TrainingStartAck(
                accepted=False, reason="deadline_passed", detail="the round's deadline has passed"
            )
        return None

    async def on_training_cancel(self, payload: object) -> None:
        cancel = parse(TrainingCancel, payload)
        if self.round is not None and self.round.start.round_id == cancel.round_id:
            log.info("round %s cancelled by the server: %s", cancel.round_id, cancel.reason)
            if self.worker is not None:
                self.worker.cancel()
        else:
            log.info("ignoring cancel of round %s (not training it)", cancel.round_id)

    async def on_blob_chunk(self, payload: object) -> dict[str, Any]:
        chunk = parse(BlobChunk, payload)
        return self.blobs.accept_chunk(SERVER_PEER, chunk, time.monotonic()).to_wire()

    async def on_blob_status(self, payload: object) -> dict[str, Any]:
        status = parse(BlobStatus, payload)
        return self.blobs.status(SERVER_PEER, status.blob_id, time.monotonic()).to_wire()

    async def on_weights_global(self, payload: object) -> dict[str, Any]:
        message = parse(WeightsGlobal, payload)
        data = self.blobs.take(SERVER_PEER, message.weights)
        fmt = message.weights.format
        async with self.global_lock:
            held = await asyncio.to_thread(self._store_global, message, data, fmt)
        older = self.held is not None and self.held.version < held.version
        self.held = held
        if older:
            # Rounds start only from the held version: work on older bases is dead.
            busy = set(self.keeping)
            if self.round is not None:
                busy.add(self.round.job.checkpoint_path.stem)
            await asyncio.to_thread(
                remove_stale, self.work_dir, busy=busy, below_version=held.version
            )
        self.publish(weights_version=held.version, task=held.task)
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in message.metrics.items())
        log.info(
            "received global weights v%d of %s%s",
            held.version,
            held.task,
            f" ({metrics})" if metrics else "",
        )
        return OkAck().to_wire()

    def _store_global(
        self, message: WeightsGlobal, data: bytes | bytearray, fmt: str
    ) -> GlobalWeights:
        """Decode (full validation, never unpickling) and store; runs in a worker thread.

        ``data`` was verified against ``message.weights.sha256`` by the transfer.
        """
        state = decode(data, "json" if fmt == "json" else "safetensors")
        digest: str | None = message.weights.sha256
        if fmt != "safetensors":
            data = encode(state, "safetensors")  # the trainer reads safetensors only
            digest = None
        try:
            return self.global_store.save(
                version=message.version, task=message.task, data=data, sha256=digest
            )
        except OSError as exc:
            raise FedtrayError(
                "internal_error", f"cannot store global weights v{message.version}: {exc}"
            ) from exc

    # -- worker events ----------------------------------------------------------------

    def _from_worker_thread(self, loop: asyncio.AbstractEventLoop, event: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the session ended
            loop.call_soon_threadsafe(self.on_worker_event, event)

    def on_worker_event(self, event: object) -> None:
        from client import worker as w

        rnd = self.round
        if isinstance(event, w.Progress):
            self._on_progress(event)
        elif isinstance(event, w.Paused | w.Resumed):
            self.publish_state()
        elif isinstance(event, w.Done):
            self.flush_progress()
            self.round = None
            if rnd is None:
                log.warning("the worker finished an unknown round; ignoring its result")
            else:
                self.keeping.add(rnd.job.checkpoint_path.stem)
                self.background(self._keep_result(rnd, event.result))
            self.publish_state()
        elif isinstance(event, w.Failed):
            self.round = None
            self.report_error(rnd.start.round_id if rnd else None, event.code, event.message)
            self.publish_state()
        elif isinstance(event, w.Cancelled):
            self.round = None
            log.info("round %s cancelled", rnd.start.round_id if rnd else "-")
            self.publish_state()
        else:
            log.debug("ignoring worker event %r", event)

    def _on_progress(self, event: Any) -> None:
        rnd = self.round
        if rnd is None:
            return
        try:
            message = TrainingProgress.model_validate(
                {**event.progress, "round_id": rnd.start.round_id, "state": "training"}
            )
        except ValueError as exc:
            log.debug("unreportable progress %r: %s", event, exc)
            return
        self.publish(
            progress=Progress(
                fraction=message.fraction,
                epoch=message.epoch,
                epochs=message.epochs,
                loss=message.loss,
                samples_per_sec=message.samples_per_sec,
            )
        )
        self._throttle_progress(message)

    def _throttle_progress(self, message: TrainingProgress) -> None:
        now = time.monotonic()
        wait = self.progress_sent_at + PROGRESS_INTERVAL_S - now
        if wait <= 0:
            self._send_progress(message)
            return
        # Too soon: keep the latest and send it when the interval is up (so the last
        # update of a burst is never lost).
        self.progress_pending = message
        if self.progress_flush is None:
            loop = asyncio.get_running_loop()
            self.progress_flush = loop.call_later(wait, self.flush_progress)

    def flush_progress(self) -> None:
        if self.progress_flush is not None:
            self.progress_flush.cancel()
            self.progress_flush = None
        pending, self.progress_pending = self.progress_pending, None
        if pending is not None:
            self._send_progress(pending)

    def _send_progress(self, message: TrainingProgress) -> None:
        self.progress_sent_at = time.monotonic()
        self.emit_soon(EV_TRAINING_PROGRESS, message.to_wire())

    async def _keep_result(self, rnd: _Round, result: TrainResult) -> None:
        try:
            await self._keep_result_files(rnd, result)
        finally:
            self.keeping.discard(rnd.job.checkpoint_path.stem)

    async def _keep_result_files(self, rnd: _Round, result: TrainResult) -> None:
        start = rnd.start
        try:
            await asyncio.to_thread(self._convert_if_needed, result.output_path, start)
            await asyncio.to_thread(
                self.pending.add,
                result.output_path,
                round_id=start.round_id,
                task=start.task,
                base_version=start.base_version,
                num_samples=result.num_samples,
                metrics=result.metrics,
                fmt=start.weight_format,
                created=time.time(),
            )
        except (OSError, FedtrayError) as exc:
            self.report_error(
                start.round_id, "internal_error", f"cannot keep the trained update on disk: {exc}"
            )
            return
        log.info(
            "round %s: trained on %d samples (%s); sending the update",
            start.round_id,
            result.num_samples,
            ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()),
        )
        self.kick_uploads()

    @staticmethod
    def _convert_if_needed(path: Path, start: TrainingStart) -> None:
        if start.weight_format == "safetensors":
            return
        from client.atomicfile import write_atomic

        state = decode(path.read_bytes(), "safetensors")
        write_atomic(path, encode(state, start.weight_format))

    # -- uploads ----------------------------------------------------------------------

    def kick_uploads(self) -> None:
        """Start sending pending updates unless that is already under way."""
        if self.sio is None or (self.upload_task is not None and not self.upload_task.done()):
            return
        self.upload_task = self._spawn(self._upload_all())

    async def _upload_all(self) -> None:
        failures = 0
        while self.sio is not None:
            entries = await asyncio.to_thread(self.pending.entries)
            if not entries:
                return
            update = entries[0]
            self.uploading = update.round_id
            self.publish_state()
            try:
                done = await self._upload(update)
            finally:
                self.uploading = None
                self.publish_state()
            if done:
                failures = 0
                continue
            failures += 1
            if failures >= UPLOAD_RETRIES:
                log.warning("giving up sending for now; will retry after the next reconnect")
                return
            await asyncio.sleep(min(30.0, 2.0**failures))

    async def _upload(self, update: PendingUpdate) -> bool:
        """Send one update; True when it is resolved (and deleted), False to retry later."""
        sio = self.sio
        if sio is None:
            return False
        try:
            data = await asyncio.to_thread(self.pending.read, update)
        except (FedtrayError, OSError) as exc:
            log.error("discarding the update of round %s: %s", update.round_id, exc)
            await asyncio.to_thread(self.pending.remove, update)
            return True

        async def call(event: str, payload: dict[str, Any]) -> Any:
            return await sio.call(event, payload, timeout=ACK_TIMEOUT_S)

        ref = weights_ref_for(
            data, update.format, inline_limit=self.limits.max_chunk_bytes, sha256=update.sha256
        )
        try:
            if ref.blob_id is not None:
                first = True

                def on_progress(received: int, total: int) -> None:
                    nonlocal first
                    if first and received > 0:
                        log.info(
                            "resuming the upload of round %s at byte %d of %d",
                            update.round_id,
                            received,
                            total,
                        )
                    first = False
                    self.publish(upload_fraction=received / total if total else 1.0)

                await send_blob(
                    call,
                    data,
                    blob_id=ref.blob_id,
                    chunk_bytes=self.limits.max_chunk_bytes,
                    window=self.limits.max_inflight_chunks,
                    sha256=update.sha256,
                    on_progress=on_progress,
                )
            submit = WeightsSubmit(
                round_id=update.round_id,
                base_version=update.base_version,
                num_samples=update.num_samples,
                metrics=update.metrics,
                weights=ref,
            )
            ack = await sio.call(EV_WEIGHTS_SUBMIT, submit.to_wire(), timeout=SUBMIT_TIMEOUT_S)
        except FedtrayError as exc:
            return await self._submit_refused(update, exc.code, exc.message)
        except (socketio.exceptions.SocketIOError, TimeoutError) as exc:
            log.info("sending the update of round %s was interrupted: %s", update.round_id, exc)
            return False
        finally:
            self.publish(upload_fraction=None)
        err = _error_of(ack)
        if err is not None:
            return await self._submit_refused(update, err.code, err.message)
        try:
            accepted = parse(SubmitAccepted, ack)
        except FedtrayError as exc:
            log.warning("unexpected answer to weights:submit: %s", exc.message)
            return False
        await asyncio.to_thread(self.pending.remove, update)
        self.publish(rounds_completed=self.client._snapshot.rounds_completed + 1)
        log.info(
            "round %s: update accepted (%d received so far)", update.round_id, accepted.received
        )
        return True

    async def _submit_refused(self, update: PendingUpdate, code: str, message: str) -> bool:
        if code not in FINAL_SUBMIT_CODES:
            log.warning(
                "the server could not take round %s yet (%s): %s", update.round_id, code, message
            )
            return False
        await asyncio.to_thread(self.pending.remove, update)
        if code == "duplicate":
            log.info("round %s: the server already counted this update", update.round_id)
            self.publish(rounds_completed=self.client._snapshot.rounds_completed + 1)
        elif code == "round_closed":
            log.warning("round %s closed before the update arrived; discarded it", update.round_id)
        else:
            log.warning(
                "the server refused the update of round %s (%s): %s; discarded it",
                update.round_id,
                code,
                message,
            )
        return True

    # -- watching the battery and the settings file ---------------------------------

    async def _start_watching(self) -> None:
        """Read the battery once before connecting (no round is accepted on a low battery),
        then keep polling it and the settings file in loop tasks."""
        await self.power.poll_once(self._power_settings, self._on_power)
        self.watch_tasks.append(
            asyncio.ensure_future(self.power.run(self._power_settings, self._on_power))
        )
        if self.settings_file is not None:
            watch = await asyncio.to_thread(SettingsFileWatch, self.settings_file)
            self.watch_tasks.append(asyncio.ensure_future(self._watch_settings(watch)))

    def _power_settings(self) -> PowerSettings:
        return power_settings(self.settings)

    def _on_power(self, decision: PauseDecision) -> None:
        self.set_source("power", decision)

    async def _watch_settings(self, watch: SettingsFileWatch) -> None:
        while True:
            await asyncio.sleep(self.settings_poll_interval)
            try:
                from_file = await asyncio.to_thread(watch.poll)
            except Exception:  # a bug here must not stop the session; keep watching
                log.exception("watching the settings file failed")
                continue
            if from_file is None:
                continue
            merged = merge_live(self.settings, from_file)
            if merged != self.settings:
                changed = sorted(
                    k
                    for k in Settings.model_fields
                    if getattr(merged, k) != getattr(self.settings, k)
                )
                log.info("the settings file changed (%s); applying it", ", ".join(changed))
                await self.update_settings(merged)

    # -- pausing ----------------------------------------------------------------------

    def set_source(self, name: str, decision: PauseDecision) -> None:
        self.sources[name] = decision
        self._apply_decision()

    async def set_user_paused(self, paused: bool, until: datetime | None = None) -> None:
        """The user's pause (``until``: when it ends by itself; ignored when resuming)."""
        until = until.astimezone(UTC) if paused and until is not None else None
        changed = (self.settings.paused, self.settings.paused_until) != (paused, until)
        if changed:
            self.settings = self.settings.model_copy(
                update={"paused": paused, "paused_until": until}
            )
            self.client._settings = self.settings
        self.set_source("user", user_decision(self.settings, _utc_now()))
        self._arm_deadline()
        if not changed and self.settings_file is None:
            return  # nothing new, and no file that another process may have changed
        try:
            await asyncio.to_thread(self._save_pause, paused, until)
        except OSError as exc:
            log.warning("could not save the pause setting: %s", exc)

    def _arm_deadline(self) -> None:
        """(Re)start the task that ends a timed pause, or stop it when there is none."""
        task, self.deadline_task = self.deadline_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        until = self.settings.paused_until
        if self.settings.paused and until is not None and not self.stopping:
            self.deadline_task = asyncio.ensure_future(self._end_pause_at(until))

    async def _end_pause_at(self, until: datetime) -> None:
        # Short sleeps against the wall clock rather than one long monotonic sleep: the
        # deadline is a wall-clock time, and a laptop may sleep through it.
        while (left := (until - _utc_now()).total_seconds()) > 0:
            await asyncio.sleep(min(left, DEADLINE_CHECK_S))
        if self.deadline_task is not asyncio.current_task():
            return  # replaced meanwhile
        self.deadline_task = None
        log.info("the pause until %s is over; resuming training", f"{until.astimezone():%H:%M}")
        await self.set_user_paused(False)

    def _save_pause(self, paused: bool, until: datetime | None) -> None:
        """Save the pause on top of the file as it is now (runs in a worker thread).

        Another process may have changed other keys since the last poll of the file
        (`fedtray-client config set ...`); writing back the session's older copy would undo
        that, so the file's current settings are the base.
        """
        base = self.settings
        if self.settings_file is not None:
            with contextlib.suppress(OSError, ValueError):
                from_file = parse_settings_bytes(self.settings_file.read_bytes())
                if (from_file.paused, from_file.paused_until) == (paused, until):
                    return  # the file says so already (`fedtray-client pause` wrote it)
                base = from_file
        self.save(base.model_copy(update={"paused": paused, "paused_until": until}))

    def _apply_decision(self) -> None:
        """THE place where a pause decision takes effect (worker, progress, heartbeat)."""
        decision = effective_decision(self.sources.values())
        if decision == self.applied:
            return
        was_allowed = self.applied.allowed
        self.applied = decision
        rnd = self.round
        if not decision.allowed:
            log.info("paused: %s", decision.detail or decision.reason)
            if rnd is not None and self.worker is not None and was_allowed:
                self.worker.pause()
            if rnd is not None:
                snap = self.client._snapshot.progress
                self.flush_progress()
                with contextlib.suppress(ValueError):
                    self._send_progress(
                        TrainingProgress(
                            round_id=rnd.start.round_id,
                            epoch=snap.epoch,
                            epochs=max(1, snap.epochs or rnd.start.config.epochs),
                            step=0,
                            steps=1,
                            fraction=snap.fraction,
                            loss=snap.loss,
                            state="paused",
                            pause_reason=decision.reason,
                            pause_detail=decision.detail or None,
                        )
                    )
        elif not was_allowed:
            log.info("resumed")
            if rnd is not None and self.worker is not None:
                self.worker.resume()
        self.publish_state()
        self.background(self.send_heartbeat())

    # -- connection control -----------------------------------------------------------

    async def set_connected(self, wanted: bool) -> None:
        self.want_connected = wanted
        if not wanted and self.sio is not None:
            await self.sio.disconnect()
        self.wake.set()

    async def update_settings(self, settings: Settings) -> None:
        old, self.settings = self.settings, settings
        self.client._settings = settings
        self.publish(device_name=settings.device_name, server_url=settings.server_url)
        user = user_decision(settings, _utc_now())
        if user != self.sources["user"]:
            self.set_source("user", user)
        if (old.paused, old.paused_until) != (settings.paused, settings.paused_until):
            self._arm_deadline()  # a deadline already passed ends the pause at once
        # A new threshold applies to the last reading at once, not at the next poll.
        power = self.power.evaluate(power_settings(settings))
        if power is not None:
            self.set_source("power", power)
        changed = (old.server_url, old.auth_token, old.ca_file, old.device_name) != (
            settings.server_url,
            settings.auth_token,
            settings.ca_file,
            settings.device_name,
        )
        if changed:
            self.backoff.reset()
            if self.sio is not None:
                await self.sio.disconnect()  # reconnects with the new settings at once
            self.wake.set()

    async def shutdown(self) -> None:
        # The round is NOT cancelled: the worker's shutdown pauses it first, so its
        # checkpoint is written and the same round, offered again after a restart,
        # resumes from it (see _teardown).
        self.stopping = True
        if self.round is not None:
            log.info("stopping: round %s is checkpointed, not cancelled", self.round.start.round_id)
        if self.sio is not None:
            with contextlib.suppress(Exception):
                await self.sio.disconnect()
        self.wake.set()

    async def _teardown(self) -> None:
        tasks = [*self.watch_tasks, *([self.deadline_task] if self.deadline_task else [])]
        self.deadline_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.flush_progress()
        if self.worker is not None:
            worker, self.worker = self.worker, None
            await asyncio.to_thread(worker.shutdown)
        self.publish(connection="stopped", next_retry_at=None, upload_fraction=None)


# ---------------------------------------------------------------------------------------
# the facade


class DistributedClient:
    """The thread-safe facade over one session (see the module docstring).

    ``worker_factory`` builds the training worker (default: :class:`client.worker.
    TrainingWorker`); ``device_info`` skips device detection (tests); ``data_dir``
    replaces the user data dir (global weights, pending updates, work files);
    ``save`` persists settings changes (default :func:`client.config.save_settings`).
    ``battery_source`` is read every ``power_poll_interval`` seconds (in a worker thread)
    for the power policy. ``settings_file`` is polled every ``settings_poll_interval``
    seconds and its live settings applied (``fedtray-client pause`` in another terminal);
    by default it is :func:`client.config.config_path` when ``save`` is the default, and
    nothing is watched when a custom ``save`` is given without a ``settings_file``.
    ``checkpoint_interval``: seconds of training between the worker's periodic
    checkpoints (0: only when paused or stopped).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        no_reconnect: bool = False,
        worker_factory: WorkerFactory | None = None,
        device_info: DeviceInfo | None = None,
        data_dir: Path | None = None,
        backoff: Backoff | None = None,
        save: Callable[[Settings], None] = save_settings,
        battery_source: BatterySource = read_battery,
        power_poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        settings_file: Path | None = None,
        settings_poll_interval: float = SETTINGS_POLL_INTERVAL_S,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
    ) -> None:
        if settings_file is None and save is save_settings:
            settings_file = config_path()  # the file this session saves to is the one watched
        user = user_decision(settings, _utc_now())  # a deadline already passed: unpaused
        self._snapshot = ClientSnapshot(
            server_url=settings.server_url,
            device_id=settings.device_id,
            device_name=settings.device_name,
            device_state="idle" if user.allowed else "paused",
            pause_reason=user.reason,
            pause_detail=user.detail,
        )
        self._settings = settings
        # The loop and the session exist from the start, so subscribe(), pause() and
        # friends may be called before start(): their work waits in the loop's queue.
        self._loop = asyncio.new_event_loop()
        self._session = _Session(
            self,
            settings,
            no_reconnect=no_reconnect,
            worker_factory=worker_factory or _default_worker_factory,
            device_info=device_info,
            data_dir=data_dir,
            backoff=backoff or Backoff(),
            save=save,
            battery_source=battery_source,
            power_poll_interval=power_poll_interval,
            settings_file=settings_file,
            settings_poll_interval=settings_poll_interval,
            checkpoint_interval=checkpoint_interval,
        )
        self._thread: threading.Thread | None = None
        self._subscribers: list[Subscriber] = []  # touched only on the session thread

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the session thread and connect. Raises RuntimeError when already started."""
        if self._thread is not None:
            raise RuntimeError("the session was already started")
        self._thread = threading.Thread(
            target=self._thread_main, name="fedtray-session", daemon=True
        )
        self._thread.start()

    def _thread_main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._session.run())
            # Let callbacks already scheduled (e.g. a final emit) finish quietly.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def stop(self, timeout: float = 15.0) -> bool:
        """Pause and checkpoint training, disconnect and end the session; True when it
        ended in time (the round is not cancelled: offered again, it resumes).

        Safe to call more than once and after the session ended by itself.
        """
        thread = self._thread
        if thread is None:
            return True
        with contextlib.suppress(RuntimeError):  # already ended (e.g. --no-reconnect)
            self._submit(lambda s: s.shutdown())
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def running(self) -> bool:
        """True while the session thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- commands ---------------------------------------------------------------------

    def connect(self) -> None:
        """(Re)connect now, skipping any backoff or auth-failure wait."""
        self._submit(lambda s: s.set_connected(True))

    def disconnect(self) -> None:
        """Disconnect and stay disconnected until :meth:`connect`."""
        self._submit(lambda s: s.set_connected(False))

    def pause(self, until: datetime | None = None) -> None:
        """Pause training (the user's choice, saved in the settings; survives a restart).

        With ``until`` (a timezone-aware time) the pause ends by itself then, even across
        a restart; without it, any earlier deadline is dropped. Raises ValueError for a
        naive ``until``.
        """
        if until is not None and until.utcoffset() is None:
            raise ValueError("pause(until=...) needs a timezone-aware datetime")
        self._submit(lambda s: s.set_user_paused(True, until))

    def resume(self) -> None:
        """Undo :meth:`pause` (other pause sources, such as power, still apply)."""
        self._submit(lambda s: s.set_user_paused(False))

    def set_pause_source(self, name: str, decision: PauseDecision) -> None:
        """Set the decision of a pause source other than the user (e.g. ``"power"``).

        Sources are combined in the order first set; ``"user"`` always comes first.
        """
        if name == "user":
            raise ValueError("use pause()/resume() for the user's decision")
        self._call_soon(lambda s: s.set_source(name, decision))

    def update_settings(self, settings: Settings) -> None:
        """Apply changed settings; a new URL, token, CA file or name reconnects at once."""
        self._settings = settings
        self._submit(lambda s: s.update_settings(settings))

    # -- observing --------------------------------------------------------------------

    def snapshot(self) -> ClientSnapshot:
        """The current state (immutable; safe to keep and read from any thread)."""
        return self._snapshot

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(snapshot)`` now and on every change, on the session thread.

        Callbacks must return quickly and must not block on the facade. Returns a
        function that unsubscribes (safe to call from any thread, more than once).
        """

        def add(_: _Session) -> None:
            self._subscribers.append(callback)
            self._notify(callback, self._snapshot)

        def remove(_: _Session) -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        self._call_soon(add)

        def unsubscribe() -> None:
            with contextlib.suppress(RuntimeError):
                self._call_soon(remove)

        return unsubscribe

    def wait_for(
        self, predicate: Callable[[ClientSnapshot], bool], timeout: float
    ) -> ClientSnapshot:
        """Block until ``predicate(snapshot)`` holds; raise TimeoutError with the last state.

        Never call it from a subscriber (it would wait on its own thread).
        """
        snap = self._snapshot
        if predicate(snap):
            return snap
        found: list[ClientSnapshot] = []
        event = threading.Event()

        def check(s: ClientSnapshot) -> None:
            if not event.is_set() and predicate(s):
                found.append(s)
                event.set()

        unsubscribe: Callable[[], None] | None = None
        try:
            with contextlib.suppress(RuntimeError):  # the session already ended
                unsubscribe = self.subscribe(check)
            if not event.wait(timeout):
                snap = self._snapshot
                if predicate(snap):
                    return snap
                raise TimeoutError(f"condition not met within {timeout} s; last state: {snap}")
            return found[0]
        finally:
            if unsubscribe is not None:
                unsubscribe()

    # -- internals --------------------------------------------------------------------

    def _set_snapshot(self, snap: ClientSnapshot) -> None:
        """Session thread only: swap in a new snapshot and tell the subscribers."""
        if snap == self._snapshot:
            return
        self._snapshot = snap
        for callback in list(self._subscribers):
            self._notify(callback, snap)

    @staticmethod
    def _notify(callback: Subscriber, snap: ClientSnapshot) -> None:
        try:
            callback(snap)
        except Exception:
            log.exception("a snapshot subscriber failed")

    def _call_soon(self, fn: Callable[[_Session], None]) -> None:
        """Run ``fn(session)`` on the session loop; RuntimeError once the session ended."""
        self._loop.call_soon_threadsafe(fn, self._session)

    def _submit(self, fn: Callable[[_Session], Awaitable[T]]) -> Future[T]:
        """Run ``await fn(session)`` on the session loop; RuntimeError once it ended."""
        session = self._session
        if self._loop.is_closed():
            raise RuntimeError("the session has ended")

        async def run() -> T:
            return await fn(session)

        return asyncio.run_coroutine_threadsafe(run(), self._loop)
