"""The server keeps to each device's advertised transfer limits when it sends the global
(real server on loopback, scripted devices advertising small limits)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

from tests.waiting import wait_until_async

pytestmark = pytest.mark.timeout(60)

# Rounds need 5 devices: only the global sent after registration travels here.
QUIET = {"min_clients": 5, "clients_per_round": 5}


def test_the_global_goes_in_the_devices_chunks_and_window(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        dev = ScriptedDevice(
            srv.url, name="small", max_chunk_bytes=64, max_inflight_chunks=2, hold_chunk_acks=True
        )
        await dev.join()
        await dev.until(lambda: 0 in dev.weights, 20, "version 0 in small chunks")
        assert dev.globals_meta[0]["inline"] is False
        # Chunks of the device's maxChunkBytes (the server's own is 512 KiB), none repeated.
        *full, last = dev.chunk_sizes
        assert len(full) > 2 and set(full) == {64} and 0 < last <= 64
        # The server's own window is 4; towards this device it keeps to 2, and fills it.
        assert dev.most_chunks_unacked == 2
        status = await srv.await_status(
            lambda s: s["devices"] and s["devices"][0]["weightsVersion"] == 0
        )
        assert status["devices"][0]["name"] == "small"

    with running_server(tmp_path, **QUIET) as srv:
        assert srv.config.limits.max_inflight_chunks == 4
        run_devices(scenario(srv))


def test_a_global_over_the_devices_max_blob_bytes_is_not_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def skipped() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "server.distribution" and "not sending version 0 to tiny" in r.getMessage()
        ]

    async def scenario(srv: ServerHandle) -> None:
        tiny = ScriptedDevice(srv.url, name="tiny", max_blob_bytes=100)
        assert (await tiny.join())["ok"] is True
        await wait_until_async(lambda: bool(skipped()), 20, "the server says it skips tiny")
        [line] = skipped()
        assert "over the 100 bytes the device takes (its maxBlobBytes)" in line
        # Nothing was sent, and the server serves a device with room as usual.
        roomy = ScriptedDevice(srv.url, name="roomy", max_blob_bytes=1 << 20)
        await roomy.join()
        await roomy.until(lambda: 0 in roomy.weights, 20, "version 0")
        assert tiny.chunk_sizes == [] and tiny.weights == {}
        status = srv.status()
        held = {d["name"]: d["weightsVersion"] for d in status["devices"]}
        assert held == {"tiny": None, "roomy": 0}
        assert tiny.sio.connected

    caplog.set_level(logging.INFO, logger="server")
    with running_server(tmp_path, **QUIET) as srv:
        run_devices(scenario(srv))
