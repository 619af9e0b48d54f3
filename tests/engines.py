"""Real Redis and PostgreSQL servers for the cluster tests (pytest fixtures).

Stable API (other test modules rely on it):

* ``redis_server`` (session) -- a :class:`RedisServer`: ``/usr/bin/redis-server`` on a free
  loopback port, no persistence, data dir under a throwaway temp folder; ``.url(db)``,
  ``.stop()``, ``.start()`` (same port again: a *restart*), ``.kill()`` (SIGKILL),
  ``.command(*inline)`` (raw inline commands, one reply line each).
* ``redis_url`` (function) -- ``redis://127.0.0.1:PORT/N`` on the session server with a
  database number of its own, flushed before the test (keys are per test; pub/sub channels
  are server-wide in Redis, so a test that needs its own channels, or restarts Redis, uses
  ``private_redis``).
* ``private_redis`` (function) -- a :class:`RedisServer` for this test alone (stopped after).
* ``postgres_server`` (session) -- a :class:`PostgresServer`: PostgreSQL 15 from
  ``/usr/lib/postgresql/15/bin`` (initdb, then postgres) on a free loopback port, trust
  authentication for the ``postgres`` role, a throwaway data dir, fsync off (a crash of the
  test machine loses nothing of value). Run as root, it runs as the ``postgres`` user
  (PostgreSQL refuses root). ``.url(dbname)``, ``.create_database()``,
  ``.drop_database(name)``, ``.sql(dbname, statement)`` (psql; returns stdout),
  ``.terminate_backends(dbname)`` (pg_terminate_backend on every other session: what a
  killed client or a lost network looks like to the server).
* ``postgres_url`` (function) -- ``postgresql://postgres@127.0.0.1:PORT/DB`` of a database
  created for this test and dropped (with its sessions) after it. Advisory locks and
  LISTEN/NOTIFY channels are per database, so tests do not see each other.

Promises: every server started here is stopped when its fixture ends (also when the test
fails), and dies with the pytest process (PR_SET_PDEATHSIG) if pytest itself is killed
(checked by hand: kill -9 of the parent ends both servers; their temp dirs then stay, as
``/tmp/fedtray-pg-*`` and ``/tmp/fedtray-redis-*``); otherwise its data dir is removed.
A server that does not come up raises RuntimeError with its log.
Never: touches the machine's own Redis or PostgreSQL services, ports or data.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.waiting import scaled

REDIS_SERVER = Path("/usr/bin/redis-server")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
#: The unprivileged user PostgreSQL runs as when the tests run as root.
PG_OS_USER = "postgres"
#: Databases a Redis test server offers (one per test in a session).
REDIS_DATABASES = 4096
_START_TRIES = 3
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A loopback port free right now (the server binds it next; a lost race is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent(sig: int) -> Callable[[], None]:
    def set_pdeathsig() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return set_pdeathsig


def _wait_ready(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path, what: str
) -> None:
    deadline = time.monotonic() + scaled(30.0)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{what} did not come up in time: {_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=scaled(20.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _ServerProcess:
    """A server process on a loopback port: the start shared by Redis and PostgreSQL."""

    port: int
    proc: subprocess.Popen[bytes] | None

    def _spawn(self, out: IO[bytes]) -> subprocess.Popen[bytes]:
        """The server's process, its output to ``out``, on ``self.port``."""
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _launch(self, log: Path, what: str) -> None:
        """Start the process on ``self.port`` once it has one (a restart), else on a free
        port (a lost race for it retried); wait until it is ready."""
        keep_port = self.port != 0
        for attempt in range(_START_TRIES):
            if not keep_port:
                self.port = free_port()
            with log.open("ab") as out:
                self.proc = self._spawn(out)
            try:
                _wait_ready(self.proc, self._ready, log, f"{what} on port {self.port}")
                return
            except RuntimeError:
                if keep_port or attempt == _START_TRIES - 1:
                    raise


# ------------------------------------------------------------------ Redis


class RedisServer(_ServerProcess):
    """One redis-server process on 127.0.0.1 (see the module docstring)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fedtray-redis-"))
        self.port = 0
        self.proc = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def command(self, *commands: str) -> list[str]:
        """Send inline commands (no spaces in arguments); one reply line each."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=scaled(5.0)) as sock:
            sock.sendall("".join(f"{c}\r\n" for c in commands).encode())
            data = b""
            while data.count(b"\r\n") < len(commands):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.decode(errors="replace").split("\r\n")[: len(commands)]

    def _ready(self) -> bool:
        try:
            return self.command("PING") == ["+PONG"]
        except OSError:
            return False

    def start(self) -> None:
        """Start (or restart, on the same port once it has one) the server; empty."""
        if not self.running:
            self._launch(self.dir / "redis.log", "redis-server")

    def _spawn(self, out: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                str(REDIS_SERVER),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--databases",
                str(REDIS_DATABASES),
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(signal.SIGTERM),  # noqa: PLW1509 (prctl only)
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM: a clean shutdown; nothing is saved)."""
        _stop(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        _stop(self.proc, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


_redis_dbs = itertools.count(1)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    db = next(_redis_dbs) % REDIS_DATABASES
    redis_server.start()  # a test before this one may have stopped it
    replies = redis_server.command(f"SELECT {db}", "FLUSHDB")
    assert replies == ["+OK", "+OK"], replies
    return redis_server.url(db)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


# ------------------------------------------------------------------ PostgreSQL


class PostgresServer(_ServerProcess):
    """One PostgreSQL 15 cluster on 127.0.0.1 (see the module docstring)."""

    def __init__(self, settings: tuple[str, ...] = ()) -> None:
        #: Extra ``name=value`` server settings (``-c``), e.g. for a benchmark's statistics.
        self.settings = settings
        self.root = Path(tempfile.mkdtemp(prefix="fedtray-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self.proc = None
        self._names = itertools.count(1)
        self._as_user = os.geteuid() == 0
        if self._as_user:
            entry = pwd.getpwnam(PG_OS_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run_as(self) -> dict[str, object]:
        return (
            {"user": PG_OS_USER, "group": PG_OS_USER, "extra_groups": []} if self._as_user else {}
        )

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def initdb(self) -> None:
        result = subprocess.run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            check=False,
            cwd=self.root,
            **self._run_as(),  # type: ignore[call-overload]
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.decode(errors='replace')}")

    def _ready(self) -> bool:
        result = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def start(self) -> None:
        if self.running:
            return
        if not (self.data / "PG_VERSION").exists():
            self.initdb()
        self._launch(self.root / "postgres.log", "postgres")

    def _spawn(self, out: IO[bytes]) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                *(arg for setting in self.settings for arg in ("-c", setting)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
            # SIGINT: PostgreSQL's fast shutdown (sessions are ended, not awaited).
            preexec_fn=_die_with_parent(signal.SIGINT),  # noqa: PLW1509 (prctl only)
            **self._run_as(),  # type: ignore[call-overload]
        )
        return proc

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open sessions are ended."""
        _stop(self.proc, signal.SIGINT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def sql(self, dbname: str, statement: str) -> str:
        """Run one statement with psql; its unaligned, tuples-only output."""
        result = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                dbname,
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                statement,
            ],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.decode(errors='replace')}")
        return result.stdout.decode()

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(self._names)}"
        self.sql("postgres", f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.sql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def terminate_backends(self, dbname: str) -> int:
        """End every session on ``dbname`` (but psql's own); how many were ended."""
        out = self.sql(
            dbname,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{dbname}' AND pid <> pg_backend_pid()",
        )
        return int(out.strip() or 0)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    postgres_server.start()  # a test before this one may have stopped it
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        with contextlib.suppress(RuntimeError):
            postgres_server.drop_database(name)
