"""Tests for the CLI's settings commands (client.cli) and for client.logsetup."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path

import pytest

from client import __version__, logsetup
from client.cli import apply_cli_overrides, build_parser, main
from client.config import Settings, load_settings, save_settings
from tests.waiting import scaled

TOKEN = "tok-9f8e7d6c5b4a"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    root = logging.getLogger()
    level = root.level
    yield tmp_path
    logsetup.reset_logging()
    root.setLevel(level)
    monkeypatch.setattr(logsetup, "_secrets", set())


def cfg_file(tmp_path: Path) -> Path:
    return tmp_path / "xdg_config_home" / "fedtray" / "config.toml"


# --- config commands ---------------------------------------------------------------------


def test_config_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(cfg_file(tmp_path))


def test_config_show_lines_and_json_hide_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_settings(Settings(device_name="box", auth_token=TOKEN), cfg_file(tmp_path))
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert 'device_name = "box"' in out
    assert 'auth_token = "***"' in out
    assert "battery_threshold = 50" in out
    assert "paused = false" in out
    assert "ca_file = (not set)" in out
    assert TOKEN not in out

    assert main(["config", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["auth_token"] == "***"
    assert shown["device_name"] == "box"
    assert shown["ca_file"] is None
    assert shown["paused_until"] is None


def test_config_show_marks_the_keys_it_reset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = cfg_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(
        'server_url = "https://fed.example.org"\ndevice_name = "box"\n'
        f'auth_token = "{TOKEN}"\nbattery_threshold = 150\n'
        '[task_data]\ndigits = "/data/d"\nbad = ""\n',
        encoding="utf-8",
    )
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert 'server_url = "https://fed.example.org"\n' in out  # kept, unmarked
    assert 'device_name = "box"\n' in out and 'auth_token = "***"\n' in out
    assert "battery_threshold = 50  # reset: battery_threshold must be a whole percent" in out
    assert "got 150" in out
    assert 'task_data.digits = "/data/d"\n' in out
    assert "task_data.bad = (not set)  # reset: task_data.bad must be a folder path" in out
    (aside,) = path.parent.glob("config.toml.corrupt-*")
    assert f"# the original file is kept at {aside}" in out
    assert TOKEN not in out
    # Repaired: the next show is clean.
    assert main(["config", "show", "--json"]) == 0
    assert "_settings_report" not in json.loads(capsys.readouterr().out)


def test_config_show_json_reports_an_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = cfg_file(tmp_path)
    save_settings(Settings(device_name="box", auth_token=TOKEN), path)
    before = path.read_bytes()
    real = Path.read_bytes

    def denied(self: Path) -> bytes:  # root reads a mode-000 file; refuse as the OS would
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert main(["config", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    report = shown["_settings_report"]
    assert report["in_memory"] is True and "Permission denied" in report["file_problem"]
    assert main(["config", "show"]) == 0
    assert "# the file was left untouched" in capsys.readouterr().out
    assert real(path) == before  # device_id and token untouched


def test_config_shows_a_deadline_and_refuses_to_set_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    until = datetime(2026, 5, 4, 13, 30, tzinfo=UTC)
    save_settings(Settings(paused=True, paused_until=until), cfg_file(tmp_path))
    assert main(["config", "show"]) == 0
    assert 'paused_until = "2026-05-04T13:30:00+00:00"' in capsys.readouterr().out
    assert main(["config", "show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["paused_until"] == "2026-05-04T13:30:00+00:00"
    assert main(["config", "set", "paused_until", "2026-05-04T14:00:00Z"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: paused_until is set together with the pause")
    assert "pause --for" in err
    assert load_settings().paused_until == until  # unchanged


def test_config_set_saves_and_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "set", "battery_threshold", "80"]) == 0
    assert capsys.readouterr().out.strip() == "battery_threshold = 80"
    assert load_settings(cfg_file(tmp_path)).battery_threshold == 80

    assert main(["config", "set", "auth_token", TOKEN]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == 'auth_token = "***"'
    assert TOKEN not in captured.out + captured.err
    assert load_settings(cfg_file(tmp_path)).auth_token == TOKEN

    assert main(["config", "set", "auth_token", "none"]) == 0
    assert load_settings(cfg_file(tmp_path)).auth_token is None


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["config", "set", "colour", "red"], "unknown setting 'colour'; valid keys:"),
        (["config", "set", "battery_threshold", "150"], "battery_threshold must be"),
        (["config", "set", "paused", "maybe"], "paused must be true or false"),
        (["config", "set", "server_url", "ftp://x"], "server_url must be"),
        (["config", "set", "device_id", "3f0c8a52-6d1e-4b8e-9a43-0d2a1f7e5c11"], "identity"),
        (["--server", "http://h", "config", "show"], "--server applies only when running"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    before = load_settings(cfg_file(tmp_path))
    capsys.readouterr()
    assert main(argv) == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err_lines) == 1, err_lines
    assert err_lines[0].startswith("error: ")
    assert fragment in err_lines[0]
    assert load_settings(cfg_file(tmp_path)) == before


@pytest.mark.parametrize(
    "argv",
    [["config"], ["config", "set", "paused"], ["--log-level", "LOUD", "config", "path"], ["zap"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


# --- run mode overrides ------------------------------------------------------------------


# Slow: detecting the device runs the GPU probe, a child process that imports torch.
@pytest.mark.slow
def test_server_and_name_overrides_are_saved_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = load_settings(cfg_file(tmp_path)).device_id
    url = f"http://127.0.0.1:{closed_port()}"
    argv = ["-s", url, "-n", "lab pc", "--battery-threshold", "30", "--no-reconnect"]
    assert main(argv) == 1  # nothing listens there, and --no-reconnect ends the run
    assert "error:" in capsys.readouterr().err
    saved = load_settings(cfg_file(tmp_path))
    assert (saved.server_url, saved.device_name, saved.battery_threshold) == (url, "lab pc", 30)
    assert saved.device_id == identity


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_bad_override_is_refused_and_not_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = load_settings(cfg_file(tmp_path))
    assert main(["--name", "ok", "--server", "localhost:3001"]) == 2
    assert "error: server_url must be" in capsys.readouterr().err
    assert load_settings(cfg_file(tmp_path)) == before


def test_apply_cli_overrides_without_flags_does_not_write(tmp_path: Path) -> None:
    target = tmp_path / "c.toml"
    args = build_parser().parse_args([])
    s = Settings()
    assert apply_cli_overrides(s, args, path=target) is s
    assert not target.exists()
    args = build_parser().parse_args(["--battery-threshold", "100"])
    updated = apply_cli_overrides(s, args, path=target)
    assert updated.battery_threshold == 100
    assert load_settings(target) == updated


# --- python -m client -------------------------------------------------------------------


def test_python_dash_m_prints_config_path(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg-sub")}
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        env[var] = str(tmp_path / var.lower())
    done = subprocess.run(
        [sys.executable, "-m", "client", "config", "path"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "cfg-sub" / "fedtray" / "config.toml")
    assert "Traceback" not in done.stderr


# --- logsetup -----------------------------------------------------------------------------


def read_log(path: Path) -> str:
    for handler in logging.getLogger().handlers:
        handler.flush()
    return path.read_text("utf-8")


def test_secrets_are_redacted_in_file_and_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = logsetup.setup_logging("DEBUG", log_dir=tmp_path / "logs")
    logsetup.add_secret(TOKEN)
    log = logging.getLogger("fedtray.test")
    log.info("connecting with token %s", TOKEN)
    log.warning(f"inline {TOKEN} in the message")
    try:
        raise RuntimeError(f"server refused {TOKEN}")
    except RuntimeError:
        log.exception("handshake failed")
    text = read_log(log_file)
    err = capsys.readouterr().err
    for output in (text, err):
        assert TOKEN not in output
        assert "connecting with token ***" in output
        assert "inline *** in the message" in output
        assert "RuntimeError: server refused ***" in output


def test_a_record_is_redacted_once_for_both_handlers_and_again_for_a_new_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = logsetup.setup_logging(log_dir=tmp_path / "logs")
    redacted: list[str] = []
    real_redact = logsetup.redact

    def counted(text: str) -> str:
        redacted.append(text)
        return real_redact(text)

    monkeypatch.setattr(logsetup, "redact", counted)
    log = logging.getLogger("fedtray.test")
    log.info("hello %s", "world")
    assert redacted == ["hello world"]  # not once more for the second handler
    logsetup.add_secret("world")
    log.info("hello %s", "world")
    assert redacted[1:] == ["hello world"]
    assert read_log(log_file).count("hello ***") == 1
    assert capsys.readouterr().err.count("hello ***") == 1


def test_setup_logging_is_idempotent(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    first = logsetup.setup_logging(log_dir=tmp_path / "logs")
    after_one = len(root.handlers)
    second = logsetup.setup_logging("WARNING", log_dir=tmp_path / "logs")
    assert first == second == tmp_path / "logs" / "fedtray.log"
    assert after_one == before + 2
    assert len(root.handlers) == after_one
    assert root.level == logging.WARNING
    logging.getLogger("fedtray.test").warning("once")
    assert read_log(first).count("once") == 1


def test_the_log_file_rotates_by_size_and_formats_each_record_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(logsetup, "MAX_BYTES", 1000)
    log_file = logsetup.setup_logging(log_dir=tmp_path / "logs")
    [file_handler] = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, RotatingFileHandler) and h.baseFilename == str(log_file)
    ]
    assert file_handler.formatter is not None
    formatted: list[str] = []
    real_format = file_handler.formatter.format

    def counted(record: logging.LogRecord) -> str:
        formatted.append(record.getMessage())
        return real_format(record)

    monkeypatch.setattr(file_handler.formatter, "format", counted)
    log = logging.getLogger("fedtray.test")
    for i in range(60):
        log.info("line %03d %s", i, "x" * 40)
    read_log(log_file)
    assert len(formatted) == 60  # once each, not once more to decide on rolling over
    files = [log_file.with_name(f"fedtray.log.{n}") for n in range(5, 0, -1)] + [log_file]
    assert all(f.is_file() and f.stat().st_size <= 1000 for f in files)
    assert not log_file.with_name("fedtray.log.6").exists()  # BACKUP_COUNT kept
    numbers = [
        int(line.split("line ")[1][:3]) for f in files for line in f.read_text().splitlines()
    ]
    # The newest lines, in order, none lost between the files kept.
    assert numbers == list(range(60 - len(numbers), 60)) and 30 < len(numbers) < 60
    assert capsys.readouterr().err.count("line 0") == 60  # stderr has every line


def test_the_log_file_rolls_over_at_its_size_whoever_wrote_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logsetup, "MAX_BYTES", 1000)
    log_file = logsetup.setup_logging(log_dir=tmp_path / "logs")
    log = logging.getLogger("fedtray.test")
    log.info("first")
    # Another client sharing the log directory appends to the same file.
    with log_file.open("a", encoding="utf-8") as other:
        other.write("o" * 900 + "\n")
    log.info("second %s", "y" * 80)
    rolled = log_file.with_name("fedtray.log.1")
    assert rolled.is_file() and "first" in rolled.read_text() and "o" * 900 in rolled.read_text()
    assert "second" in read_log(log_file) and log_file.stat().st_size <= 1000


def test_default_log_dir_follows_xdg_state_home(tmp_path: Path) -> None:
    path = logsetup.setup_logging()
    assert path == tmp_path / "xdg_state_home" / "fedtray" / "log" / "fedtray.log"
    logging.getLogger("fedtray.test").info("hello file")
    assert "hello file" in read_log(path)


def test_unwritable_log_dir_falls_back_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log directory should be")
    path = logsetup.setup_logging(log_dir=blocker / "logs")
    logging.getLogger("fedtray.test").warning("still visible")
    err = capsys.readouterr().err
    assert "cannot write the log file" in err
    assert "still visible" in err
    assert not path.exists()


@pytest.mark.parametrize("name", ["LOUD", "", "info2", "10"])
def test_bad_level_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="log level must be one of DEBUG, INFO"):
        logsetup.setup_logging(name)


@pytest.mark.parametrize(
    ("name", "level"),
    [("debug", logging.DEBUG), ("INFO", logging.INFO), ("warn", logging.WARNING)],
)
def test_level_names(name: str, level: int) -> None:
    assert logsetup.parse_level(name) == level


def test_config_file_is_valid_toml_after_cli_use(tmp_path: Path) -> None:
    assert main(["config", "set", "autostart", "yes"]) == 0
    data = tomllib.loads(cfg_file(tmp_path).read_text("utf-8"))
    assert data["autostart"] is True


# Slow: detecting the device runs the GPU probe, a child process that imports torch.
@pytest.mark.slow
def test_info_prints_device_and_resources_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"device", "resources"}
    assert report["device"]["clientVersion"] == __version__
    assert report["device"]["hardware"]["cpuCores"] >= 1
    assert 0 <= report["resources"]["ramUsedPercent"] <= 100
