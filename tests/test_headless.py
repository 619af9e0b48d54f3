"""The headless run mode: plain-words display (tables) and the --no-reconnect exit."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from client.config import Reset, Settings, SettingsReport
from client.headless import EXIT_ENDED, change_line, run_client, settings_line, status_rows
from client.snapshot import NO_PROGRESS, Budget, ClientSnapshot
from tests.waiting import scaled

BASE = ClientSnapshot(
    settings=Settings(
        server_url="http://127.0.0.1:3001",
        device_id="00000000-0000-4000-8000-000000000001",
        device_name="box",
    )
)
LIGHT = Budget(1, 50, "you are using the computer")
TRAINING = ClientSnapshot(
    settings=Settings(
        server_url=BASE.server_url,
        device_id="00000000-0000-4000-8000-000000000001",
        device_name="box",
    ),
    connection="connected",
    device_state="training",
    round_id="r1",
    progress=replace(
        NO_PROGRESS, fraction=0.5, epoch=1, epochs=2, loss=0.25, samples_per_sec=1234.0
    ),
    weights_version=3,
)


def _with(snap: ClientSnapshot, **changes: object) -> ClientSnapshot:
    import dataclasses

    return dataclasses.replace(snap, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (None, BASE, None),
        (
            BASE,
            _with(BASE, connection="connecting"),
            "connection: connecting to http://127.0.0.1:3001",
        ),
        (
            _with(BASE, connection="connecting"),
            _with(BASE, last_error="cannot reach the server"),
            "connection: disconnected (cannot reach the server)",
        ),
        (
            _with(BASE, connection="connecting"),
            _with(BASE, connection="auth_failed", last_error="token refused"),
            "connection: auth failed (token refused)",
        ),
        (BASE, _with(BASE, next_retry_at=14.0), "connection: disconnected, retrying in 4 s"),
        (
            _with(TRAINING, device_state="idle", round_id=None),
            TRAINING,
            "state: training (round r1)",
        ),
        (
            _with(TRAINING, progress=replace(NO_PROGRESS, epoch=0, epochs=2)),
            TRAINING,
            "round r1: epoch 1/2 (50%), loss 0.2500, 1,234 samples/s",
        ),
        (
            TRAINING,
            _with(TRAINING, progress=replace(NO_PROGRESS, fraction=0.6, epoch=1, epochs=2)),
            None,
        ),
        (
            TRAINING,
            _with(
                TRAINING,
                device_state="paused",
                pause_reason="user_paused",
                pause_detail="Paused by you",
            ),
            "state: paused: Paused by you (round r1)",
        ),
        (TRAINING, _with(TRAINING, weights_version=4), "global weights: v4"),
        (TRAINING, _with(TRAINING, rounds_completed=1), "rounds completed: 1"),
        (
            TRAINING,
            _with(TRAINING, budget=LIGHT),
            "budget: 1 core at 50 % (you are using the computer, requested)",
        ),
        (_with(TRAINING, budget=LIGHT), _with(TRAINING, budget=LIGHT), None),
        (
            _with(TRAINING, budget=LIGHT, progress=replace(NO_PROGRESS, epoch=0, epochs=2)),
            _with(TRAINING, budget=LIGHT),
            "round r1: epoch 1/2 (50%), loss 0.2500, 1,234 samples/s, budget 1 core at 50 % "
            "(you are using the computer, requested)",
        ),
        (
            TRAINING,
            _with(
                TRAINING,
                device_state="paused",
                pause_reason="step_aside",
                pause_detail="Other programs are using 80 % of the CPU",
            ),
            "state: paused: Other programs are using 80 % of the CPU (round r1)",
        ),
    ],
)
def test_change_line(old: ClientSnapshot | None, new: ClientSnapshot, expected: str | None) -> None:
    assert change_line(old, new, now=10.0) == expected


@pytest.mark.parametrize(
    ("snap", "label", "value"),
    [
        (BASE, "Connection", "disconnected"),
        (_with(BASE, last_error="nope"), "Connection", "disconnected — nope"),
        (BASE, "Round", "-"),
        (BASE, "Global weights", "none"),
        (TRAINING, "Epoch", "1/2 (50%)"),
        (TRAINING, "Loss", "0.2500"),
        (TRAINING, "Samples/s", "1,234"),
        (TRAINING, "Global weights", "v3"),
        (_with(TRAINING, simulation=True), "State", "training [simulation]"),
        (
            _with(TRAINING, device_state="uploading", upload_fraction=0.25),
            "State",
            "uploading (25%)",
        ),
        (BASE, "Budget", "-"),
        (
            _with(BASE, budget=Budget(3, 100, "the computer is idle", applied=True)),
            "Budget",
            "3 cores at 100 % (the computer is idle)",
        ),
        (
            BASE,
            "Surroundings",
            "computer unknown, treated as in use; CPU unknown; other programs -",
        ),
        (
            _with(BASE, activity="idle", temperature_c=71.6, other_cpu_percent=12.3),
            "Surroundings",
            "computer idle; CPU 72 °C; other programs 12 %",
        ),
    ],
)
def test_status_rows(snap: ClientSnapshot, label: str, value: str) -> None:
    assert dict(status_rows(snap, now=0.0))[label] == value


RESET = SettingsReport(
    resets=(Reset("battery_threshold", "battery_threshold must be ..., got 150", "50"),),
    kept_aside="/cfg/config.toml.corrupt-20260504T133000Z",
)
UNREADABLE = SettingsReport(
    file_problem="/cfg/config.toml cannot be read: Permission denied", in_memory=True
)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (None, BASE, None),
        (BASE, BASE, None),
        (
            None,
            _with(BASE, settings_report=RESET),
            "settings: 1 setting was not valid and reset: battery_threshold; every other "
            "setting was kept; the original is kept at /cfg/config.toml.corrupt-20260504T133000Z.",
        ),
        (_with(BASE, settings_report=RESET), _with(BASE, settings_report=RESET), None),
        (
            _with(BASE, settings_report=RESET),
            BASE,
            "settings: the settings file is fine again",
        ),
        (
            None,
            _with(BASE, settings_report=UNREADABLE),
            "settings: Cannot use the settings file (/cfg/config.toml cannot be read: "
            "Permission denied): fedtray runs on temporary settings and leaves the file as "
            "it is. Fix it, then restart.",
        ),
    ],
)
def test_settings_line(
    old: ClientSnapshot | None, new: ClientSnapshot, expected: str | None
) -> None:
    assert settings_line(old, new) == expected


def test_status_rows_say_which_settings_were_reset() -> None:
    assert "Settings" not in dict(status_rows(BASE, now=0.0))
    row = dict(status_rows(_with(BASE, settings_report=RESET), now=0.0))["Settings"]
    assert "reset: battery_threshold" in row and "corrupt-20260504T133000Z" in row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Slow: detecting the device runs the GPU probe, a child process that imports torch.
@pytest.mark.slow
def test_no_reconnect_exits_1_with_a_one_line_reason(capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(server_url=f"http://127.0.0.1:{_free_port()}", device_name="t")
    code = run_client(argparse.Namespace(no_reconnect=True), settings)
    assert code == EXIT_ENDED
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1
    assert "cannot reach the server" in err_lines[0]


@pytest.mark.slow
def test_cli_no_reconnect_in_a_subprocess(tmp_path: Path) -> None:
    """``python -m client --no-reconnect`` against a port where nothing listens."""
    from tests.server_harness import REPO_ROOT, subprocess_env

    url = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "client", "--server", url, "--no-reconnect"],
        cwd=REPO_ROOT,
        env=subprocess_env(tmp_path),
        check=False,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot reach the server")
