"""What a federated round costs on bare python-socketio: the floor under fedtray's round.

Run ``python -m benchmarks.socketio_floor`` (defaults: 100,000 float32 = 0.4 MB, 3 clients,
100 rounds). One server process (python-socketio's ``AsyncServer`` on aiohttp, uvloop) and
``--clients`` client processes (``AsyncClient``, websocket), all on loopback. Each round the
server calls ``train`` on every client with the weights as one binary attachment; each
client adds a constant with numpy, acks, and emits ``submit`` with its weights; once every
client has submitted, the server averages them with numpy and the round ends. It prints the
median and 10th percentile s/round over rounds 2.. and the loadavg.

Why: ``benchmarks.vs_flower`` compares fedtray's round with Flower's; this shows how much of
either is the transport itself: no files, no fsyncs, no validation, no worker process, no
logging -- only what any Socket.IO round has to do. Nothing is written; the clients are
killed at the end; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import socketio
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.serving import loop_factory

#: Longest wait for the clients to connect, and for any one round (seconds).
JOIN_TIMEOUT_S = 120.0
ROUND_TIMEOUT_S = 120.0


def _client_main(port: int) -> None:
    async def run() -> None:
        sio = socketio.AsyncClient()

        @sio.on("train")  # type: ignore[misc]
        async def train(data: bytes) -> dict[str, bool]:
            trained = np.frombuffer(data, dtype=np.float32) + np.float32(0.001)
            asyncio.get_running_loop().create_task(sio.emit("submit", trained.tobytes()))
            return {"ok": True}

        await sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"])
        await sio.wait()

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(run())


async def rounds(params: int, clients: int, count: int) -> list[float]:
    """Seconds of each of ``count`` rounds with ``clients`` clients and ``params`` floats."""
    sio = socketio.AsyncServer(async_mode="aiohttp", max_http_buffer_size=1 << 30)
    app = web.Application()
    sio.attach(app)
    sids: list[str] = []
    got: list[np.ndarray[Any, Any]] = []
    changed = asyncio.Event()

    @sio.on("connect")  # type: ignore[misc]
    async def connect(sid: str, environ: dict[str, Any]) -> None:
        sids.append(sid)
        changed.set()

    @sio.on("submit")  # type: ignore[misc]
    async def submit(sid: str, data: bytes) -> None:
        got.append(np.frombuffer(data, dtype=np.float32))
        changed.set()

    async def until(predicate: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                changed.clear()
                await changed.wait()

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_client_main, args=(port,), daemon=True) for _ in range(clients)]
    for proc in procs:
        proc.start()
    try:
        await until(lambda: len(sids) >= clients, JOIN_TIMEOUT_S)
        weights = np.zeros(params, np.float32)
        times: list[float] = []
        for _ in range(count):
            started = time.perf_counter()
            got.clear()
            data = weights.tobytes()
            await asyncio.gather(*(sio.call("train", data, to=sid) for sid in sids))
            await until(lambda: len(got) >= clients, ROUND_TIMEOUT_S)
            weights = np.mean(got, axis=0, dtype=np.float32)
            times.append(time.perf_counter() - started)
        return times
    finally:
        for proc in procs:
            proc.kill()
            proc.join(5)
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--params", type=int, default=100_000, help="float32 weights (0.4 MB)")
    p.add_argument("--clients", type=int, default=3, help="client processes")
    p.add_argument("--rounds", type=int, default=100, help="rounds (the first is not counted)")
    args = p.parse_args(argv)
    if args.rounds < 2 or args.clients < 1 or args.params < 1:
        p.error("needs --rounds >= 2, --clients >= 1, --params >= 1")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        times = sorted(runner.run(rounds(args.params, args.clients, args.rounds))[1:])
    mb = args.params * 4 / 1e6
    print(
        f"bare python-socketio round, {args.clients} clients, {mb:.1f} MB each way: "
        f"median {statistics.median(times):.4f} s/round, "
        f"p10 {times[len(times) // 10]:.4f} s over {len(times)} rounds; "
        f"loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
