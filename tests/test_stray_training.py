"""A device heard training a round that is not open is told to stop (server.starter.StrayTraining).

A device disconnected when its round closed never got that round's ``training:cancel``;
back, it trains on for nothing and refuses every offer as busy until it is done
(test_faults' random cuts saw a server retry a round for minutes). Its heartbeat names
the round it is on, so the server tells it to stop: once per connection and round, never
for the round that is open.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.server_harness import ScriptedDevice, run_devices, running_server


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "xdg" / var.lower()))


def _cancelled(device: ScriptedDevice) -> list[str]:
    return [str(c["roundId"]) for c in device.cancels]


def test_a_device_on_a_closed_round_is_told_to_stop_once_per_connection(
    tmp_path: Path,
) -> None:
    # Two devices needed: with one, no round ever opens here.
    with running_server(tmp_path, min_clients=2, clients_per_round=2) as srv:
        a = ScriptedDevice(srv.url, name="a")

        async def scenario() -> None:
            await a.join()
            await a.heartbeat("training", roundId="r-gone")
            await a.until(lambda: _cancelled(a) == ["r-gone"], 10, "told to stop r-gone")
            assert a.cancels[0]["reason"] == "the round is closed"
            # The same round again on the same connection: nothing more. A later stray
            # is told, in order, so a second r-gone would show before it.
            await a.heartbeat("training", roundId="r-gone")
            await a.heartbeat("paused", roundId="r-other", pauseReason="user_paused")
            await a.until(lambda: len(a.cancels) >= 2, 10, "told to stop r-other")
            await a.heartbeat("idle")  # on no round: nothing
            assert _cancelled(a) == ["r-gone", "r-other"]
            # A new connection is told again (the old one may have lost it).
            await a.disconnect()
            a.cancels.clear()
            await a.join()
            await a.heartbeat("training", roundId="r-gone")
            await a.until(lambda: _cancelled(a) == ["r-gone"], 10, "told again")

        run_devices(scenario())


def test_a_device_on_the_open_round_is_not_told_to_stop(tmp_path: Path) -> None:
    with running_server(tmp_path, min_clients=2, clients_per_round=2) as srv:
        a, b = ScriptedDevice(srv.url, name="a"), ScriptedDevice(srv.url, name="b")

        async def scenario() -> None:
            await asyncio.gather(a.join(), b.join())
            await a.until(lambda: bool(a.starts), 20, "the round started")
            open_round = str(a.starts[0]["roundId"])
            await a.heartbeat("training", roundId=open_round)
            await a.heartbeat("training", roundId="r-gone")  # told, after the first
            await a.until(lambda: bool(a.cancels), 10, "told to stop r-gone")
            assert _cancelled(a) == ["r-gone"]

        run_devices(scenario())
