"""The Linux package end to end: build the PyInstaller bundle and the .deb, unpack the .deb
into a temporary root, and use the INSTALLED executable as a user would.

What breaks if packaging is wrong: the .deb layout (command symlinks, menu entry, icon,
Depends), ``fedtray --version`` and the ``fedtray-client`` argv[0] dispatch, the frozen
GPU probe route, a full training round from the packaged headless client against the
reference server from this source tree (frozen ``spawn`` worker, bundled torch and digits
data), a round of a task package the bundle has never seen (packed in the test from a
model file that is then deleted, served with ``--task-file``: the frozen worker rebuilds
the programs from JSON with torch's serde, ``torch.export`` and sympy, and trains them),
and the packaged tray docking on a real X server and quitting with exit 0.

The bundle and .deb are built once per session (:func:`package`), by
``packaging/build-linux.sh`` -- the script ``make package`` runs. A ``dist/fedtray_*.deb``
newer than every source file it is built from is reused; ``CI`` or
``FEDTRAY_PACKAGE_REBUILD`` in the environment always rebuilds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_harness import (
    REPO_ROOT,
    ProcessHandle,
    ServerHandle,
    running_server,
    server_process,
    subprocess_env,
)
from xharness import XSession, _poll, xsession  # noqa: F401  (fixture)

from client import __version__
from client.config import Settings, save_settings
from client.snapshot import ClientSnapshot
from tests.waiting import scaled
from tray.menu import MenuEntry, build_menu

# The build alone takes minutes; each test's limit includes the shared fixture's setup.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "packaging" / "build-linux.sh"
# What the package is built from: anything newer than the .deb makes it stale.
SOURCES = ("client", "tray", "packaging", "assets", "pyproject.toml", "constraints.txt")
BUILD_TIMEOUT = 1200.0
DEVICE_ID = "9b1f3c2e-4a5d-4e6f-8a7b-1c2d3e4f5a6b"


@dataclass(frozen=True)
class Installed:
    """The .deb unpacked with ``dpkg -x`` under ``root``."""

    deb: Path
    root: Path

    @property
    def exe(self) -> Path:
        return self.root / "opt" / "fedtray" / "fedtray"


def _newest_source_mtime() -> float:
    newest = 0.0
    for name in SOURCES:
        path = ROOT / name
        paths = [path] if path.is_file() else path.rglob("*")
        for item in paths:
            if item.is_file() and "__pycache__" not in item.parts:
                newest = max(newest, item.stat().st_mtime)
    return newest


def _fresh_deb() -> Path | None:
    if os.environ.get("CI") or os.environ.get("FEDTRAY_PACKAGE_REBUILD"):
        return None
    debs = sorted((ROOT / "dist").glob(f"fedtray_{__version__}_*.deb"))
    if len(debs) != 1 or not (ROOT / "dist" / "fedtray" / "fedtray").is_file():
        return None
    return debs[0] if debs[0].stat().st_mtime > _newest_source_mtime() else None


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    deb = _fresh_deb()
    if deb is None:
        done = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], cwd=ROOT, capture_output=True, text=True,
            timeout=BUILD_TIMEOUT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        debs = sorted((ROOT / "dist").glob(f"fedtray_{__version__}_*.deb"))
        assert len(debs) == 1, f"expected one .deb in dist/, found {debs}"
        deb = debs[0]
    root = tmp_path_factory.mktemp("deb-root")
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, timeout=scaled(300))
    return Installed(deb, root)


def user_env(tmp_path: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose home and XDG dirs are under ``tmp_path``."""
    env = dict(base if base is not None else os.environ)
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        path = tmp_path / "user" / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    env["HOME"] = str(tmp_path / "user")
    # The packaged app must not lean on this source tree or venv.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def run(args: list[str | Path], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    done = subprocess.run(
        [str(a) for a in args], env=env, cwd=env["HOME"], capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def _load_entry() -> Any:
    # By path: a top-level `packaging` directory is not a package (PyPI's `packaging` is).
    spec = importlib.util.spec_from_file_location("fedtray_entry", ROOT / "packaging" / "entry.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/opt/fedtray/fedtray"], ("tray", [])),
        (["fedtray", "--version"], ("tray", ["--version"])),
        (["fedtray", "autostart", "enable"], ("tray", ["autostart", "enable"])),
        (["fedtray", "--gpu-probe"], ("gpu-probe", [])),
        (["fedtray-client", "--gpu-probe"], ("gpu-probe", [])),
        # The probe flag among other arguments is not the probe.
        (["fedtray", "--gpu-probe", "x"], ("tray", ["--gpu-probe", "x"])),
        (["fedtray", "client", "--server", "u"], ("client", ["--server", "u"])),
        (["/usr/bin/fedtray-client", "config", "show"], ("client", ["config", "show"])),
        (["C:\\fedtray\\fedtray-client.exe", "info"], ("client", ["info"])),
        (["fedtray-client.EXE"], ("client", [])),
        # Through the alias, "client" is the client's own argument, not a subcommand.
        (["fedtray-client", "client"], ("client", ["client"])),
        (["fedtray", "settings", "client"], ("tray", ["settings", "client"])),
        ([], ("tray", [])),
    ],
)
def test_entry_dispatch(argv: list[str], expected: tuple[str, list[str]]) -> None:
    assert _load_entry().program_for(argv) == expected


# ---------------------------------------------------------------------------------------


def test_deb_installs_commands_menu_entry_and_icon(package: Installed) -> None:
    usr = package.root / "usr"
    for name in ("fedtray", "fedtray-client"):
        link = usr / "bin" / name
        assert link.is_symlink(), f"/usr/bin/{name} is not a symlink"
        assert os.readlink(link) == "/opt/fedtray/fedtray"
    assert os.access(package.exe, os.X_OK)

    entry = (usr / "share" / "applications" / "fedtray.desktop").read_text(encoding="utf-8")
    lines = set(entry.splitlines())
    assert {"Type=Application", "Exec=fedtray", "Icon=fedtray", "Terminal=false"} <= lines
    for size in (16, 48, 256):
        icon = usr / "share" / "icons" / "hicolor" / f"{size}x{size}" / "apps" / "fedtray.png"
        from PIL import Image

        with Image.open(icon) as image:
            assert image.size == (size, size)

    def field(name: str) -> str:
        done = subprocess.run(
            ["dpkg-deb", "--field", str(package.deb), name],
            capture_output=True, text=True, check=True, timeout=scaled(60),
        )  # fmt: skip
        return done.stdout.strip()

    assert field("Package") == "fedtray"
    assert field("Version") == __version__
    depends = field("Depends")
    assert "libgtk-3-0" in depends and "appindicator3" in depends, depends
    # The digits data is inside the bundle (the built-in task reads it as a resource).
    assert (package.exe.parent / "_internal" / "client" / "tasks" / "data" / "digits.npz").is_file()


def test_uninstall_scripts_leave_user_data_alone(package: Installed, tmp_path: Path) -> None:
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "--control", str(package.deb), str(control)], check=True,
                   timeout=scaled(60))  # fmt: skip
    scripts = [p for p in control.iterdir() if p.name in ("preinst", "postinst", "prerm", "postrm")]
    assert {p.name for p in scripts} >= {"postrm"}
    for script in scripts:
        text = script.read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert not any("rm " in line or "HOME" in line or "/home" in line for line in lines), (
            f"{script.name} would touch files it does not own"
        )
    # Run the postrm as dpkg would on purge, with a fake user's data around: untouched.
    home = tmp_path / "home"
    settings = home / ".config" / "fedtray" / "config.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text("server_url = 'http://x'\n", encoding="utf-8")
    env = {**user_env(tmp_path), "HOME": str(home), "PATH": "/usr/bin:/bin"}
    code, output = run(["sh", control / "postrm", "purge"], env)
    assert code == 0, output
    assert settings.read_text(encoding="utf-8") == "server_url = 'http://x'\n"


def test_installed_version_client_alias_and_gpu_probe(package: Installed, tmp_path: Path) -> None:
    env = user_env(tmp_path)
    code, output = run([package.exe, "--version"], env)
    assert (code, output.strip()) == (0, f"fedtray {__version__}")

    # /usr/bin/fedtray-client is a symlink to the one executable: dispatch on argv[0].
    alias = tmp_path / "bin" / "fedtray-client"
    alias.parent.mkdir()
    alias.symlink_to(package.exe)
    code, output = run([alias, "--version"], env)
    assert (code, output.strip()) == (0, f"fedtray-client {__version__}")
    code, output = run([package.exe, "client", "--version"], env)
    assert (code, output.strip()) == (0, f"fedtray-client {__version__}")

    code, output = run([package.exe, "--gpu-probe"], env)
    assert code == 0, output
    assert json.loads(output.strip().splitlines()[-1]) is None  # CPU torch: no accelerator


def _one_round_with_the_bundle(
    package: Installed,
    tmp_path: Path,
    server: ServerHandle | ProcessHandle,
    env: dict[str, str],
    wait: float,
) -> tuple[dict[str, Any], str]:
    """Run the installed client (through its ``fedtray-client`` alias) until the server
    records a first round attempt, completed or abandoned (a broken bundle fails fast, no
    waiting out a timeout); assert it completed with one report. The status and the
    client's output."""
    alias = tmp_path / "bin" / "fedtray-client"
    alias.parent.mkdir()
    alias.symlink_to(package.exe)
    log = tmp_path / "client-output.txt"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(alias), "--server", server.url, "--name", "packaged"],
            env=env, cwd=env["HOME"], stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        status = server.wait_for(
            lambda s: len(s["history"]) >= 1, wait, "a round attempt with the packaged client"
        )
    except TimeoutError as exc:
        server_output = server.output() if isinstance(server, ProcessHandle) else ""
        raise AssertionError(
            f"{exc}\nclient output:\n{log.read_text(errors='replace')}\n{server_output}"
        ) from exc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(scaled(30))
    output = log.read_text(errors="replace")
    record = status["history"][0]
    assert record["outcome"] == "completed", f"{record}\nclient output:\n{output}"
    assert record["clientsReported"] == 1
    assert record["trainLoss"] is not None
    return status, output


def test_packaged_client_completes_a_round(package: Installed, tmp_path: Path) -> None:
    env = user_env(tmp_path)
    # The real digits task: proves the bundled data file and torch, not only the wire.
    with running_server(tmp_path, task="digits", model_params={"hidden": 16},
                        min_clients=1, round_timeout=90.0) as server:  # fmt: skip
        status, output = _one_round_with_the_bundle(package, tmp_path, server, env, 240)
    [device] = status["devices"]
    assert device["name"] == "packaged"
    assert device["roundsCompleted"] >= 1
    assert "Traceback" not in output


#: The operator's models for the package test, in a file no device ever sees: a
#: convolution with dropout (train and eval programs differ), and the same with batch
#: norm (running statistics and a 0-d ``num_batches_tracked`` buffer).
OPERATOR_MODELS = {
    "conv-dropout": """
from torch import nn


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.1),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )
""",
    "conv-batchnorm-dropout": """
from torch import nn


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )
""",
}


def _image_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """1x4x4 images of 3 classes, each class lighting its own row: learnable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int64)
    x = rng.normal(0, 0.3, (n, 1, 4, 4)).astype(np.float32)
    x[np.arange(n), 0, y, :] += 2.0
    return x, y


def _pack_operator_model(tmp_path: Path, source: str) -> Path:
    """Pack the model in ``source`` from the source tree (the operator's side), then delete
    the model file: only the package knows the model."""
    work = tmp_path / "operator"
    work.mkdir()
    model = work / "operator_model.py"
    model.write_text(source, encoding="utf-8")
    data = work / "data.npz"
    x_train, y_train = _image_data(1, 240)
    x_test, y_test = _image_data(2, 60)
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    out = tmp_path / "unseen.fedtask"
    done = subprocess.run(
        [sys.executable, "-m", "server", "pack", f"{model}:make_model", "--data", str(data),
         "-o", str(out), "--name", "unseen", "--epochs", "1", "--batch-size", "16"],
        cwd=REPO_ROOT, env=subprocess_env(tmp_path / "operator-env"), capture_output=True,
        text=True, timeout=scaled(300), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.rmtree(work)
    return out


@pytest.mark.parametrize(
    "model",
    [
        "conv-dropout",
        "conv-batchnorm-dropout",
    ],
)
def test_packaged_client_trains_a_task_package_it_has_never_seen(
    package: Installed, tmp_path: Path, model: str
) -> None:
    fedtask = _pack_operator_model(tmp_path, OPERATOR_MODELS[model])
    env = user_env(tmp_path)
    flags = ("--task-file", str(fedtask), "--rounds", "1", "--min-clients", "1",
             "--round-timeout", "180")  # fmt: skip
    with server_process(tmp_path, *flags) as server:
        status, output = _one_round_with_the_bundle(package, tmp_path, server, env, 300)
    [device] = status["devices"]
    assert (device["name"], device["roundsCompleted"]) == ("packaged", 1), device
    # The bundle downloaded the (device's copy of the) package and keeps it in its cache.
    cached = list(Path(env["XDG_DATA_HOME"]).glob("fedtray/packages/*.fedtask"))
    assert len(cached) == 1, cached
    assert "Traceback" not in output


def _quit_presses(server_url: str) -> int:
    """Down-arrow presses that select Quit in the connected tray's menu."""
    settings = Settings(server_url=server_url, device_id=DEVICE_ID, device_name="pkg")
    snapshot = ClientSnapshot(settings=settings, connection="connected")
    menu = build_menu(snapshot, monotonic_now=0.0, wall_now=datetime.now())
    labels = [n.label for n in menu if isinstance(n, MenuEntry) and n.enabled]
    return labels.index("Quit") + 1


@pytest.fixture
def packaged_tray(
    package: Installed,
    xsession: XSession,  # noqa: F811
    tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Any, float]]:
    with running_server(tmp_path) as server:
        env = user_env(tmp_path, xsession.env)
        save_settings(
            Settings(server_url=server.url, device_name="pkg", device_id=DEVICE_ID),
            Path(env["XDG_CONFIG_HOME"]) / "fedtray" / "config.toml",
        )
        log = tmp_path / "tray-output.txt"
        started = time.monotonic()
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [str(package.exe), "--log-level", "DEBUG"],
                env=env, cwd=env["HOME"], stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            yield proc, log, server, started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(scaled(10))


def test_packaged_tray_docks_and_quits(
    packaged_tray: tuple[subprocess.Popen[bytes], Path, Any, float],
    xsession: XSession,  # noqa: F811
) -> None:
    proc, log, server, started = packaged_tray
    try:
        icon = xsession.wait_for_docked(90)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\ntray output:\n{log.read_text(errors='replace')}") from exc
    docked_after = time.monotonic() - started
    print(f"packaged tray docked {docked_after:.2f} s after launch")
    server.wait_for(
        lambda s: any(d["id"] == DEVICE_ID and d["connected"] for d in s["devices"]),
        60,
        "the packaged tray's device online",
    )

    left, top, width, height = xsession.window_geometry(icon)
    xsession.xdotool("mousemove", str(left + width // 2), str(top + height // 2), "click", "3")

    def menu_open() -> bool:
        out = xsession.run("xdotool", "search", "--onlyvisible", "--pid", str(proc.pid),
                           check=False)  # fmt: skip
        for token in out.split():
            try:
                if xsession.window_geometry(int(token))[3] >= 150:
                    return True
            except (RuntimeError, KeyError):
                continue  # the window went away between the search and the query
        return False

    _poll(menu_open, 15, "the packaged tray's menu to open")
    presses = _quit_presses(server.url)
    xsession.xdotool("key", "--delay", "60", *(["Down"] * presses), "Return")
    code = proc.wait(scaled(20))
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert "Traceback" not in output
    server.wait_for(
        lambda s: not any(d["id"] == DEVICE_ID and d["connected"] for d in s["devices"]),
        20,
        "the packaged tray's device offline after Quit",
    )
