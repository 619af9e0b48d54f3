"""The server link: one Socket.IO connection at a time, registered, kept alive, reconnected.

Contract (a loop-only object; every method runs on the session loop):

* :meth:`ServerLink.run` connects with ``auth={"token": ...}`` when a token is set; on
  every (re)connect it sends ``device:register`` (same ``deviceId`` each time) and then
  heartbeats at the server's ``heartbeatIntervalSec``. It reconnects until
  :meth:`shutdown`, with capped, fully jittered exponential backoff
  (:mod:`client.backoff`); the snapshot says when the next try is. A refusal whose
  message starts with ``unauthorized`` gives ``auth_failed`` and waits the maximum
  backoff (or until :meth:`set_connected` / new connection settings). With
  ``no_reconnect=True`` a refused or lost connection ends :meth:`run` (the session then
  stops with ``last_error``).
* ``https://``/``wss://`` servers are verified (system CAs or ``ca_file``), never
  unverified; a certificate refusal is put in plain words in ``last_error``
  (:mod:`client.session.tls`) and retried with the usual backoff.
* The link installs the transport handlers itself (``connect_error``, ``disconnect``)
  and the session's event handlers from the ONE ``handlers()`` table it is given, each
  wrapped by :func:`guard`: no exception ever reaches python-socketio; a refusal
  becomes an ``ErrorAck``.
* Tasks of one connection (heartbeats, uploads: :meth:`spawn`) are cancelled when it
  ends, after :attr:`connected` turned False (so a task that loops while connected
  ends even if its cancellation is lost). :meth:`emit` / :meth:`emit_soon` send
  unacknowledged events when connected and log (never raise) a failure; :meth:`caller`
  gives the acked call of the current connection (``None`` when not connected).
* Collaborators are callables: ``register_payload`` and ``heartbeat`` describe the
  device, ``on_heartbeat`` runs with every beat, ``heartbeat_acked`` with each beat the
  server acknowledged (a heartbeat may carry a registration update that is repeated
  until then), ``on_connected`` after each registration, ``on_disconnected`` after each
  connection's tasks ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import aiohttp
import socketio

from client.backoff import CONNECT_TIMEOUT_S, MAX_DELAY_S, Backoff
from client.errors import FedtrayError
from client.protocol import (
    EV_HEARTBEAT,
    EV_REGISTER,
    DeviceRegistered,
    ErrorAck,
    Heartbeat,
    Limits,
    parse,
)
from client.protocol.guard import Answer
from client.session.hub import SnapshotHub
from client.session.live_settings import LiveSettings
from client.session.sioclient import device_client
from client.session.tasks import TaskSet
from client.session.tls import (
    AUTH_FAILED_WORDS,
    HOSTNAME_CODES,
    cert_error,
    certificate_names,
    connect_error_words,
    is_auth_refusal,
    tls_words,
)

__all__ = ["ACK_TIMEOUT_S", "Call", "Guarded", "ServerLink", "error_of"]

log = logging.getLogger(__name__)

ACK_TIMEOUT_S: Final = 30.0

Outcome = Literal["auth_failed", "refused", "lost"]
#: A server event's handler behind the shared guard (:func:`client.protocol.guard.guard`).
Guarded = Callable[..., Awaitable[Answer]]
#: An acked call on the current connection: ``await call(event, payload, timeout)``.
Call = Callable[[str, dict[str, Any], float], Awaitable[Any]]


def error_of(ack: object) -> ErrorAck | None:
    """The refusal in an ack, if it is one (an unreadable refusal is still a refusal)."""
    if isinstance(ack, dict) and ack.get("ok") is False:
        try:
            return ErrorAck.model_validate(ack)
        except ValueError:
            return ErrorAck(code="internal_error", message=f"unreadable refusal {ack!r:.200}")
    return None


class ServerLink:
    """The connection to the server (see the module docstring)."""

    def __init__(
        self,
        hub: SnapshotHub,
        settings: LiveSettings,
        *,
        backoff: Backoff,
        no_reconnect: bool,
        handlers: Callable[[], Mapping[str, Guarded]],
        register_payload: Callable[[], dict[str, Any]],
        heartbeat: Callable[[], Heartbeat],
        on_heartbeat: Callable[[], None],
        heartbeat_acked: Callable[[Heartbeat], None] = lambda _beat: None,
        on_connected: Callable[[], None],
        on_disconnected: Callable[[], None],
    ) -> None:
        self._hub = hub
        self._settings = settings
        self._backoff = backoff
        self._no_reconnect = no_reconnect
        self._handlers = handlers
        self._register_payload = register_payload
        self._heartbeat = heartbeat
        self._on_heartbeat = on_heartbeat
        self._heartbeat_acked = heartbeat_acked
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._want_connected = True
        self._stopping = False
        self._wake = asyncio.Event()
        self._sio: socketio.AsyncClient | None = None
        self._registered: DeviceRegistered | None = None
        self._limits = Limits()
        self._conn_tasks = TaskSet()  # cancelled when a connection ends
        self._background = TaskSet()  # outlive connections

    @property
    def limits(self) -> Limits:
        """The server's transfer limits (from the last registration)."""
        return self._limits

    @property
    def connected(self) -> bool:
        """True while registered with the server."""
        return self._sio is not None

    # -- the reconnect loop -----------------------------------------------------------

    async def run(self) -> None:
        """Connect and reconnect until :meth:`shutdown` (or a failure with no_reconnect)."""
        while not self._stopping:
            if not self._want_connected:
                self._hub.publish(connection="disconnected", next_retry_at=None)
                await self._sleep_until_woken(None)
                continue
            outcome = await self._connect_once()
            if self._stopping:
                break
            if not self._want_connected:
                continue
            if self._no_reconnect:
                log.info("not reconnecting (--no-reconnect): %s", self._hub.current.last_error)
                break
            delay = MAX_DELAY_S if outcome == "auth_failed" else self._backoff.next_delay()
            self._hub.publish(next_retry_at=time.monotonic() + delay)
            log.info("reconnecting in %.1f s", delay)
            await self._sleep_until_woken(delay)
            self._hub.publish(next_retry_at=None)

    async def _sleep_until_woken(self, delay: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()

    async def set_connected(self, wanted: bool) -> None:
        """Connect now (skipping any wait), or disconnect and stay so until asked again."""
        self._want_connected = wanted
        if not wanted and self._sio is not None:
            await self._sio.disconnect()
        self._wake.set()

    async def reconnect_now(self) -> None:
        """New connection settings: drop the connection and try again at once."""
        self._backoff.reset()
        if self._sio is not None:
            await self._sio.disconnect()  # reconnects with the new settings at once
        self._wake.set()

    async def shutdown(self) -> None:
        """End :meth:`run`: disconnect and stop reconnecting."""
        self._stopping = True
        if self._sio is not None:
            with contextlib.suppress(Exception):
                await self._sio.disconnect()
        self._wake.set()

    # -- one connection ---------------------------------------------------------------

    async def _connect_once(self) -> Outcome:
        # Any wake-up asked for before this attempt is answered by the attempt itself.
        self._wake.clear()
        settings = self._settings.value
        self._hub.publish(connection="connecting")
        http_session: aiohttp.ClientSession | None = None
        if settings.ca_file:
            try:
                ctx = ssl.create_default_context(cafile=settings.ca_file)
            except (OSError, ssl.SSLError) as exc:
                self._hub.publish(
                    connection="disconnected",
                    last_error=f"cannot read the CA file {settings.ca_file}: {exc}",
                )
                return "refused"
            http_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))
        sio = device_client(http_session)  # the device's message limit, a safe decoder
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
                failure = cert_error(exc)
                if failure is not None:
                    return await self._certificate_refused(failure)
                return self._refused(refusal[0] if refusal else str(exc))
            return await self._registered_session(sio, lost)
        finally:
            # Not connected before the tasks are cancelled: a task whose cancel is lost
            # (the heartbeat loop) ends by its own loop condition instead of running on.
            self._sio = None
            self._registered = None
            await self._conn_tasks.cancel_all()
            with contextlib.suppress(Exception):
                await sio.disconnect()
            if http_session is not None:
                await http_session.close()
            self._on_disconnected()

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
        for event, handler in self._handlers().items():
            sio.on(event, handler)

    async def _certificate_refused(self, err: ssl.SSLCertVerificationError) -> Outcome:
        url, ca_file = self._settings.value.server_url, self._settings.value.ca_file
        host = urlsplit(url).hostname or url
        code = err.verify_code
        names = await certificate_names(url, ca_file) if code in HOSTNAME_CODES else []
        words = tls_words(code, err.verify_message or str(err), host, ca_file, names)
        log.warning("connection to %s refused by this client: %s", url, words)
        self._hub.publish(connection="disconnected", last_error=words)
        return "refused"

    def _refused(self, message: str) -> Outcome:
        if is_auth_refusal(message):
            log.warning("the server refused this device's token: %s", message)
            self._hub.publish(connection="auth_failed", last_error=AUTH_FAILED_WORDS)
            return "auth_failed"
        url = self._settings.value.server_url
        words = connect_error_words(message, url)
        log.info("connection to %s failed: %s", url, words)
        self._hub.publish(connection="disconnected", last_error=words)
        return "refused"

    async def _registered_session(self, sio: socketio.AsyncClient, lost: asyncio.Event) -> Outcome:
        try:
            ack = await sio.call(EV_REGISTER, self._register_payload(), timeout=ACK_TIMEOUT_S)
        except (socketio.exceptions.SocketIOError, TimeoutError) as exc:
            self._hub.publish(connection="disconnected", last_error=f"registration failed: {exc}")
            return "lost"
        err = error_of(ack)
        if err is not None:
            if err.code == "unauthorized":
                return self._refused(f"unauthorized: {err.message}")
            self._hub.publish(
                connection="disconnected",
                last_error=f"the server refused the registration ({err.code}): {err.message}",
            )
            return "refused"
        try:
            registered = parse(DeviceRegistered, ack)
        except FedtrayError as exc:
            self._hub.publish(connection="disconnected", last_error=exc.message)
            return "refused"
        self._sio = sio
        self._set_registered(registered)
        self._backoff.reset()
        self._hub.publish(connection="connected", last_error=None, next_retry_at=None)
        settings = self._settings.value
        log.info(
            "connected to %s as %s (%s)",
            settings.server_url,
            settings.device_name,
            settings.device_id,
        )
        self.spawn(self._heartbeat_loop())
        self._on_connected()
        await lost.wait()
        if not self._stopping and self._want_connected:
            self._hub.publish(
                connection="disconnected", last_error="the connection to the server was lost"
            )
            log.warning("lost the connection to %s", self._settings.value.server_url)
        else:
            self._hub.publish(connection="disconnected")
        return "lost"

    def _set_registered(self, registered: DeviceRegistered) -> None:
        self._registered = registered
        self._limits = registered.limits

    async def on_registered_event(self, registered: DeviceRegistered) -> None:
        """``device:registered`` sent again by the server (new limits or interval)."""
        self._set_registered(registered)

    # -- while connected --------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task of the current connection (cancelled when it ends)."""
        return self._conn_tasks.spawn(coro)

    def caller(self) -> Call | None:
        """The acked call of the current connection, or ``None`` when not connected."""
        sio = self._sio
        if sio is None:
            return None

        async def call(event: str, payload: dict[str, Any], timeout: float) -> Any:
            return await sio.call(event, payload, timeout=timeout)

        return call

    async def _heartbeat_loop(self) -> None:
        while self._registered is not None:
            await self.send_heartbeat()
            self._on_heartbeat()
            await asyncio.sleep(self._registered.heartbeat_interval_sec)

    async def send_heartbeat(self) -> None:
        """One heartbeat now (nothing when not connected; a refusal is only logged)."""
        sio = self._sio
        if sio is None:
            return
        beat = self._heartbeat()
        try:
            ack = await sio.call(EV_HEARTBEAT, beat.to_wire(), timeout=ACK_TIMEOUT_S)
        except (socketio.exceptions.SocketIOError, TimeoutError) as exc:
            log.debug("heartbeat not acknowledged: %s", exc)
            return
        err = error_of(ack)
        if err is not None:
            log.warning("the server refused a heartbeat (%s): %s", err.code, err.message)
            return
        self._heartbeat_acked(beat)

    async def emit(self, event: str, payload: dict[str, Any]) -> None:
        """Send an unacknowledged event if connected; a failure is logged, never raised."""
        sio = self._sio
        if sio is None:
            log.debug("not connected; %s dropped", event)
            return
        try:
            await sio.emit(event, payload)
        except socketio.exceptions.SocketIOError as exc:
            log.debug("could not send %s: %s", event, exc)

    def emit_soon(self, event: str, payload: dict[str, Any]) -> None:
        """:meth:`emit` in a task that outlives the connection (call from sync code)."""
        self._background.spawn(self.emit(event, payload))

    def heartbeat_soon(self) -> None:
        """:meth:`send_heartbeat` in a background task (call from sync code)."""
        self._background.spawn(self.send_heartbeat())
