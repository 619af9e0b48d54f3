"""A task package served with ``--task-file``: real server, real sessions, real workers.

Needs the package reader and writer (:mod:`client.taskpkg.archive`,
:mod:`client.taskpkg.program`, :mod:`client.taskpkg.task`) and torch; skipped without
them. The model is defined here only: the devices get it as a package, never as code.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from client.backoff import Backoff
from client.config import Settings
from client.session import DistributedClient, Worker
from client.taskpkg import archive, program
from server import cli
from tests.device_info import quick_device_info
from tests.server_harness import running_server

NAME = "tiny-mlp"
CLASSES = 3
ROUND_TIMEOUT = 120.0


def _data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    x = rng.normal(0, 0.3, (n, 6)).astype(np.float32)
    x[np.arange(n), y] += 2.0  # the class lights one feature: learnable in a few steps
    return x, y


def make_package(path: Path) -> Path:
    """A small MLP with batch norm and dropout, packed with its data (server source)."""
    from torch import nn

    from client.protocol import TrainingConfig
    from client.taskpkg.manifest import Manifest

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, CLASSES)
    )
    example = torch.zeros(16, 6)
    model.train()
    train_json = program.serialize_program(program.export_program(model, example))
    model.eval()
    eval_json = program.serialize_program(program.export_program(model, example))
    data = {"train": _data(1, 240), "test": _data(2, 90)}
    manifest = Manifest.model_validate(
        {
            "format": "fedtray-task/1",
            "name": NAME,
            "version": "1",
            "input": {"shape": [6], "dtype": "float32"},
            "label": {"shape": [], "dtype": "int64"},
            "loss": "cross_entropy",
            "metrics": ["loss", "accuracy"],
            "numClasses": CLASSES,
            "training": TrainingConfig(epochs=2, batch_size=16, learning_rate=0.1).model_dump(
                by_alias=True
            ),
            "data": {"source": "server", "trainSamples": 240, "testSamples": 90},
        }
    )
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    archive.write_package(path, manifest, train_json, eval_json, weights, None, data)
    return path


def test_a_bad_package_stops_the_server_with_one_line_naming_the_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.fedtask"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("manifest.json", b"{}")
        zf.writestr("../evil.py", b"print('no')")
    assert cli.main(["--task-file", str(bad), "--state-dir", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtray-server: error: bad task package") and "\n" not in err
    code = err.split(": ")[3]
    from client.errors import CODES

    assert code in CODES


def _torch_worker(on_event: Callable[[object], None]) -> Worker:
    from client.worker import TrainingWorker

    worker: Worker = TrainingWorker(on_event=on_event, simulation=False)
    return worker


@pytest.mark.slow
@pytest.mark.torch
def test_two_devices_train_a_served_package_and_cache_only_their_share(tmp_path: Path) -> None:
    from server.taskfile import open_package

    package = make_package(tmp_path / "tiny.fedtask")
    served = open_package(package)
    clients: list[DistributedClient] = []
    with running_server(
        tmp_path,
        task=NAME,
        task_file=package,
        model_params={},
        min_clients=2,
        clients_per_round=2,
        rounds=2,
        epochs=None,
        partition="label_skew",
        round_timeout=ROUND_TIMEOUT,
    ) as server:
        try:
            for i in range(2):
                client = DistributedClient(
                    Settings(server_url=server.url, device_name=f"pkg-{i}"),
                    device_info=quick_device_info(),
                    data_dir=tmp_path / f"client-{i}",
                    backoff=Backoff(base=0.1, cap=0.5),
                    settings_file=None,
                    worker_factory=_torch_worker,
                )
                client.start()
                clients.append(client)
            for client in clients:
                snap = client.wait_for(lambda s: s.weights_version == 2, ROUND_TIMEOUT * 2)
                assert snap.task == NAME and snap.last_error is None
            status = server.wait_for(
                lambda st: st["phase"] == "finished", timeout=30, what="the federation's end"
            )
        finally:
            for client in clients:
                assert client.stop(30), "a session did not stop in time"
    history = [r for r in status["history"] if r["outcome"] == "completed"]
    assert len(history) == 2 and all(r["clientsReported"] == 2 for r in history)
    assert history[-1]["evalAccuracy"] is not None and history[-1]["evalAccuracy"] > 0.6
    shares: set[str] = set()
    for i in range(2):
        folder = tmp_path / f"client-{i}" / "packages"
        cached = sorted(p.name for p in folder.iterdir())
        assert f"{served.sha256}.fedtask" in cached  # kept once, by sha256
        mine = {n for n in cached if n.endswith(".safetensors")}
        assert mine  # its share(s): a device may get another part in another round
        shares |= mine
        # The package a device got carries no data: it downloads only its own share.
        names = zipfile.ZipFile(folder / f"{served.sha256}.fedtask").namelist()
        assert not any(n.startswith("data/") for n in names)
    assert len(shares) == 2  # two partitions, each encoded once (same bytes every round)
