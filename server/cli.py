"""The ``fedtray-server`` command: parse flags, set up logging, run the server.

Contract: :func:`main` returns the process exit status and never raises for bad input:
a bad flag prints one ``fedtray-server: error: ...`` line to stderr and returns 2 (so
does a ``--task-param`` the task does not accept: :mod:`server.task_params`); a
server that cannot start (unknown task, a bad ``--task-file`` package -- the line names
the package reader's error code --, unusable state dir, port in use) prints one such
line and returns 1; a clean stop returns 0: SIGINT, SIGTERM, or -- only with
``--exit-when-done`` -- the end of the federation (``--rounds`` rounds complete, the final
global and ``federation:finished`` sent to every connected device). Without that flag a
finished server keeps serving the final global, ``/api/status`` (phase ``finished``) and
the dashboard until it is stopped. Once listening it prints
``fedtray-server listening on http://HOST:PORT`` to stdout (``https://`` with
``--certfile``/``--keyfile``; the real port, also with ``--port 0``), which scripts
and tests parse. Tokens are registered with the log redactor and never printed;
``--token`` is visible in ``ps``, ``--tokens-file`` is not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from client.logsetup import LogLevelError, add_secret, parse_level, setup_logging
from client.protocol import PartitionScheme
from server import __version__
from server.auth import TokenFileError, read_tokens_file
from server.cluster.supervisor import add_cluster_flags, cluster_problem
from server.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ConfigError,
    ServerConfig,
    add_partition_flags,
    default_state_dir,
)
from server.fedeval import add_evaluate_flag
from server.strategies.settings import add_flags as add_strategy_flags, settings_from_args
from server.task_params import FLAG as TASK_PARAM_FLAG, task_params_from_flags
from server.taskfile import ServedPackage

log = logging.getLogger(__name__)

PROG = "fedtray-server"
LISTENING_PREFIX = f"{PROG} listening on "


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="fedtray reference training server (FedAvg, FedProx, FedAvgM, FedAdam, "
        "median, trimmed mean).",
        epilog="`fedtray-server demo --help`: a whole federation on this machine. "
        "`fedtray-server pack --help`: package your own model for the fleet.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument(
        "--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port; 0 picks a free one (default: %(default)s)",
    )
    p.add_argument("--task", default="digits", help="task to train (default: %(default)s)")
    p.add_argument(
        "--task-file",
        type=Path,
        default=None,
        help="a task package (.fedtask, made with `fedtray-server pack`) to train instead "
        "of --task; its weights are the first global model",
    )
    p.add_argument(
        TASK_PARAM_FLAG,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model/data parameter of --task (repeatable), e.g. `--task synthetic "
        "--task-param features=1024 --task-param hidden=24000`; VALUE is read as JSON "
        '(numbers, true, "text") or else as text; checked against the task\'s parameters',
    )
    p.add_argument("--rounds", type=int, default=0, help="rounds to run in total; 0 = forever")
    p.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit once --rounds rounds are complete and devices were told "
        "(default: keep serving the final model until stopped)",
    )
    p.add_argument("--min-clients", type=int, default=2, help="devices needed to start a round")
    p.add_argument("--clients-per-round", type=int, default=10, help="devices selected per round")
    p.add_argument(
        "--round-timeout", type=float, default=300.0, help="seconds before a round closes"
    )
    p.add_argument(
        "--min-completion",
        type=float,
        default=0.5,
        help="fraction of selected devices that must report for a round to count",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="local epochs per round (default: the task's)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="local batch size (default: the task's)"
    )
    p.add_argument(
        "--lr", type=float, default=None, help="local learning rate (default: the task's)"
    )
    add_partition_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heartbeat-interval", type=float, default=10.0, help="seconds")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"where weights and history are kept (default: {default_state_dir()})",
    )
    p.add_argument(
        "--token",
        action="append",
        default=[],
        help="accepted device token (repeatable); visible to other users in `ps`, "
        "so prefer --tokens-file",
    )
    p.add_argument("--tokens-file", type=Path, help="file of tokens, one per line (# comments)")
    p.add_argument(
        "--certfile",
        type=Path,
        help="PEM certificate (chain): serve HTTPS and WSS on the port (needs --keyfile)",
    )
    p.add_argument("--keyfile", type=Path, help="the certificate's unencrypted PEM private key")
    p.add_argument(
        "--max-transfer-bytes",
        type=int,
        default=None,
        help="bytes of partial uploads held for all devices together "
        "(default: clients per round x 2 updates of the model's size)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    add_evaluate_flag(p)
    add_strategy_flags(p)
    add_cluster_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """A checked ServerConfig; raises ConfigError, TokenFileError or LogLevelError."""
    tokens = list(args.token)
    if args.tokens_file is not None:
        tokens.extend(read_tokens_file(args.tokens_file))
    parse_level(args.log_level)
    partition: PartitionScheme = args.partition
    model_params = task_params_from_flags(
        args.task_param, args.task, task_file=args.task_file is not None
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        task=args.task,
        task_file=args.task_file,
        model_params=model_params,
        rounds=args.rounds,
        min_clients=args.min_clients,
        clients_per_round=args.clients_per_round,
        round_timeout=args.round_timeout,
        min_completion=args.min_completion,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        partition=partition,
        partition_alpha=args.partition_alpha,
        seed=args.seed,
        heartbeat_interval=args.heartbeat_interval,
        state_dir=args.state_dir if args.state_dir is not None else default_state_dir(),
        tokens=tuple(tokens),
        log_level=args.log_level,
        certfile=args.certfile,
        keyfile=args.keyfile,
        max_transfer_bytes=args.max_transfer_bytes,
        strategy=settings_from_args(args),
        evaluate_every=args.evaluate_every,
    )


async def serve(
    config: ServerConfig, *, exit_when_done: bool = False, package: ServedPackage | None = None
) -> int:
    """Run until a signal (or, with ``exit_when_done``, the federation's end); the status."""
    from server.app import FedServer, StartupError
    from server.serving import wait_until_stopped

    server = FedServer(config, package=package)
    try:
        port = await server.start()
    except StartupError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        await server.stop()
        return 1
    print(f"{LISTENING_PREFIX}{config.scheme}://{config.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await wait_until_stopped(stop, server.finished if exit_when_done else None)
    finally:
        await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedtray-server``; ``fedtray-server demo ...`` runs the local demo,
    ``fedtray-server pack ...`` packs a model (:mod:`server.pack_cli`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from server import demo  # the demo orchestrates processes; load it only when asked

        return demo.main(argv[1:])
    if argv[:1] == ["pack"]:
        from server import pack_cli  # packing imports torch; load it only when asked

        return pack_cli.main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        config = config_from_args(args)
    except (ConfigError, TokenFileError, LogLevelError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    problem = cluster_problem(args)
    if problem is not None:
        sys.stderr.write(f"{PROG}: error: {problem}\n")
        return 2
    if args.redis is not None:
        from server.cluster import supervisor  # cluster mode: worker processes

        setup_logging(config.log_level, app=PROG)
        return supervisor.run(argv, args)
    for token in config.tokens:
        add_secret(token)
    package: ServedPackage | None = None
    if config.task_file is not None:
        from server.served_task import check_package

        # Checked before anything starts: a bad package is one line and exit status 1.
        package = check_package(config.task_file, PROG)
        if package is None:
            return 1
        config = dataclasses.replace(config, task=package.manifest.name)
    setup_logging(config.log_level, app=PROG)
    from server.serving import run_server  # uvloop where installed

    try:
        return run_server(serve(config, exit_when_done=args.exit_when_done, package=package))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
