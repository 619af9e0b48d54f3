"""FedProx on the device: the proximal term, its gradient on every kind of task, mu = 0
byte for byte FedAvg's local training, the pull towards the base, pause/resume with mu > 0.

(Pause/resume and restart with mu > 0 on a built-in task are in tests/test_trainer.py's
``CONFIGS``; a checkpoint of another mu is ignored there too.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from pydantic import JsonValue

from client.protocol import Partition, TrainingConfig
from client.proximal import ProximalAnchor, is_anchored, proximal_anchor
from client.taskpkg.task import PackagedTask, load_packaged_task
from client.tasks import get_task
from client.tasks.base import Task, model_state
from client.trainer import Command, LocalTrainer, TrainJob, epoch_seed
from client.weights import decode, encode
from tests.float64_task import Float64Task

pytestmark = pytest.mark.torch
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.taskpkg_packer import pack

    path = tmp_path_factory.mktemp("pkg") / "tiny.fedtask"
    pack(path)
    return path


class MseEcho(Float64Task):
    """A plugin task with its own loss (mean squared error on one-hot targets)."""

    name: ClassVar[str] = "mse-echo"

    def train_step(
        self, model: torch.nn.Module, x_batch: torch.Tensor, y_batch: torch.Tensor
    ) -> torch.Tensor:
        target = torch.nn.functional.one_hot(y_batch.long(), 2).to(x_batch.dtype)
        loss: torch.Tensor = ((model(x_batch) - target) ** 2).mean()
        return loss


def _task(kind: str, package: Path) -> Task:
    if kind == "built-in":
        return get_task("digits", {"hidden": 16})
    if kind == "plugin":
        return MseEcho()
    return load_packaged_task(package)


KINDS = ["built-in", "plugin", "packaged"]


def _job(tmp_path: Path, kind: str, mu: float, **changes: Any) -> TrainJob:
    task = {"built-in": "digits", "plugin": "mse-echo", "packaged": "package"}[kind]
    params: dict[str, JsonValue] = {"hidden": 16} if kind == "built-in" else {}
    job = TrainJob(
        round_id="round-1",
        task=task,
        model_params=params,
        config=TrainingConfig(
            epochs=2, batch_size=16, learning_rate=0.05, momentum=0.9, seed=3, proximal_mu=mu
        ),
        partition=Partition(index=0, count=2, seed=4, scheme="iid"),
        base_weights_path=None,
        output_path=tmp_path / f"out-{mu}.safetensors",
        checkpoint_path=tmp_path / "ckpt.safetensors",
        torch_threads=1,
    )
    return replace(job, **changes)


def _trainer(task: Task) -> LocalTrainer:
    def loader(name: str, params: Mapping[str, JsonValue]) -> Task:
        return task

    return LocalTrainer(device="cpu", task_loader=loader)


def _distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], names: list[str]) -> float:
    return math.sqrt(sum(float(((a[n] - b[n]).astype(np.float64) ** 2).sum()) for n in names))


# -- the term ----------------------------------------------------------------------------


@pytest.mark.parametrize("mu", [-1.0, math.nan, math.inf, -math.inf])
def test_a_mu_that_is_not_finite_and_non_negative_is_refused(mu: float) -> None:
    with pytest.raises(ValueError, match="proximal mu"):
        proximal_anchor(torch.nn.Linear(2, 2), mu)


def test_mu_zero_takes_no_anchor() -> None:
    assert proximal_anchor(torch.nn.Linear(2, 2), 0.0) is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mu", [0.01, 0.5, 3.0])
def test_the_term_and_its_gradient_on_every_kind_of_task(
    package: Path, kind: str, mu: float
) -> None:
    model = _task(kind, package).build_model({} if kind != "built-in" else {"hidden": 16}, 7)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    anchor = proximal_anchor(model, mu)
    assert anchor is not None
    params = dict(model.named_parameters())
    assert list(anchor.names) == [n for n, p in params.items() if is_anchored(p)]
    assert anchor.names and set(anchor.names) <= set(params)
    assert not set(anchor.names) & {n for n, _ in model.named_buffers()}  # no bn statistics
    # At the base the term is exactly zero.
    assert float(anchor.term(model).detach()) == 0.0
    # Move every parameter; the base stays where it was (a detached copy).
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for name, p0 in zip(anchor.names, anchor.base, strict=True):
        assert torch.equal(p0, before[name]) and not p0.requires_grad
        assert p0.dtype == params[name].dtype and p0.device == params[name].device
    model.zero_grad(set_to_none=True)
    term = anchor.term(model)
    expected = (
        mu
        / 2
        * sum(
            float(((params[n].detach() - p0).double() ** 2).sum())
            for n, p0 in zip(anchor.names, anchor.base, strict=True)
        )
    )
    assert float(term.detach()) == pytest.approx(expected, rel=1e-5)
    term.backward()  # type: ignore[no-untyped-call]
    for name, p0 in zip(anchor.names, anchor.base, strict=True):
        grad = params[name].grad
        assert grad is not None, f"no gradient reaches {name}"
        torch.testing.assert_close(grad, mu * (params[name].detach() - p0))


def test_frozen_and_integer_parameters_are_not_anchored() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    anchor = proximal_anchor(model, 1.0)
    assert anchor is not None
    assert anchor.names == ("0.bias", "1.weight", "1.bias")
    empty = ProximalAnchor(mu=1.0, names=(), base=())
    assert float(empty.term(model)) == 0.0


# -- mu = 0 is FedAvg, byte for byte ---------------------------------------------------


def _plain_local_training(task: Task, job: TrainJob, mu: float = 0.0) -> bytes:
    """The trainer's loop written out by hand: SGD over the job's seeded orders, and,
    when ``mu`` > 0, FedProx's term written independently of :mod:`client.proximal`."""
    model = task.build_model(task.params, job.config.seed)
    base = [p.detach().clone() for p in model.parameters()]
    x_np, y_np = task.load_data("train", job.partition)
    x, y = torch.as_tensor(x_np), torch.as_tensor(y_np)
    opt = torch.optim.SGD(
        model.parameters(), lr=job.config.learning_rate, momentum=job.config.momentum
    )
    n, bs = len(y), job.config.batch_size
    for epoch in range(job.config.epochs):
        gen = torch.Generator().manual_seed(epoch_seed(job.config.seed, job.partition.index, epoch))
        order = torch.randperm(n, generator=gen)
        for pos in range(0, n, bs):
            idx = order[pos : pos + bs]
            opt.zero_grad(set_to_none=True)
            loss = task.train_step(model, x[idx], y[idx])
            if mu:
                pairs = zip(model.parameters(), base, strict=True)
                drift = sum(((p - p0) ** 2).sum() for p, p0 in pairs)
                loss = loss + mu / 2 * drift
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    return encode(model_state(model), "safetensors")


def test_mu_zero_gives_the_bytes_of_plain_local_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = get_task("digits", {"hidden": 16})
    job = _job(tmp_path, "built-in", 0.0)

    def never(self: ProximalAnchor, model: torch.nn.Module) -> torch.Tensor:
        raise AssertionError("mu == 0 must not compute the proximal term at all")

    monkeypatch.setattr(ProximalAnchor, "term", never)
    got = _trainer(task).run(job).output_path.read_bytes()
    assert got == _plain_local_training(task, job)
    # The same run with mu > 0 is another update (so the comparison above can fail) ...
    monkeypatch.undo()
    prox = _trainer(task).run(_job(tmp_path, "built-in", 0.5)).output_path.read_bytes()
    assert prox != got
    # ... and it is the one the term written by hand gives.
    expected = decode(_plain_local_training(task, job, mu=0.5))
    trained = decode(prox)
    for name in expected:
        np.testing.assert_allclose(trained[name], expected[name], rtol=0, atol=1e-6)


# -- the pull towards the base, on every kind of task ------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_large_mu_keeps_the_update_closer_to_the_base(
    package: Path, tmp_path: Path, kind: str
) -> None:
    task = _task(kind, package)
    base_model = task.build_model(task.params, 11)
    names = [n for n, p in base_model.named_parameters() if is_anchored(p)]
    base_state = model_state(base_model)
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(base_state, "safetensors"))
    distances = {}
    for mu in (0.0, 0.1, 2.0):
        job = _job(tmp_path, kind, mu, base_weights_path=base)
        trained = decode(_trainer(task).run(job).output_path.read_bytes())
        distances[mu] = _distance(trained, base_state, names)
    assert distances[0.0] > 0
    assert distances[2.0] < distances[0.1] < distances[0.0], distances
    assert distances[2.0] < 0.8 * distances[0.0], distances


# -- pause and resume with mu > 0, on a plugin and a package ---------------------------


class PauseAt:
    def __init__(self, at: int, path: Path) -> None:
        self.at, self.path, self.checks, self.seen = at, path, 0, False

    def check(self) -> Command:
        self.checks += 1
        return "pause" if self.checks == self.at else "run"

    def wait_while_paused(self) -> None:
        self.seen = self.path.exists()


class DieAt(PauseAt):
    def wait_while_paused(self) -> None:
        self.seen = self.path.exists()
        raise KeyboardInterrupt("the process died while paused")


@pytest.mark.parametrize("kind", ["plugin", "packaged"])
def test_pause_and_restart_with_mu_are_bit_identical(
    package: Path, tmp_path: Path, kind: str
) -> None:
    task = _task(kind, package)
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(model_state(task.build_model(task.params, 11)), "safetensors"))
    job = _job(tmp_path, kind, 1.0, base_weights_path=base)
    plain = _trainer(task).run(replace(job, output_path=tmp_path / "plain"))
    assert (
        plain.output_path.read_bytes()
        != (
            _trainer(task).run(_job(tmp_path, kind, 0.0, base_weights_path=base))
        ).output_path.read_bytes()
    )

    control = PauseAt(5, job.checkpoint_path)  # epoch 2 for the package (3 batches each)
    paused = _trainer(task).run(replace(job, output_path=tmp_path / "paused"), control)
    assert control.seen
    assert paused.output_path.read_bytes() == plain.output_path.read_bytes()

    # A fresh trainer (a new process) resumes a checkpoint: the base is taken again.
    dying = DieAt(5, job.checkpoint_path)
    with pytest.raises(KeyboardInterrupt):
        _trainer(task).run(job, dying)
    assert dying.seen
    torch.manual_seed(12345)
    if isinstance(task, PackagedTask):
        task = load_packaged_task(package)
    resumed = _trainer(task).run(job)
    assert resumed.output_path.read_bytes() == plain.output_path.read_bytes()
    assert not job.checkpoint_path.exists()
