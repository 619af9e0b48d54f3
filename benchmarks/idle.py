"""Memory and CPU of a connected, idle headless client, against a bare sleeping Python.

Run ``python -m benchmarks.idle`` (``--seconds``, default 60; ``--help``). Everything stays
on loopback, in temporary directories (XDG dirs included), and stops by itself.

It starts the reference server (``python -m server``, small ``synthetic`` task, real
10 s heartbeat interval, ``--min-clients 2`` so no round starts) and then, side by side,
``python -m client --server URL`` and ``python -c "import time; time.sleep(...)"`` as
subprocesses. Once the client is registered and holds the global weights (the server's
status says so), both are sampled with psutil once a second for ``--seconds``: RSS (peak
and mean, MB = 2**20 bytes) and CPU time over the window as a percentage of one core.
Whether the client loaded torch is read from ``/proc/PID/maps`` (any mapped ``libtorch``
library) at the end. Targets: client RSS <= 80 MB, CPU <= 0.5 % of one core, no torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server_harness import server_process, subprocess_env

RSS_TARGET_MB = 80.0
CPU_TARGET_PERCENT = 0.5
READY_TIMEOUT_S = 120.0
MiB = 2**20


def torch_mapped(pid: int) -> bool:
    """Whether the process maps a libtorch shared library (Linux ``/proc``)."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
        return any("libtorch" in line for line in fh)


def _wait_ready(server: Any, client: subprocess.Popen[bytes]) -> None:
    """Until the server sees one connected device holding its global weights."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if client.poll() is not None:
            raise RuntimeError(f"the client exited early with status {client.returncode}")
        status = server.status()
        if any(
            d["connected"] and d["weightsVersion"] == status["globalVersion"]
            for d in status["devices"]
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the client did not become ready; last status: {status}")
        time.sleep(0.2)


def _sample(procs: dict[str, psutil.Process], seconds: float) -> dict[str, dict[str, float]]:
    rss: dict[str, list[int]] = {name: [] for name in procs}
    cpu0 = {name: p.cpu_times() for name, p in procs.items()}
    t0 = time.monotonic()
    next_at = t0
    while True:
        for name, p in procs.items():
            rss[name].append(p.memory_info().rss)
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        next_at += 1.0
        time.sleep(max(0.0, min(next_at, t0 + seconds) - now))
    wall = time.monotonic() - t0
    out: dict[str, dict[str, float]] = {}
    for name, p in procs.items():
        c1 = p.cpu_times()
        cpu = (c1.user + c1.system) - (cpu0[name].user + cpu0[name].system)
        out[name] = {
            "rss_peak": max(rss[name]) / MiB,
            "rss_mean": statistics.fmean(rss[name]) / MiB,
            "cpu_percent": 100 * cpu / wall,
            "samples": len(rss[name]),
            "wall": wall,
        }
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedtray-bench-") as tmp:
        root = Path(tmp)
        args = ("--heartbeat-interval", "10", "--min-clients", "2", "--log-level", "WARNING")
        with server_process(root / "server", *args) as server:
            env = subprocess_env(root / "client")
            client = subprocess.Popen(
                [sys.executable, "-m", "client", "--server", server.url, "--log-level", "WARNING"],
                cwd=Path(__file__).resolve().parent.parent,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            sleeper = subprocess.Popen(
                [sys.executable, "-c", f"import time; time.sleep({seconds + 600})"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                _wait_ready(server, client)
                procs = {"client": psutil.Process(client.pid), "bare": psutil.Process(sleeper.pid)}
                result: dict[str, Any] = _sample(procs, seconds)
                result["torch"] = torch_mapped(client.pid)
                result["client_alive"] = client.poll() is None
            finally:
                _stop(client)
                _stop(sleeper)
    return result


def report(r: dict[str, Any], seconds: float) -> str:
    c, b = r["client"], r["bare"]
    lines = [
        f"idle client over {c['wall']:.0f} s ({c['samples']} samples, 1/s), "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "",
        f"{'process':<34}{'RSS peak MB':>12}{'RSS mean MB':>12}{'CPU % core':>12}",
        f"{'python -m client (connected)':<34}"
        f"{c['rss_peak']:>12.1f}{c['rss_mean']:>12.1f}{c['cpu_percent']:>12.3f}",
        f"{'bare python sleeping':<34}"
        f"{b['rss_peak']:>12.1f}{b['rss_mean']:>12.1f}{b['cpu_percent']:>12.3f}",
        "",
        f"torch loaded in the client: {'YES' if r['torch'] else 'no'}",
        f"client still running at the end: {'yes' if r['client_alive'] else 'NO'}",
        "",
        f"ratio client / bare RSS (peak) {c['rss_peak'] / b['rss_peak']:>8.2f}x",
        _verdict("client RSS peak", c["rss_peak"], RSS_TARGET_MB, "MB"),
        _verdict("client CPU", c["cpu_percent"], CPU_TARGET_PERCENT, "% of one core"),
    ]
    return "\n".join(lines)


def _verdict(label: str, value: float, target: float, unit: str) -> str:
    status = "meets" if value <= target else "MISSES"
    return f"{label:<18}{value:>10.2f}   {status} target <= {target:g} {unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="sampling window (s)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    r = run(args.seconds)
    print(report(r, args.seconds), flush=True)
    return 0 if r["client_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
