"""Throwaway Redis and PostgreSQL for a cluster-mode benchmark, and what they cost.

Contract: :func:`cluster_engines` starts ``redis-server`` and PostgreSQL 15 (the servers of
``tests/engines.py``: loopback ports, throwaway data dirs, no persistence, fsync off; run as
root, PostgreSQL runs as the ``postgres`` user) with ``pg_stat_statements`` loaded, creates
one database with the extension, yields :class:`ClusterEngines` and stops both (and removes
their data dirs) when the block ends, however it ends; both also die with this process
(PR_SET_PDEATHSIG) if it is killed. :meth:`ClusterEngines.redis_cpu_s` /
:meth:`ClusterEngines.postgres_cpu_s` are the engines' utime + stime (PostgreSQL: the
postmaster and every backend), :meth:`ClusterEngines.redis_commands` Redis's command count
(INFO stats), :meth:`ClusterEngines.pg_calls` the statements executed in the benchmark's
database (pg_stat_statements, the statistics query itself excluded).
Raises RuntimeError (with the server's log) when an engine does not come up. Never touches
the machine's own Redis or PostgreSQL.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.engines import PostgresServer, RedisServer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
_STATS_QUERY_MARK = "fedtray-benchmark-stats"


def _cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def _tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return []


@dataclass
class ClusterEngines:
    redis: RedisServer
    postgres: PostgresServer
    database: str

    @property
    def redis_url(self) -> str:
        return self.redis.url(0)

    @property
    def database_url(self) -> str:
        return self.postgres.url(self.database)

    def redis_cpu_s(self) -> float:
        assert self.redis.proc is not None
        return _cpu_s([self.redis.proc.pid])

    def postgres_cpu_s(self) -> float:
        """The postmaster and all its children (backends, checkpointer, ...). A backend
        that exits between two readings takes its CPU with it (the workers' sessions stay
        open for the whole benchmark)."""
        assert self.postgres.proc is not None
        return _cpu_s(_tree(self.postgres.proc.pid))

    def redis_commands(self) -> int:
        """Commands Redis has processed since it started (``total_commands_processed``)."""
        return _redis_info_int(self.redis, "total_commands_processed")

    def pg_calls(self) -> int:
        """Statements executed in the benchmark's database so far (this query excluded)."""
        out = self.postgres.sql(
            self.database,
            f"/* {_STATS_QUERY_MARK} */ SELECT coalesce(sum(s.calls), 0) "
            "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            f"WHERE d.datname = current_database() AND s.query NOT LIKE '%{_STATS_QUERY_MARK}%'",
        )
        return int(out.strip() or 0)

    def pg_top(self, limit: int = 12) -> list[tuple[int, str]]:
        """The most called statements in the benchmark's database: (calls, query)."""
        out = self.postgres.sql(
            self.database,
            f"/* {_STATS_QUERY_MARK} */ SELECT s.calls, "
            "regexp_replace(left(s.query, 100), '\\s+', ' ', 'g') "
            "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            f"WHERE d.datname = current_database() AND s.query NOT LIKE '%{_STATS_QUERY_MARK}%' "
            f"ORDER BY s.calls DESC LIMIT {int(limit)}",
        )
        rows = []
        for line in out.splitlines():
            calls, _, query = line.partition("|")
            if calls.strip():
                rows.append((int(calls), query))
        return rows

    def pg_reset(self) -> None:
        self.postgres.sql(
            self.database, f"/* {_STATS_QUERY_MARK} */ SELECT pg_stat_statements_reset()"
        )


def _redis_info_int(redis: RedisServer, field: str) -> int:
    with socket.create_connection(("127.0.0.1", redis.port), timeout=10) as sock:
        sock.sendall(b"INFO stats\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, _, rest = data.partition(b"\r\n")
            if head.startswith(b"$") and len(rest) >= int(head[1:]):
                break
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split(":", 1)[1])
    raise RuntimeError(f"Redis INFO has no {field}")


@contextmanager
def cluster_engines() -> Iterator[ClusterEngines]:
    """Redis and PostgreSQL for one benchmark run (see the module docstring)."""
    redis = RedisServer()
    postgres = PostgresServer(settings=("shared_preload_libraries=pg_stat_statements",))
    try:
        redis.start()
        postgres.start()
        database = postgres.create_database()
        postgres.sql(database, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        yield ClusterEngines(redis, postgres, database)
    finally:
        postgres.close()
        redis.close()
