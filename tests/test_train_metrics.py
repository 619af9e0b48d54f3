"""client.train_metrics (a round's trainAccuracy) and client.kept_model.cpu_arrays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn

from client.kept_model import BuiltModel, cpu_arrays
from client.tasks import get_task
from client.tasks.base import EVAL_BATCH, Task, model_state
from client.train_metrics import mode_free, train_accuracy
from client.weights import layout_of

torch.set_num_threads(1)


class _MyLinear(nn.Linear):
    """A subclass: its forward could do anything, so it is not taken as plain."""


MODELS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), True),
    "flatten-tanh": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
        True,
    ),
    "in-place relu": (lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 2)), False),
    "dropout": (lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2)), False),
    "batch norm": (lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), False),
    "subclass": (lambda: nn.Sequential(_MyLinear(4, 2)), False),
    "nested": (lambda: nn.Sequential(nn.Sequential(nn.Linear(4, 2)), nn.Identity()), True),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mode_free(name: str) -> None:
    build, expected = MODELS[name]
    assert mode_free(build()) is expected


def _data(n: int, seed: int = 0) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal((n, 4), dtype=np.float32)
    y_np = rng.integers(0, 2, n).astype(np.int64)
    x_np.flags.writeable = False
    y_np.flags.writeable = False
    return x_np, y_np, torch.tensor(x_np), torch.tensor(y_np)


class _Plain(Task):
    name = "plain-test"

    def build_model(self, params: Any, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))

    def load_data(self, split: Any, partition: Any) -> tuple[npt.NDArray[Any], ...]:
        raise AssertionError("not used")


class _OwnEvaluate(_Plain):
    def evaluate(self, model: nn.Module, x: Any, y: Any) -> dict[str, float]:
        return {"accuracy": 0.125}


@pytest.mark.parametrize("n", [1, 3, 17, EVAL_BATCH + 5])
@pytest.mark.parametrize("training", [True, False])
def test_the_direct_accuracy_is_task_evaluates(n: int, training: bool) -> None:
    task = _Plain()
    data = _data(n, seed=n)
    for seed in range(5):
        model = task.build_model({}, seed)
        model.train(training)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        expected = task.evaluate(model, data[0], data[1])["accuracy"]
        assert train_accuracy(task, model, data, direct=True) == expected
        assert all(m.training is training for m in model.modules())  # mode untouched
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert model[0].weight.grad is None  # no gradients


def test_the_direct_accuracy_leaves_the_data_as_it_was() -> None:
    data = _data(9)
    copies = [np.array(data[0]), np.array(data[1]), data[2].clone(), data[3].clone()]
    train_accuracy(_Plain(), _Plain().build_model({}, 1), data, direct=True)
    assert np.array_equal(copies[0], data[0]) and np.array_equal(copies[1], data[1])
    assert torch.equal(copies[2], data[2]) and torch.equal(copies[3], data[3])


def test_a_task_with_its_own_evaluate_or_a_model_not_mode_free_uses_task_evaluate() -> None:
    data = _data(8)
    model = _Plain().build_model({}, 0)
    assert train_accuracy(_OwnEvaluate(), model, data, direct=True) == 0.125
    assert train_accuracy(_OwnEvaluate(), model, data, direct=False) == 0.125

    class Counting(_Plain):
        calls = 0

        def evaluate(self, model: nn.Module, x: Any, y: Any) -> dict[str, float]:
            Counting.calls += 1
            return super().evaluate(model, x, y)

    # Not the default evaluate (a subclass overrides it): called whatever ``direct`` says.
    train_accuracy(Counting(), model, data, direct=True)
    assert Counting.calls == 1


def test_a_task_without_accuracy_reports_nan() -> None:
    class NoAccuracy(_Plain):
        def evaluate(self, model: nn.Module, x: Any, y: Any) -> dict[str, float]:
            return {"loss": 1.0}

    assert np.isnan(
        train_accuracy(NoAccuracy(), _Plain().build_model({}, 0), _data(3), direct=False)
    )


def _built(model: nn.Module) -> BuiltModel:
    task = get_task("digits", {"hidden": 4})
    return BuiltModel("key", task, model, layout_of(model_state(model)))


def test_cpu_arrays_are_the_models_memory_made_once() -> None:
    built = _built(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    first = cpu_arrays(built)
    assert first is not None
    state = model_state(built.model)
    assert first.keys() == state.keys()
    for name, arr in first.items():
        assert np.array_equal(arr, state[name]) and arr.flags.writeable
    again = cpu_arrays(built)
    assert again is not None
    assert all(again[k] is first[k] for k in first)  # remembered
    first["0.weight"][0, 0] = 42.0  # written through to the model
    assert built.model[0].weight[0, 0].item() == 42.0


def test_cpu_arrays_are_made_again_when_a_tensor_moved() -> None:
    built = _built(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    first = cpu_arrays(built)
    assert first is not None
    with torch.no_grad():
        built.model[0].weight = nn.Parameter(torch.ones(3, 4))  # a new tensor
    again = cpu_arrays(built)
    assert again is not None
    assert again["0.weight"] is not first["0.weight"]
    assert np.array_equal(again["0.weight"], np.ones((3, 4), dtype=np.float32))
    again["0.weight"][1, 1] = 7.0
    assert built.model[0].weight[1, 1].item() == 7.0


def test_cpu_arrays_are_none_for_a_tensor_that_is_not_dense() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight = nn.Parameter(torch.ones(4, 3).t())  # a transposed view
    built = _built(nn.Sequential(nn.Linear(4, 3)))
    built.model = model
    assert cpu_arrays(built) is None
