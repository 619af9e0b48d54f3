"""Task package programs and the PackagedTask adapter: rebuilt without pickle, dynamic
batch, train/eval programs sharing one set of tensors, trained by LocalTrainer unchanged."""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.errors import FedtrayError
from client.protocol import Partition, TrainingConfig
from client.taskpkg.archive import read_package
from client.taskpkg.graphcheck import SCHEMA_MAJOR
from client.taskpkg.program import SERDE_API, example_inputs, load_program
from client.taskpkg.task import PackagedTask, load_packaged_task
from client.trainer import Command, LocalTrainer, TrainJob
from client.weights import decode

pytestmark = pytest.mark.torch
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.taskpkg_packer import pack

    path = tmp_path_factory.mktemp("pkg") / "tiny.fedtask"
    pack(path)
    return path


def test_the_private_serde_api_we_rely_on_is_unchanged() -> None:
    for module, name in SERDE_API:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone"
    from torch._export.serde import schema, serialize

    assert schema.SCHEMA_VERSION[0] == SCHEMA_MAJOR, "torch's export schema changed"
    params = list(inspect.signature(serialize.ExportedProgramDeserializer.deserialize).parameters)
    assert params[:5] == ["self", "exported_program", "state_dict", "constants", "example_inputs"]
    kwargs = inspect.signature(serialize.serialize).parameters
    for name in ("serialize_state_dict", "serialize_constants", "serialize_example_inputs"):
        assert name in kwargs
    assert list(inspect.signature(serialize._dict_to_dataclass).parameters) == ["cls", "data"]
    # In-memory artifacts must bypass torch.load (the unsafe fallback lives there).
    artifact = {"a": torch.zeros(1)}
    assert serialize.deserialize_torch_artifact(artifact) is artifact


def test_loading_never_calls_torch_load(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    model = load_packaged_task(package).build_model({}, 0)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_an_operator_outside_the_allowlist_is_refused_before_building(package: Path) -> None:
    contents = read_package(package)
    data = json.loads(contents.train_program)
    data["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.mylib.evil.default"
    with pytest.raises(FedtrayError) as info:
        load_program(
            json.dumps(data).encode(),
            contents.weights,
            contents.constants,
            example_inputs(contents.manifest.input),
        )
    assert info.value.code == "package_operator" and "mylib.evil" in info.value.message


def test_the_rebuilt_module_matches_the_model_and_switches_programs(package: Path) -> None:
    from tests.taskpkg_packer import programs

    eager, _, _ = programs()
    task = load_packaged_task(package)
    model = task.build_model({}, 0)
    assert list(model.state_dict()) == list(eager.state_dict())
    assert set(model.state_dict()) == set(task.contents.weights)
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    eager.eval()
    torch.testing.assert_close(model(x), eager(x))
    model.train()
    for batch in (16, 5, 3, 64):  # the dynamic batch axis, a partial last batch
        out = model(torch.randn(batch, 1, 8, 8))
        assert out.shape == (batch, 4)
        out.sum().backward()
    state = model.state_dict()
    assert int(state["bn.num_batches_tracked"]) == 4  # the train program updated the stats
    assert not torch.equal(state["bn.running_mean"], eager.state_dict()["bn.running_mean"])
    model.eval()
    a, b = model(x), model(x)
    torch.testing.assert_close(a, b)  # eval: no dropout
    assert int(model.state_dict()["bn.num_batches_tracked"]) == 4  # eval: stats untouched


class PauseAt:
    def __init__(self, at: int, path: Path) -> None:
        self.at, self.path, self.checks, self.seen = at, path, 0, False

    def check(self) -> Command:
        self.checks += 1
        return "pause" if self.checks == self.at else "run"

    def wait_while_paused(self) -> None:
        self.seen = self.path.exists()


def _job(tmp_path: Path, **changes: Any) -> TrainJob:
    job = TrainJob(
        round_id="round-1",
        task="package",
        model_params={},
        config=TrainingConfig(epochs=2, batch_size=16, learning_rate=0.05, momentum=0.9, seed=3),
        partition=Partition(index=0, count=2, seed=4, scheme="iid"),  # 35 rows: 16+16+3
        base_weights_path=None,
        output_path=tmp_path / "out.safetensors",
        checkpoint_path=tmp_path / "ckpt.safetensors",
        torch_threads=1,
    )
    return replace(job, **changes)


def test_local_trainer_trains_a_package_and_resumes_bit_identically(
    package: Path, tmp_path: Path
) -> None:
    task = load_packaged_task(package)

    def loader(name: str, params: Any) -> PackagedTask:
        return task

    plain = LocalTrainer(device="cpu", task_loader=loader).run(
        _job(tmp_path, output_path=tmp_path / "plain")
    )
    assert plain.num_samples == 35 and plain.batch_size == 16
    trained = decode(plain.output_path.read_bytes())
    assert set(trained) == set(task.contents.weights)
    assert not np.array_equal(trained["fc.weight"], task.contents.weights["fc.weight"])
    tracked = trained["bn.num_batches_tracked"]
    assert tracked.shape == task.contents.weights["bn.num_batches_tracked"].shape
    assert int(tracked.reshape(-1)[0]) == 6  # 2 epochs x 3 batches
    assert 0.0 <= plain.metrics["trainAccuracy"] <= 1.0

    control = PauseAt(5, tmp_path / "ckpt.safetensors")  # epoch 2, after the partial batch
    paused = LocalTrainer(device="cpu", task_loader=loader).run(
        _job(tmp_path, output_path=tmp_path / "paused"), control
    )
    assert control.seen
    assert paused.output_path.read_bytes() == plain.output_path.read_bytes()


def test_losses_and_local_data(package: Path, tmp_path: Path) -> None:
    from tests.taskpkg_packer import make_data

    data = make_data(seed=1)
    folder = tmp_path / "mydata"
    folder.mkdir()
    x, y = data["train"]
    np.savez(folder / "train.npz", x=x[:20], y=y[:20])
    task = load_packaged_task(package, folder)
    _lx, ly = task.load_data("train", Partition(index=0, count=2, seed=4, scheme="iid"))
    assert len(ly) == 20  # the device's own data is used whole
    assert len(task.load_data("test", None)[1]) == 0
    np.savez(folder / "train.npz", x=x[:20].astype(np.float64), y=y[:20])
    with pytest.raises(FedtrayError) as info:
        load_packaged_task(package, folder)
    assert info.value.code == "package_data_mismatch"
    with pytest.raises(FedtrayError, match="package_data_mismatch"):
        load_packaged_task(package, tmp_path / "nowhere")
