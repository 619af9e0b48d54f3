"""A float64 task end to end: the server's initial weights -> the trainer -> the codec ->
the server's aggregation, every tensor staying float64 (one model -> numpy rule)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydantic import JsonValue

from client.protocol import Partition, TrainingConfig
from client.tasks.base import Task
from client.trainer import LocalTrainer
from client.weights import decode, encode, layout_of, sha256_hex
from client.workfiles import WorkDir
from server.aggregation import FedAvg
from server.model import evaluate_state, initial_state
from tests.float64_task import Float64Task


def _loader(name: str, params: Mapping[str, JsonValue]) -> Task:
    assert name == "float64"
    return Float64Task().configure(params)


def test_a_float64_task_trains_and_aggregates_end_to_end(tmp_path: Path) -> None:
    task = Float64Task().configure(None)
    initial = initial_state(task, task.params, seed=0)
    assert {a.dtype for a in initial.values()} == {np.dtype(np.float64)}
    layout = layout_of(initial)
    base = tmp_path / "global.safetensors"
    base.write_bytes(encode(initial, "safetensors"))

    work = WorkDir(tmp_path / "work")
    config = TrainingConfig(epochs=2, batch_size=16, learning_rate=0.1, momentum=0.9)
    updates = []
    for index in range(2):
        job = work.job(
            round_id="r1",
            task="float64",
            model_params={},
            config=config,
            partition=Partition(index=index, count=2),
            base_weights_path=base,
            base_version=0,
            base_sha256=sha256_hex(base.read_bytes()),
            torch_threads=1,
        )
        work.prepare(job)
        result = LocalTrainer(device="cpu", task_loader=_loader).run(job)
        # The server's check of an update: the codec with the global layout.
        update = decode(result.output_path.read_bytes(), "safetensors", expected=layout)
        updates.append((update, result.num_samples))

    strategy = FedAvg()
    strategy.begin(initial)
    for update, samples in updates:
        strategy.add(update, samples)
    new_global = strategy.result()
    assert layout_of(new_global) == layout
    total = sum(n for _, n in updates)
    for name in initial:
        expected = sum(u[name] * n for u, n in updates) / total
        np.testing.assert_allclose(new_global[name], expected, rtol=0, atol=1e-12)
        assert not np.array_equal(new_global[name], initial[name])  # it trained
    x, y = task.load_data("test", None)
    assert evaluate_state(task, task.params, new_global, x, y)["accuracy"] > 0.6
