"""The device's Socket.IO client: python-socketio's ``AsyncClient`` with explicit limits.

Contract: :func:`device_client` builds the one client a :class:`client.session.link.ServerLink`
connection uses (no automatic reconnection: the link reconnects itself). It promises:

* Engine.IO messages up to :data:`client.transfer.DEVICE_MAX_MESSAGE_BYTES` (16 MiB) are
  read (aiohttp's websocket ``max_msg_size``, 4 MiB by default, is raised to it through
  engineio's ``websocket_extra_options``), so any event a conforming server sends, and an
  oversized one up to that size, reaches the handlers and is answered (an oversized
  ``blob:chunk`` with ``chunk_too_large``). A message over the limit is cut by the
  transport, which closes the connection; the link then reconnects with its backoff.
* A message the Socket.IO packet decoder refuses (a ``ValueError``: an unknown packet
  type, broken JSON, an unexpected binary attachment -- seen while a server stops) is
  counted in :attr:`DeviceSocketClient.malformed_packets`, logged as one warning line
  and dropped; the connection stays and no exception reaches asyncio's "never retrieved"
  log. A half-assembled binary packet is discarded with it.

It performs no I/O of its own beyond python-socketio's.
"""

from __future__ import annotations

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
        "websocket_extra_options": {"max_msg_size": DEVICE_MAX_MESSAGE_BYTES},
    }
    if http_session is not None:
        options["http_session"] = http_session
    return DeviceSocketClient(**options)
