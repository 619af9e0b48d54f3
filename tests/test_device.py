"""Device detection: classification, torch version, GPU probe and its cache."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import platformdirs
import psutil
import pytest

from client import __version__, device
from client.device import (
    DeviceInfo,
    GpuProbeError,
    classify_device,
    detect_device,
    detect_gpu,
    has_display,
    parse_probe_output,
    probe_command,
)
from client.errors import FedtrayError
from client.gpu_facts import ASK_TORCH
from client.protocol import GpuInfo, parse
from tests.waiting import scaled

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


@pytest.fixture(autouse=True)
def _os_cannot_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OS answer is tested on its own (tests/test_gpu_facts.py); here the torch probe
    must answer, whatever this machine's OS would say."""
    monkeypatch.setattr(device, "os_gpu_answer", lambda: ASK_TORCH)


class CountingProbe:
    """Wraps the probe runner to count how often a subprocess would be spawned."""

    def __init__(self, answer: GpuInfo | None = None, *, real: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.answer = answer
        self.real = real
        self._real_runner = device.run_gpu_probe

    async def __call__(self, command: Sequence[str], timeout: float) -> GpuInfo | None:
        self.calls.append(list(command))
        if self.real:
            # The real probe imports torch: on a busy machine that takes longer than on
            # a user's idle one, so its time limit is scaled like every test wait.
            return await self._real_runner(command, scaled(timeout))
        return self.answer


# --- pure decisions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "battery", "display", "expected"),
    [
        ("Linux", True, True, "laptop"),
        ("Linux", True, False, "laptop"),  # a laptop over SSH is still on battery
        ("Linux", False, True, "desktop"),
        ("Linux", False, False, "server"),
        ("FreeBSD", False, False, "server"),
        ("FreeBSD", False, True, "desktop"),
        ("Darwin", True, True, "laptop"),
        ("Darwin", False, True, "desktop"),
        ("Darwin", False, False, "desktop"),  # macOS always has a display
        ("Windows", True, False, "laptop"),
        ("Windows", False, True, "desktop"),
        ("Windows", False, False, "desktop"),  # Windows always has a display
    ],
)
def test_classify_device(system: str, battery: bool, display: bool, expected: str) -> None:
    assert classify_device(system, battery, display) == expected


@pytest.mark.parametrize(
    ("system", "environ", "expected"),
    [
        ("Linux", {}, False),
        ("Linux", {"DISPLAY": ":0"}, True),
        ("Linux", {"WAYLAND_DISPLAY": "wayland-0"}, True),
        ("Linux", {"DISPLAY": "", "WAYLAND_DISPLAY": ""}, False),
        ("Darwin", {}, True),
        ("Windows", {}, True),
    ],
)
def test_has_display(system: str, environ: dict[str, str], expected: bool) -> None:
    assert has_display(system, environ) is expected


@pytest.mark.parametrize(
    ("frozen", "expected"),
    [
        (False, ["/x/python", "-m", "client.gpu_probe"]),
        (True, ["/x/python", "--gpu-probe"]),
    ],
)
def test_probe_command(frozen: bool, expected: list[str]) -> None:
    assert probe_command("/x/python", frozen) == expected


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("null\n", None),
        ('{"kind": "mps"}\n', GpuInfo(kind="mps")),
        (
            '{"kind": "cuda", "name": "NVIDIA H200", "memoryMb": 143771}\n',
            GpuInfo(kind="cuda", name="NVIDIA H200", memory_mb=143771),
        ),
        # a library may print before the answer; the last line counts
        ('some warning\n{"kind": "mps"}\n\n', GpuInfo(kind="mps")),
    ],
)
def test_parse_probe_output(stdout: str, expected: GpuInfo | None) -> None:
    assert parse_probe_output(stdout) == expected


@pytest.mark.parametrize(
    "stdout",
    [
        "",
        "\n  \n",
        "garbage",
        "[1, 2]",
        '"cuda"',
        '{"kind": "tpu"}',
        '{"kind": "cuda", "memoryMb": -1}',
        '{"kind": "cuda", "memoryMb": "big"}',
    ],
)
def test_parse_probe_output_refuses_bad_answers(stdout: str) -> None:
    with pytest.raises(GpuProbeError):
        parse_probe_output(stdout)


# --- torch version -----------------------------------------------------------------------


def test_torch_version_reported_iff_torch_installed() -> None:
    installed = importlib.util.find_spec("torch") is not None
    version = device.torch_version()
    assert (version is not None) == installed
    if version is not None:
        assert version[0].isdigit()


# --- real detection on this machine ------------------------------------------------------


# Slow: the real GPU probe is a child process that imports torch.
@pytest.mark.slow
def test_detect_device_on_this_machine(tmp_path: Path) -> None:
    info = detect_device(cache_dir=tmp_path)
    assert info.platform.os == platform.system()
    assert info.platform.python == platform.python_version()
    assert info.hardware.cpu_cores >= 1
    assert info.hardware.cpu_cores == (os.cpu_count() or 1)
    assert info.hardware.ram_total_mb > 0
    assert info.client_version == __version__
    assert info.torch_version == device.torch_version()
    if info.torch_version is None:
        assert info.hardware.gpu is None
    expected_type = classify_device(
        platform.system(),
        info.hardware.battery_present,
        has_display(platform.system(), os.environ),
    )
    assert info.device_type == expected_type


def test_device_info_serialises_camel_case_and_round_trips(tmp_path: Path) -> None:
    info = detect_device(probe_gpu=False, cache_dir=tmp_path)
    wire = info.to_wire()
    assert set(wire) == {"deviceType", "platform", "hardware", "torchVersion", "clientVersion"}
    assert {"cpuCores", "ramTotalMb", "gpu", "batteryPresent"} == set(wire["hardware"])
    assert parse(DeviceInfo, wire) == info
    assert parse(DeviceInfo, json.loads(info.model_dump_json(by_alias=True))) == info
    with pytest.raises(FedtrayError) as caught:
        parse(DeviceInfo, {**wire, "deviceType": "phone"})
    assert caught.value.code == "bad_request"


def test_device_info_is_frozen(tmp_path: Path) -> None:
    info = detect_device(probe_gpu=False, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="frozen"):
        info.client_version = "9"  # type: ignore[misc]


def test_headless_linux_is_a_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    info = detect_device(probe_gpu=False, cache_dir=tmp_path)
    if platform.system() == "Linux" and not info.hardware.battery_present:
        assert info.device_type == "server"
    monkeypatch.setenv("DISPLAY", ":0")
    info = detect_device(probe_gpu=False, cache_dir=tmp_path)
    assert info.device_type in ("desktop", "laptop")


def test_detect_device_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys, pathlib\n"
        "import client.device, client.resources, client.gpu_probe\n"
        f"info = client.device.detect_device(cache_dir=pathlib.Path({str(tmp_path)!r}))\n"
        "client.resources.ResourceMonitor().snapshot()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(info.torch_version)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=scaled(120),
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(device.torch_version())
    # the probe really ran (in its own process) when torch is installed
    assert (tmp_path / "gpu.json").exists() == (device.torch_version() is not None)


# --- GPU cache -----------------------------------------------------------------------------


# Slow: the real GPU probe is a child process that imports torch.
@pytest.mark.slow
def test_gpu_cache_written_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "torch_version", lambda: "2.13.0")
    probe = CountingProbe(real=True)
    monkeypatch.setattr(device, "run_gpu_probe", probe)
    first = detect_device(cache_dir=tmp_path)
    assert len(probe.calls) == 1
    assert probe.calls[0] == [sys.executable, "-m", "client.gpu_probe"]
    cached = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    assert cached["executable"] == sys.executable
    assert cached["torchVersion"] == "2.13.0"
    assert cached["gpu"] == (first.hardware.gpu.to_wire() if first.hardware.gpu else None)
    second = detect_device(cache_dir=tmp_path)
    assert len(probe.calls) == 1
    assert second.hardware.gpu == first.hardware.gpu


def test_cached_gpu_answer_is_returned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h200 = GpuInfo(kind="cuda", name="NVIDIA H200", memory_mb=143771)
    probe = CountingProbe(h200)
    monkeypatch.setattr(device, "run_gpu_probe", probe)
    assert detect_gpu("2.13.0", cache_dir=tmp_path) == h200
    monkeypatch.setattr(device, "run_gpu_probe", CountingProbe(None))
    assert detect_gpu("2.13.0", cache_dir=tmp_path) == h200
    assert len(probe.calls) == 1


def test_gpu_cache_default_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expected = Path(platformdirs.user_cache_dir("fedtray", appauthor=False))
    assert device.default_cache_dir() == expected
    if platform.system() == "Linux":
        assert expected == tmp_path / "cache" / "fedtray"


@pytest.mark.parametrize(
    ("changed_version", "changed_exe"),
    [("2.14.0", "/usr/bin/python3"), ("2.14.0", None), (None, "/usr/bin/python3")],
)
def test_gpu_cache_invalidated_when_key_changes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    changed_version: str | None,
    changed_exe: str | None,
) -> None:
    probe = CountingProbe(None)
    monkeypatch.setattr(device, "run_gpu_probe", probe)
    assert detect_gpu("2.13.0", cache_dir=tmp_path, executable="/venv/python") is None
    assert len(probe.calls) == 1
    probe.answer = GpuInfo(kind="mps")
    version = changed_version or "2.13.0"
    exe = changed_exe or "/venv/python"
    assert detect_gpu(version, cache_dir=tmp_path, executable=exe) == GpuInfo(kind="mps")
    assert len(probe.calls) == 2
    assert probe.calls[1][0] == exe
    cached = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    assert (cached["executable"], cached["torchVersion"]) == (exe, version)
    # the new answer is now the cached one
    assert detect_gpu(version, cache_dir=tmp_path, executable=exe) == GpuInfo(kind="mps")
    assert len(probe.calls) == 2


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"executable": 1}', b"\xff\xfe", b'{"executable":"x","torchVersion":"y"}'],
)
def test_corrupt_gpu_cache_means_reprobe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    (tmp_path / "gpu.json").write_bytes(content)
    probe = CountingProbe(GpuInfo(kind="mps"))
    monkeypatch.setattr(device, "run_gpu_probe", probe)
    assert detect_gpu("2.13.0", cache_dir=tmp_path, executable="/p") == GpuInfo(kind="mps")
    assert len(probe.calls) == 1
    assert json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))["gpu"] == {
        "kind": "mps",
        "name": None,
        "memoryMb": None,
    }


def test_unwritable_cache_dir_still_gives_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be", encoding="utf-8")
    monkeypatch.setattr(device, "run_gpu_probe", CountingProbe(GpuInfo(kind="mps")))
    with caplog.at_level(logging.WARNING, logger="client.device"):
        assert detect_gpu("2.13.0", cache_dir=blocker) == GpuInfo(kind="mps")
    assert "could not write GPU cache" in caplog.text
    assert blocker.read_text(encoding="utf-8").startswith("a file")


def test_no_torch_means_no_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "torch_version", lambda: None)
    probe = CountingProbe(GpuInfo(kind="mps"))
    monkeypatch.setattr(device, "run_gpu_probe", probe)
    info = detect_device(cache_dir=tmp_path)
    assert info.hardware.gpu is None
    assert info.torch_version is None
    assert probe.calls == []
    assert not (tmp_path / "gpu.json").exists()


def test_probe_gpu_false_skips_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "torch_version", lambda: "2.13.0")
    probe = CountingProbe(GpuInfo(kind="mps"))
    monkeypatch.setattr(device, "run_gpu_probe", probe)
    assert detect_device(probe_gpu=False, cache_dir=tmp_path).hardware.gpu is None
    assert probe.calls == []
    assert detect_device(cache_dir=tmp_path).hardware.gpu == GpuInfo(kind="mps")


# --- probe failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "timeout", "message"),
    [
        ("import sys; print('boom', file=sys.stderr); sys.exit(1)", 30.0, "status 1: boom"),
        ("print('this is not json')", 30.0, "not JSON"),
        ('print(\'{"kind": "tpu"}\')', 30.0, "invalid"),
        ("pass", 30.0, "printed nothing"),
        ("import time; time.sleep(60)", 0.5, "did not answer within 0.5 s"),
    ],
)
def test_probe_failure_gives_none_and_warning(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    script: str,
    timeout: float,
    message: str,
) -> None:
    with caplog.at_level(logging.WARNING, logger="client.device"):
        gpu = detect_gpu(
            "2.13.0",
            cache_dir=tmp_path,
            command=[sys.executable, "-c", script],
            timeout=timeout,
        )
    assert gpu is None
    assert "GPU detection failed" in caplog.text
    assert message in caplog.text
    # a failure may be transient: it is not cached
    assert not (tmp_path / "gpu.json").exists()


def test_probe_that_cannot_start_gives_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="client.device"):
        gpu = detect_gpu("2.13.0", cache_dir=tmp_path, command=[str(tmp_path / "no-such-program")])
    assert gpu is None
    assert "could not start" in caplog.text


# Slow: the real GPU probe is a child process that imports torch.
@pytest.mark.slow
def test_real_probe_succeeds_from_a_foreign_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real probe subprocess gives a valid answer (run_gpu_probe raises otherwise), even
    when the working directory is not the source checkout."""
    monkeypatch.chdir(tmp_path)
    gpu = asyncio.run(device.run_gpu_probe(probe_command(sys.executable, frozen=False), 120))
    if importlib.util.find_spec("torch") is None:
        assert gpu is None
    else:
        assert gpu is None or gpu.kind in ("cuda", "mps")


def test_gpu_probe_prints_null_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
        "from client.gpu_probe import main\n"
        "raise SystemExit(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=scaled(60),
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "null\n"


def test_gpu_probe_module_does_not_import_torch() -> None:
    code = "import sys, client.gpu_probe; assert 'torch' not in sys.modules"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=scaled(60),
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr


# --- the probe command override and cancellation -------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('["python", "-c", "print(1)"]', ["python", "-c", "print(1)"]),
        ('["/bin/probe"]', ["/bin/probe"]),
        ("[]", None),
        ("python -c x", None),
        ('"python"', None),
        ('["python", 3]', None),
        ('{"a": 1}', None),
    ],
)
def test_parse_probe_command_env(text: str, expected: list[str] | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match=device.GPU_PROBE_COMMAND_ENV):
            device.parse_probe_command_env(text)
    else:
        assert device.parse_probe_command_env(text) == expected


def test_probe_command_env_replaces_os_and_torch_probes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device, "os_gpu_answer", lambda: None)  # would say "no GPU"
    answer = '{"kind": "cuda", "name": "Env GPU", "memoryMb": 7}'
    monkeypatch.setenv(
        device.GPU_PROBE_COMMAND_ENV, json.dumps([sys.executable, "-c", f"print({answer!r})"])
    )
    assert detect_gpu("2.13.0", cache_dir=tmp_path) == GpuInfo(
        kind="cuda", name="Env GPU", memory_mb=7
    )


def test_os_answer_settles_it_without_the_torch_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h200 = GpuInfo(kind="cuda", name="NVIDIA H200", memory_mb=143771)
    monkeypatch.setattr(device, "os_gpu_answer", lambda: h200)
    probe = CountingProbe(None)
    monkeypatch.setattr(device, "run_gpu_probe", probe)
    assert detect_gpu("2.13.0", cache_dir=tmp_path) == h200
    assert probe.calls == []
    # cached like a torch answer
    assert device.cached_gpu("2.13.0", cache_dir=tmp_path) == device.KnownGpu(h200)


def test_cancelled_probe_kills_its_subprocess(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(600)\n"
    )

    async def scenario() -> int:
        task = asyncio.create_task(
            device.find_gpu("2.13.0", cache_dir=tmp_path, command=[sys.executable, "-c", script])
        )
        deadline = asyncio.get_running_loop().time() + scaled(30)
        while not pid_file.exists() or not pid_file.read_text():
            assert asyncio.get_running_loop().time() < deadline, "the probe never started"
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(pid_file.read_text())

    pid = asyncio.run(scenario())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "gpu.json").exists()
