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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from client import cli
from client.config import Settings, config_path, load_settings
from client.device import detect_device
from client.protocol import BatteryStatus
from client.schedule import parse_schedule, until_tomorrow
from client.session import DistributedClient
from tests.server_harness import REPO_ROOT, client_process, running_server, subprocess_env
from tests.waiting import scaled


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("2h30m", timedelta(hours=2, minutes=30)),
        (" 1H30M ", timedelta(hours=1, minutes=30)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("1d2h", timedelta(days=1, hours=2)),
        ("7d", timedelta(days=7)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert cli.parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected a duration such as 30m, 1h or 2h30m"),
        ("1", "expected a duration"),
        ("h", "expected a duration"),
        ("1x", "expected a duration"),
        ("30m1h", "expected a duration"),  # units out of order
        ("1h1h", "expected a duration"),
        ("-1h", "expected a duration"),
        ("1.5h", "expected a duration"),
        ("1h 30m", "expected a duration"),
        ("0m", "longer than zero"),
        ("0h0m", "longer than zero"),
        ("8d", "at most 7 days"),
        ("99999999999h", "at most 7 days"),
    ],
)
def test_parse_duration_refuses(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        cli.parse_duration(text)


def test_pause_for_sets_a_deadline_and_plain_pause_or_resume_clears_it(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = datetime.now(UTC)
    assert cli.main(["pause", "--for", "1h"]) == 0
    after = datetime.now(UTC)
    settings = load_settings()
    assert settings.paused is True and settings.paused_until is not None
    assert before + timedelta(hours=1) - timedelta(seconds=1) <= settings.paused_until
    assert settings.paused_until <= after + timedelta(hours=1)
    local = settings.paused_until.astimezone()
    # With the day only when the hour from now is tomorrow (a run near midnight).
    same_day = local.date() == before.astimezone().date()
    said = f"{local:%H:%M}" if same_day else f"{local:%a %d %b %H:%M}"
    assert f"Paused until {said}:" in capsys.readouterr().out
    # Plain `pause` keeps the pause and drops the deadline, and says so.
    assert cli.main(["pause"]) == 0
    assert f"no longer ending at {said}" in capsys.readouterr().out
    assert (load_settings().paused, load_settings().paused_until) == (True, None)
    assert cli.main(["pause", "--for", "30m"]) == 0
    assert cli.main(["resume"]) == 0
    assert "resumed training" in capsys.readouterr().out
    assert (load_settings().paused, load_settings().paused_until) == (False, None)


@pytest.mark.parametrize(("schedule", "at"), [("", "07:00"), ("22:00-07:00", "22:00")])
def test_pause_until_tomorrow_ends_at_the_morning_or_the_schedule(
    xdg: Path, capsys: pytest.CaptureFixture[str], schedule: str, at: str
) -> None:
    assert cli.main(["config", "set", "schedule", schedule]) == 0
    window = parse_schedule(schedule)
    before = until_tomorrow(datetime.now(), window).astimezone(UTC)
    assert cli.main(["pause", "--until-tomorrow"]) == 0
    after = until_tomorrow(datetime.now(), window).astimezone(UTC)
    settings = load_settings()
    assert settings.paused is True
    assert settings.paused_until in (before, after)  # equal but across a 04:00 boundary
    assert settings.paused_until is not None
    local = settings.paused_until.astimezone()
    assert f"{local:%H:%M}" == at
    assert local.date() > (datetime.now() - timedelta(hours=4)).date()  # not today
    # Said with the day, but for a pause asked after midnight that ends the same date.
    said = f"{local:%H:%M}" if local.date() == datetime.now().date() else f"{local:%a %d %b %H:%M}"
    assert f"Paused until {said}:" in capsys.readouterr().out


def test_pause_for_and_until_tomorrow_exclude_each_other(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["pause", "--for", "1h", "--until-tomorrow"]) == cli.EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err
    assert not config_path().exists() or load_settings().paused is False


def test_pause_for_a_bad_duration_exits_2_and_changes_nothing(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["pause", "--for", "soon"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "argument --for: expected a duration such as 30m, 1h or 2h30m" in err
    assert not config_path().exists() or load_settings().paused is False


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

    monkeypatch.setattr(cli, "update_settings", refuse)
    assert cli.main(["pause"]) == cli.EXIT_IO
    assert "could not save settings" in capsys.readouterr().err
    assert load_settings().paused is False


def _device(status: dict[str, Any]) -> dict[str, Any]:
    [device] = status["devices"]
    return device


@pytest.mark.slow
def test_pause_and_resume_reach_a_running_client_process(tmp_path: Path) -> None:
    env = subprocess_env(tmp_path)
    with (
        running_server(tmp_path, min_clients=5) as server,
        client_process(server.url, "cli-dev", env) as client,
    ):
        server.wait_for(
            lambda st: len(st["devices"]) == 1 and _device(st)["state"] == "idle",
            timeout=60,
            what="the client process registered",
        )

        def command(name: str, *extra: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "client", name, *extra],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=scaled(60),
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
        said = command("pause", "--for", "1h")
        assert said.startswith("Paused until "), said
        status = server.wait_for(
            lambda st: (_device(st)["pauseDetail"] or "").startswith("Paused by you until "),
            timeout=5,
            what="the running client paused by `fedtray-client pause --for 1h`",
        )
        when = said.removeprefix("Paused until ").split(": ", 1)[0]  # "15:30" or with the day
        assert _device(status)["pauseDetail"] == f"Paused by you until {when}"
        assert "resumed training" in command("resume")
        server.wait_for(
            lambda st: _device(st)["pauseReason"] is None,
            timeout=5,
            what="the timed pause ended by `fedtray-client resume`",
        )
        client.proc.send_signal(signal.SIGTERM)
        assert client.proc.wait(scaled(60)) == 0
    assert "state: paused: Paused by you" in client.text(), client.text()


@pytest.mark.slow
def test_battery_threshold_flag_is_saved_and_applied(
    xdg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got: list[Settings] = []

    def fake_run(args: argparse.Namespace, settings: Settings, report: object = None) -> int:
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
            assert client.stop(scaled(30))
