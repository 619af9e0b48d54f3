"""Each worker's device list in Redis, for the status document any worker answers.

Contract: :class:`StatusBoard` holds, per worker, a snapshot of the devices in its local
registry (``P status:devices:<worker_id>``: a JSON list of
:class:`server.status.DeviceStatus`, camelCase, TTL ``ttl`` so a dead worker's list
vanishes), and one flag saying someone reads the status (``P status:wanted``, TTL
:data:`WANTED_S`): workers publish their snapshots only while it is set
(:class:`server.cluster.status_view.ClusterStatusView`), so nobody watching costs one GET
per worker per period and no serialisation of the fleet. ``P`` is the presence prefix
(:data:`server.cluster.presence.DEFAULT_PREFIX`).

Promises: :meth:`StatusBoard.want` sets the flag and says whether it was unset before (a
reader then waits briefly for snapshots to appear); :meth:`StatusBoard.snapshots` reads
the given workers' lists in one MGET; a list that does not parse is reported in the log and
left out (its devices are missing from that document, nothing else). Every call is one
round trip.

Raises: ClusterError (one line, ``Redis ...``) for every engine failure. Never: holds
anything that must not be lost, or any token.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from pydantic import TypeAdapter, ValidationError
from redis.exceptions import RedisError

from server.cluster.contracts import ClusterError
from server.cluster.presence import DEFAULT_PREFIX, TIMEOUT_S, redis_errors
from server.status import DeviceStatus

__all__ = ["WANTED_S", "StatusBoard", "connect_board"]

log = logging.getLogger(__name__)

#: Seconds the "someone reads the status" flag lasts after the last read.
WANTED_S = 30

_DEVICES = TypeAdapter(list[DeviceStatus])


def encode_devices(devices: Sequence[DeviceStatus]) -> bytes:
    """A snapshot's JSON (camelCase, as the status API writes devices)."""
    return _DEVICES.dump_json(list(devices), by_alias=True)


def decode_devices(data: str | bytes) -> list[DeviceStatus]:
    """A snapshot's devices; ValidationError for bytes that are not one."""
    return _DEVICES.validate_json(data)


class StatusBoard:
    """The workers' device snapshots in Redis (see the module docstring)."""

    def __init__(
        self, client: aioredis.Redis, worker_id: str, *, ttl: float, prefix: str = DEFAULT_PREFIX
    ) -> None:
        self._redis = client
        self.worker_id = worker_id
        self._ttl = max(1, round(ttl))
        self._p = prefix

    def _key(self, worker_id: str) -> str:
        return f"{self._p}status:devices:{worker_id}"

    @property
    def _wanted(self) -> str:
        return f"{self._p}status:wanted"

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()

    async def want(self) -> bool:
        """Someone reads the status now; True when nobody did within :data:`WANTED_S`."""
        with redis_errors("status flag"):
            before = await self._redis.set(self._wanted, "1", ex=WANTED_S, get=True)
        return before is None

    async def wanted(self) -> bool:
        """Whether someone read the status within :data:`WANTED_S`."""
        with redis_errors("status flag"):
            return bool(await self._redis.exists(self._wanted))

    async def publish(self, devices: Sequence[DeviceStatus]) -> None:
        """This worker's devices (replacing its previous snapshot)."""
        data = encode_devices(devices)
        with redis_errors("status snapshot"):
            await self._redis.set(self._key(self.worker_id), data, ex=self._ttl)

    async def snapshots(self, worker_ids: Sequence[str]) -> dict[str, list[DeviceStatus]]:
        """The snapshots of ``worker_ids`` that exist (and parse)."""
        if not worker_ids:
            return {}
        with redis_errors("status snapshots"):
            found: list[Any] = await self._redis.mget([self._key(w) for w in worker_ids])
        lists: dict[str, list[DeviceStatus]] = {}
        for worker_id, data in zip(worker_ids, found, strict=True):
            if data is None:
                continue
            try:
                lists[worker_id] = decode_devices(data)
            except ValidationError as exc:
                log.error(
                    "the device snapshot of worker %s is unreadable (%d errors); left out",
                    worker_id,
                    exc.error_count(),
                )
        return lists


async def connect_board(
    url: str, worker_id: str, *, ttl: float, prefix: str = DEFAULT_PREFIX
) -> StatusBoard:
    """The board on the Redis at ``url`` (checked with PING); ClusterError when it is
    unreachable."""
    client = aioredis.Redis.from_url(
        url, decode_responses=True, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
    )
    try:
        with redis_errors("unreachable"):
            await client.ping()
    except ClusterError:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()
        raise
    return StatusBoard(client, worker_id, ttl=ttl, prefix=prefix)
