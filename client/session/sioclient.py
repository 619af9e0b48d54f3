"""The device's Socket.IO client: python-socketio's ``AsyncClient`` with explicit limits.

Contract: :func:`device_client` builds the one client a :class:`client.session.link.ServerLink`
connection uses (no automatic reconnection: the link reconnects itself). It promises:

* Engine.IO messages up to :data:`client.transfer.DEVICE_MAX_MESSAGE_BYTES` (16 MiB) are
  read (aiohttp's websocket ``max_msg_size``, 4 MiB by default, is raised to it through
  engineio's ``websocket_extra_options``), so any event a conforming server sends, and an
  oversized one up to that size, reaches the handlers and is answered (an oversized
  ``blob:chunk`` with ``chunk_too_large``). A message over the limit is cut by the
  transport, which closes the connection; the link then reconnects with its backoff.
* The WebSocket never negotiates ``permessage-deflate`` (``compress: 0`` is passed to
  aiohttp's ``ws_connect`` explicitly, so no server can turn it on): the large messages
  are blob chunks of float weights, which deflate cannot shrink, and compressing them
  would cost both peers a pass over every byte.
* A message the Socket.IO packet decoder refuses (a ``ValueError``: an unknown packet
  type, broken JSON, an unexpected binary attachment -- seen while a server stops) is
  counted in :attr:`DeviceSocketClient.malformed_packets`, logged as one warning line
  and dropped; the connection stays and no exception reaches asyncio's "never retrieved"
  log. A half-assembled binary packet is discarded with it.
* :meth:`DeviceSocketClient.call` is python-socketio's acknowledged call (same
  arguments, result and ``socketio.exceptions.TimeoutError``) that never swallows a
  cancellation: a task cancelled while its answer is arriving ends cancelled. The
  library's own ``call`` waits with ``asyncio.wait_for``, which on Python 3.11 returns
  the result instead when the answer landed just before the cancel; a connection task
  (the heartbeat loop) then kept running after the link cancelled it, and stopping the
  device hung.

It performs no I/O of its own beyond python-socketio's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import socketio

from client.transfer import DEVICE_MAX_MESSAGE_BYTES

__all__ = ["DeviceSocketClient", "device_client"]

log = logging.getLogger(__name__)


class DeviceSocketClient(socketio.AsyncClient):  # type: ignore[misc]
    """``socketio.AsyncClient`` whose packet decoding never raises (see the module)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Messages from the server that could not be decoded, since construction.
        self.malformed_packets = 0

    async def call(
        self,
        event: str,
        data: Any = None,
        namespace: str | None = None,
        timeout: float = 60,
    ) -> Any:
        """Emit ``event`` and wait up to ``timeout`` seconds for the server's answer.

        Raises ``socketio.exceptions.TimeoutError`` when none comes in time (also when
        the connection drops meanwhile), and ``asyncio.CancelledError`` whenever the
        calling task is cancelled, even if the answer has already arrived.
        """
        answered = asyncio.Event()
        answers: list[tuple[Any, ...]] = []

        def on_answer(*args: Any) -> None:
            answers.append(args)
            answered.set()

        await self.emit(event, data=data, namespace=namespace, callback=on_answer)
        try:
            # asyncio.timeout tells its own expiry from a cancel; wait_for (3.11) does not.
            async with asyncio.timeout(timeout):
                await answered.wait()
        except TimeoutError:
            raise socketio.exceptions.TimeoutError() from None
        args = answers[0]
        return args if len(args) > 1 else args[0] if args else None

    async def _handle_eio_message(self, data: Any) -> None:
        try:
            await super()._handle_eio_message(data)
        except ValueError as exc:
            self._binary_packet = None  # a partial binary packet cannot be completed now
            self.malformed_packets += 1
            log.warning(
                "dropped a malformed Socket.IO packet from the server (%d so far): %s",
                self.malformed_packets,
                str(exc)[:200],
            )


def device_client(http_session: aiohttp.ClientSession | None = None) -> DeviceSocketClient:
    """A client for one connection: no auto-reconnect, the device's message limit."""
    options: dict[str, Any] = {
        "reconnection": False,
        "websocket_extra_options": {"max_msg_size": DEVICE_MAX_MESSAGE_BYTES, "compress": 0},
    }
    if http_session is not None:
        options["http_session"] = http_session
    return DeviceSocketClient(**options)
