"""``fedtray-client pause`` / ``resume`` and ``--battery-threshold``, down to the server.

The commands only write the settings file; a running client (here a real
``python -m client`` process) notices the change and the reference server's
``/api/status`` shows it within seconds.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from client import cli
from client.config import Settings, config_path, load_settings
from client.device import detect_device
from client.protocol import BatteryStatus
from client.session import DistributedClient
from tests.server_harness import REPO_ROOT, running_server, subprocess_env


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "xdg" / var.lower()))
    return tmp_path


def test_pause_and_resume_write_the_setting_and_say_so(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["pause"]) == 0
    assert load_settings().paused is True
    assert "paused training" in capsys.readouterr().out
    assert cli.main(["pause"]) == 0
    assert "already paused" in capsys.readouterr().out
    assert cli.main(["resume"]) == 0
    assert load_settings().paused is False
    assert "resumed training" in capsys.readouterr().out
    assert cli.main(["resume"]) == 0
    assert "not paused" in capsys.readouterr().out


def test_pause_refuses_run_flags(xdg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--server", "http://example.org", "pause"]) == cli.EXIT_USAGE
    assert "only when running the client" in capsys.readouterr().err
    assert not config_path().exists() or load_settings().paused is False


def test_pause_reports_an_unwritable_settings_file(
    xdg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    load_settings()  # creates the file

    def refuse(*_: Any, **__: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli, "save_settings", refuse)
    assert cli.main(["pause"]) == cli.EXIT_IO
    assert "could not save settings" in capsys.readouterr().err
    assert load_settings().paused is False


def _device(status: dict[str, Any]) -> dict[str, Any]:
    [device] = status["devices"]
    return device


@pytest.mark.slow
def test_pause_and_resume_reach_a_running_client_process(tmp_path: Path) -> None:
    env = subprocess_env(tmp_path)
    with running_server(tmp_path, min_clients=5) as server:
        client = subprocess.Popen(
            [sys.executable, "-m", "client", "--server", server.url, "--name", "cli-dev"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        assert client.stdout is not None
        out = client.stdout
        reader = threading.Thread(target=lambda: lines.extend(out), daemon=True)
        reader.start()
        try:
            server.wait_for(
                lambda st: len(st["devices"]) == 1 and _device(st)["state"] == "idle",
                timeout=60,
                what="the client process registered",
            )

            def command(name: str) -> str:
                done = subprocess.run(
                    [sys.executable, "-m", "client", name],
                    cwd=REPO_ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert done.returncode == 0, done.stderr
                return done.stdout

            assert "paused training" in command("pause")
            status = server.wait_for(
                lambda st: _device(st)["pauseReason"] == "user_paused",
                timeout=5,
                what="the running client paused by `fedtray-client pause`",
            )
            assert _device(status)["pauseDetail"] == "Paused by you"
            assert "resumed training" in command("resume")
            server.wait_for(
                lambda st: _device(st)["state"] == "idle" and _device(st)["pauseReason"] is None,
                timeout=5,
                what="the running client resumed by `fedtray-client resume`",
            )
            client.send_signal(signal.SIGTERM)
            assert client.wait(60) == 0
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(30)
        reader.join(10)
        text = "".join(lines)
        assert "state: paused: Paused by you" in text, text


@pytest.mark.slow
def test_battery_threshold_flag_is_saved_and_applied(
    xdg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got: list[Settings] = []

    def fake_run(args: argparse.Namespace, settings: Settings) -> int:
        got.append(settings)
        return 0

    monkeypatch.setattr(cli, "run_client", fake_run)
    with running_server(xdg, min_clients=5) as server:
        assert cli.main(["--server", server.url, "--battery-threshold", "70"]) == 0
        assert load_settings().battery_threshold == 70  # saved
        [settings] = got
        assert settings.battery_threshold == 70
        # Applied: the session started with these settings pauses at 60 % on battery.
        client = DistributedClient(
            settings,
            device_info=detect_device(probe_gpu=False),
            data_dir=xdg / "data",
            battery_source=lambda: BatteryStatus(percent=60.0, plugged_in=False),
            power_poll_interval=0.2,
        )
        client.start()
        try:
            status = server.wait_for(
                lambda st: bool(st["devices"]) and _device(st)["pauseReason"] == "battery_low",
                timeout=30,
            )
            assert "training resumes at 75 %" in _device(status)["pauseDetail"]
        finally:
            assert client.stop(30)
