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


def _noise(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A pre-hook adding a large offset in train mode only (training-time noise)."""
    return (args[0] + 100.0,) if module.training else args


def _hooked(module: nn.Module, *, pre: bool) -> nn.Module:
    if pre:
        module.register_forward_pre_hook(_noise)
    else:
        module.register_forward_hook(lambda m, args, out: out.neg() if m.training else out)
    return nn.Sequential(module)


def _own_forward(module: nn.Linear) -> nn.Module:
    """A plain Linear whose instance has its own forward (mode dependent)."""
    plain = module.forward
    module.forward = lambda x: plain(x).neg() if module.training else plain(x)  # type: ignore[method-assign]
    return nn.Sequential(module)


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
    # torch.nn.utils.spectral_norm: a plain Linear whose forward pre-hook runs a power
    # iteration in train mode only (writing its buffers), not in eval mode.
    "spectral norm": (
        lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 3)), nn.Linear(3, 2)),
        False,
    ),
    "forward hook": (lambda: _hooked(nn.Linear(4, 2), pre=False), False),
    "forward pre-hook": (lambda: _hooked(nn.Linear(4, 2), pre=True), False),
    "own forward": (lambda: _own_forward(nn.Linear(4, 2)), False),
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

    # Nor one set on the instance (as a test's task loader sets build_model).
    task = _Plain()
    task.evaluate = lambda model, x, y: {"accuracy": 0.25}  # type: ignore[method-assign]
    assert train_accuracy(task, model, data, direct=True) == 0.25


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


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_accuracy_as_the_trainer_asks_is_task_evaluates_and_changes_nothing(
    name: str,
) -> None:
    """``direct=mode_free(model)`` (what the trainer passes): Task.evaluate's value, the
    model's state (buffers too) and mode as they were, whatever the model."""
    task = _Plain()
    data = _data(300, seed=7)
    for seed in range(3):
        torch.manual_seed(seed)
        model = MODELS[name][0]()
        model.train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        got = train_accuracy(task, model, data, direct=mode_free(model))
        after = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(before)
        assert got == task.evaluate(model, data[0], data[1])["accuracy"]
        assert all(torch.equal(before[k], v) for k, v in after.items()), name
        assert all(m.training for m in model.modules())


def _flip_in_training(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
    """A forward hook negating a training model's output (its argmax flips)."""
    return out.neg() if module.training and isinstance(module, nn.Sequential) else None


def test_a_global_forward_hook_is_run_as_task_evaluate_runs_it() -> None:
    task = _Plain()
    data = _data(300, seed=3)
    model = task.build_model({}, 0)
    model.train()
    handle = nn.modules.module.register_module_forward_hook(_flip_in_training)
    try:
        expected = task.evaluate(model, data[0], data[1])["accuracy"]
        assert train_accuracy(task, model, data, direct=mode_free(model)) == expected
        with torch.no_grad():  # the hook does change a training model's output
            assert torch.equal(model(data[2]), -model.eval()(data[2]))
    finally:
        handle.remove()


class _OwnTrainStep(_Plain):
    """Its own loss (not cross-entropy): labels Task.evaluate's cross-entropy refuses
    train, so its evaluate raises (as it always did for such a task)."""

    def train_step(self, model: nn.Module, x_batch: torch.Tensor, y_batch: torch.Tensor) -> Any:
        return (model(x_batch)[:, 0] - y_batch.float()).pow(2).mean()


def test_a_task_with_its_own_train_step_raises_what_task_evaluate_raises() -> None:
    x_np, _y, x, _yt = _data(20)
    y_np = np.arange(20, dtype=np.int64) % 5  # 5 classes for a 2-output model
    y_np.flags.writeable = False
    data = (x_np, y_np, x, torch.tensor(y_np))
    task = _OwnTrainStep()
    model = task.build_model({}, 0)
    with pytest.raises(IndexError) as expected:
        task.evaluate(model, x_np, y_np)
    with pytest.raises(IndexError) as got:
        train_accuracy(task, model, data, direct=mode_free(model))
    assert str(got.value) == str(expected.value)
