"""PostgreSQL plumbing shared by the cluster's engine adapters (asyncpg).

Contract:

* :func:`create_pool` / :func:`connect_one` open a pool / one connection, or raise
  :class:`~server.cluster.contracts.ClusterError` naming the server (never the password)
  when it is unreachable or refuses.
* :func:`engine_errors` turns asyncpg's and the socket's errors inside its block into one
  ``ClusterError`` line (``PostgreSQL <what>: <reason>``); a ClusterError raised inside
  passes unchanged.
* :func:`ensure_schema` creates a component's tables idempotently, once per schema
  version, serialised between processes by a transaction-scoped advisory lock (so several
  workers starting at once do not race on ``CREATE TABLE IF NOT EXISTS``), and records the
  version in ``fedtray_schema``; a database that holds a *newer* version raises ClusterError
  (an older program must not write a newer layout).

Never: logs or returns a password; keeps a connection it could not set up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from server.cluster.contracts import ClusterError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "connect_one",
    "create_pool",
    "engine_errors",
    "ensure_schema",
    "notify",
]

#: Seconds a connection attempt may take before the engine counts as unreachable.
CONNECT_TIMEOUT_S = 10.0
#: Advisory lock key (transaction scope) that serialises schema creation.
_SCHEMA_LOCK_KEY = 0x66656474_72617901  # "fedtray" + 1

_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    asyncio.TimeoutError,
)


def where(url: str) -> str:
    """``host:port/db`` of a PostgreSQL URL, without user or password."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    return f"{host}:{port}{parts.path or ''}"


@contextlib.contextmanager
def engine_errors(what: str) -> Iterator[None]:
    try:
        yield
    except ClusterError:
        raise
    except _DB_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClusterError(f"PostgreSQL {what}: {reason}") from exc


async def connect_one(url: str, application_name: str = "fedtray") -> asyncpg.Connection:
    """One connection; ``application_name`` shows in ``pg_stat_activity``."""
    with engine_errors(f"at {where(url)} unreachable"):
        return await asyncpg.connect(
            url,
            timeout=CONNECT_TIMEOUT_S,
            server_settings={"application_name": application_name},
        )


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    with engine_errors(f"at {where(url)} unreachable"):
        pool = await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, timeout=CONNECT_TIMEOUT_S
        )
    assert pool is not None
    return pool


async def ensure_schema(
    conn: asyncpg.Connection, component: str, version: int, statements: Sequence[str]
) -> None:
    """Create ``component``'s tables (``statements``) unless at ``version`` already."""
    with engine_errors(f"schema of {component}"):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS fedtray_schema ("
                " component text PRIMARY KEY, version integer NOT NULL)"
            )
            have: Any = await conn.fetchval(
                "SELECT version FROM fedtray_schema WHERE component = $1", component
            )
            if have is not None and int(have) > version:
                raise ClusterError(
                    f"PostgreSQL schema of {component} is version {have}, newer than this "
                    f"program's {version}: upgrade fedtray"
                )
            if have == version:
                return
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO fedtray_schema (component, version) VALUES ($1, $2) "
                "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                component,
                version,
            )


async def notify(conn: asyncpg.Connection, channel: str, payload: str) -> None:
    """``pg_notify(channel, payload)`` on ``conn`` (delivered when its transaction commits)."""
    await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
