"""The command line of one cluster worker: ``python -m server.cluster.worker --worker-id ID
[fedtray-server flags]`` (the supervisor, :mod:`server.cluster.supervisor`, starts these).

Contract: :func:`main` parses the ``fedtray-server`` flags plus ``--worker-id`` (federated
evaluation defaults to off here: ``--evaluate-every N`` turns it on), needs
``--redis`` and ``--database`` (exit status 2 otherwise, or for bad flags), opens the
``--task-file`` package when given (:func:`server.served_task.check_package`: a bad one
is the single-process CLI's one line and exit status 1; the task is then named by its
manifest, as ``fedtray-server`` does), starts a
:class:`server.cluster.worker.ClusterWorker`, prints ``fedtray-server listening on URL`` once
it listens, and stops it on SIGTERM/SIGINT (exit 0) -- or, with ``--exit-when-done``,
once the federation is finished and its devices were told (it prints
:data:`server.cluster.supervisor.FINISHED_LINE` first, so the supervisor does not restart
it; exit 0) -- or once its parent process is gone (:func:`watch_parent`: a supervisor
killed with SIGKILL leaves no worker behind holding the port; exit 0). A worker that
cannot start says why in one line on stderr and exits 1. Never prints secrets (tokens are
registered with the log filter first).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence

from client.logsetup import LogLevelError, add_secret, setup_logging
from server.app import StartupError
from server.auth import TokenFileError
from server.cluster.engines import ClusterSettings
from server.cluster.supervisor import FINISHED_LINE
from server.cluster.worker import ClusterWorker
from server.config import ConfigError, ServerConfig
from server.served_task import check_package
from server.serving import run_server, wait_until_stopped
from server.taskfile import ServedPackage

__all__ = ["PARENT_POLL_S", "main", "watch_parent"]

log = logging.getLogger("server.cluster.worker")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.cluster.worker --worker-id ID [fedtray-server flags]``."""
    from server.cli import PROG, build_parser, config_from_args

    parser = build_parser()
    parser.add_argument("--worker-id", required=True, help="this worker's id (unique)")
    # Federated evaluation is off by default in cluster mode (--evaluate-every N: on).
    parser.set_defaults(evaluate_every=0)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    if not args.redis or not args.database:
        sys.stderr.write(f"{PROG}: error: a worker needs --redis and --database\n")
        return 2
    try:
        config = config_from_args(args)
    except (ConfigError, TokenFileError, LogLevelError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    for token in config.tokens:
        add_secret(token)
    package: ServedPackage | None = None
    if config.task_file is not None:
        package = check_package(config.task_file, PROG)
        if package is None:
            return 1
        config = dataclasses.replace(config, task=package.manifest.name)
    setup_logging(config.log_level, app=f"{PROG}-{args.worker_id}")
    settings = ClusterSettings(
        redis_url=args.redis,
        database_url=args.database,
        worker_id=args.worker_id,
        shared_dir=args.shared_dir,
    )
    try:
        # uvloop where installed
        return run_server(_serve(config, settings, package, exit_when_done=args.exit_when_done))
    except KeyboardInterrupt:
        return 0


#: Seconds between two looks at the parent process (see :func:`watch_parent`).
PARENT_POLL_S = 1.0


async def watch_parent(stop: asyncio.Event, poll: float = PARENT_POLL_S) -> None:
    """Set ``stop`` once this process's parent is no longer the one it started under
    (it was re-parented: the supervisor died, even by SIGKILL). A worker started by hand or
    by a service manager keeps its parent, so this never fires for it."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(poll)
        if os.getppid() != parent:
            log.warning("the parent process (pid %d) is gone: stopping", parent)
            stop.set()
            return


async def _serve(
    config: ServerConfig,
    settings: ClusterSettings,
    package: ServedPackage | None,
    *,
    exit_when_done: bool = False,
) -> int:
    worker = ClusterWorker(config, settings, package=package)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    watching = asyncio.create_task(watch_parent(stop))
    try:
        return await _run(worker, stop, config, exit_when_done=exit_when_done)
    finally:
        watching.cancel()


async def _run(
    worker: ClusterWorker, stop: asyncio.Event, config: ServerConfig, *, exit_when_done: bool
) -> int:
    from server.cli import LISTENING_PREFIX, PROG

    starting = asyncio.create_task(worker.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await worker.stop()
        return 0
    stopping.cancel()
    try:
        port = starting.result()
    except StartupError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        await worker.stop()
        return 1
    print(f"{LISTENING_PREFIX}{config.scheme}://{config.host}:{port}", flush=True)
    end = worker.rounds.end.finished if exit_when_done and worker.rounds is not None else None
    if await wait_until_stopped(stop, end):
        print(FINISHED_LINE, flush=True)
    await worker.stop()
    return 0
