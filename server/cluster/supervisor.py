"""``fedtray-server --workers N --redis URL --database URL``: start and keep N workers.

Contract: :func:`run` starts ``N`` worker processes (``python -m server.cluster.worker``,
each with the same ``fedtray-server`` flags and a unique ``--worker-id``) that share one
port with ``SO_REUSEPORT`` (``--port 0`` picks a free port once, here, and keeps it
reserved with a bound, never listening, socket). Once every worker has said it listens it
prints ``fedtray-server listening on http://HOST:PORT`` once (the line scripts and tests
parse); the workers' other output passes through. SIGTERM/SIGINT are forwarded to the
workers (killed after ``stop_timeout`` s); a worker that dies is restarted with a backoff
(1 s doubling to 30 s, back to 1 s after a minute of running) -- except, with
``--exit-when-done``, a worker that printed :data:`FINISHED_LINE` (the federation is
finished) and exited 0: it stays stopped, and once every worker has so :func:`run`
returns 0. A worker that fails before
any worker listened (exit status 1 or 2: bad flags, an unusable engine) stops the others
and :func:`run` returns its status; a clean stop returns 0. A ``--task-file`` package is
checked here first (:func:`server.served_task.check_package`): a bad one is one line on
stderr and exit status 1 before any worker starts or the port is taken. Nothing here
talks to Redis or PostgreSQL. :func:`add_cluster_flags` declares the cluster flags of
``fedtray-server``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

PROG = "fedtray-server"
LISTENING_PREFIX = f"{PROG} listening on "
#: What a worker prints before it exits at the end of the federation (--exit-when-done).
FINISHED_LINE = f"{PROG} worker finished: the federation is finished"
BACKOFF_MIN, BACKOFF_MAX, STEADY_AFTER = 1.0, 30.0, 60.0
#: Seconds to wait for the output of a worker that exited 0 to be read to its end.
PUMP_DRAIN_S = 5.0


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """``--workers``, ``--redis``, ``--database``, ``--shared-dir``."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="cluster mode: worker processes on this machine sharing the port "
        "(needs --redis and --database; 1 when only they are given)",
    )
    p.add_argument("--redis", default=None, help="cluster mode: Redis URL, redis://HOST:PORT/0")
    p.add_argument(
        "--database", default=None, help="cluster mode: PostgreSQL URL, postgresql://..."
    )
    p.add_argument(
        "--shared-dir",
        type=Path,
        default=None,
        help="cluster mode on one machine: keep weights and partial sums in this directory "
        "(default: PostgreSQL large objects)",
    )


def cluster_problem(args: argparse.Namespace) -> str | None:
    """Why the cluster flags do not go together (None: fine, or not cluster mode)."""
    if args.workers is None and args.redis is None and args.database is None:
        return None
    if not args.redis or not args.database:
        return "cluster mode (--workers) needs both --redis and --database"
    if args.workers is not None and args.workers < 1:
        return "--workers must be at least 1"
    return None


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[str] | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_MIN
    restart_at: float | None = None
    worker_id: str = ""
    listening: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    pump: threading.Thread | None = None


def _reserve_port(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        workers: int,
        host: str,
        port: int,
        *,
        exit_when_done: bool = False,
    ) -> None:
        self._argv = list(argv)
        self._exit_when_done = exit_when_done
        self._host = host
        self._workers = [_Worker(i) for i in range(workers)]
        self._stop = threading.Event()
        self._announced = False
        self._reserved = _reserve_port(host, port)
        self.port = int(self._reserved.getsockname()[1])
        self._node = socket.gethostname().split(".")[0] or "node"

    def _spawn(self, w: _Worker) -> None:
        w.worker_id = f"{self._node}-w{w.index}-{secrets.token_hex(3)}"
        w.listening = threading.Event()
        w.finished = threading.Event()
        cmd = [
            sys.executable,
            "-m",
            "server.cluster.worker",
            *self._argv,
            "--port",
            str(self.port),
            "--worker-id",
            w.worker_id,
        ]
        w.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
        w.started_at = time.monotonic()
        w.restart_at = None
        w.pump = threading.Thread(target=self._pump, args=(w, w.proc), daemon=True)
        w.pump.start()
        log.info("worker %s started (pid %d)", w.worker_id, w.proc.pid)

    def _pump(self, w: _Worker, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.rstrip("\n") == FINISHED_LINE:
                w.finished.set()
            if line.startswith(LISTENING_PREFIX):
                w.listening.set()
                if not self._announced and all(x.listening.is_set() for x in self._workers):
                    self._announced = True
                    sys.stdout.write(line)
                    sys.stdout.flush()
            else:
                sys.stdout.write(line)
                sys.stdout.flush()

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self._stop.set()

    def run(self, stop_timeout: float = 15.0) -> int:
        for w in self._workers:
            self._spawn(w)
        status = 0
        while not self._stop.wait(0.2):
            ended = self._check()
            if ended is not None:
                status = ended
                break
        self._shutdown(stop_timeout)
        self._reserved.close()
        return status

    def _check(self) -> int | None:
        """Restart workers that died; the status to stop with (None: go on)."""
        now = time.monotonic()
        for w in self._workers:
            if w.proc is not None and w.proc.poll() is not None:
                code = w.proc.returncode
                if not self._announced and code in (1, 2):
                    log.error("worker %s could not start (exit %d)", w.worker_id, code)
                    return code
                if self._exit_when_done and code == 0 and w.pump is not None:
                    w.pump.join(PUMP_DRAIN_S)  # its last lines (FINISHED_LINE) are read
                if self._exit_when_done and code == 0 and w.finished.is_set():
                    log.info("worker %s exited: the federation is finished", w.worker_id)
                    w.proc, w.done = None, True
                    continue
                ran = now - w.started_at
                w.backoff = BACKOFF_MIN if ran >= STEADY_AFTER else min(w.backoff * 2, BACKOFF_MAX)
                w.restart_at = now + (BACKOFF_MIN if ran >= STEADY_AFTER else w.backoff / 2)
                log.warning(
                    "worker %s exited (status %d); restarting in %.0f s",
                    w.worker_id,
                    code,
                    w.restart_at - now,
                )
                w.proc = None
            if w.proc is None and w.restart_at is not None and now >= w.restart_at:
                self._spawn(w)
        if self._exit_when_done and all(w.done for w in self._workers):
            log.info("every worker exited at the end of the federation (--exit-when-done)")
            return 0
        return None

    def _shutdown(self, timeout: float) -> None:
        procs = [w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def strip_workers(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--workers N`` / ``--workers=N`` (the workers' own flags)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out


def run(argv: Sequence[str], args: argparse.Namespace) -> int:
    """Supervise ``args.workers`` (default 1) workers until a signal; the exit status."""
    if args.task_file is not None:
        # Checked once here, so a bad package starts no worker (each worker opens it again).
        from server.served_task import check_package

        if check_package(args.task_file, PROG) is None:
            return 1
    try:
        sup = Supervisor(
            strip_workers(argv),
            args.workers or 1,
            args.host,
            args.port,
            exit_when_done=bool(getattr(args, "exit_when_done", False)),
        )
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: cannot listen on {args.host}:{args.port}: {exc}\n")
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, sup.request_stop)
    return sup.run()
