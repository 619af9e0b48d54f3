"""What this device is: type, platform, hardware, torch version.

Contract:

* :func:`detect_device` returns a :class:`DeviceInfo` and never raises for a missing
  torch, a failing GPU probe or an unusable cache directory: those give ``gpu=None``
  (with a logged warning for probe and cache problems).
* It never imports torch in the calling process. The torch version comes from package
  metadata; the GPU comes from :mod:`client.gpu_probe` run as a subprocess (see
  :func:`probe_command`), at most :data:`PROBE_TIMEOUT_S` seconds. The answer is cached
  as JSON in ``<user cache dir>/gpu.json`` keyed by (``sys.executable``, torch version),
  so the probe runs once per interpreter and torch install. A failed probe is not
  cached (it may be transient) and is retried on the next call. The first call after a
  torch install may therefore block for seconds: call it off the event loop.
* Without torch there is no probe and ``gpu`` is None.
* :func:`classify_device`, :func:`has_display`, :func:`probe_command` and
  :func:`parse_probe_output` are pure.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import platformdirs
import psutil
from pydantic import ValidationError

from client import __version__
from client.gpu_probe import GPU_PROBE_FLAG
from client.protocol import (
    DeviceType,
    GpuInfo,
    HardwareInfo,
    PlatformInfo,
    ShortText,
    WireModel,
)
from client.resources import battery_present

logger = logging.getLogger(__name__)

APP_NAME = "fedtray"
GPU_CACHE_FILENAME = "gpu.json"
PROBE_TIMEOUT_S = 30.0
_MIB = 1024 * 1024
# Systems whose desktop is not X11/Wayland: a display is always there.
_ALWAYS_DISPLAY = frozenset({"Darwin", "Windows"})


class DeviceInfo(WireModel):
    """Data class containing device information sent during registration."""

    device_type: DeviceType
    platform: PlatformInfo
    hardware: HardwareInfo
    torch_version: ShortText | None
    client_version: ShortText


class GpuProbeError(Exception):
    """The GPU probe subprocess failed, timed out or printed something unreadable."""


class _GpuCache(WireModel):
    """Contents of ``gpu.json``: the probe's answer and what it depends on."""

    executable: str
    torch_version: str
    gpu: GpuInfo | None


# --- pure decisions --------------------------------------------------------------------


def has_display(system: str, environ: Mapping[str, str]) -> bool:
    """Whether a graphical session exists: always on macOS/Windows, else when ``DISPLAY`` or
    ``WAYLAND_DISPLAY`` is set (X11/Wayland systems)."""
    if system in _ALWAYS_DISPLAY:
        return True
    return bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


def classify_device(system: str, battery_present: bool, has_display: bool) -> DeviceType:
    """``laptop`` with a battery, else ``server`` on a headless X11/Wayland system, else
    ``desktop``.

    The battery wins over headlessness: a laptop reached over SSH still runs on battery.
    macOS and Windows always have a display, whatever ``has_display`` says.
    """
    if battery_present:
        return "laptop"
    if system not in _ALWAYS_DISPLAY and not has_display:
        return "server"
    return "desktop"


def probe_command(executable: str, frozen: bool) -> list[str]:
    """The command line that runs :mod:`client.gpu_probe` with ``executable``.

    A PyInstaller bundle cannot run ``-m``; it must route ``--gpu-probe`` to
    :func:`client.gpu_probe.main` (see that module).
    """
    if frozen:
        return [executable, GPU_PROBE_FLAG]
    return [executable, "-m", "client.gpu_probe"]


def parse_probe_output(stdout: str) -> GpuInfo | None:
    """The probe's answer from its stdout (its last non-empty line, since a library may
    print before it). Raises :class:`GpuProbeError` when that is not a valid answer."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise GpuProbeError("the GPU probe printed nothing")
    try:
        answer: Any = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise GpuProbeError(f"the GPU probe printed {lines[-1][:200]!r}, not JSON") from None
    if answer is None:
        return None
    if not isinstance(answer, dict):
        raise GpuProbeError(f"the GPU probe printed {answer!r}, not an object or null")
    try:
        return GpuInfo.model_validate(answer)
    except ValidationError as exc:
        raise GpuProbeError(f"the GPU probe's answer is invalid: {exc}") from None


# --- I/O at the edges ------------------------------------------------------------------


def torch_version() -> str | None:
    """The installed torch version from package metadata (torch is not imported), or None."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def default_cache_dir() -> Path:
    """fedtray's user cache directory (honours ``XDG_CACHE_HOME`` on Linux)."""
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def _probe_env() -> dict[str, str]:
    """The child's environment: ours, with this ``client`` package importable first."""
    env = dict(os.environ)
    if not getattr(sys, "frozen", False):
        # Run the same client package as ours even if the child's working directory or
        # sys.path would find another (or none, when running from a source checkout).
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_gpu_probe(command: Sequence[str], timeout: float) -> GpuInfo | None:
    """Run the probe subprocess and return its answer; raise :class:`GpuProbeError` on failure."""
    # No console window flashing up when the tray (a GUI app) starts the probe.
    creationflags = 0
    if sys.platform == "win32":
        creationflags = subprocess.CREATE_NO_WINDOW
    try:
        done = subprocess.run(
            list(command),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=_probe_env(),
            creationflags=creationflags,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GpuProbeError(f"the GPU probe did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise GpuProbeError(f"the GPU probe could not start: {exc}") from None
    if done.returncode != 0:
        detail = done.stderr.strip()[-500:] or "no message"
        raise GpuProbeError(f"the GPU probe exited with status {done.returncode}: {detail}")
    return parse_probe_output(done.stdout)


def _read_cache(path: Path, executable: str, version: str) -> _GpuCache | None:
    """The cached answer when it exists, is valid and matches the key; else None."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("ignoring unreadable GPU cache %s: %s", path, exc)
        return None
    try:
        cached = _GpuCache.model_validate_json(text)
    except ValidationError:
        logger.warning("ignoring corrupt GPU cache %s; probing again", path)
        return None
    if cached.executable != executable or cached.torch_version != version:
        return None
    return cached


def _write_cache(path: Path, entry: _GpuCache) -> None:
    """Write the cache atomically; a failure only costs a re-probe next time."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=".gpu-", suffix=".tmp")
        tmp = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(entry.model_dump_json(by_alias=True))
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not write GPU cache %s: %s", path, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def detect_gpu(
    torch_version: str,
    *,
    cache_dir: Path | None = None,
    executable: str | None = None,
    command: Sequence[str] | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> GpuInfo | None:
    """The GPU torch can use, from the cache or a fresh probe; None on any failure (logged).

    ``executable`` (default ``sys.executable``) is both part of the cache key and the
    interpreter the probe runs with; ``command`` overrides the probe command line.
    """
    exe = executable if executable is not None else sys.executable
    path = (cache_dir if cache_dir is not None else default_cache_dir()) / GPU_CACHE_FILENAME
    cached = _read_cache(path, exe, torch_version)
    if cached is not None:
        return cached.gpu
    argv = (
        list(command)
        if command is not None
        else probe_command(exe, bool(getattr(sys, "frozen", False)))
    )
    try:
        gpu = run_gpu_probe(argv, timeout)
    except GpuProbeError as exc:
        logger.warning("GPU detection failed, training will use the CPU: %s", exc)
        return None
    _write_cache(path, _GpuCache(executable=exe, torch_version=torch_version, gpu=gpu))
    return gpu


def detect_platform() -> PlatformInfo:
    """This machine's OS and interpreter."""
    return PlatformInfo(
        os=platform.system(),
        release=platform.release(),
        arch=platform.machine(),
        python=platform.python_version(),
    )


def detect_device(*, probe_gpu: bool = True, cache_dir: Path | None = None) -> DeviceInfo:
    """Describe this device for registration (see the module contract)."""
    system = platform.system()
    battery = battery_present()
    version = torch_version()
    gpu = detect_gpu(version, cache_dir=cache_dir) if probe_gpu and version is not None else None
    hardware = HardwareInfo(
        cpu_cores=max(1, psutil.cpu_count(logical=True) or os.cpu_count() or 1),
        ram_total_mb=max(1, int(psutil.virtual_memory().total) // _MIB),
        gpu=gpu,
        battery_present=battery,
    )
    return DeviceInfo(
        device_type=classify_device(system, battery, has_display(system, os.environ)),
        platform=detect_platform(),
        hardware=hardware,
        torch_version=version,
        client_version=__version__,
    )
