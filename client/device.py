"""What this device is: type, platform, hardware, torch version, and the GPU torch can use.

Contract:

* :func:`detect_device` returns a :class:`DeviceInfo` and never raises for a missing
  torch, a failing GPU probe or an unusable cache directory: those give ``gpu=None``
  (with a logged warning for probe and cache problems). With ``probe_gpu=False`` it
  takes the GPU from the cache only (``None`` when nothing is cached) and returns in
  milliseconds: a session registers with that and finds the GPU later
  (:func:`find_gpu`, reported in a heartbeat, see :mod:`client.session.hardware`).
* It never imports torch in the calling process. The torch version comes from package
  metadata. :func:`find_gpu` answers from the cache, else from the OS without torch
  (:mod:`client.gpu_facts`), else from :mod:`client.gpu_probe` run as a subprocess (see
  :func:`probe_command`), at most :data:`PROBE_TIMEOUT_S` seconds and killed when the
  caller is cancelled. :data:`GPU_PROBE_COMMAND_ENV` (a JSON list of strings), when
  set, replaces both the OS and the torch probe with that command (for tests: a slow or
  made-up probe). The answer is cached as JSON in ``<user cache dir>/gpu.json`` keyed
  by (``sys.executable``, torch version), so a probe runs once per interpreter and
  torch install (:func:`cached_gpu` reads it). A failed probe is not cached (it may be
  transient) and is retried on the next call.
* Without torch there is no probe and ``gpu`` is None.
* :func:`classify_device`, :func:`has_display`, :func:`probe_command`,
  :func:`parse_probe_output` and :func:`parse_probe_command_env` are pure.
"""

from __future__ import annotations

import asyncio
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import platformdirs
import psutil
from pydantic import ValidationError

from client import __version__
from client.gpu_facts import ASK_TORCH, AskTorch, decide, read_gpu_facts
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
GPU_PROBE_COMMAND_ENV: Final = "FEDTRAY_GPU_PROBE_COMMAND"
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

    def with_gpu(self, gpu: GpuInfo | None) -> DeviceInfo:
        """This description with ``gpu`` as its GPU."""
        return self.model_copy(update={"hardware": self.hardware.model_copy(update={"gpu": gpu})})


@dataclass(frozen=True)
class KnownGpu:
    """A settled answer about the GPU (``gpu`` None: torch can use none)."""

    gpu: GpuInfo | None


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


def parse_probe_command_env(text: str) -> list[str]:
    """A :data:`GPU_PROBE_COMMAND_ENV` value: a non-empty JSON list of strings. Raises
    :class:`ValueError` naming the variable otherwise."""
    try:
        value: Any = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not value or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f"{GPU_PROBE_COMMAND_ENV}={text[:200]!r} is not a JSON list of strings "
            '(e.g. ["python", "-c", "print(\'null\')"])'
        )
    return value


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


async def run_gpu_probe(command: Sequence[str], timeout: float) -> GpuInfo | None:
    """Run the probe subprocess and return its answer; raise :class:`GpuProbeError` on
    failure. The child is killed on a timeout and when the caller is cancelled."""
    # No console window flashing up when the tray (a GUI app) starts the probe.
    kwargs: dict[str, Any] = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_probe_env(),
            **kwargs,
        )
    except OSError as exc:
        raise GpuProbeError(f"the GPU probe could not start: {exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        raise GpuProbeError(f"the GPU probe did not answer within {timeout:g} s") from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: do not leave it running
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip()[-500:] or "no message"
        raise GpuProbeError(f"the GPU probe exited with status {proc.returncode}: {detail}")
    return parse_probe_output(out.decode(errors="replace"))


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


def cached_gpu(
    torch_version: str, *, cache_dir: Path | None = None, executable: str | None = None
) -> KnownGpu | None:
    """The cached answer for this interpreter and torch version, or None (not cached)."""
    exe = executable if executable is not None else sys.executable
    path = (cache_dir if cache_dir is not None else default_cache_dir()) / GPU_CACHE_FILENAME
    cached = _read_cache(path, exe, torch_version)
    return KnownGpu(cached.gpu) if cached is not None else None


def os_gpu_answer() -> GpuInfo | AskTorch | None:
    """What the OS says without torch (:mod:`client.gpu_facts`); never raises."""
    try:
        return decide(read_gpu_facts())
    except Exception as exc:  # a bug or an odd OS: the torch probe still answers
        logger.warning("could not read the GPU from the OS (%r); asking torch", exc)
        return ASK_TORCH


async def find_gpu(
    torch_version: str,
    *,
    cache_dir: Path | None = None,
    executable: str | None = None,
    command: Sequence[str] | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> GpuInfo | None:
    """The GPU torch can use: the cache, else the OS, else the torch probe; None on any
    failure (logged). Never raises but :class:`asyncio.CancelledError`.

    ``executable`` (default ``sys.executable``) is both part of the cache key and the
    interpreter the probe runs with; ``command`` (or :data:`GPU_PROBE_COMMAND_ENV`)
    replaces the OS and torch probes with that command.
    """
    exe = executable if executable is not None else sys.executable
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    known = cached_gpu(torch_version, cache_dir=cache, executable=exe)
    if known is not None:
        return known.gpu
    if command is None and (override := os.environ.get(GPU_PROBE_COMMAND_ENV)):
        try:
            command = parse_probe_command_env(override)
        except ValueError as exc:
            logger.warning("%s; ignoring it", exc)
    answer: GpuInfo | AskTorch | None = ASK_TORCH
    if command is None:
        answer = await asyncio.to_thread(os_gpu_answer)
    if isinstance(answer, AskTorch):
        argv = (
            list(command)
            if command is not None
            else probe_command(exe, bool(getattr(sys, "frozen", False)))
        )
        try:
            answer = await run_gpu_probe(argv, timeout)
        except GpuProbeError as exc:
            logger.warning("GPU detection failed, training will use the CPU: %s", exc)
            return None
    entry = _GpuCache(executable=exe, torch_version=torch_version, gpu=answer)
    await asyncio.to_thread(_write_cache, cache / GPU_CACHE_FILENAME, entry)
    return answer


def detect_gpu(
    torch_version: str,
    *,
    cache_dir: Path | None = None,
    executable: str | None = None,
    command: Sequence[str] | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> GpuInfo | None:
    """:func:`find_gpu` for synchronous callers with no running event loop."""
    return asyncio.run(
        find_gpu(
            torch_version,
            cache_dir=cache_dir,
            executable=executable,
            command=command,
            timeout=timeout,
        )
    )


def detect_platform() -> PlatformInfo:
    """This machine's OS and interpreter."""
    return PlatformInfo(
        os=platform.system(),
        release=platform.release(),
        arch=platform.machine(),
        python=platform.python_version(),
    )


def detect_device(*, probe_gpu: bool = True, cache_dir: Path | None = None) -> DeviceInfo:
    """Describe this device (see the module contract). ``probe_gpu=False``: the GPU from
    the cache only, no probe (returns at once; None when nothing is cached)."""
    system = platform.system()
    battery = battery_present()
    version = torch_version()
    gpu: GpuInfo | None = None
    if version is not None:
        if probe_gpu:
            gpu = detect_gpu(version, cache_dir=cache_dir)
        elif (known := cached_gpu(version, cache_dir=cache_dir)) is not None:
            gpu = known.gpu
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
