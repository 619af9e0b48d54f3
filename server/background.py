"""The server's background work: one owner for every task it starts outside a handler.

Contract: :meth:`Background.spawn` runs a coroutine as an asyncio task, keeps a reference
until it ends and logs its failure (never re-raises). Work spawned for a device
(``device_id``) is cancelled by :meth:`Background.cancel_device` when that device
disconnects, so a transfer to a vanished peer does not wait out its ack timeout.
:meth:`Background.cancel_all` cancels everything and waits at most ``timeout`` seconds.
Owned by the server's one event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Background:
    """The set of running background tasks, by device where they serve one."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._by_device: dict[str, set[asyncio.Task[Any]]] = {}

    def spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, device_id: str | None = None
    ) -> None:
        """Run ``coro`` in the background; log if it fails."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        if device_id is not None:
            self._by_device.setdefault(device_id, set()).add(task)

        def _done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if device_id is not None:
                work = self._by_device.get(device_id)
                if work is not None:
                    work.discard(t)
                    if not work:
                        del self._by_device[device_id]
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s failed", name, exc_info=t.exception())

        task.add_done_callback(_done)

    def cancel_device(self, device_id: str) -> None:
        """Cancel the work spawned for ``device_id``."""
        for task in list(self._by_device.get(device_id, ())):
            task.cancel()

    async def cancel_all(self, extra: list[asyncio.Task[Any]], timeout: float) -> None:
        """Cancel every background task and ``extra``; wait at most ``timeout`` seconds."""
        pending = [*extra, *self._tasks]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=timeout)
