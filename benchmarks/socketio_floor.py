"""The floor under fedtray's round: the same messages over bare python-socketio, against Flower.

Run ``python -m benchmarks.socketio_floor`` (``--sizes``, ``--rounds``, ``--pairs``,
``--variants``, ``--skip-flower``; ``--help``). Everything stays on loopback (127.0.0.1),
in a temporary directory, and stops by itself: every run has a ``--timeout``, and every
process is in its own process group, stopped on every way out.

What it answers: how fast could a round of issue 15's workload be with fedtray's wire
protocol and architecture, before any of fedtray's own code runs? It plays the round of
``benchmarks.vs_flower`` (3 clients + 1 server, each its own process; the model's floats
of the chosen size; a trivial fit) with nothing but what the architecture fixes, in three
variants, each the one before plus one fixed part:

* ``bare``: the wire only -- python-socketio over aiohttp on uvloop, as fedtray's server
  and client run it; per device and round exactly fedtray's messages: ``training:start``
  carrying the global as a binary attachment and its ack, ``weights:submit`` carrying the
  update and its ack. The server averages the updates with numpy. No checks, no disk.
* ``worker``: + the torch-free session's training process: each client hands the global
  to its own child process over a pipe and gets the update back (the child copies it).
* ``checked``: + the integrity promises and the files, at their cheapest: SHA-256 of every
  blob on both ends, every blob's floats checked finite before use (the whole of weight
  validation here), the global and the update written on the client, each update and each
  new global written on the server -- but nothing fsynced.
* ``durable``: + the fsyncs fedtray promises (issue 15; ``docs/architecture.md``, "What is
  fsynced and why"): the update on the client before it is submitted (not the global: it
  can be fetched again), each update on the server before its ack, each new global before
  the next round starts.

Flower's side is ``benchmarks.vs_flower``'s (the same virtual environment and arrays).
Reported per variant: steady s/round and CPU ms per steady round (server, largest client,
all processes; :mod:`benchmarks.round_figures`), as ratios to Flower's in the same run,
with ``/proc/loadavg`` before and after each run. This module's own roles (``server``,
``client``, ``child``) are what the driver starts; they import only python-socketio,
aiohttp, numpy and the standard library (no fedtray code).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.round_figures import Trial, flower_trial
from benchmarks.vs_flower import (
    CLIENTS,
    BenchError,
    RssSampler,
    _check_alive,
    _children,
    _deadline_check,
    _env,
    _free_port,
    _listening,
    _sizes,
    _start,
    default_flower_venv,
    ensure_flower,
    floats_of,
    loadavg,
    run_flower,
    shapes_for,
    size_label,
)
from server.serving import run_server

VARIANTS = ("bare", "worker", "checked", "durable")
POLL_S = 0.1
MAX_MESSAGE = 512 * 1024 * 1024


def _write(path: Path, data: bytes, synced: bool) -> None:
    with path.open("wb") as f:
        f.write(data)
        if synced:
            f.flush()
            os.fsync(f.fileno())


# -- the roles -------------------------------------------------------------------------------


def serve(port: int, rounds: int, floats: int, variant: str, out: Path, work: Path) -> None:
    """The server role: waits for CLIENTS registrations, runs ``rounds`` rounds, writes
    flower_side's record (``registered``, ``opened``, ``aggregated``) to ``out``."""
    import numpy as np
    import socketio
    from aiohttp import web

    checked, synced = variant in ("checked", "durable"), variant == "durable"
    record: dict[str, Any] = {"registered": [], "opened": {}, "aggregated": {}}

    async def main() -> None:
        sio = socketio.AsyncServer(async_mode="aiohttp", max_http_buffer_size=MAX_MESSAGE)
        app = web.Application(client_max_size=MAX_MESSAGE)
        sio.attach(app)
        devices: list[str] = []
        joined = asyncio.Event()
        updates: list[Any] = []
        collected = asyncio.Event()
        current = {"round": 0}

        @sio.on("device:register")  # type: ignore[misc]
        async def register(sid: str, _data: Any) -> dict[str, Any]:
            devices.append(sid)
            record["registered"].append(time.time())
            if len(devices) == CLIENTS:
                joined.set()
            return {"ok": True}

        @sio.on("weights:submit")  # type: ignore[misc]
        async def submit(sid: str, data: dict[str, Any]) -> dict[str, Any]:
            blob = data["weights"]
            if data["round"] != current["round"] or len(blob) != 4 * floats:
                return {"ok": False}
            if checked:
                if hashlib.sha256(blob).hexdigest() != data["sha256"]:
                    return {"ok": False}
                _write(work / f"update-{sid}", blob, synced)
            update = np.frombuffer(blob, dtype=np.float32)
            if checked and not np.isfinite(update).all():
                return {"ok": False}
            updates.append(update)
            if len(updates) == CLIENTS:
                collected.set()
            return {"ok": True}

        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await joined.wait()
        weights = np.zeros(floats, dtype=np.float32)
        for number in range(1, rounds + 1):
            current["round"] = number
            updates.clear()
            collected.clear()
            record["opened"][number] = time.time()
            blob = weights.tobytes()
            start = {"round": number, "weights": blob}
            if checked:
                start["sha256"] = hashlib.sha256(blob).hexdigest()
            acks = await asyncio.gather(
                *(sio.call("training:start", start, to=sid, timeout=60) for sid in devices)
            )
            if not all(ack.get("ok") for ack in acks):
                raise RuntimeError(f"round {number}: a device refused training:start")
            await collected.wait()
            weights = np.mean(np.stack(updates), axis=0, dtype=np.float32)
            if checked:
                _write(work / "global", weights.tobytes(), synced)
            record["aggregated"][number] = time.time()
        out.write_text(json.dumps(record), encoding="utf-8")
        await runner.cleanup()

    run_server(main())  # uvloop where installed, as fedtray's server and session run


def child(conn: Connection) -> None:
    """The training process of the ``worker`` variants: a global in, an update out."""
    import numpy as np

    while True:
        try:
            blob = conn.recv_bytes()
        except EOFError:
            return
        conn.send_bytes(np.frombuffer(blob, dtype=np.float32).copy().tobytes())


def _exchange(conn: Connection, blob: bytes) -> bytes:
    conn.send_bytes(blob)
    return conn.recv_bytes()


def client(url: str, variant: str, work: Path) -> None:
    """The client role: registers, then answers every ``training:start`` and submits."""
    import numpy as np
    import socketio

    checked, synced = variant in ("checked", "durable"), variant == "durable"
    conn: Connection | None = None
    if variant != "bare":
        ctx = multiprocessing.get_context("spawn")  # fedtray's training process is spawned
        conn, theirs = ctx.Pipe()
        ctx.Process(target=child, args=(theirs,), daemon=True).start()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sio = socketio.AsyncClient(reconnection=False)
        done = asyncio.Event()
        training: set[asyncio.Task[None]] = set()

        async def train(number: int, blob: bytes) -> None:
            if conn is None:
                update = blob
            else:
                # One blocking exchange in a helper thread: a pipe's write of a whole
                # global blocks until the child reads it.
                update = await loop.run_in_executor(None, _exchange, conn, blob)
            submit: dict[str, Any] = {"round": number, "weights": update}
            if checked:
                _write(work / "update", update, synced)
                submit["sha256"] = hashlib.sha256(update).hexdigest()
            ack = await sio.call("weights:submit", submit, timeout=60)
            if not ack.get("ok"):
                raise RuntimeError(f"round {number}: update refused")

        @sio.on("training:start")  # type: ignore[misc]
        async def start(data: dict[str, Any]) -> dict[str, Any]:
            blob = data["weights"]
            if checked:  # never fsynced: it can be fetched again after a power cut
                if hashlib.sha256(blob).hexdigest() != data["sha256"]:
                    return {"ok": False}
                if not np.isfinite(np.frombuffer(blob, dtype=np.float32)).all():
                    return {"ok": False}
                _write(work / "global", blob, synced=False)
            task = loop.create_task(train(data["round"], blob))
            training.add(task)
            task.add_done_callback(training.discard)
            return {"ok": True}

        @sio.event  # type: ignore[misc]
        async def disconnect(*_args: Any) -> None:
            done.set()

        await sio.connect(url, transports=["websocket"])
        await sio.call("device:register", {"name": work.name}, timeout=60)
        await done.wait()

    run_server(main())  # uvloop where installed, as fedtray's server and session run


# -- the driver ------------------------------------------------------------------------------


def _role(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.socketio_floor", "--role", *args]


def run_floor(variant: str, size_mb: float, rounds: int, work: Path, timeout: float) -> Trial:
    """One run of ``variant``: its figures as a :class:`Trial` (flower_trial's reading of
    the same record; no per-client fit times, so no first-update figure)."""
    deadline = time.monotonic() + timeout
    port = _free_port()
    record = work / "server.json"
    floats = floats_of(shapes_for(size_mb))
    load_before = loadavg()
    with _children() as children, RssSampler() as rss:
        cmd = _role("server", "--port", str(port), "--rounds", str(rounds))
        cmd += ["--floats", str(floats), "--variant", variant, "--out", str(record)]
        cmd += ["--work", str(work)]
        server = _start("server", cmd, work / "server.log", _env(None))
        children.append(server)
        rss.watch("server", server.proc.pid)
        while not _listening(port):
            _check_alive(children, f"{variant} server start")
            _deadline_check(deadline, f"{variant} server start")
            time.sleep(POLL_S)
        starts: list[float] = []
        for i in range(1, CLIENTS + 1):
            home = work / f"client-{i}"
            home.mkdir()
            cmd = _role("client", "--url", f"http://127.0.0.1:{port}", "--variant", variant)
            starts.append(time.time())
            cmd += ["--work", str(home)]
            child_proc = _start(f"client-{i}", cmd, home / "log", _env(None))
            children.append(child_proc)
            rss.watch(child_proc.name, child_proc.proc.pid)
        while server.proc.poll() is None:
            if not record.exists():  # the clients leave once the server is done
                _check_alive(children[1:], f"{variant} run")
            _deadline_check(deadline, f"{variant} run")
            time.sleep(POLL_S)
        if server.proc.returncode != 0 or not record.exists():
            raise BenchError(f"the {variant} server failed: {server.tail(5).strip()}")
        fits: list[list[dict[str, Any]]] = [[] for _ in starts]
        trial = flower_trial(json.loads(record.read_text(encoding="utf-8")), fits, starts)
    trial.system = variant
    trial.cpu_ms = rss.cpu_ms(trial.ends)
    trial.load = f"{load_before} -> {loadavg()}"
    return trial


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summary(label: str, trials: dict[str, list[Trial]]) -> list[str]:
    """The table of one size: medians per system, and each as a ratio to Flower's."""

    def med(system: str, pick: Callable[[Trial], float | None]) -> float | None:
        return _median([v for t in trials.get(system, []) if (v := pick(t)) is not None])

    rows = [
        ("steady s/round", lambda t: t.steady_s, ".4f"),
        ("CPU ms/round server", lambda t: t.cpu_ms.get("server"), ".1f"),
        ("CPU ms/round largest client", lambda t: t.cpu_ms.get("client"), ".1f"),
        ("CPU ms/round all", lambda t: t.cpu_ms.get("total"), ".1f"),
    ]
    systems = [s for s in (*VARIANTS, "Flower") if trials.get(s)]
    lines = [f"## {label}", "", "| figure (median) | " + " | ".join(systems) + " |"]
    lines.append("|---|" + "---:|" * len(systems))
    for name, pick, spec in rows:
        base = med("Flower", pick)
        cells = []
        for system in systems:
            value = med(system, pick)
            cell = "-" if value is None else format(value, spec)
            if value is not None and base and system != "Flower":
                cell += f" ({value / base:.2f}×)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.socketio_floor",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--sizes", type=_sizes, default=[0.4], help="MB (default: 0.4)")
    p.add_argument("--rounds", type=int, default=200, help="rounds per run (default: 200)")
    p.add_argument("--pairs", type=int, default=3, help="interleaved repeats (default: 3)")
    p.add_argument(
        "--variants",
        type=lambda text: [v for v in text.split(",") if v],
        default=list(VARIANTS),
        help="comma-separated, of " + ",".join(VARIANTS) + " (default: all)",
    )
    p.add_argument("--skip-flower", action="store_true", help="the variants only")
    p.add_argument(
        "--flower-venv", type=Path, default=None, help=f"default: {default_flower_venv()}"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run (default: 300)")
    # The roles the driver starts.
    p.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--floats", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.role == "server":
        serve(args.port, args.rounds, args.floats, args.variant, args.out, args.work)
        return 0
    if args.role == "client":
        client(args.url, args.variant, args.work)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants takes some of {','.join(VARIANTS)}; got {unknown}")
    if args.rounds < 2 or args.pairs < 1 or args.timeout <= 0:
        parser.error("--rounds must be at least 2, --pairs at least 1, --timeout positive")
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; loadavg {loadavg()}")
    try:
        python = (
            None if args.skip_flower else ensure_flower(args.flower_venv or default_flower_venv())
        )
    except (BenchError, OSError) as exc:
        print(f"error: Flower is not available: {exc}", file=sys.stderr)
        return 1
    results: dict[str, dict[str, list[Trial]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedtray-floor-") as tmp:
        try:
            for pair in range(args.pairs):
                for size in args.sizes:
                    label = size_label(size)
                    systems = [*args.variants, *([] if python is None else ["Flower"])]
                    if pair % 2:
                        systems.reverse()
                    for system in systems:
                        run_dir = Path(tmp) / f"{label}-{pair + 1}-{system}"
                        run_dir.mkdir()
                        if system == "Flower":
                            assert python is not None
                            trial = run_flower(python, size, args.rounds, run_dir, args.timeout)
                        else:
                            trial = run_floor(system, size, args.rounds, run_dir, args.timeout)
                        results.setdefault(label, {}).setdefault(system, []).append(trial)
                        steady = "-" if trial.steady_s is None else f"{trial.steady_s:.4f}"
                        print(
                            f"pair {pair + 1} {label} {system:<8} steady {steady} s/round, "
                            f"CPU ms/round {trial.cpu_ms}, loadavg {trial.load}",
                            flush=True,
                        )
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for label, trials in results.items():
        print()
        print("\n".join(summary(label, trials)))
    print(f"\nloadavg at the end {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
