"""A fresh ``python -m client`` registers before its GPU probe ends; the GPU follows.

Real parts: the reference server in-process (tests/server_harness.py), the client as a
real subprocess, its probe a real subprocess started through ``FEDTRAY_GPU_PROBE_COMMAND``
(the test knob of :mod:`client.device`): a probe that says it started, then waits for a
gate file the test creates only after it has seen the device registered. So the device
provably registered while its probe was still running; after the gate opens, the GPU
appears in the server's ``/api/status`` through the heartbeat's registration update.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from client.device import GPU_CACHE_FILENAME, GPU_PROBE_COMMAND_ENV
from tests.server_harness import client_process, running_server, subprocess_env
from tests.waiting import poll

GPU = {"kind": "cuda", "name": "Gate GPU 9000", "memoryMb": 1234}


def _probe_script(started: Path, gate: Path) -> str:
    return (
        "import json, pathlib, time\n"
        f"pathlib.Path({str(started)!r}).write_text('started')\n"
        f"gate = pathlib.Path({str(gate)!r})\n"
        "while not gate.exists():\n"
        "    time.sleep(0.02)\n"
        f"print(json.dumps({GPU!r}))\n"
    )


def _device(status: dict[str, Any]) -> dict[str, Any] | None:
    devices = [d for d in status["devices"] if d["name"] == "startup-dev"]
    return devices[0] if devices else None


# Slow: a real client process (a warm training worker may import torch once connected).
@pytest.mark.slow
def test_registers_before_the_gpu_probe_ends_and_reports_the_gpu_later(tmp_path: Path) -> None:
    started, gate = tmp_path / "probe-started", tmp_path / "probe-gate"
    env = subprocess_env(tmp_path / "client")
    env[GPU_PROBE_COMMAND_ENV] = json.dumps([sys.executable, "-c", _probe_script(started, gate)])
    with (
        running_server(tmp_path, min_clients=5) as server,
        client_process(server.url, "startup-dev", env) as client,
    ):
        status = server.wait_for(
            lambda st: (d := _device(st)) is not None and d["connected"],
            timeout=60,
            what="the client registered",
        )
        # Registered while the probe could not have finished: its gate is still shut.
        assert not gate.exists()
        device = _device(status)
        assert device is not None and device["gpu"] is None
        # ... and the probe runs in the background.
        poll(started.exists, bool, 30, "the probe started")
        assert _device(server.status())["gpu"] is None  # type: ignore[index]
        gate.write_text("open")
        status = server.wait_for(
            lambda st: (d := _device(st)) is not None and d["gpu"] is not None,
            timeout=30,
            what="the GPU reported in a heartbeat",
        )
        device = _device(status)
        assert device is not None
        assert device["gpu"] == GPU
        assert device["connected"] and device["state"] == "idle"
        # The answer is cached for the next start.
        cache = tmp_path / "client" / "xdg" / "xdg_cache_home" / "fedtray" / GPU_CACHE_FILENAME
        assert json.loads(cache.read_text(encoding="utf-8"))["gpu"] == GPU
    text = client.text()
    assert "GPU probe: cuda Gate GPU 9000, 1234 MB" in text, text
