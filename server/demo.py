"""``fedtray-server demo``: a whole federation on one machine, for a first look.

Contract:

* :func:`main` starts the reference server (``python -m server --port 0
  --exit-when-done ...`` with a temporary state dir; the bound port is parsed from its
  ``listening on`` line) and
  ``--clients`` headless clients (``python -m client --server URL --name demo-i``), each
  with its own temporary ``XDG_*`` dirs so they are distinct devices. It prints one line
  per finished round (number, clients, train loss, eval accuracy, seconds; read from the
  server's ``/api/status`` history and, after the server exits, from its
  ``history.json``) and then the final accuracy and whether ``--target`` was met.
* Exit status: 0 when all rounds completed (3 with ``--require-target`` when the target
  was missed), 1 with a one-line reason when something failed (a process died, the
  overall ``--timeout`` passed), 130 on Ctrl-C / SIGTERM.
* Every process it starts runs in its own process group and is stopped on every way
  out (terminate, then kill after a grace period), so no process is left behind, the
  clients' training processes included. The temporary directory is removed unless
  ``--keep`` is given; with ``--verbose`` the children's output is shown.
* ``--task-param KEY=VALUE`` (repeatable) is checked against the task before anything
  starts (a bad one: one ``error:`` line, exit status 2) and passed to the server; so
  are ``--strategy`` and its parameter flags (:mod:`server.strategies.settings`).
* :func:`parse_listening`, :func:`round_line`, :func:`summary` are pure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

from server.config import ConfigError, add_partition_flags, partition_problem
from server.fedeval import add_evaluate_flag
from server.strategies.settings import add_flags as add_strategy_flags, flags_of, settings_from_args
from server.task_params import task_params_from_flags

PROG: Final = "fedtray-server demo"
LISTENING_RE: Final = re.compile(r"fedtray-server listening on (http://\S+:\d+)")
STOP_GRACE_S: Final = 10.0
START_TIMEOUT_S: Final = 120.0
POLL_S: Final = 0.5
XDG_VARS: Final = ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_TARGET_MISSED: Final = 3
EXIT_INTERRUPTED: Final = 130


class DemoError(Exception):
    """The demo cannot go on; the message is the one-line reason."""


# ------------------------------------------------------------------------- pure helpers


def parse_listening(line: str) -> str | None:
    """The server URL from its ``fedtray-server listening on URL`` line, else None."""
    match = LISTENING_RE.search(line)
    return match.group(1) if match else None


def _fmt(value: object, spec: str, missing: str = "-") -> str:
    return format(value, spec) if isinstance(value, int | float) else missing


def round_line(record: dict[str, Any], rounds: int) -> str:
    """One line for a finished round record (camelCase keys, as in ``/api/status``)."""
    number = record.get("number", "?")
    width = len(str(rounds))
    head = f"round {number:>{width}}/{rounds}"
    if record.get("outcome") != "completed":
        return f"{head}  abandoned: {record.get('detail') or 'no reason given'}"
    acc = record.get("evalAccuracy")
    acc_text = f"{acc * 100:5.1f} %" if isinstance(acc, int | float) else "   - "
    return (
        f"{head}  clients {record.get('clientsReported', '?')}/"
        f"{record.get('clientsSelected', '?')}  "
        f"train loss {_fmt(record.get('trainLoss'), '.4f')}  "
        f"eval accuracy {acc_text}  "
        f"{_fmt(record.get('seconds'), '.1f')} s"
    )


def summary(records: Sequence[dict[str, Any]], rounds: int, target: float) -> tuple[str, bool]:
    """The closing line and whether the target accuracy was reached by the last round."""
    completed = [r for r in records if r.get("outcome") == "completed"]
    if not completed:
        return "no round completed", False
    acc = completed[-1].get("evalAccuracy")
    if not isinstance(acc, int | float):
        return f"{len(completed)} of {rounds} rounds completed; no accuracy reported", False
    met = acc >= target
    verdict = "met" if met else "NOT met"
    return (
        f"final eval accuracy {acc * 100:.1f} % after {len(completed)} of {rounds} rounds "
        f"— target {target * 100:.0f} % {verdict}",
        met,
    )


# ------------------------------------------------------------------------- processes


@dataclass
class Child:
    """A started process, its log and how to describe it."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    lines: list[str] = field(default_factory=list)

    def tail(self, count: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            return "\n".join(text.splitlines()[-count:])
        return ""


def _popen(
    cmd: list[str], env: dict[str, str], log_path: Path, verbose: bool
) -> subprocess.Popen[bytes]:
    log_file: IO[bytes] = log_path.open("wb")
    kwargs: dict[str, Any] = {}
    if os.name == "posix":
        # Own process group: Ctrl-C in the terminal reaches only the demo, which then
        # stops each group (the client's training process included) in order.
        kwargs["start_new_session"] = True
    else:  # pragma: no cover - Windows
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    try:
        return subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if verbose else log_file,
            stderr=subprocess.STDOUT,
            **kwargs,
        )
    finally:
        log_file.close()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        if os.name == "posix":
            os.killpg(proc.pid, sig)
        elif sig == signal.SIGTERM:  # pragma: no cover - Windows
            proc.terminate()
        else:  # pragma: no cover - Windows
            proc.kill()


def stop_all(children: Sequence[Child], grace: float = STOP_GRACE_S) -> None:
    """Terminate every child's process group, then kill what is left after ``grace``."""
    for child in children:
        _signal_group(child.proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(max(0.1, deadline - time.monotonic()))
    kill = getattr(signal, "SIGKILL", signal.SIGTERM)
    for child in children:
        # Also after a clean exit: the group may still hold a stray grandchild.
        _signal_group(child.proc, kill)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(5)


def _child_env(base: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if base is not None:
        for var in XDG_VARS:
            path = base / var.lower()
            path.mkdir(parents=True, exist_ok=True)
            env[var] = str(path)
    # Find the fedtray packages even when run from a source checkout.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pump(child: Child, verbose: bool, found: threading.Event) -> None:
    """Read a piped child's output: keep it in its log, echo it with --verbose."""
    stream = child.proc.stdout
    if stream is None:
        return
    with child.log_path.open("ab") as log_file:
        for raw in stream:
            log_file.write(raw)
            log_file.flush()
            line = raw.decode("utf-8", errors="replace")
            child.lines.append(line)
            if verbose:
                sys.stderr.write(f"[{child.name}] {line}")
            if parse_listening(line):
                found.set()
    found.set()


def _get_status(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{url}/api/status", timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read().decode("utf-8"))
            return data
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _saved_history(state_dir: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((state_dir / "history.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    history = data.get("history") if isinstance(data, dict) else None
    return [r for r in history if isinstance(r, dict)] if isinstance(history, list) else []


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C (so the children are stopped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------- the demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run a server and N headless clients on this machine and train digits.",
    )
    p.add_argument("--clients", type=int, default=3, help="clients to start (default: 3)")
    p.add_argument("--rounds", type=int, default=10, help="rounds to run (default: 10)")
    # Without these the server uses the task's recommended settings (Task.default_config).
    p.add_argument("--epochs", type=int, help="local epochs per round (default: the task's)")
    p.add_argument("--lr", type=float, help="local learning rate (default: the task's)")
    p.add_argument("--batch-size", type=int, help="local batch size (default: the task's)")
    add_partition_flags(p)
    p.add_argument("--task", default="digits", help="task to train (default: digits)")
    p.add_argument(
        "--task-file",
        type=Path,
        default=None,
        help="a task package (.fedtask) to train instead of --task",
    )
    p.add_argument(
        "--task-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model/data parameter of --task (repeatable), passed to the server; "
        "e.g. --task synthetic --task-param hidden=256",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--target", type=float, default=0.9, help="eval accuracy to reach (default: 0.9)"
    )
    p.add_argument(
        "--require-target",
        action="store_true",
        help=f"exit with status {EXIT_TARGET_MISSED} when the target is not met",
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="overall limit in seconds (default: 600)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--verbose", action="store_true", help="show the processes' output")
    add_evaluate_flag(p)
    add_strategy_flags(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.clients <= 64:
        raise DemoError(f"--clients must be 1-64, got {args.clients}")
    if args.rounds < 1:
        raise DemoError(f"--rounds must be at least 1, got {args.rounds}")
    if not 0 <= args.target <= 1:
        raise DemoError(f"--target must be a fraction in [0, 1], got {args.target}")
    if args.timeout <= 0:
        raise DemoError(f"--timeout must be positive, got {args.timeout}")
    # Checked here, before any process starts (the server would refuse them too).
    problem = partition_problem(args.partition, args.partition_alpha) or (
        settings_from_args(args).problem()
    )
    if problem is not None:
        raise DemoError(problem)
    try:
        task_params_from_flags(args.task_param, args.task, task_file=args.task_file is not None)
    except ConfigError as exc:
        raise DemoError(str(exc)) from None


def _start_server(args: argparse.Namespace, work: Path, state_dir: Path) -> tuple[Child, str]:
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *(
            ["--task-file", str(args.task_file.resolve())]
            if args.task_file is not None
            else ["--task", args.task]
        ),
        *(arg for item in args.task_param for arg in ("--task-param", item)),
        "--rounds",
        str(args.rounds),
        "--exit-when-done",
        "--min-clients",
        str(args.clients),
        "--clients-per-round",
        str(args.clients),
        "--partition",
        args.partition,
        *_given("--partition-alpha", args.partition_alpha),
        *_given("--epochs", args.epochs),
        *_given("--lr", args.lr),
        *_given("--batch-size", args.batch_size),
        "--seed",
        str(args.seed),
        "--heartbeat-interval",
        "2",
        "--round-timeout",
        "120",
        "--state-dir",
        str(state_dir),
        *flags_of(settings_from_args(args)),
        "--evaluate-every",
        str(args.evaluate_every),
    ]
    log_path = work / "server.log"
    log_path.touch()
    # The server's stdout is always piped: its first line carries the bound port.
    env = _child_env(work / "server-home")
    group: dict[str, Any] = {"start_new_session": True} if os.name == "posix" else {}
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **group,
    )
    child = Child("server", proc, log_path)
    found = threading.Event()
    threading.Thread(
        target=_pump, args=(child, args.verbose, found), name="demo-server-out", daemon=True
    ).start()
    found.wait(START_TIMEOUT_S)
    url = next((u for u in map(parse_listening, list(child.lines)) if u), None)
    if url is None:
        tail = "".join(child.lines[-10:]).strip()
        stop_all([child])
        raise DemoError(f"the server did not start{': ' + tail.splitlines()[-1] if tail else ''}")
    return child, url


def _given(flag: str, value: object) -> list[str]:
    """``[flag, value]`` when the user gave the value, else nothing (the server decides)."""
    return [] if value is None else [flag, str(value)]


def _run(args: argparse.Namespace, work: Path, children: list[Child]) -> int:
    deadline = time.monotonic() + args.timeout
    state_dir = work / "server-state"
    server, url = _start_server(args, work, state_dir)
    children.append(server)
    print(
        f"server {url}: {args.task_file or args.task}, {args.partition}, {args.rounds} rounds; "
        f"starting {args.clients} clients",
        flush=True,
    )
    for i in range(1, args.clients + 1):
        name = f"demo-{i}"
        log_path = work / f"{name}.log"
        cmd = [sys.executable, "-m", "client", "--server", url, "--name", name]
        proc = _popen(cmd, _child_env(work / name), log_path, args.verbose)
        child = Child(name, proc, log_path)
        if args.verbose:
            threading.Thread(
                target=_pump, args=(child, True, threading.Event()), daemon=True
            ).start()
        children.append(child)

    printed: set[str] = set()
    records: list[dict[str, Any]] = []

    def show(new_records: list[dict[str, Any]], final: bool = True) -> None:
        for i, record in enumerate(new_records):
            key = str(record.get("roundId"))
            # The latest version's evaluation may arrive after its record: wait for it (or
            # a later record, or the end, which waits for the final evaluation).
            pending = (
                record.get("outcome") == "completed"
                and record.get("evalAccuracy") is None
                and i == len(new_records) - 1
            )
            if key not in printed and not (pending and not final):
                printed.add(key)
                records.append(record)
                print(round_line(record, args.rounds), flush=True)

    while True:
        status = _get_status(url)
        if status is not None and isinstance(status.get("history"), list):
            show(
                [r for r in status["history"] if isinstance(r, dict)],
                final=status.get("phase") == "finished",
            )
        done = sum(1 for r in records if r.get("outcome") == "completed") >= args.rounds
        if done:
            break
        if server.proc.poll() is not None:
            # It stops by itself after the last round: take the final records from disk.
            show(_saved_history(state_dir))
            if sum(1 for r in records if r.get("outcome") == "completed") >= args.rounds:
                break
            raise DemoError(
                f"the server exited with status {server.proc.returncode} before the rounds "
                f"completed; last output: {''.join(server.lines[-3:]).strip() or '(none)'}"
            )
        for child in children[1:]:
            code = child.proc.poll()
            if code is not None:
                raise DemoError(
                    f"client {child.name} exited with status {code}: "
                    f"{child.tail(3).strip() or '(no output)'}"
                )
        if time.monotonic() > deadline:
            raise DemoError(
                f"timed out after {args.timeout:.0f} s with "
                f"{sum(1 for r in records if r.get('outcome') == 'completed')} of "
                f"{args.rounds} rounds completed"
            )
        time.sleep(POLL_S)

    text, met = summary(records, args.rounds, args.target)
    print(text, flush=True)
    if args.require_target and not met:
        return EXIT_TARGET_MISSED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the demo; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
    except DemoError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    children: list[Child] = []
    work = Path(tempfile.mkdtemp(prefix="fedtray-demo-"))
    try:
        with _sigterm_as_interrupt():
            try:
                return _run(args, work, children)
            except DemoError as exc:
                print(f"{PROG}: error: {exc}", file=sys.stderr)
                if not args.verbose:
                    print(f"{PROG}: logs are in {work}", file=sys.stderr)
                    args.keep = True
                return EXIT_FAILED
            except KeyboardInterrupt:
                print(f"{PROG}: interrupted; stopping everything", file=sys.stderr)
                return EXIT_INTERRUPTED
            finally:
                try:
                    stop_all(children)
                except KeyboardInterrupt:  # a second Ctrl-C: no more grace, just kill
                    stop_all(children, grace=0.0)
    finally:
        if args.keep:
            print(f"{PROG}: files kept in {work}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
