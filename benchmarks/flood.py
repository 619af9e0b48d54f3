"""Flood protection: rounds/s of well-behaved devices with and without a flooding client.

Run ``python -m benchmarks.flood`` (``--seconds`` per phase, default 15;
``--upload-mb``, default 128; ``--help``). Everything stays on loopback, in temporary
directories (XDG dirs included), and stops by itself.

Setup: ``python -m server`` (``synthetic`` task, ``--min-clients 2 --clients-per-round 2``)
and two scripted devices in this process (:class:`tests.server_harness.ScriptedDevice`:
heartbeats every 0.2 s, every ``training:start`` answered at once with a submission of
the global weights it is based on, so a round costs the server its real work: sending
weights, decoding and checking two updates, FedAvg, evaluation, saving). In the same run:

1. baseline: rounds completed per second over ``--seconds``;
2. flood: the same, while a raw python-socketio client in a child process floods the
   server as fast as it can (unknown events and unregistered heartbeats, reconnecting
   every time it is dropped); reported with the events it sent, the answers it got by
   code and how often the server disconnected it;
3. legitimate bulk: one device uploads ``--upload-mb`` MB with
   :func:`client.transfer.send_blob` at the server's announced limits (1 MiB chunks,
   window 4) and must never be answered ``rate_limited``; MB/s is reported.

The server's RSS (MB = 2**20 bytes) is sampled with psutil at the start and the end of
each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import socketio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.protocol import EV_HEARTBEAT
from client.transfer import send_blob
from client.weights import sha256_hex
from tests.server_harness import ProcessHandle, ScriptedDevice, server_process

MB = 2**20


def _rss_mb(server: ProcessHandle) -> float:
    return float(psutil.Process(server.proc.pid).memory_info().rss) / MB


async def _serve_rounds(dev: ScriptedDevice) -> None:
    answered = 0
    while True:
        await dev.until(lambda n=answered: len(dev.starts) > n, timeout=600, what="a round")
        start = dev.starts[answered]
        answered += 1
        base = int(start["baseVersion"])
        await dev.until(lambda v=base: v in dev.weights, timeout=60, what=f"version {base}")
        with contextlib.suppress(Exception):
            await dev.submit(start["roundId"], base, dev.weights[base], num_samples=10)


async def _completed(server: ProcessHandle) -> int:
    status = await asyncio.to_thread(server.status)
    return sum(1 for r in status["history"] if r["outcome"] == "completed")


async def _flood(url: str, stop: asyncio.Event) -> tuple[int, Counter[str], int]:
    sent, drops = 0, 0
    acks: Counter[str] = Counter()

    def on_ack(*ack: Any) -> None:
        body = ack[0] if ack else None
        acks[body.get("code", "ok") if isinstance(body, dict) else "other"] += 1

    while not stop.is_set():
        rogue = socketio.AsyncClient(reconnection=False)
        gone = asyncio.Event()

        async def on_disconnect(*_: Any, gone: asyncio.Event = gone) -> None:
            gone.set()

        rogue.on("disconnect", on_disconnect)
        try:
            await rogue.connect(url, transports=["websocket"], wait_timeout=10)
        except socketio.exceptions.ConnectionError:
            await asyncio.sleep(0.05)
            continue
        while not gone.is_set() and not stop.is_set():
            try:
                event = EV_HEARTBEAT if sent % 2 else "flood:junk"
                await rogue.emit(event, {"n": sent, "pad": "x" * 200}, callback=on_ack)
            except socketio.exceptions.SocketIOError:
                break
            sent += 1
            if sent % 20 == 0:
                await asyncio.sleep(0.001)
        if gone.is_set():
            drops += 1
        with contextlib.suppress(Exception):
            await rogue.disconnect()
    return sent, acks, drops


def _flood_process(url: str, seconds: float, out: Any) -> None:
    """The flooder in its own process, so it does not share the devices' event loop."""

    async def run() -> tuple[int, Counter[str], int]:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        return await _flood(url, stop)

    sent, acks, drops = asyncio.run(run())
    out.put((sent, dict(acks), drops))


async def _phase(server: ProcessHandle, seconds: float) -> tuple[float, float, float]:
    """Rounds per second over ``seconds``, and the server's RSS before and after."""
    rss0, done0, t0 = _rss_mb(server), await _completed(server), time.monotonic()
    await asyncio.sleep(seconds)
    done1, t1 = await _completed(server), time.monotonic()
    return (done1 - done0) / (t1 - t0), rss0, _rss_mb(server)


async def _upload(url: str, megabytes: int) -> tuple[float, Counter[str]]:
    dev = ScriptedDevice(url, name="bulk")
    await dev.join()
    data = os.urandom(megabytes * MB)
    answers: Counter[str] = Counter()

    async def call(event: str, payload: dict[str, Any]) -> Any:
        ack = await dev.call(event, payload, timeout=60)
        answers[ack.get("code", "ok") if isinstance(ack, dict) else "other"] += 1
        return ack

    t0 = time.perf_counter()
    await send_blob(
        call, data, blob_id="bench-upload", chunk_bytes=MB, window=4, sha256=sha256_hex(data)
    )
    seconds = time.perf_counter() - t0
    await dev.disconnect()
    return megabytes / seconds, answers


async def _run(server: ProcessHandle, seconds: float, upload_mb: int) -> None:
    devices = [ScriptedDevice(server.url, name=f"good{i}") for i in range(2)]
    for dev in devices:
        await dev.join()
    work = [asyncio.create_task(_serve_rounds(d)) for d in devices]
    work += [asyncio.create_task(d.heartbeat_forever(period=0.2)) for d in devices]
    try:
        while await _completed(server) < 1:  # warm up: the first round loads everything
            await asyncio.sleep(0.1)
        base_rate, b_rss0, b_rss1 = await _phase(server, seconds)
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        flooder = ctx.Process(target=_flood_process, args=(server.url, seconds + 2, results))
        flooder.start()
        await asyncio.sleep(1.0)  # the child's start-up (imports) is not part of the phase
        flood_rate, f_rss0, f_rss1 = await _phase(server, seconds)
        sent, acks, drops = await asyncio.to_thread(results.get, True, 60)
        await asyncio.to_thread(flooder.join, 30)
    finally:
        for task in work:
            task.cancel()
        await asyncio.gather(*work, return_exceptions=True)
        for dev in devices:
            with contextlib.suppress(Exception):
                await dev.disconnect()
    up_rate, up_answers = await _upload(server.url, upload_mb)
    ratio = flood_rate / base_rate if base_rate else float("nan")
    print("| phase    | rounds/s | server RSS MB (start -> end) |")
    print("|----------|---------:|------------------------------|")
    print(f"| baseline | {base_rate:8.2f} | {b_rss0:.0f} -> {b_rss1:.0f} |")
    print(f"| flood    | {flood_rate:8.2f} | {f_rss0:.0f} -> {f_rss1:.0f} |")
    print(f"ratio flood / baseline: {ratio:.2f}")
    print(
        f"flood: {sent} events sent ({sent / seconds:.0f}/s), answers {dict(acks)}, "
        f"dropped by the server {drops} times"
    )
    print(
        f"bulk upload: {upload_mb} MB at {up_rate:.0f} MB/s (1 MiB chunks, window 4), "
        f"answers {dict(up_answers)}; rate_limited: {up_answers['rate_limited']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.flood", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--upload-mb", type=int, default=128, help="size of the bulk upload")
    args = parser.parse_args(argv)
    flags = ("--min-clients", "2", "--clients-per-round", "2", "--log-level", "WARNING")
    with (
        tempfile.TemporaryDirectory(prefix="fedtray-flood-") as tmp,
        server_process(Path(tmp), *flags) as server,
    ):
        asyncio.run(_run(server, args.seconds, args.upload_mb))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
