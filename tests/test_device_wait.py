"""The wait before a round (server/device_wait.py) on a real server: heartbeats never wake
it, the waiting reason still follows every change, and crossing ``--min-clients`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server_harness import ScriptedDevice, ServerHandle, run_devices, running_server


def reason(status: dict[str, Any]) -> str:
    return str((status["currentRound"] or {}).get("waitingReason") or "")


def test_heartbeats_do_not_wake_the_waiting_coordinator(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        waiting = srv.server.coordinator.waiting
        a, b = ScriptedDevice(srv.url, name="a"), ScriptedDevice(srv.url, name="b")
        for dev in (a, b):
            assert (await dev.join())["ok"] is True
        await srv.await_status(lambda s: reason(s) == "2 of 3 eligible devices", what="2 of 3")
        wakes = waiting.wakes
        for _ in range(20):
            assert await a.heartbeat() == {"ok": True}
            assert await b.heartbeat() == {"ok": True}
        assert waiting.wakes == wakes
        # A pause changes the reason (and the log line) without a pass of the loop.
        assert await a.heartbeat("paused", pauseReason="battery_low") == {"ok": True}
        await srv.await_status(
            lambda s: reason(s) == "1 of 3 eligible devices (1 paused: battery_low)",
            what="the pause in the waiting reason",
        )
        assert await a.heartbeat() == {"ok": True}
        await srv.await_status(lambda s: reason(s) == "2 of 3 eligible devices", what="back")
        assert waiting.wakes == wakes
        # The third device crosses min_clients: one wake, and the round starts.
        c = ScriptedDevice(srv.url, name="c")
        assert (await c.join())["ok"] is True
        await srv.await_status(
            lambda s: (s["currentRound"] or {}).get("phase") in ("starting", "training"),
            what="the round started",
        )
        assert waiting.wakes == wakes + 1

    # A long heartbeat interval: no device can turn stale (no timer wake) during the test.
    with running_server(
        tmp_path, min_clients=3, clients_per_round=3, heartbeat_interval=30.0
    ) as srv:
        run_devices(scenario(srv))
