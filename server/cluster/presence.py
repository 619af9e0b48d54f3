"""Device presence in Redis with expiring keys (redis.asyncio).

:class:`RedisPresence` implements :class:`server.cluster.contracts.Presence` for one worker;
:func:`connect` opens it (or raises :class:`~server.cluster.contracts.ClusterError` naming
the server when Redis is unreachable).

Keys (``P`` is the prefix, ``fedtray:`` unless given):

* ``P dev:<device_id>`` -- hash ``worker``, ``eligible`` (``1``/``0``), ``version`` (``''``
  for none), TTL ``device_ttl`` (the server's ``stale_after``): refreshed by every
  :meth:`~RedisPresence.device_seen`, so a device nobody reports vanishes by itself.
* ``P elig:<worker_id>`` -- SET of the worker's eligible device ids, TTL ``worker_ttl``
  (refreshed with the liveness key).
* ``P worker:<worker_id>`` -- the worker's liveness key (its start time), TTL
  ``worker_ttl``; :meth:`~RedisPresence.worker_alive` refreshes it (call it every
  ``worker_ttl / 3`` seconds or so) and says whether it was still there (False: first
  call, Redis restarted empty, or the key expired -- the worker writes its devices again).
* ``P workers`` -- SET of worker ids that announced themselves; ids whose liveness key
  expired are removed from it by :meth:`~RedisPresence.live_workers`.

Promises:

* Every call is O(1) in the fleet size except :meth:`~RedisPresence.live_workers`,
  :meth:`~RedisPresence.eligible_count` (O(workers)) and
  :meth:`~RedisPresence.eligible_devices` (O(eligible devices); once per round).
  ``device_seen``/``device_gone`` are one atomic Lua script each (one round trip);
  :meth:`~RedisPresence.devices_changed` runs those scripts for many devices in one
  pipeline (one round trip, each device's script still atomic).
* A device is counted on one worker at most: ``device_seen`` on worker B takes it out of
  the eligible set of the worker that had it before; a late ``device_gone`` from that
  worker removes nothing of B's.
* A dead worker (liveness key expired) counts for nothing: its set is ignored by
  :meth:`~RedisPresence.eligible_count`, :meth:`~RedisPresence.eligible_devices` and
  :meth:`~RedisPresence.worker_of`, and all its keys expire within ``worker_ttl``;
  :meth:`~RedisPresence.forget_worker` removes them at once.
* :meth:`~RedisPresence.eligible_devices` returns only devices whose own key still names
  that worker as eligible (a device whose key expired -- stale -- is not offered work, and
  is dropped from the set then); :meth:`~RedisPresence.eligible_count` counts set members
  and so may include such a stale device until its worker reports it (an upper bound for
  the coordinator's wait; the selection uses the exact list).
* Redis restarted (no persistence): the keys are gone; each worker's next
  ``worker_alive`` (False: the worker writes all its devices again) puts them back, so
  presence recovers within one ``worker_alive`` period. redis-py reconnects by itself;
  a call made while Redis is down raises ClusterError.

Raises: ClusterError (one line, ``Redis ...``) for every engine failure. Never: keeps
round state, updates or anything that must not be lost (that is PostgreSQL's).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.cluster.contracts import ClusterError, DeviceSeen, Presence

__all__ = ["DEFAULT_PREFIX", "RedisPresence", "connect", "redis_errors"]

DEFAULT_PREFIX = "fedtray:"
#: Seconds a Redis call may take before Redis counts as unreachable.
TIMEOUT_S = 5.0

# KEYS: dev key, own eligible set. ARGV: worker id, eligible (1/0), version, device ttl,
# prefix of eligible sets, device id, worker ttl.
_SEEN = """
local old = redis.call('HGET', KEYS[1], 'worker')
if old and old ~= ARGV[1] then
  redis.call('SREM', ARGV[5] .. old, ARGV[6])
end
redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'eligible', ARGV[2], 'version', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[2], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[7])
else
  redis.call('SREM', KEYS[2], ARGV[6])
end
return 1
"""

# KEYS: dev key, own eligible set. ARGV: worker id, device id.
_GONE = """
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
"""


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    r"""Redis failures inside the block as one-line :class:`ClusterError`\ s naming ``what``."""
    try:
        yield
    except RedisError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClusterError(f"Redis {what}: {reason}") from exc
    except OSError as exc:
        raise ClusterError(f"Redis {what}: {exc}") from exc


def _text(value: str | bytes) -> str:
    """A reply as text (the client decodes responses; bytes only in the type stubs)."""
    return value.decode() if isinstance(value, bytes) else value


def _ttl(seconds: float) -> int:
    return max(1, round(seconds))


class RedisPresence:
    """One worker's view of device presence (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        worker_id: str,
        *,
        device_ttl: float,
        worker_ttl: float,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self._redis = client
        self.worker_id = worker_id
        self._device_ttl = _ttl(device_ttl)
        self._worker_ttl = _ttl(worker_ttl)
        self._p = prefix
        self._seen = client.register_script(_SEEN)
        self._gone = client.register_script(_GONE)
        self._started = f"{time.time():.3f}"

    def _dev(self, device_id: str) -> str:
        return f"{self._p}dev:{device_id}"

    def _elig(self, worker_id: str) -> str:
        return f"{self._p}elig:{worker_id}"

    def _alive(self, worker_id: str) -> str:
        return f"{self._p}worker:{worker_id}"

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()

    async def device_seen(self, seen: DeviceSeen) -> None:
        with redis_errors(f"presence of {seen.device_id}"):
            await self._seen(
                keys=[self._dev(seen.device_id), self._elig(self.worker_id)],
                args=self._seen_args(seen),
            )

    def _seen_args(self, seen: DeviceSeen) -> list[str | int]:
        return [
            self.worker_id,
            "1" if seen.eligible else "0",
            "" if seen.version is None else str(seen.version),
            self._device_ttl,
            f"{self._p}elig:",
            seen.device_id,
            self._worker_ttl,
        ]

    async def device_gone(self, device_id: str) -> None:
        with redis_errors(f"presence of {device_id}"):
            await self._gone(
                keys=[self._dev(device_id), self._elig(self.worker_id)],
                args=[self.worker_id, device_id],
            )

    async def devices_changed(self, seen: Sequence[DeviceSeen], gone: Sequence[str]) -> None:
        if not seen and not gone:
            return
        with redis_errors(f"presence of {len(seen) + len(gone)} devices"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for one in seen:
                    await self._seen(
                        keys=[self._dev(one.device_id), self._elig(self.worker_id)],
                        args=self._seen_args(one),
                        client=pipe,
                    )
                for device_id in gone:
                    await self._gone(
                        keys=[self._dev(device_id), self._elig(self.worker_id)],
                        args=[self.worker_id, device_id],
                        client=pipe,
                    )
                await pipe.execute()

    async def worker_alive(self) -> bool:
        with redis_errors("worker liveness"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._alive(self.worker_id), self._started, ex=self._worker_ttl, get=True)
                pipe.sadd(f"{self._p}workers", self.worker_id)
                pipe.expire(self._elig(self.worker_id), self._worker_ttl)
                replies: list[Any] = await pipe.execute()
        return replies[0] is not None

    async def live_workers(self) -> set[str]:
        with redis_errors("live workers"):
            known = sorted(_text(m) for m in await self._redis.smembers(f"{self._p}workers"))
            if not known:
                return set()
            alive = await self._redis.mget([self._alive(w) for w in known])
            dead = [w for w, a in zip(known, alive, strict=True) if a is None]
            if dead:
                await self._redis.srem(f"{self._p}workers", *dead)
        return {w for w, a in zip(known, alive, strict=True) if a is not None}

    async def eligible_count(self) -> int:
        workers = sorted(await self.live_workers())
        if not workers:
            return 0
        with redis_errors("eligible count"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for w in workers:
                    pipe.scard(self._elig(w))
                counts: list[Any] = await pipe.execute()
        return sum(int(c) for c in counts)

    async def eligible_devices(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for worker in sorted(await self.live_workers()):
            with redis_errors("eligible devices"):
                members = sorted(_text(m) for m in await self._redis.smembers(self._elig(worker)))
                if not members:
                    continue
                async with self._redis.pipeline(transaction=False) as pipe:
                    for device in members:
                        pipe.hmget(self._dev(device), ["worker", "eligible"])
                    states: list[Any] = await pipe.execute()
                stale = []
                for device, (holder, eligible) in zip(members, states, strict=True):
                    if holder == worker and eligible == "1":
                        found.append((device, worker))
                    elif holder != worker:
                        stale.append(device)
                if stale:
                    await self._redis.srem(self._elig(worker), *stale)
        return sorted(found)

    async def worker_of(self, device_id: str) -> str | None:
        with redis_errors(f"presence of {device_id}"):
            holder = await self._redis.hget(self._dev(device_id), "worker")
            if holder is None:
                return None
            alive = await self._redis.exists(self._alive(str(holder)))
        return str(holder) if alive else None

    async def forget_worker(self, worker_id: str) -> None:
        """Remove a dead worker's set and liveness key now (its device keys expire)."""
        with redis_errors(f"forget worker {worker_id}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._elig(worker_id), self._alive(worker_id))
                pipe.srem(f"{self._p}workers", worker_id)
                await pipe.execute()


async def connect(
    url: str,
    worker_id: str,
    *,
    device_ttl: float,
    worker_ttl: float,
    prefix: str = DEFAULT_PREFIX,
) -> RedisPresence:
    """Presence for ``worker_id`` on the Redis at ``url`` (checked with PING); ClusterError
    when it is unreachable. The worker is not announced until :meth:`worker_alive`."""
    client = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=TIMEOUT_S,
        socket_connect_timeout=TIMEOUT_S,
    )
    try:
        with redis_errors(f"at {_where(url)} unreachable"):
            await client.ping()
    except ClusterError:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()
        raise
    return RedisPresence(
        client, worker_id, device_ttl=device_ttl, worker_ttl=worker_ttl, prefix=prefix
    )


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"


if TYPE_CHECKING:  # mypy proves the implementation satisfies its contract

    def _conforms(impl: RedisPresence) -> Presence:
        return impl
