"""Round latency against Flower: 3 clients + 1 server, each its own process, on loopback.

Run ``python -m benchmarks.vs_flower`` (``--sizes``, ``--rounds``, ``--pairs``,
``--skip-flower``; ``--help``). Everything stays on loopback (127.0.0.1), in temporary
directories, and stops by itself: every run has a ``--timeout``, and every process it
starts is in its own process group, stopped (then killed) on every way out.

The workload (issue 15): a trivial fit, so a round is serialisation, transfer and
aggregation. For each model size (``--sizes``, in MB of float32: 100 = ~25M floats,
0.4 = ~100k) and each of ``--pairs`` pairs, interleaved (the order alternates by pair):

* fedtray: ``python -m server`` (task ``synthetic`` sized with ``--task-param``:
  ``features=1024 classes=2 samples=10`` and ``hidden`` for the size; ``--partition iid``
  so each client trains 2-3 rows for one step) and three ``python -m client``, each with
  its own XDG dirs (three devices), started once the server listens.
* Flower (``flwr==1.42.*`` with a ``NumPyClient`` whose ``fit`` returns what it got, and
  ``FedAvg``, no evaluation; arrays of the same shapes): ``benchmarks/flower_side.py``
  run by the interpreter of Flower's own virtual environment, which this benchmark makes
  once with ``python -m venv`` and ``pip install`` (PyPI) under
  ``~/.cache/fedtray-bench/flwr-venv`` (``--flower-venv``); fedtray's stays clean.

fedtray's packages are byte-compiled first (``compileall``, as an install is: pip compiles
what it installs, Flower's virtual environment included), so a client's start-up does not
depend on which modules an earlier run left compiled (``PYTHONDONTWRITEBYTECODE`` keeps an
interpreter from writing them itself).

Each run does ``--rounds`` rounds. Reported per system (medians over the pairs; the
definitions are in :mod:`benchmarks.round_figures`): steady and first-round seconds per
round, client start to registered and to the first update submitted (fedtray: the server
acknowledged it; Flower: ``fit`` returned), peak RSS of the server and of the largest
client (the larger of the root process's ``VmHWM`` and the RSS summed over its process
tree, sampled every 0.2 s: a fedtray client's training process counts), the CPU per steady
round of the server, of the largest client and of all processes (each process tree's CPU
sampled alongside; :func:`benchmarks.round_figures.cpu_per_round`; it needs at least
``CPU_MIN_ROUNDS`` + 2 rounds, and is steadier with more: ``--rounds 100`` at 0.4 MB), fedtray's
round breakdown, the ratio fedtray / Flower with the goals, and ``/proc/loadavg`` before and
after each run. ``--json PATH`` also writes every trial.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.round_figures import (
    Trial,
    cpu_per_round,
    fedtray_trial,
    flower_trial,
    summary_lines,
)
from server.demo import Child, parse_listening, stop_all

ROOT = Path(__file__).resolve().parent.parent
FLOWER_SIDE = Path(__file__).resolve().parent / "flower_side.py"
FLOWER_PIN = "flwr==1.42.*"
FLOWER_VERSION_PREFIX = "1.42."
CLIENTS = 3
FEATURES = 1024
CLASSES = 2
SAMPLES = 10
MB = 1_000_000
MiB = 2**20
POLL_S = 0.5
RSS_EVERY_S = 0.2
INSTALL_TIMEOUT_S = 1800.0
XDG_VARS = ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME")


class BenchError(Exception):
    """A run failed; the message is the reason (logs are kept and named)."""


# -- sizes ------------------------------------------------------------------------------


def size_label(size_mb: float) -> str:
    return f"{size_mb:g}MB"


def hidden_for(size_mb: float) -> int:
    """The synthetic MLP's hidden width for ``size_mb`` MB of float32 weights."""
    # Parameters: hidden * (features + 1 + classes) + classes.
    return max(1, round((size_mb * MB / 4 - CLASSES) / (FEATURES + 1 + CLASSES)))


def shapes_for(size_mb: float) -> list[list[int]]:
    """The synthetic model's layout (``Linear(f, h) -> ReLU -> Linear(h, c)``)."""
    h = hidden_for(size_mb)
    return [[h, FEATURES], [h], [CLASSES, h], [CLASSES]]


def floats_of(shapes: Sequence[Sequence[int]]) -> int:
    return sum(math.prod(s) for s in shapes)


# -- processes and memory -----------------------------------------------------------------


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text(encoding="utf-8").strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _hwm_bytes(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Peak RSS and CPU samples per started process tree (see the module docstring), on a
    daemon thread. A process's CPU counts while it is alive: one that ended before a sample
    drops out of the later ones (the benchmark's processes live through the rounds)."""

    def __init__(self) -> None:
        self._roots: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        #: name -> (Unix time, cumulative CPU seconds of the tree), in time order.
        self.cpu: dict[str, list[tuple[float, float]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self._roots[name] = pid
            self.peak.setdefault(name, 0)
            self.cpu.setdefault(name, [])

    def _sample(self, name: str, pid: int) -> None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total, cpu = 0, 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
                times = proc.cpu_times()
                cpu += times.user + times.system
        self.peak[name] = max(self.peak[name], total, _hwm_bytes(pid))
        self.cpu[name].append((time.time(), cpu))

    def _run(self) -> None:
        while not self._stop.wait(RSS_EVERY_S):
            with self._lock:
                roots = dict(self._roots)
            for name, pid in roots.items():
                self._sample(name, pid)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def mb(self, prefix: str) -> float | None:
        values = [v for k, v in self.peak.items() if k.startswith(prefix) and v]
        return max(values) / MiB if values else None

    def cpu_ms(self, ends: Sequence[float]) -> dict[str, float]:
        """ms of CPU per steady round: the server, the largest client, all processes
        (only the roles every tree of which has a figure)."""
        per = {name: cpu_per_round(samples, ends) for name, samples in self.cpu.items()}
        figures = {name: 1000 * value for name, value in per.items() if value is not None}
        clients = [v for k, v in figures.items() if k.startswith("client")]
        out: dict[str, float] = {}
        if "server" in figures:
            out["server"] = figures["server"]
        if clients:
            out["client"] = max(clients)
        if len(figures) == len(per):
            out["total"] = sum(figures.values())
        return out


def _env(home: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if home is not None:
        for var in XDG_VARS:
            path = home / var.lower()
            path.mkdir(parents=True, exist_ok=True)
            env[var] = str(path)
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> Child:
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Child(name, proc, log_path)


@contextlib.contextmanager
def _children() -> Iterator[list[Child]]:
    children: list[Child] = []
    try:
        yield children
    finally:
        stop_all(children, grace=5.0)


def _check_alive(children: Sequence[Child], what: str) -> None:
    for child in children:
        code = child.proc.poll()
        if code is not None:
            raise BenchError(
                f"{what}: {child.name} exited with status {code}: {child.tail(3).strip()}"
            )


def _deadline_check(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise BenchError(f"{what}: timed out")


# -- fedtray ---------------------------------------------------------------------------------


def _status(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{url}/api/status", timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read().decode("utf-8"))
            return data
    except (OSError, ValueError):
        return None


def run_fedtray(size_mb: float, rounds: int, work: Path, timeout: float) -> Trial:
    deadline = time.monotonic() + timeout
    params = {"features": FEATURES, "classes": CLASSES, "samples": SAMPLES}
    params["hidden"] = hidden_for(size_mb)
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--task", "synthetic"]
    for key, value in params.items():
        cmd += ["--task-param", f"{key}={value}"]
    cmd += ["--rounds", str(rounds), "--min-clients", str(CLIENTS)]
    cmd += ["--clients-per-round", str(CLIENTS), "--partition", "iid"]
    # The same workload as Flower's side (fraction_evaluate=0): no federated evaluation.
    cmd += ["--evaluate-every", "0"]
    cmd += ["--round-timeout", str(int(timeout)), "--state-dir", str(work / "server-state")]
    load_before = loadavg()
    with _children() as children, RssSampler() as rss:
        server = _start("server", cmd, work / "server.log", _env(work / "server-home"))
        children.append(server)
        rss.watch("server", server.proc.pid)
        url = None
        while url is None:
            _check_alive(children, "fedtray server start")
            _deadline_check(deadline, "fedtray server start")
            time.sleep(0.1)
            url = next((u for u in map(parse_listening, server.tail(50).splitlines()) if u), None)
        starts: list[float] = []
        for i in range(1, CLIENTS + 1):
            name = f"client-{i}"
            client_cmd = [sys.executable, "-m", "client", "--server", url, "--name", name]
            env = _env(work / name)
            # Other programs' load (other clients, other work on the machine) would make a
            # device step aside mid-round: this benchmark measures rounds, not politeness.
            conf = Path(env["XDG_CONFIG_HOME"]) / "fedtray"
            conf.mkdir(parents=True, exist_ok=True)
            (conf / "config.toml").write_text("step_aside_cpu_percent = 0\n")
            starts.append(time.time())
            child = _start(name, client_cmd, work / f"{name}.log", env)
            children.append(child)
            rss.watch(name, child.proc.pid)
        while True:
            status = _status(url)
            history = status.get("history", []) if status else []
            published = [
                r
                for r in history
                if r.get("outcome") == "completed" and (r.get("timing") or {}).get("publishedAt")
            ]
            if len(published) >= rounds:
                break
            _check_alive(children, "fedtray run")
            _deadline_check(deadline, f"fedtray run ({len(published)} of {rounds} rounds)")
            time.sleep(POLL_S)
        logs = [c.log_path.read_text(encoding="utf-8", errors="replace") for c in children[1:]]
        trial = fedtray_trial(history, logs, starts)
    trial.rss_server_mb, trial.rss_client_mb = rss.mb("server"), rss.mb("client")
    trial.cpu_ms = rss.cpu_ms(trial.ends)
    trial.load = f"{load_before} -> {loadavg()}"
    return trial


# -- Flower ----------------------------------------------------------------------------------


def default_flower_venv() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fedtray-bench" / "flwr-venv"


def _flower_version(python: Path) -> str | None:
    if not python.exists():
        return None
    proc = subprocess.run(
        [str(python), "-c", "import flwr; print(flwr.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_flower(venv: Path) -> Path:
    """The Python of a virtual environment with ``flwr==1.42.*``; made once, then reused."""
    python = venv / "bin" / "python"
    version = _flower_version(python)
    if version is None or not version.startswith(FLOWER_VERSION_PREFIX):
        print(f"installing {FLOWER_PIN} into {venv} (once; it is reused)", flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", FLOWER_PIN],
        ]
        for step in steps:
            proc = subprocess.run(
                step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
            )
            if proc.returncode != 0:
                raise BenchError(f"{' '.join(step)} failed: {proc.stderr.strip()[-500:]}")
        version = _flower_version(python)
        if version is None or not version.startswith(FLOWER_VERSION_PREFIX):
            raise BenchError(f"{venv} has flwr {version}, not {FLOWER_PIN}")
    return python


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def run_flower(python: Path, size_mb: float, rounds: int, work: Path, timeout: float) -> Trial:
    deadline = time.monotonic() + timeout
    port = _free_port()
    record = work / "flower-server.json"
    cmd = [str(python), str(FLOWER_SIDE), "server", "--port", str(port)]
    cmd += ["--rounds", str(rounds), "--clients", str(CLIENTS)]
    cmd += ["--shapes", json.dumps(shapes_for(size_mb)), "--out", str(record)]
    load_before = loadavg()
    with _children() as children, RssSampler() as rss:
        server = _start("server", cmd, work / "flower-server.log", _env(None))
        children.append(server)
        rss.watch("server", server.proc.pid)
        while not _listening(port):
            _check_alive(children, "Flower server start")
            _deadline_check(deadline, "Flower server start")
            time.sleep(0.1)
        starts: list[float] = []
        fit_files: list[Path] = []
        for i in range(1, CLIENTS + 1):
            fit_files.append(work / f"flower-client-{i}.jsonl")
            client_cmd = [str(python), str(FLOWER_SIDE), "client", "--port", str(port)]
            client_cmd += ["--out", str(fit_files[-1])]
            starts.append(time.time())
            child = _start(f"client-{i}", client_cmd, work / f"flower-client-{i}.log", _env(None))
            children.append(child)
            rss.watch(child.name, child.proc.pid)
        while server.proc.poll() is None:
            _check_alive(children[1:], "Flower run")
            _deadline_check(deadline, "Flower run")
            time.sleep(POLL_S)
        if server.proc.returncode != 0 or not record.exists():
            raise BenchError(f"the Flower server failed: {server.tail(5).strip()}")
        fits = [
            [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            if path.exists()
            else []
            for path in fit_files
        ]
        trial = flower_trial(json.loads(record.read_text(encoding="utf-8")), fits, starts)
    trial.rss_server_mb, trial.rss_client_mb = rss.mb("server"), rss.mb("client")
    trial.cpu_ms = rss.cpu_ms(trial.ends)
    trial.load = f"{load_before} -> {loadavg()}"
    return trial


# -- the run ---------------------------------------------------------------------------------


def _one_line(trial: Trial) -> str:
    def f(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    return (
        f"steady {f(trial.steady_s, '.3f')} s/round, first {trial.first_round_s:.3f} s, "
        f"register {f(trial.register_s, '.2f')} s, "
        f"first update {f(trial.first_update_s, '.2f')} s, loadavg {trial.load}"
    )


def _sizes(text: str) -> list[float]:
    try:
        sizes = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes takes MB values like 100,0.4; got {text!r}"
        ) from None
    if not sizes or any(not 0 < s <= 1000 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes must be in (0, 1000] MB; got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.vs_flower",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--sizes", type=_sizes, default=[100.0, 0.4], help="MB (default: 100,0.4)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per run (default: 5)")
    p.add_argument("--pairs", type=int, default=3, help="fedtray/Flower pairs (default: 3)")
    p.add_argument("--skip-flower", action="store_true", help="fedtray only (a fast smoke run)")
    p.add_argument(
        "--flower-venv", type=Path, default=None, help=f"default: {default_flower_venv()}"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run (default: 900)")
    p.add_argument("--json", type=Path, default=None, help="also write every trial here")
    p.add_argument("--keep", action="store_true", help="keep the runs' logs")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every child's process group is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.rounds < 2 or args.pairs < 1 or args.timeout <= 0:
        parser.error("--rounds must be at least 2, --pairs at least 1, --timeout positive")
    print(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; loadavg {loadavg()}", flush=True
    )
    try:
        python = (
            None if args.skip_flower else ensure_flower(args.flower_venv or default_flower_venv())
        )
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"error: Flower is not available: {exc}", file=sys.stderr)
        return 1
    for package in ("client", "server"):
        compileall.compile_dir(ROOT / package, quiet=1)
    trials: dict[str, dict[str, list[Trial]]] = {}
    work = Path(tempfile.mkdtemp(prefix="fedtray-vs-flower-"))
    keep = args.keep
    try:
        for pair in range(args.pairs):
            for size in args.sizes:
                label = size_label(size)
                runs = trials.setdefault(label, {"fedtray": [], "Flower": []})
                order = ["fedtray", "Flower"] if pair % 2 == 0 else ["Flower", "fedtray"]
                for system in order:
                    if system == "Flower" and python is None:
                        continue
                    run_dir = work / f"{label}-{pair + 1}-{system}"
                    run_dir.mkdir()
                    if system == "fedtray":
                        trial = run_fedtray(size, args.rounds, run_dir, args.timeout)
                    else:
                        assert python is not None
                        trial = run_flower(python, size, args.rounds, run_dir, args.timeout)
                    runs[system].append(trial)
                    print(f"pair {pair + 1} {label} {system:<8} {_one_line(trial)}", flush=True)
    except BenchError as exc:
        print(f"error: {exc} (logs kept in {work})", file=sys.stderr)
        keep = True
        return 1
    finally:
        if keep:
            print(f"logs kept in {work}", flush=True)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    print()
    for size in args.sizes:
        label = size_label(size)
        floats = floats_of(shapes_for(size))
        print(
            "\n".join(
                summary_lines(label, floats, trials[label]["fedtray"], trials[label]["Flower"])
            )
        )
        print()
    print(f"loadavg at the end {loadavg()}")
    if args.json is not None:
        payload = {
            label: {s: [asdict(t) for t in ts] for s, ts in v.items()}
            for label, v in trials.items()
        }
        args.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
