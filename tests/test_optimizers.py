"""client.optimizers: bit for bit torch.optim's SGD and Adam, their state, and no torch._dynamo.

The reference is torch.optim itself, run here on the same inputs (this process imports
torch._dynamo through it; the no-dynamo promise is checked in a fresh process, slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import client.trainer
from client.checkpoint import Position, checkpoint_bytes, load_checkpoint
from client.optimizers import SGD, Adam, make_optimizer, state_slots
from client.protocol import Partition, TrainingConfig
from client.trainer import LocalTrainer, TrainJob
from tests.server_harness import subprocess_env

torch.set_num_threads(1)

Make = Callable[[Iterable[torch.Tensor]], Any]

#: name -> (ours, torch.optim's), the same hyper-parameters.
OPTIMIZERS: dict[str, tuple[Make, Make]] = {
    "sgd": (lambda p: SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd-momentum": (
        lambda p: SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    ),
    "sgd-dampening-decay": (
        lambda p: SGD(p, lr=0.03, momentum=0.5, dampening=0.3, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.5, dampening=0.3, weight_decay=0.01),
    ),
    "sgd-nesterov": (
        lambda p: SGD(p, lr=0.07, momentum=0.8, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.SGD(p, lr=0.07, momentum=0.8, nesterov=True, weight_decay=1e-3),
    ),
    "adam": (lambda p: Adam(p, lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
    "adam-betas-eps-decay": (
        lambda p: Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02),
        lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02),
    ),
}

SHAPES = {
    "matrix-vector": [(7, 5), (5,)],
    "scalar-and-3d": [(), (2, 3, 4)],
    "one-big": [(257, 33)],
}


def _params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(7)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _train(optimizer: Any, params: list[torch.nn.Parameter], steps: int, *, seed: int = 11) -> None:
    """``steps`` steps with random gradients; parameter 0 has none at step 2 (skipped)."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        optimizer.zero_grad()
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if not (i == 0 and step == 2):
                p.grad = grad
        optimizer.step()


def _same_state(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert ours["state"][index].keys() == state.keys()
        for name, value in state.items():
            mine = ours["state"][index][name]
            assert mine.dtype == value.dtype and mine.device == value.device
            assert torch.equal(mine, value), f"{index}.{name}"
    assert [len(g["params"]) for g in ours["param_groups"]] == [
        len(g["params"]) for g in theirs["param_groups"]
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_steps_are_bit_identical_to_torch_optim(name: str, shapes: str, dtype: torch.dtype) -> None:
    make_ours, make_theirs = OPTIMIZERS[name]
    mine, theirs = _params(SHAPES[shapes], dtype), _params(SHAPES[shapes], dtype)
    ours, reference = make_ours(mine), make_theirs(theirs)
    _train(ours, mine, 5)
    _train(reference, theirs, 5)
    for a, b in zip(mine, theirs, strict=True):
        assert a.dtype == dtype
        assert torch.equal(a, b)
    _same_state(ours.state_dict(), reference.state_dict())
    assert all(p.grad is not None for p in mine)
    ours.zero_grad()
    assert all(p.grad is None for p in mine)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_moves_between_ours_and_torch_optim_either_way(name: str) -> None:
    """A checkpoint written with torch.optim's classes resumes with ours and back."""
    make_ours, make_theirs = OPTIMIZERS[name]
    shapes = SHAPES["matrix-vector"]
    straight = _params(shapes, torch.float32)
    reference = make_theirs(straight)
    _train(reference, straight, 3, seed=1)
    _train(reference, straight, 3, seed=2)

    first = _params(shapes, torch.float32)
    theirs = make_theirs(first)
    _train(theirs, first, 3, seed=1)
    ours = make_ours(first)
    ours.load_state_dict(theirs.state_dict())
    _train(ours, first, 3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first, straight, strict=True))

    second = _params(shapes, torch.float32)
    mine = make_ours(second)
    _train(mine, second, 3, seed=1)
    back = make_theirs(second)
    back.load_state_dict(mine.state_dict())
    _train(back, second, 3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(second, straight, strict=True))


def test_loaded_state_is_a_copy_cast_to_the_parameter() -> None:
    params = _params([(3,)], torch.float64)
    source = Adam(params, lr=0.1)
    _train(source, params, 2)
    saved = source.state_dict()
    as_float32 = {
        "state": {
            0: {k: v.to(torch.float32) if k != "step" else v for k, v in saved["state"][0].items()}
        },
        "param_groups": saved["param_groups"],
    }
    target = Adam(params, lr=0.1)
    target.load_state_dict(as_float32)
    state = target.state_dict()["state"][0]
    assert state["exp_avg"].dtype == torch.float64  # cast to the parameter, as torch does
    assert state["step"].dtype == torch.float32 and state["step"].item() == 2.0
    before = state["exp_avg"].clone()
    as_float32["state"][0]["exp_avg"].add_(1.0)  # the caller's tensors are not shared
    assert torch.equal(target.state_dict()["state"][0]["exp_avg"], before)


def _bad_states() -> dict[str, tuple[Make, Callable[[dict[str, Any]], None]]]:
    def two_groups(s: dict[str, Any]) -> None:
        s["param_groups"] = s["param_groups"] * 2

    def fewer_params(s: dict[str, Any]) -> None:
        s["param_groups"] = [{**s["param_groups"][0], "params": [0]}]

    def index_out_of_range(s: dict[str, Any]) -> None:
        s["state"][5] = s["state"][0]

    def other_names(s: dict[str, Any]) -> None:
        s["state"][0] = {"something": torch.zeros(7, 5)}

    def wrong_shape(s: dict[str, Any]) -> None:
        s["state"][1] = {k: v if k == "step" else torch.zeros(6) for k, v in s["state"][1].items()}

    def not_a_tensor(s: dict[str, Any]) -> None:
        s["state"][1] = {k: 1.0 for k in s["state"][1]}

    sgd: Make = OPTIMIZERS["sgd-momentum"][0]
    adam: Make = OPTIMIZERS["adam"][0]
    return {
        "sgd two groups": (sgd, two_groups),
        "sgd fewer params": (sgd, fewer_params),
        "sgd index out of range": (sgd, index_out_of_range),
        "sgd other names": (sgd, other_names),
        "sgd wrong shape": (sgd, wrong_shape),
        "sgd not a tensor": (sgd, not_a_tensor),
        "adam other names": (adam, other_names),
        "adam wrong shape": (adam, wrong_shape),
        "adam not a tensor": (adam, not_a_tensor),
        "adam step not a scalar": (
            adam,
            lambda s: s["state"][1].__setitem__("step", torch.zeros(2)),
        ),
    }


BAD_STATES = _bad_states()


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(case: str) -> None:
    make, spoil = BAD_STATES[case]
    params = _params(SHAPES["matrix-vector"], torch.float32)
    optimizer = make(params)
    _train(optimizer, params, 2)
    bad = optimizer.state_dict()
    bad = {
        "state": {i: dict(s) for i, s in bad["state"].items()},
        "param_groups": bad["param_groups"],
    }
    spoil(bad)
    before = {
        i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()
    }
    with pytest.raises(ValueError):
        optimizer.load_state_dict(bad)
    after = optimizer.state_dict()["state"]
    assert after.keys() == before.keys()
    assert all(torch.equal(after[i][k], v) for i, s in before.items() for k, v in s.items())


@pytest.mark.parametrize(
    ("config", "kind", "slots", "hyper"),
    [
        (TrainingConfig(epochs=1, batch_size=1, learning_rate=0.1), SGD, 0, {"momentum": 0.0}),
        (
            TrainingConfig(epochs=1, batch_size=1, learning_rate=0.2, momentum=0.9),
            SGD,
            1,
            {"lr": 0.2, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
        ),
        (
            TrainingConfig(
                epochs=1, batch_size=1, learning_rate=0.3, optimizer="adam", momentum=0.5
            ),
            Adam,
            2,
            {"lr": 0.3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
        ),
    ],
)
def test_make_optimizer_follows_the_config(
    config: TrainingConfig, kind: type, slots: int, hyper: dict[str, Any]
) -> None:
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], config)
    assert type(optimizer) is kind
    group = optimizer.state_dict()["param_groups"][0]
    assert {k: group[k] for k in hyper} == hyper
    assert state_slots(config) == slots


@pytest.mark.parametrize(
    "make",
    [
        lambda: SGD([], lr=0.1),
        lambda: SGD([torch.nn.Parameter(torch.zeros(1))], lr=-1.0),
        lambda: SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, nesterov=True),
        lambda: Adam([torch.nn.Parameter(torch.zeros(1))], betas=(1.0, 0.9)),
        lambda: Adam([torch.nn.Parameter(torch.zeros(1))], eps=-1.0),
    ],
)
def test_bad_hyper_parameters_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


def test_a_checkpoint_with_torch_optim_state_resumes_with_ours(tmp_path: Path) -> None:
    """Checkpoints written before client.optimizers (torch.optim's state) still load."""
    model = torch.nn.Linear(4, 3)
    theirs = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(theirs, list(model.parameters()), 3)
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(
        checkpoint_bytes(
            round_id="r1", fingerprint="f", model=model, optimizer=theirs, position=Position(4)
        )
    )
    other = torch.nn.Linear(4, 3)
    ours = Adam(other.parameters(), lr=0.01)
    load_checkpoint(path, "f", other, ours, torch.device("cpu"))
    _same_state(ours.state_dict(), theirs.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters(), strict=True)
    )


CONFIGS = {
    "sgd": TrainingConfig(epochs=2, batch_size=32, learning_rate=0.05, seed=3),
    "sgd-momentum": TrainingConfig(
        epochs=2, batch_size=32, learning_rate=0.05, momentum=0.9, seed=3
    ),
    "adam": TrainingConfig(epochs=2, batch_size=16, learning_rate=0.01, optimizer="adam", seed=5),
    "adam-fedprox": TrainingConfig(
        epochs=1, batch_size=16, learning_rate=0.01, optimizer="adam", seed=5, proximal_mu=2.0
    ),
}


def _torch_optim(params: Iterable[torch.Tensor], config: TrainingConfig) -> Any:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate)
    return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_round_gives_the_weights_torch_optim_gives(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = TrainJob(
        round_id="round-1",
        task="digits",
        model_params={"hidden": 16},
        config=CONFIGS[name],
        partition=Partition(index=1, count=3, seed=4),
        base_weights_path=None,
        output_path=tmp_path / "ours.safetensors",
        checkpoint_path=tmp_path / "ckpt.safetensors",
        torch_threads=1,
    )
    ours = LocalTrainer(device="cpu").run(job)
    monkeypatch.setattr(client.trainer, "make_optimizer", _torch_optim)
    theirs = LocalTrainer(device="cpu").run(replace(job, output_path=tmp_path / "theirs"))
    assert ours.sha256 == theirs.sha256
    assert ours.output_path.read_bytes() == theirs.output_path.read_bytes()
    assert ours.metrics["trainLoss"] == theirs.metrics["trainLoss"]


_NO_DYNAMO = """
import json, sys, tempfile
from pathlib import Path
from client.protocol import Partition, TrainingConfig
from client.trainer import Command, LocalTrainer, TrainJob, warm_up

class DieAtSecondBatch:
    def __init__(self): self.calls = 0
    def check(self) -> Command:
        self.calls += 1
        return "pause" if self.calls == 2 else "run"
    def wait_while_paused(self) -> None:
        raise KeyboardInterrupt("killed while paused")

seen = {}
warm_up()
seen["warm_up"] = "torch._dynamo" in sys.modules
d = Path(tempfile.mkdtemp())
for opt in ("sgd", "adam"):
    job = TrainJob(round_id="r1", task="digits", model_params={"hidden": 8},
        config=TrainingConfig(epochs=1, batch_size=256, learning_rate=0.05, optimizer=opt,
                              momentum=0.9 if opt == "sgd" else 0.0, seed=1),
        partition=Partition(index=0, count=3), base_weights_path=None,
        output_path=d / f"{opt}.safetensors", checkpoint_path=d / f"{opt}.ckpt",
        torch_threads=1)
    try:
        LocalTrainer(device="cpu").run(job, DieAtSecondBatch())  # checkpoint: state_dict
    except KeyboardInterrupt:
        pass
    assert job.checkpoint_path.exists()
    LocalTrainer(device="cpu").run(job)  # resumed: load_state_dict
    assert not job.checkpoint_path.exists()
    seen[opt] = "torch._dynamo" in sys.modules
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_warm_up_and_training_never_import_torch_dynamo(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _NO_DYNAMO],
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "warm_up": False,
        "sgd": False,
        "adam": False,
    }
