"""Flood protection against a real server: a rogue connection cannot stop the others.

Two well-behaved scripted devices (heartbeating, answering every ``training:start`` with
a submission) run rounds on a real server while a raw python-socketio client floods it
with events (bounded: 20 000 events or 60 s in all). The rogue gets ``rate_limited``
answers, is disconnected by the server (again after every reconnect), the devices keep
completing rounds meanwhile, and the server's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import socketio

from client.protocol import EV_HEARTBEAT
from tests.server_harness import ScriptedDevice, ServerHandle, run_devices, running_server
from tests.waiting import scaled

pytestmark = pytest.mark.slow

MAX_EVENTS = 20_000
MAX_SECONDS = 60.0


async def _serve_rounds(dev: ScriptedDevice) -> None:
    """Answer every training:start with the global weights it is based on."""
    answered = 0
    while True:
        await dev.until(lambda n=answered: len(dev.starts) > n, timeout=120, what="a round")
        start = dev.starts[answered]
        answered += 1
        base = int(start["baseVersion"])
        await dev.until(lambda v=base: v in dev.weights, what=f"global version {base}")
        with contextlib.suppress(Exception):  # a round closed meanwhile is not our concern
            await dev.submit(start["roundId"], base, dev.weights[base], num_samples=10)


def _completed(server: ServerHandle) -> int:
    return int(server.server.rounds_completed)


async def _flood(url: str, keep_going: Any) -> tuple[int, Counter[str], list[Any]]:
    """Flood until ``keep_going()`` is false or the bounds are hit; reconnect when dropped."""
    sent = 0
    acks: Counter[str] = Counter()
    drops: list[Any] = []
    started = time.monotonic()

    def on_ack(*ack: Any) -> None:
        body = ack[0] if ack else None
        acks[body.get("code", "ok") if isinstance(body, dict) else "other"] += 1

    while keep_going() and sent < MAX_EVENTS and time.monotonic() - started < MAX_SECONDS:
        rogue = socketio.AsyncClient(reconnection=False)
        gone = asyncio.Event()

        async def on_disconnect(*reason: Any, gone: asyncio.Event = gone) -> None:
            drops.append(reason)
            gone.set()

        rogue.on("disconnect", on_disconnect)
        await rogue.connect(url, transports=["websocket"], wait_timeout=round(scaled(10)))
        try:
            while not gone.is_set() and sent < MAX_EVENTS:
                event = EV_HEARTBEAT if sent % 2 else "flood:junk"
                try:
                    await rogue.emit(event, {"n": sent, "pad": "x" * 200}, callback=on_ack)
                except socketio.exceptions.SocketIOError:
                    break  # dropped by the server
                sent += 1
                if sent % 20 == 0:
                    # About 10-20k events/s: fast enough to be a flood, slow enough that
                    # the rogue notices being dropped and comes back for more.
                    await asyncio.sleep(0.001)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), scaled(10))
        finally:
            await rogue.disconnect()
    return sent, acks, drops


def test_rogue_flood_is_limited_and_dropped_while_others_train(tmp_path: Path) -> None:
    proc = psutil.Process()
    with running_server(tmp_path, min_clients=2, clients_per_round=2) as server:
        devices = [ScriptedDevice(server.url, name=f"good{i}") for i in range(2)]

        async def scenario() -> tuple[int, int, int, Counter[str], list[Any], dict[str, Any]]:
            for dev in devices:
                await dev.join()
            work = [asyncio.create_task(_serve_rounds(d)) for d in devices]
            work += [asyncio.create_task(d.heartbeat_forever(period=0.2)) for d in devices]
            try:
                # Warm up: rounds run before the flood starts.
                await server.await_status(
                    lambda st: len(st["history"]) >= 1, timeout=60, what="a first round"
                )
                rss_before = proc.memory_info().rss
                before = _completed(server)
                sent, acks, drops = await _flood(
                    server.url, lambda: _completed(server) < before + 2
                )
                during = _completed(server) - before
                rss_growth = proc.memory_info().rss - rss_before
                status = await asyncio.to_thread(server.status)
                return during, rss_growth, sent, acks, drops, status
            finally:
                for task in work:
                    task.cancel()
                await asyncio.gather(*work, return_exceptions=True)

        during, rss_growth, sent, acks, drops, status = run_devices(scenario())
        print(f"flood: {sent} events, answers {dict(acks)}, {len(drops)} drops, {during} rounds")
        assert acks["rate_limited"] > 0, f"no rate_limited answer to {sent} events: {acks}"
        assert drops, "the server never disconnected the flooding client"
        # Dropped connections stop being answered: far fewer answers than events sent.
        assert sum(acks.values()) < sent
        assert during >= 2, f"only {during} rounds completed during the flood"
        assert rss_growth < 100 * 1024 * 1024, f"server RSS grew by {rss_growth / 1e6:.0f} MB"
        # The good devices are still there, and every round in the history completed.
        assert {d["name"] for d in status["devices"] if d["connected"]} == {"good0", "good1"}
        assert all(r["outcome"] == "completed" for r in status["history"])
