"""Server scale benchmark: many connected devices, and FedAvg memory against model size.

Part 1 starts ``python -m server`` (synthetic task, rounds never start because
``--min-clients`` is above N) and holds N raw python-socketio clients in this process,
all registered and heartbeating; it reports devices held, heartbeat round-trip p50/p99
and the server's RSS. Part 2 aggregates K updates of a 1M-parameter model through
:class:`server.aggregation.FedAvg` and reports seconds and the peak memory it allocates
(tracemalloc) as a multiple of the model size. Everything stays on loopback, in
temporary directories, and stops by itself.

    .venv/bin/python benchmarks/server_scale.py                 # N = 500, 1000, 2000
    .venv/bin/python benchmarks/server_scale.py --sizes 50,100 --updates 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import socketio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.aggregation import FedAvg  # noqa: E402
from tests.server_harness import register_payload, resources  # noqa: E402

LISTENING = re.compile(r"listening on (http://\S+)")


async def _hold(url: str, n: int, beats: int) -> dict[str, Any]:
    clients: list[socketio.AsyncClient] = []
    gate = asyncio.Semaphore(64)

    async def join(i: int) -> socketio.AsyncClient | None:
        sio = socketio.AsyncClient(reconnection=False)
        async with gate:
            try:
                await sio.connect(url, transports=["websocket"], wait_timeout=30)
                ack = await sio.call(
                    "device:register",
                    register_payload(str(uuid.uuid4()), f"sim-{i}", weights_version=0),
                    timeout=30,
                )
            except Exception as exc:
                print(f"  device {i} failed to join: {type(exc).__name__}: {exc}")
                return None
        return sio if isinstance(ack, dict) and ack.get("ok") else None

    t0 = time.monotonic()
    joined = await asyncio.gather(*(join(i) for i in range(n)))
    clients = [c for c in joined if c is not None]
    join_s = time.monotonic() - t0
    rtts: list[float] = []

    async def beat(sio: socketio.AsyncClient) -> None:
        start = time.perf_counter()
        ack = await sio.call(
            "device:heartbeat", {"state": "idle", "resources": resources()}, timeout=30
        )
        if isinstance(ack, dict) and ack.get("ok"):
            rtts.append(time.perf_counter() - start)

    for _ in range(beats):
        # Each wave is every device heartbeating at once: the worst case of a fleet.
        await asyncio.gather(*(beat(c) for c in clients), return_exceptions=True)
    held = sum(1 for c in clients if c.connected)
    await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)
    rtts.sort()
    return {
        "held": held,
        "join_s": join_s,
        "p50_ms": 1000 * statistics.median(rtts) if rtts else float("nan"),
        "p99_ms": 1000 * rtts[int(0.99 * (len(rtts) - 1))] if rtts else float("nan"),
    }


def bench_devices(n: int, beats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
            env[var] = str(Path(tmp) / var.lower())
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--port",
                "0",
                "--task",
                "synthetic",
                "--min-clients",
                str(n + 1),
                "--clients-per-round",
                str(n + 1),
                "--state-dir",
                str(Path(tmp) / "state"),
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout is not None
            url = None
            for line in proc.stdout:
                match = LISTENING.search(line)
                if match:
                    url = match.group(1)
                    break
            if url is None:
                raise RuntimeError("server did not start")
            server = psutil.Process(proc.pid)
            rss_idle = server.memory_info().rss
            result = asyncio.run(_hold(url, n, beats))
            result["rss_idle_mb"] = rss_idle / 2**20
            result["rss_mb"] = server.memory_info().rss / 2**20
            return result
        finally:
            proc.terminate()
            proc.wait(30)


def bench_fedavg(k: int, params: int = 1_000_000) -> dict[str, Any]:
    side = int(params**0.5)
    rng = np.random.default_rng(0)
    global_state = {"w": np.zeros((side, side), np.float32), "b": np.zeros(side, np.float32)}
    model_bytes = sum(a.nbytes for a in global_state.values())
    updates = [
        {name: rng.standard_normal(a.shape).astype(np.float32) for name, a in global_state.items()}
        for _ in range(2)
    ]
    agg = FedAvg()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    agg.begin(global_state)
    for i in range(k):
        agg.add(updates[i % 2], 1 + i)
    out = agg.result()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del out
    return {
        "k": k,
        "seconds": seconds,
        "peak_mb": peak / 2**20,
        "model_mb": model_bytes / 2**20,
        "peak_x_model": peak / model_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="500,1000,2000", help="device counts, comma-separated")
    p.add_argument("--updates", default="10,50,100", help="FedAvg update counts")
    p.add_argument("--beats", type=int, default=5, help="heartbeat waves per size")
    args = p.parse_args(argv)
    print("## devices held (one client process, loopback, websocket)")
    print("| N | held | join s | heartbeat p50 ms | p99 ms | server RSS idle MB | RSS held MB |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",") if x):
        r = bench_devices(n, args.beats)
        print(
            f"| {n} | {r['held']} | {r['join_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['rss_idle_mb']:.0f} | {r['rss_mb']:.0f} |",
            flush=True,
        )
    print("\n## FedAvg, 1M-parameter float32 model")
    print("| K updates | seconds | peak alloc MB | model MB | peak / model |")
    print("|---|---|---|---|---|")
    for k in (int(x) for x in args.updates.split(",") if x):
        r = bench_fedavg(k)
        print(
            f"| {k} | {r['seconds']:.2f} | {r['peak_mb']:.1f} | {r['model_mb']:.1f} | "
            f"{r['peak_x_model']:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
