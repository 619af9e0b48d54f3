"""Helpers of the multi-process server tests: ``fedtray-server --workers N`` on real Redis and
PostgreSQL (tests/engines.py) with real ``python -m client`` devices.

Contract: what the tests assert is read from the shared engines themselves -- rows of the
cluster's PostgreSQL tables (:func:`update_rows`, :func:`round_rows`), presence in Redis
(:func:`placement`) and the lock's holder in ``pg_stat_activity`` (:func:`lock_holder_pid`)
-- never from one process's memory. :func:`cluster` runs the supervisor and prints its
output (all workers' logs) and the devices' logs when the test fails. Devices run with a
short reconnect ceiling (:data:`RECONNECT_CAP_S`) so a device whose worker died is back
within a few seconds. Every process started here is stopped when its context ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from client.backoff import RECONNECT_CAP_ENV
from server.cluster.engines import connect_presence
from server.cluster.lock import LOCK_APPLICATION
from tests.server_harness import REPO_ROOT, ProcessHandle, server_process, subprocess_env
from tests.waiting import poll, scaled

_STARTED = re.compile(r"worker (\S+) started \(pid (\d+)\)")
#: The tiny synthetic task of these tests.
TINY = ("features=8", "classes=3", "hidden=8", "samples=300")
#: Seconds a device waits at most between reconnect attempts (FEDTRAY_RECONNECT_CAP_S).
RECONNECT_CAP_S = 1.0
#: The server's heartbeat interval in these tests (server_args' default; stale after 3).
HEARTBEAT_S = 0.5


def cluster_flags(
    tmp_path: Path,
    redis: str,
    database: str,
    *extra: str,
    workers: int = 2,
    devices: int = 3,
    shared_dir: bool = True,
) -> list[str]:
    """``fedtray-server`` flags: ``workers`` workers, rounds of all ``devices`` devices,
    blobs in a shared directory (else PostgreSQL large objects)."""
    params = [arg for p in TINY for arg in ("--task-param", p)]
    blobs = ["--shared-dir", str(tmp_path / "shared")] if shared_dir else []
    return [
        "--workers",
        str(workers),
        "--redis",
        redis,
        "--database",
        database,
        *blobs,
        "--min-clients",
        str(devices),
        "--clients-per-round",
        str(devices),
        "--min-completion",
        "1.0",
        "--round-timeout",
        "60",
        *params,
        *extra,
    ]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ------------------------------------------------------------------ the engines' view


async def _placement(redis: str) -> dict[str, str]:
    presence = await connect_presence(redis, "test-observer")
    try:
        return dict(await presence.eligible_devices())
    finally:
        await presence.close()  # type: ignore[attr-defined]


def placement(redis: str) -> dict[str, str]:
    """``device_id -> worker_id`` of the eligible devices on live workers (Redis)."""
    found: dict[str, str] = run(_placement(redis))
    return found


async def _fetch(database: str, query: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database)
    try:
        return [dict(row) for row in await conn.fetch(query, *args)]
    finally:
        await conn.close()


def fetch(database: str, query: str, *args: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = run(_fetch(database, query, *args))
    return rows


def round_rows(database: str) -> list[dict[str, Any]]:
    """Every round row, oldest first."""
    return fetch(database, "SELECT * FROM fedtray_rounds ORDER BY opened_at")


def update_rows(database: str) -> list[dict[str, Any]]:
    """Every update row (round_id, device_id, worker_id, num_samples), in arrival order."""
    return fetch(
        database,
        "SELECT round_id, device_id, worker_id, num_samples FROM fedtray_updates"
        " ORDER BY received_at",
    )


def latest_version(database: str) -> dict[str, Any] | None:
    rows = fetch(database, "SELECT * FROM fedtray_versions ORDER BY version DESC LIMIT 1")
    return rows[0] if rows else None


def lock_session(database: str) -> tuple[int, int] | None:
    """``(backend pid, client port)`` of the session holding the coordinator lock (None
    when nobody holds it)."""
    rows = fetch(
        database,
        "SELECT a.pid, a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1"
        " AND a.datname = current_database()",
        LOCK_APPLICATION,
    )
    return (int(rows[0]["pid"]), int(rows[0]["client_port"])) if rows else None


def lock_holder_pid(database: str) -> int | None:
    """The OS pid of the process holding the coordinator lock (its connection's client port
    matched to a local socket; None when nobody holds it)."""
    session = lock_session(database)
    return None if session is None else pid_of_local_port(session[1])


def pid_of_local_port(port: int) -> int | None:
    """The pid whose TCP socket has local port ``port`` (via /proc/net/tcp and fds)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in list(fh)[1:]:
                cols = line.split()
                # A closed socket lingering on the same port (TIME_WAIT) has no inode.
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] != "0":
                    inode = cols[9]
                    break
        if inode is not None:
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return int(pid)
    return None


# ------------------------------------------------------------------ processes


@dataclass
class Cluster:
    """A running supervisor and the devices started against it."""

    srv: ProcessHandle
    tmp_path: Path
    redis: str
    database: str
    devices: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def device(self, name: str) -> subprocess.Popen[bytes]:
        """Start a real ``python -m client`` device (own config dirs, log file)."""
        env = subprocess_env(self.tmp_path / name)
        env[RECONNECT_CAP_ENV] = str(scaled(RECONNECT_CAP_S))
        log = (self.tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "client", "--server", self.srv.url, "--name", name],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.devices[name] = proc
        return proc

    def stop_device(self, name: str) -> None:
        proc = self.devices.pop(name)
        _stop(proc)

    def placed(
        self, count: int, what: str, timeout: float = 60, exclude: frozenset[str] = frozenset()
    ) -> dict[str, str]:
        """Wait until ``count`` eligible devices are in Redis, none on a worker in
        ``exclude``; their placement."""
        found: dict[str, str] = poll(
            lambda: placement(self.redis),
            lambda p: len(p) == count and not set(p.values()) & exclude,
            timeout,
            what,
        )
        return found

    def spread(self, count: int) -> dict[str, str]:
        """Start ``count`` devices (d0, d1, ...) so that both workers hold at least one:
        the second is restarted (a new connection) until the kernel put it on the other
        worker; the rest land where they land. Their placement."""
        self.device("d0")
        self.placed(1, "d0 registered")
        where: dict[str, str] = {}
        for attempt in range(16):
            self.device("d1")
            where = self.placed(2, "d1 registered")
            if len(set(where.values())) == 2:
                break
            self.stop_device("d1")
            self.placed(1, f"d1 gone (attempt {attempt})")
        else:
            raise AssertionError(f"16 connections all landed on one worker: {where}")
        for i in range(2, count):
            self.device(f"d{i}")
        return self.placed(count, f"{count} devices registered")

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The devices' client processes stopped (SIGSTOP) for the block: none of them can
        report, so a round open now is still open when the block runs; continued after
        (keep the block short: a stopped device does not heartbeat)."""
        procs = [p for p in self.devices.values() if p.poll() is None]
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)

    def worker_pids(self) -> dict[str, int]:
        """``worker_id -> pid`` of the workers the supervisor started (latest start)."""
        return {m[1]: int(m[2]) for m in _STARTED.finditer(self.srv.output())}

    def logs(self) -> str:
        parts = [f"==== server\n{self.srv.output()}"]
        for log in sorted(self.tmp_path.glob("*.log")):
            text = log.read_text(errors="replace")
            parts.append(f"==== {log.name}\n{text[-6000:]}")
        return "\n".join(parts)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(scaled(20))
    if proc.poll() is None:
        proc.kill()
        proc.wait(scaled(20))


@contextlib.contextmanager
def cluster(tmp_path: Path, redis: str, database: str, *flags: str) -> Iterator[Cluster]:
    """The supervisor with ``flags`` (see :func:`cluster_flags`); on failure its output and
    the devices' logs are printed (pytest shows them with the failure)."""
    with server_process(tmp_path, *flags, start_timeout=120) as srv:
        running = Cluster(srv, tmp_path, redis, database)
        try:
            yield running
        except BaseException:
            print(running.logs())
            raise
        finally:
            for name in list(running.devices):
                running.stop_device(name)
