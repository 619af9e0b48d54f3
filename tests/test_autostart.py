"""Start at login per OS, against temp folders and an in-memory registry."""

from __future__ import annotations

import plistlib
import subprocess
import sys
from pathlib import Path

import pytest

from tray import autostart
from tray.autostart import AutostartEnv, AutostartError

COMMAND = ("/opt/fed tray/bin/fedtray",)


class FakeRunKey:
    """An in-memory HKCU Run key."""

    def __init__(self, fail: bool = False) -> None:
        self.values: dict[str, str] = {}
        self.fail = fail
        self.writes = 0

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def set(self, name: str, value: str) -> None:
        if self.fail:
            raise PermissionError("access denied")
        self.writes += 1
        self.values[name] = value

    def delete(self, name: str) -> None:
        if self.fail:
            raise PermissionError("access denied")
        self.values.pop(name, None)


def linux_env(tmp_path: Path) -> AutostartEnv:
    return AutostartEnv("linux", tmp_path / "home", COMMAND, xdg_config_home=tmp_path / "xdg")


def test_linux_enable_disable_status_idempotent(tmp_path: Path) -> None:
    env = linux_env(tmp_path)
    path = tmp_path / "xdg" / "autostart" / "fedtray.desktop"
    assert not autostart.is_enabled(env)
    autostart.enable(env)
    assert autostart.is_enabled(env)
    text = path.read_text(encoding="utf-8")
    assert "[Desktop Entry]" in text and "Type=Application" in text and "Hidden=false" in text
    # The space forces quoting per the Desktop Entry spec.
    assert 'Exec="/opt/fed tray/bin/fedtray"' in text
    mtime = path.stat().st_mtime_ns
    autostart.enable(env)  # again: nothing changes
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == ["fedtray.desktop"]  # no temp files left
    assert "on" in autostart.describe(env) and str(path) in autostart.describe(env)
    autostart.disable(env)
    assert not path.exists() and not autostart.is_enabled(env)
    autostart.disable(env)  # again: fine
    assert "off" in autostart.describe(env)


def test_linux_default_location_is_home_config(tmp_path: Path) -> None:
    env = AutostartEnv("linux", tmp_path / "home", COMMAND)
    autostart.enable(env)
    assert (tmp_path / "home" / ".config" / "autostart" / "fedtray.desktop").is_file()


@pytest.mark.parametrize(
    ("line", "enabled"),
    [
        ("Hidden=true", False),
        ("Hidden = True", False),
        ("X-GNOME-Autostart-enabled=false", False),
        ("Hidden=false", True),
        ("X-GNOME-Autostart-enabled=true", True),
    ],
)
def test_linux_hidden_counts_as_disabled(tmp_path: Path, line: str, enabled: bool) -> None:
    env = linux_env(tmp_path)
    path = tmp_path / "xdg" / "autostart" / "fedtray.desktop"
    path.parent.mkdir(parents=True)
    path.write_text(f"[Desktop Entry]\nType=Application\nExec=fedtray\n{line}\n", encoding="utf-8")
    assert autostart.is_enabled(env) is enabled
    autostart.enable(env)  # enabling rewrites a switched-off entry
    assert autostart.is_enabled(env)


@pytest.mark.parametrize(
    ("command", "exec_line"),
    [
        (("/usr/bin/fedtray",), "Exec=/usr/bin/fedtray"),
        (("/usr/bin/python3", "-m", "tray"), "Exec=/usr/bin/python3 -m tray"),
        (("/a b/$x",), 'Exec="/a b/\\\\$x"'),
        (("/100%/fedtray",), "Exec=/100%%/fedtray"),
    ],
)
def test_desktop_exec_quoting(command: tuple[str, ...], exec_line: str) -> None:
    assert exec_line + "\n" in autostart.desktop_entry(command)


def test_linux_refusal_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "xdg"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(AutostartError, match=r"cannot write .*fedtray\.desktop"):
        autostart.enable(linux_env(tmp_path))


def test_macos_plist(tmp_path: Path) -> None:
    env = AutostartEnv("darwin", tmp_path / "home", COMMAND)
    path = tmp_path / "home" / "Library" / "LaunchAgents" / "org.fedtray.tray.plist"
    assert not autostart.is_enabled(env)
    autostart.enable(env)
    data = plistlib.loads(path.read_bytes())
    assert data == {
        "Label": "org.fedtray.tray",
        "ProgramArguments": list(COMMAND),
        "RunAtLoad": True,
        "KeepAlive": False,
        "ProcessType": "Interactive",
    }
    assert autostart.is_enabled(env)
    autostart.enable(env)
    autostart.disable(env)
    autostart.disable(env)
    assert not path.exists() and not autostart.is_enabled(env)


def test_macos_corrupt_plist_reads_as_off(tmp_path: Path) -> None:
    env = AutostartEnv("darwin", tmp_path / "home", COMMAND)
    path = tmp_path / "home" / "Library" / "LaunchAgents" / "org.fedtray.tray.plist"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    assert not autostart.is_enabled(env)
    autostart.enable(env)
    assert autostart.is_enabled(env)


def windows_env(tmp_path: Path, key: FakeRunKey) -> AutostartEnv:
    return AutostartEnv(
        "win32", tmp_path / "home", COMMAND, startup_dir=tmp_path / "Startup", run_key=key
    )


def test_windows_run_key(tmp_path: Path) -> None:
    key = FakeRunKey()
    env = windows_env(tmp_path, key)
    assert not autostart.is_enabled(env)
    autostart.enable(env)
    assert key.values == {"fedtray": subprocess.list2cmdline(COMMAND)}
    assert key.values["fedtray"] == '"/opt/fed tray/bin/fedtray"'
    autostart.enable(env)
    assert key.writes == 1  # idempotent: no second write
    assert autostart.is_enabled(env)
    autostart.disable(env)
    autostart.disable(env)
    assert key.values == {} and not autostart.is_enabled(env)


def test_windows_startup_shortcut_is_respected(tmp_path: Path) -> None:
    key = FakeRunKey()
    env = windows_env(tmp_path, key)
    shortcut = tmp_path / "Startup" / "fedtray.lnk"
    shortcut.parent.mkdir()
    shortcut.write_bytes(b"L\x00\x00\x00")  # an installer-made shortcut
    assert autostart.is_enabled(env)
    autostart.enable(env)
    assert key.values == {}  # never a Run value too: that would start fedtray twice
    assert str(shortcut) in autostart.describe(env)
    autostart.disable(env)
    assert not shortcut.exists() and not autostart.is_enabled(env)


def test_windows_registry_refusal(tmp_path: Path) -> None:
    env = windows_env(tmp_path, FakeRunKey(fail=True))
    with pytest.raises(AutostartError, match=r"HKCU\\.*\\Run\\fedtray.*access denied"):
        autostart.enable(env)
    with pytest.raises(AutostartError, match="access denied"):
        autostart.disable(env)


def test_unsupported_platform(tmp_path: Path) -> None:
    env = AutostartEnv("sunos5", tmp_path, COMMAND)
    assert not autostart.is_enabled(env)
    with pytest.raises(AutostartError, match="not supported on sunos5"):
        autostart.enable(env)
    assert "not supported" in autostart.describe(env)


@pytest.mark.parametrize(
    ("platform", "key"),
    [
        ("linux", "linux"),
        ("freebsd14", "linux"),
        ("darwin", "darwin"),
        ("win32", "windows"),
        ("emscripten", None),
    ],
)
def test_platform_key(platform: str, key: str | None) -> None:
    assert autostart.platform_key(platform) == key


def test_login_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", "/Applications/fedtray.app/fedtray")
    assert autostart.login_command() == ("/Applications/fedtray.app/fedtray",)
    monkeypatch.delattr(sys, "frozen")
    exe = tmp_path / "bin" / "fedtray"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n", encoding="utf-8")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(exe.parent))
    assert autostart.login_command() == (str(exe.resolve()),)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "python"))
    assert autostart.login_command() == (str(tmp_path / "venv" / "python"), "-m", "tray")


def test_cli_autostart_keeps_setting_in_agreement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.config import load_settings
    from tray.__main__ import main

    assert main(["autostart", "status"]) == 0
    assert "start at login: off" in capsys.readouterr().out
    assert main(["autostart", "enable"]) == 0
    assert "start at login: on" in capsys.readouterr().out
    assert load_settings().autostart is True
    assert main(["autostart", "enable"]) == 0
    assert main(["autostart", "disable"]) == 0
    assert "start at login: off" in capsys.readouterr().out
    assert load_settings().autostart is False
