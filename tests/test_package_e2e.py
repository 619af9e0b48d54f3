"""Bring your own model, end to end, as an operator and two volunteers would.

A model class that exists only in the operator's file is packed with ``fedtray-server
pack``; the file is deleted (no device could import it); ``fedtray-server --task-file``
serves the package; two ``fedtray-client`` processes train it to a stated accuracy.
Then the same with device-local data: the data never leaves the devices, and a device
with no data for the task refuses with a reason the server's status (and so the
dashboard) shows.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.weights import decode
from tests.server_harness import REPO_ROOT, server_process, subprocess_env
from tests.waiting import scaled

pytestmark = [pytest.mark.slow, pytest.mark.torch]

CLASSES = 3
FEATURES = 6
ROUNDS = 3
#: What the trained global model reaches on held-out data (the data is learnable: each
#: class lights its own feature).
ACCURACY = 0.9

OPERATOR_MODEL = '''
from torch import nn


class OperatorsOwnNet(nn.Module):
    """Exists only in this file, which is deleted once the package is made."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.body(x)


def make_model():
    return OperatorsOwnNet()
'''


def _data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    x = rng.normal(0, 0.3, (n, FEATURES)).astype(np.float32)
    x[np.arange(n), y] += 2.0
    return x, y


def _pack(tmp_path: Path, *flags: str) -> Path:
    """Pack the operator's model with the CLI, then delete the model file."""
    work = tmp_path / "operator"
    work.mkdir()
    model = work / "my_model.py"
    model.write_text(OPERATOR_MODEL, encoding="utf-8")
    out = tmp_path / "opnet.fedtask"
    proc = subprocess.run(
        [sys.executable, "-m", "server", "pack", f"{model}:make_model", "-o", str(out),
         "--name", "opnet", "--epochs", "2", "--batch-size", "16", "--learning-rate", "0.1",
         "--momentum", "0.9", *flags],
        cwd=REPO_ROOT, env=subprocess_env(tmp_path), capture_output=True, text=True,
        timeout=scaled(300), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(work)  # the class is gone: only the package knows the model now
    return out


@contextmanager
def _client(tmp_path: Path, url: str, name: str) -> Iterator[list[str]]:
    """A ``fedtray-client`` process with its own settings and data dirs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "client", "--server", url, "--name", name],
        cwd=REPO_ROOT, env=subprocess_env(tmp_path / name),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: lines.extend(out), daemon=True).start()
    try:
        yield lines
    finally:
        proc.terminate()
        try:
            proc.wait(scaled(60))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(scaled(30))


def _finished(status: dict[str, Any]) -> bool:
    return status["phase"] == "finished"


def _server_flags(package: Path, clients: int) -> tuple[str, ...]:
    return ("--task-file", str(package), "--rounds", str(ROUNDS), "--min-clients", "2",
            "--clients-per-round", str(clients), "--min-completion", "0.6",
            "--round-timeout", "180")  # fmt: skip


def _cached_packages(tmp_path: Path, name: str) -> list[Path]:
    return list((tmp_path / name).glob("xdg/xdg_data_home/fedtray/packages/*.fedtask"))


def _accuracy(package: Path, weights: Path, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    from client.taskpkg.archive import read_package
    from client.taskpkg.task import PackagedTask

    task = PackagedTask(read_package(package), {"train": (x, y)})
    model = task.build_model({}, 0)
    state = decode(weights.read_bytes(), "safetensors")
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return task.evaluate(model, x, y)["accuracy"]


def test_a_model_only_the_operator_had_is_packed_served_and_trained(tmp_path: Path) -> None:
    x_train, y_train = _data(1, 600)
    x_test, y_test = _data(2, 150)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    package = _pack(tmp_path, "--data", str(data))

    with server_process(tmp_path, *_server_flags(package, 2)) as server, ExitStack() as stack:
        for name in ("volunteer-1", "volunteer-2"):
            stack.enter_context(_client(tmp_path, server.url, name))
        status = server.wait_for(_finished, timeout=900, what="every round trained")
    completed = [r for r in status["history"] if r["outcome"] == "completed"]
    assert len(completed) == ROUNDS
    assert completed[-1]["evalAccuracy"] >= ACCURACY, completed[-1]
    for name in ("volunteer-1", "volunteer-2"):
        assert len(_cached_packages(tmp_path, name)) == 1, "the package came once, cached"


def test_local_data_never_leaves_the_devices_and_a_device_without_it_says_why(
    tmp_path: Path,
) -> None:
    package = _pack(tmp_path, "--local-data", "--input-shape", str(FEATURES),
                    "--num-classes", str(CLASSES))  # fmt: skip
    x_test, y_test = _data(9, 300)
    for index, name in enumerate(("volunteer-1", "volunteer-2")):
        folder = tmp_path / f"{name}-data"
        folder.mkdir()
        x, y = _data(10 + index, 300)
        np.savez(folder / "train.npz", x=x, y=y)
        subprocess.run(
            [sys.executable, "-m", "client", "config", "set", "task_data.opnet", str(folder)],
            cwd=REPO_ROOT, env=subprocess_env(tmp_path / name), check=True,
            capture_output=True, timeout=scaled(120),
        )  # fmt: skip

    with server_process(tmp_path, *_server_flags(package, 3)) as server, ExitStack() as stack:
        for name in ("volunteer-1", "volunteer-2", "no-data"):
            stack.enter_context(_client(tmp_path, server.url, name))
        refused = server.wait_for(
            lambda st: any("no_local_data" in (d.get("refusal") or "") for d in st["devices"]),
            timeout=600,
            what="the device without data refusing, with its reason",
        )
        status = server.wait_for(_finished, timeout=900, what="every round trained")
    [no_data] = [d for d in refused["devices"] if d["name"] == "no-data"]
    assert "no data folder is set for task 'opnet'" in no_data["refusal"]
    completed = [r for r in status["history"] if r["outcome"] == "completed"]
    assert len(completed) == ROUNDS
    assert no_data["roundsCompleted"] == 0
    final = tmp_path / "server-state" / f"global-v{status['globalVersion']}.safetensors"
    assert _accuracy(package, final, x_test, y_test) >= ACCURACY
