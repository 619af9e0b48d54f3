"""Start fedtray at login: one idempotent enable / disable / status per operating system.

Contract:

* :func:`enable`, :func:`disable` and :func:`is_enabled` act on the login item of the
  platform in :class:`AutostartEnv` (default: this machine, :func:`current_env`).
  Enabling what is enabled, or disabling what is disabled, changes nothing and
  succeeds. Files are written atomically (temp file in the same folder, then
  ``os.replace``), so a crash never leaves half a file that the desktop would run.
* :func:`enable` / :func:`disable` raise :class:`AutostartError` (plain words, naming
  the path or key) when the disk or registry refuses, or on an unsupported platform.
  :func:`is_enabled` never raises: an unreadable state is logged and reported as
  ``False``.
* Backends (standard library only):

  - Linux and the BSDs: ``$XDG_CONFIG_HOME/autostart/fedtray.desktop`` (XDG Autostart
    spec). A file with ``Hidden=true`` (how desktops switch an entry off) or
    ``X-GNOME-Autostart-enabled=false`` counts as disabled; enabling rewrites it.
  - macOS: ``~/Library/LaunchAgents/org.fedtray.tray.plist`` with ``RunAtLoad``. It is
    never ``launchctl load``-ed: that would start a second copy right now (RunAtLoad),
    and ``unload`` would kill the copy launchd started at login. launchd reads the
    folder at every login, which is all a login item needs.
  - Windows: the ``HKCU\\...\\CurrentVersion\\Run`` value ``fedtray``, through the small
    :class:`RunKey` interface (tests pass an in-memory one). A ``fedtray.lnk`` in the
    Startup folder (made by an installer) counts as enabled; enabling then writes no
    Run value (that would start fedtray twice) and disabling removes both.

* The command started at login is the frozen executable when frozen
  (``sys.frozen``), else the installed ``fedtray`` command (``PATH``, then the
  running interpreter's scripts folder), else ``python -m tray``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import plistlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple, Protocol

from client.atomicfile import write_atomic

__all__ = [
    "DESKTOP_FILENAME",
    "LAUNCH_AGENT_LABEL",
    "RUN_KEY",
    "RUN_VALUE_NAME",
    "STARTUP_SHORTCUT",
    "AutostartEnv",
    "AutostartError",
    "RunKey",
    "current_env",
    "describe",
    "disable",
    "enable",
    "is_enabled",
    "login_command",
    "platform_key",
]

log = logging.getLogger(__name__)

DESKTOP_FILENAME: Final = "fedtray.desktop"
LAUNCH_AGENT_LABEL: Final = "org.fedtray.tray"
RUN_KEY: Final = r"Software\Microsoft\Windows\CurrentVersion\Run"
RUN_VALUE_NAME: Final = "fedtray"
STARTUP_SHORTCUT: Final = "fedtray.lnk"
# Characters that force an Exec argument into double quotes (Desktop Entry spec).
_DESKTOP_RESERVED: Final = " \t\n\"'\\><~|&;$*?#()`"


class AutostartError(Exception):
    """Start-at-login could not be changed; the message says what and where."""


class RunKey(Protocol):
    """The one registry key fedtray touches (``HKCU\\...\\Run``), as three calls."""

    def get(self, name: str) -> str | None:
        """The value ``name``, or None when it does not exist."""
        ...

    def set(self, name: str, value: str) -> None:
        """Create or replace ``name``; raises OSError when refused."""
        ...

    def delete(self, name: str) -> None:
        """Remove ``name``; no error when it does not exist; raises OSError when refused."""
        ...


class WinregRunKey:
    """:class:`RunKey` over the real registry (Windows only; raises OSError elsewhere)."""

    def get(self, name: str) -> str | None:
        if sys.platform != "win32":
            raise OSError("the Windows registry exists only on Windows")
        import winreg

        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY) as key:
                value, _kind = winreg.QueryValueEx(key, name)
        except FileNotFoundError:
            return None
        return str(value)

    def set(self, name: str, value: str) -> None:
        if sys.platform != "win32":
            raise OSError("the Windows registry exists only on Windows")
        import winreg

        with winreg.CreateKeyEx(winreg.HKEY_CURRENT_USER, RUN_KEY, 0, winreg.KEY_SET_VALUE) as key:
            winreg.SetValueEx(key, name, 0, winreg.REG_SZ, value)

    def delete(self, name: str) -> None:
        if sys.platform != "win32":
            raise OSError("the Windows registry exists only on Windows")
        import winreg

        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY, 0, winreg.KEY_SET_VALUE) as key:
                winreg.DeleteValue(key, name)
        except FileNotFoundError:
            pass  # already gone: disabling is idempotent


@dataclass(frozen=True)
class AutostartEnv:
    """Everything the backends read from the machine, so tests can supply their own."""

    platform: str
    home: Path
    command: tuple[str, ...]
    xdg_config_home: Path | None = None
    startup_dir: Path | None = None
    run_key: RunKey | None = field(default=None, compare=False)


def login_command() -> tuple[str, ...]:
    """The command the OS should run at login (see the module docstring)."""
    if getattr(sys, "frozen", False):
        # A PyInstaller-style bundle: the executable *is* fedtray.
        return (sys.executable,)
    found = shutil.which("fedtray")
    if found:
        return (str(Path(found).resolve()),)
    # A venv that is not on PATH (not activated): its scripts sit next to python.
    scripts = Path(sys.executable).parent
    for name in ("fedtray", "fedtray.exe"):
        candidate = scripts / name
        if candidate.is_file():
            return (str(candidate),)
    return (sys.executable, "-m", "tray")


def _windows_startup_dir() -> Path | None:
    appdata = os.environ.get("APPDATA")
    if not appdata:
        return None
    return Path(appdata, "Microsoft", "Windows", "Start Menu", "Programs", "Startup")


def current_env() -> AutostartEnv:
    """This machine: ``sys.platform``, the home folder, XDG and Windows locations."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    on_windows = sys.platform == "win32"
    return AutostartEnv(
        platform=sys.platform,
        home=Path.home(),
        command=login_command(),
        xdg_config_home=Path(xdg) if xdg else None,
        startup_dir=_windows_startup_dir() if on_windows else None,
        run_key=WinregRunKey() if on_windows else None,
    )


def platform_key(platform: str) -> str | None:
    """The backend for a ``sys.platform`` value: ``linux``, ``darwin``, ``windows`` or None."""
    if platform.startswith("linux") or "bsd" in platform:
        return "linux"  # the BSD desktops follow the same XDG autostart spec
    if platform == "darwin":
        return "darwin"
    if platform in ("win32", "cygwin"):
        return "windows"
    return None


# ---------------------------------------------------------------------------
# Shared file helpers


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        # 0644: the desktop session (or launchd) only needs to read it.
        write_atomic(path, data, mode=0o644)
    except OSError as exc:
        raise AutostartError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass  # already gone: disabling is idempotent
    except OSError as exc:
        raise AutostartError(f"cannot remove {path}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------------
# Linux: XDG autostart .desktop file


def desktop_path(env: AutostartEnv) -> Path:
    """Where the autostart entry lives."""
    base = env.xdg_config_home if env.xdg_config_home is not None else env.home / ".config"
    return base / "autostart" / DESKTOP_FILENAME


def _desktop_quote(arg: str) -> str:
    """One Exec argument quoted per the Desktop Entry spec (not shell quoting).

    Reserved characters need double quotes, inside which ``"`` ` ``$`` ``\\`` get a
    backslash; backslashes are then doubled again because the whole value is also a
    desktop-entry string. ``%`` starts a field code, so a literal one is ``%%``.
    """
    arg = arg.replace("%", "%%")
    if arg and not any(ch in _DESKTOP_RESERVED for ch in arg):
        return arg
    inner = "".join("\\" + ch if ch in '"`$\\' else ch for ch in arg)
    return '"' + inner.replace("\\", "\\\\") + '"'


def desktop_entry(command: tuple[str, ...]) -> str:
    """The text of the autostart entry that runs ``command``."""
    exec_line = " ".join(_desktop_quote(arg) for arg in command)
    return (
        "[Desktop Entry]\n"
        "Type=Application\n"
        "Name=fedtray\n"
        "Comment=Lend this computer's spare power to federated training\n"
        f"Exec={exec_line}\n"
        "Icon=fedtray\n"
        "Terminal=false\n"
        "Hidden=false\n"
        "X-GNOME-Autostart-enabled=true\n"
    )


def _desktop_disabled_by_keys(text: str) -> bool:
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip().lower()
        # Both are how desktop settings panels switch an entry off without deleting it.
        if (key, value) in (("hidden", "true"), ("x-gnome-autostart-enabled", "false")):
            return True
    return False


def _linux_is_enabled(env: AutostartEnv) -> bool:
    path = desktop_path(env)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot read %s (%s); reporting start at login as off", path, exc)
        return False
    return not _desktop_disabled_by_keys(text)


def _linux_enable(env: AutostartEnv) -> None:
    path = desktop_path(env)
    wanted = desktop_entry(env.command)
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == wanted:
            return  # already exactly right: do not touch the file
    _write_atomic(path, wanted.encode("utf-8"))


def _linux_disable(env: AutostartEnv) -> None:
    _remove(desktop_path(env))


# ---------------------------------------------------------------------------
# macOS: LaunchAgent plist (never launchctl-loaded; see the module docstring)


def plist_path(env: AutostartEnv) -> Path:
    """Where the LaunchAgent lives."""
    return env.home / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT_LABEL}.plist"


def plist_bytes(command: tuple[str, ...]) -> bytes:
    """The LaunchAgent that runs ``command`` once at login."""
    return plistlib.dumps(
        {
            "Label": LAUNCH_AGENT_LABEL,
            "ProgramArguments": list(command),
            "RunAtLoad": True,
            # Quitting from the tray must stick: launchd must not restart fedtray.
            "KeepAlive": False,
            # An app the user interacts with, not a background daemon to throttle.
            "ProcessType": "Interactive",
        }
    )


def _macos_is_enabled(env: AutostartEnv) -> bool:
    path = plist_path(env)
    try:
        data = plistlib.loads(path.read_bytes())
    except FileNotFoundError:
        return False
    except (OSError, plistlib.InvalidFileException, ValueError) as exc:
        log.warning("cannot read %s (%s); reporting start at login as off", path, exc)
        return False
    return isinstance(data, dict) and data.get("RunAtLoad") is True


def _macos_enable(env: AutostartEnv) -> None:
    path = plist_path(env)
    wanted = plist_bytes(env.command)
    with contextlib.suppress(OSError):
        if path.read_bytes() == wanted:
            return
    _write_atomic(path, wanted)


def _macos_disable(env: AutostartEnv) -> None:
    _remove(plist_path(env))


# ---------------------------------------------------------------------------
# Windows: HKCU Run value, respecting an installer's Startup-folder shortcut


def _startup_shortcut(env: AutostartEnv) -> Path | None:
    if env.startup_dir is None:
        return None
    shortcut = env.startup_dir / STARTUP_SHORTCUT
    return shortcut if shortcut.is_file() else None


def _run_key(env: AutostartEnv) -> RunKey:
    if env.run_key is None:
        raise AutostartError("the Windows registry is not available here")
    return env.run_key


def _windows_is_enabled(env: AutostartEnv) -> bool:
    if _startup_shortcut(env) is not None:
        return True
    try:
        return _run_key(env).get(RUN_VALUE_NAME) is not None
    except (OSError, AutostartError) as exc:
        log.warning("cannot read the registry Run key (%s); reporting start at login as off", exc)
        return False


def _windows_enable(env: AutostartEnv) -> None:
    if _startup_shortcut(env) is not None:
        # The installer's shortcut already starts fedtray; a Run value too would start
        # it twice at every login.
        log.info("start at login is already on through the Startup folder shortcut")
        return
    command = subprocess.list2cmdline(env.command)
    key = _run_key(env)
    try:
        if key.get(RUN_VALUE_NAME) != command:
            key.set(RUN_VALUE_NAME, command)
    except OSError as exc:
        raise AutostartError(f"cannot write HKCU\\{RUN_KEY}\\{RUN_VALUE_NAME}: {exc}") from exc


def _windows_disable(env: AutostartEnv) -> None:
    # Remove both: otherwise the toggle would seem to do nothing for everyone whose
    # installer made the shortcut.
    try:
        _run_key(env).delete(RUN_VALUE_NAME)
    except OSError as exc:
        raise AutostartError(f"cannot remove HKCU\\{RUN_KEY}\\{RUN_VALUE_NAME}: {exc}") from exc
    shortcut = _startup_shortcut(env)
    if shortcut is not None:
        _remove(shortcut)


# ---------------------------------------------------------------------------
# Dispatch


class _Backend(NamedTuple):
    is_enabled: Callable[[AutostartEnv], bool]
    enable: Callable[[AutostartEnv], None]
    disable: Callable[[AutostartEnv], None]
    where: Callable[[AutostartEnv], str]


_BACKENDS: Final[Mapping[str, _Backend]] = {
    "linux": _Backend(
        _linux_is_enabled, _linux_enable, _linux_disable, lambda e: str(desktop_path(e))
    ),
    "darwin": _Backend(
        _macos_is_enabled, _macos_enable, _macos_disable, lambda e: str(plist_path(e))
    ),
    "windows": _Backend(
        _windows_is_enabled,
        _windows_enable,
        _windows_disable,
        lambda _e: f"HKCU\\{RUN_KEY}\\{RUN_VALUE_NAME}",
    ),
}


def _backend(env: AutostartEnv) -> _Backend:
    key = platform_key(env.platform)
    if key is None:
        raise AutostartError(f"start at login is not supported on {env.platform}")
    return _BACKENDS[key]


def is_enabled(env: AutostartEnv | None = None) -> bool:
    """Whether fedtray is set to start at login; False when unknown or unsupported."""
    env = env if env is not None else current_env()
    key = platform_key(env.platform)
    return False if key is None else _BACKENDS[key].is_enabled(env)


def enable(env: AutostartEnv | None = None) -> None:
    """Make fedtray start at login; nothing changes when it already does."""
    env = env if env is not None else current_env()
    _backend(env).enable(env)


def disable(env: AutostartEnv | None = None) -> None:
    """Stop fedtray starting at login; nothing changes when it already does not."""
    env = env if env is not None else current_env()
    _backend(env).disable(env)


def describe(env: AutostartEnv | None = None) -> str:
    """One line for ``fedtray autostart status``: on/off and where that is recorded."""
    env = env if env is not None else current_env()
    key = platform_key(env.platform)
    if key is None:
        return f"start at login: not supported on {env.platform}"
    backend = _BACKENDS[key]
    state = "on" if backend.is_enabled(env) else "off"
    if key == "windows" and _startup_shortcut(env) is not None:
        where = str(_startup_shortcut(env))
    else:
        where = backend.where(env)
    return f"start at login: {state} ({where})"
