"""The command line of one cluster worker: ``python -m server.cluster.worker --worker-id ID
[fedtray-server flags]`` (the supervisor, :mod:`server.cluster.supervisor`, starts these).

Contract: :func:`main` parses the ``fedtray-server`` flags plus ``--worker-id`` (federated
evaluation defaults to off here: ``--evaluate-every N`` is refused by the worker), needs
``--redis`` and ``--database`` (exit status 2 otherwise, or for bad flags), starts a
:class:`server.cluster.worker.ClusterWorker`, prints ``fedtray-server listening on URL``
once it listens, and stops it on SIGTERM/SIGINT (exit 0). A worker that cannot start says
why in one line on stderr and exits 1. Never prints secrets (tokens are registered with the
log filter first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from client.logsetup import LogLevelError, add_secret, setup_logging
from server.app import StartupError
from server.auth import TokenFileError
from server.cluster.engines import ClusterSettings
from server.cluster.worker import ClusterWorker
from server.config import ConfigError, ServerConfig
from server.serving import run_server

__all__ = ["main"]

log = logging.getLogger("server.cluster.worker")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.cluster.worker --worker-id ID [fedtray-server flags]``."""
    from server.cli import PROG, build_parser, config_from_args

    parser = build_parser()
    parser.add_argument("--worker-id", required=True, help="this worker's id (unique)")
    # Federated evaluation is off in cluster mode: off by default, refused when asked for.
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
    setup_logging(config.log_level, app=f"{PROG}-{args.worker_id}")
    settings = ClusterSettings(
        redis_url=args.redis,
        database_url=args.database,
        worker_id=args.worker_id,
        shared_dir=args.shared_dir,
    )
    try:
        return run_server(_serve(config, settings))  # uvloop where installed
    except KeyboardInterrupt:
        return 0


async def _serve(config: ServerConfig, settings: ClusterSettings) -> int:
    from server.cli import LISTENING_PREFIX, PROG

    worker = ClusterWorker(config, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
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
    await stop.wait()
    log.info("stopping on signal")
    await worker.stop()
    return 0
