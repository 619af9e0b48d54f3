"""LocalTrainer: correctness, reproducibility, pause/resume, cancel, memory handling."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import JsonValue
from safetensors import safe_open
from safetensors.torch import save

from client.atomicfile import file_identity, write_atomic
from client.errors import FedtrayError
from client.kept_model import KeptModel, load_base
from client.protocol import Partition, TrainingConfig, TrainingProgress
from client.tasks import get_task
from client.tasks.base import Task, seeded_build
from client.tasks.digits import DigitsTask
from client.trainer import (
    Cancelled,
    Command,
    LocalTrainer,
    TrainJob,
    cap_batch_size,
    epoch_seed,
    is_out_of_memory,
    warm_up,
)
from client.weights import decode, encode, sha256_hex
from client.worker_messages import TrainProgress
from client.workfiles import WorkDir

torch.set_num_threads(1)


def _job(tmp_path: Path, **changes: Any) -> TrainJob:
    job = TrainJob(
        round_id="round-1",
        task="digits",
        model_params={"hidden": 16},
        config=TrainingConfig(epochs=2, batch_size=32, learning_rate=0.05, momentum=0.9, seed=3),
        partition=Partition(index=1, count=3, seed=4, scheme="label_skew"),
        base_weights_path=None,
        output_path=tmp_path / "out.safetensors",
        checkpoint_path=tmp_path / "ckpt.safetensors",
        torch_threads=1,
    )
    return replace(job, **changes)


def _state_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# -- pure helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "samples", "per_sample", "available", "fixed", "expected"),
    [
        (32, 1000, 1000, 10**9, 0, 32),  # plenty of memory
        (32, 10, 1000, 10**9, 0, 10),  # never more than the data
        (512, 10**6, 10**6, 400 * 10**6, 0, 100),  # 25 % of 400 MB / 1 MB
        (512, 10**6, 10**6, 400 * 10**6, 50 * 10**6, 50),  # model takes its share first
        (512, 10**6, 10**6, 10**6, 0, 1),  # less than one sample fits: still 1
        (64, 100, 0, 10**6, 0, 64),  # a zero estimate does not divide by zero
        (64, 100, 10, 10**9, 10**12, 1),  # fixed costs above the budget
    ],
)
def test_cap_batch_size(
    requested: int, samples: int, per_sample: int, available: int, fixed: int, expected: int
) -> None:
    assert cap_batch_size(requested, samples, per_sample, available, fixed_bytes=fixed) == expected


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (MemoryError(), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), True),
        (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"), True),
        (RuntimeError("MPS backend out of memory"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_out_of_memory(exc: BaseException, expected: bool) -> None:
    assert is_out_of_memory(exc) is expected


def test_epoch_seeds_are_stable_and_distinct() -> None:
    seeds = {epoch_seed(s, i, e) for s in range(3) for i in range(3) for e in range(3)}
    assert len(seeds) == 27
    assert epoch_seed(1, 2, 3) == epoch_seed(1, 2, 3)
    assert all(0 <= s < 2**64 for s in seeds)


# -- correctness ---------------------------------------------------------------------------


def test_full_batch_sgd_round_equals_centralized_training(tmp_path: Path) -> None:
    task = get_task("digits", {"hidden": 16})
    # base weights from another seed than config.seed, so using the base file is tested too
    base_model = task.build_model(task.params, seed=99)
    base_path = tmp_path / "base.safetensors"
    base_path.write_bytes(encode(_state_of(base_model)))
    config = TrainingConfig(epochs=1, batch_size=10_000, learning_rate=0.5, momentum=0.0)
    job = _job(
        tmp_path, config=config, partition=Partition(index=0, count=1), base_weights_path=base_path
    )
    result = LocalTrainer(device="cpu").run(job)

    x, y = task.load_data("train", None)
    loss = torch.nn.functional.cross_entropy(base_model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        for param in base_model.parameters():
            assert param.grad is not None
            param.sub_(0.5 * param.grad)
    expected = _state_of(base_model)
    got = decode(result.output_path.read_bytes())
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6)
    assert not np.allclose(got["0.weight"], decode(base_path.read_bytes())["0.weight"])
    assert result.num_samples == 1438
    assert result.batch_size == 1438
    assert result.metrics["trainLoss"] == pytest.approx(loss.item(), rel=1e-5)
    assert set(result.metrics) == {"trainLoss", "trainAccuracy", "seconds", "batchSize"}


def test_runs_are_reproducible_and_seed_dependent(tmp_path: Path) -> None:
    a = LocalTrainer(device="cpu").run(_job(tmp_path, output_path=tmp_path / "a"))
    b = LocalTrainer(device="cpu").run(_job(tmp_path, output_path=tmp_path / "b"))
    config = _job(tmp_path).config.model_copy(update={"seed": 4})
    c = LocalTrainer(device="cpu").run(_job(tmp_path, output_path=tmp_path / "c", config=config))
    assert a.output_path.read_bytes() == b.output_path.read_bytes()
    assert a.output_path.read_bytes() != c.output_path.read_bytes()
    assert not (tmp_path / "ckpt.safetensors").exists()


def test_progress_reports_validate_as_training_progress(tmp_path: Path) -> None:
    seen: list[TrainProgress] = []
    LocalTrainer(device="cpu").run(_job(tmp_path), on_progress=seen.append)
    assert len(seen) == 2 * math.ceil(479 / 32)
    assert all(isinstance(p, TrainProgress) and p.round_id == "round-1" for p in seen)
    messages = [TrainingProgress.model_validate(asdict(p)) for p in seen]
    assert [m.epoch for m in messages[:2]] == [1, 1] and messages[-1].epoch == 2
    assert messages[-1].fraction == 1.0 and messages[-1].step == messages[-1].steps == 15
    fractions = [m.fraction for m in messages]
    assert fractions == sorted(fractions)
    assert all(m.batch_size == 32 for m in messages)


# -- pause, resume, restart --------------------------------------------------------------


class PauseAt:
    """Says "pause" once, before batch number ``at`` (counting checks from 1)."""

    def __init__(self, at: int, *, then: Command = "run", die: bool = False) -> None:
        self.at, self.then, self.die = at, then, die
        self.checks = 0
        self.waits = 0
        self.checkpoint_seen = False
        self.path: Path | None = None

    def check(self) -> Command:
        self.checks += 1
        if self.checks == self.at:
            return "pause"
        return self.then if self.waits else "run"

    def wait_while_paused(self) -> None:
        self.waits += 1
        assert self.path is not None
        self.checkpoint_seen = self.path.exists()
        if self.die:
            raise KeyboardInterrupt("the process died while paused")


CONFIGS = {
    "sgd-momentum": TrainingConfig(
        epochs=2, batch_size=32, learning_rate=0.05, momentum=0.9, seed=3
    ),
    "adam": TrainingConfig(epochs=2, batch_size=16, learning_rate=0.01, optimizer="adam", seed=5),
    # FedProx: the proximal term's base is not in the checkpoint; it is taken again.
    "sgd-momentum-fedprox": TrainingConfig(
        epochs=2, batch_size=32, learning_rate=0.05, momentum=0.9, seed=3, proximal_mu=0.5
    ),
    "adam-fedprox": TrainingConfig(
        epochs=2, batch_size=16, learning_rate=0.01, optimizer="adam", seed=5, proximal_mu=2.0
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("at", [1, 7, 16, 25])  # first batch, mid-epoch, epoch edge, epoch 2
def test_pause_and_resume_is_bit_identical(tmp_path: Path, name: str, at: int) -> None:
    config = CONFIGS[name]
    plain = LocalTrainer(device="cpu").run(
        _job(tmp_path, config=config, output_path=tmp_path / "plain")
    )
    control = PauseAt(at)
    control.path = tmp_path / "ckpt.safetensors"
    paused = LocalTrainer(device="cpu").run(
        _job(tmp_path, config=config, output_path=tmp_path / "paused"), control
    )
    assert control.waits == 1 and control.checkpoint_seen
    assert paused.output_path.read_bytes() == plain.output_path.read_bytes()
    assert paused.metrics["trainLoss"] == plain.metrics["trainLoss"]
    assert not control.path.exists()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_restart_from_checkpoint_in_a_fresh_trainer_is_bit_identical(
    tmp_path: Path, name: str
) -> None:
    config = CONFIGS[name]
    task = get_task("digits", {"hidden": 16})
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(_state_of(task.build_model(task.params, seed=1))))
    job = _job(tmp_path, config=config, base_weights_path=base)
    plain = LocalTrainer(device="cpu").run(replace(job, output_path=tmp_path / "plain"))

    control = PauseAt(math.ceil(479 / config.batch_size) + 4, die=True)  # in epoch 2
    control.path = job.checkpoint_path
    with pytest.raises(KeyboardInterrupt):
        LocalTrainer(device="cpu").run(job, control)
    assert job.checkpoint_path.exists() and not job.output_path.exists()
    # Disturb every random stream the checkpoint should restore.
    torch.manual_seed(12345)
    np.random.seed(54321)
    progress: list[TrainProgress] = []
    resumed = LocalTrainer(device="cpu").run(job, on_progress=progress.append)
    assert resumed.output_path.read_bytes() == plain.output_path.read_bytes()
    assert resumed.metrics["trainLoss"] == plain.metrics["trainLoss"]
    assert progress[0].epoch == 2  # it did not start over
    assert not job.checkpoint_path.exists()


def _other_base(tmp_path: Path) -> dict[str, Any]:
    task = get_task("digits", {"hidden": 16})
    base = tmp_path / "other-base.safetensors"
    base.write_bytes(encode(_state_of(task.build_model(task.params, seed=99))))
    return {"base_weights_path": base}


OTHER_WORK = {
    "seed": lambda _t: {"config": CONFIGS["sgd-momentum"].model_copy(update={"seed": 4})},
    "partition": lambda _t: {"partition": Partition(index=2, count=3, seed=4, scheme="label_skew")},
    "base weights": _other_base,
    "proximal mu": lambda _t: {
        "config": CONFIGS["sgd-momentum"].model_copy(update={"proximal_mu": 0.5})
    },
}


@pytest.mark.parametrize("other", sorted(OTHER_WORK))
def test_a_checkpoint_of_other_work_or_a_damaged_one_is_ignored(tmp_path: Path, other: str) -> None:
    job = _job(tmp_path)
    plain = LocalTrainer(device="cpu").run(replace(job, output_path=tmp_path / "plain"))
    control = PauseAt(5, die=True)
    control.path = job.checkpoint_path
    with pytest.raises(KeyboardInterrupt):
        LocalTrainer(device="cpu").run(replace(job, **OTHER_WORK[other](tmp_path)), control)
    assert job.checkpoint_path.exists()
    result = LocalTrainer(device="cpu").run(job)
    assert result.output_path.read_bytes() == plain.output_path.read_bytes()

    job.checkpoint_path.write_bytes(b"\x80\x04garbage, perhaps a pickle")
    again = LocalTrainer(device="cpu").run(job)
    assert again.output_path.read_bytes() == plain.output_path.read_bytes()
    assert not job.checkpoint_path.exists()

    # A checkpoint of this very job whose tensors do not fit the model changes nothing.
    control = PauseAt(5, die=True)
    control.path = job.checkpoint_path
    with pytest.raises(KeyboardInterrupt):
        LocalTrainer(device="cpu").run(job, control)
    with safe_open(str(job.checkpoint_path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != "model.2.bias"}  # noqa: SIM118
    tensors["model.0.weight"] = torch.full_like(tensors["model.0.weight"], 1e6)
    job.checkpoint_path.write_bytes(save(tensors, metadata=meta))
    third = LocalTrainer(device="cpu").run(job)
    assert third.output_path.read_bytes() == plain.output_path.read_bytes()


class DieAt:
    """Runs until check number ``at``, then "dies" there (as a ``kill -9`` would: no
    cleanup, no pause checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.checks = 0

    def check(self) -> Command:
        self.checks += 1
        if self.checks == self.at:
            raise KeyboardInterrupt("killed")
        return "run"

    def wait_while_paused(self) -> None:
        raise AssertionError("never paused")


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("at", [2, 19])  # epoch 1; epoch 2
def test_a_periodic_checkpoint_resumes_bit_identically_under_another_round_id(
    tmp_path: Path, name: str, at: int, caplog: pytest.LogCaptureFixture
) -> None:
    config = CONFIGS[name]
    steps = config.epochs * math.ceil(479 / config.batch_size)
    plain_progress: list[TrainProgress] = []
    plain = LocalTrainer(device="cpu").run(
        _job(tmp_path, config=config, output_path=tmp_path / "plain", checkpoint_interval=0),
        on_progress=plain_progress.append,
    )
    assert len(plain_progress) == steps
    # An interval shorter than any batch: a checkpoint at every batch boundary.
    job = _job(tmp_path, config=config, checkpoint_interval=1e-9)
    with pytest.raises(KeyboardInterrupt):
        LocalTrainer(device="cpu").run(job, DieAt(at))
    assert job.checkpoint_path.exists() and not job.output_path.exists()
    torch.manual_seed(12345)
    np.random.seed(54321)
    progress: list[TrainProgress] = []
    # The server retried the round under a new id: the same work resumes.
    with caplog.at_level(logging.INFO, logger="client.trainer"):
        resumed = LocalTrainer(device="cpu").run(
            replace(job, round_id="round-1-retry"), on_progress=progress.append
        )
    assert resumed.output_path.read_bytes() == plain.output_path.read_bytes()
    assert resumed.metrics["trainLoss"] == plain.metrics["trainLoss"]
    # The checkpoint was written at the boundary before the fatal check: at - 2 batches.
    done = at - 2
    assert len(progress) == steps - done, "it must resume, not start over"
    per_epoch = steps // config.epochs
    epoch, step = divmod(done, per_epoch)
    assert f"resuming round round-1-retry from epoch {epoch + 1} step {step}" in caplog.text
    assert not job.checkpoint_path.exists()


def test_interval_zero_writes_no_periodic_checkpoint(tmp_path: Path) -> None:
    job = _job(tmp_path, checkpoint_interval=0)
    with pytest.raises(KeyboardInterrupt):
        LocalTrainer(device="cpu").run(job, DieAt(20))
    assert not job.checkpoint_path.exists()


def test_cancel_while_paused_raises_and_removes_the_checkpoint(tmp_path: Path) -> None:
    job = _job(tmp_path)
    control = PauseAt(3, then="cancel")
    control.path = job.checkpoint_path
    with pytest.raises(Cancelled):
        LocalTrainer(device="cpu").run(job, control)
    assert control.checkpoint_seen
    assert not job.checkpoint_path.exists()
    assert not job.output_path.exists()


def test_the_work_key_of_the_job_decides_which_checkpoint_resumes(tmp_path: Path) -> None:
    task = get_task("digits", {"hidden": 16})
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(_state_of(task.build_model(task.params, seed=1))))
    work = WorkDir(tmp_path / "work")
    config = CONFIGS["sgd-momentum"]

    def job(round_id: str, seed: int) -> TrainJob:
        return work.job(
            round_id=round_id,
            task="digits",
            model_params={"hidden": 16},
            config=config.model_copy(update={"seed": seed}),
            partition=Partition(index=1, count=3),
            base_weights_path=base,
            base_version=2,
            base_sha256=sha256_hex(base.read_bytes()),
            torch_threads=1,
        )

    first = job("r1", seed=3)
    assert first.work_key is not None and first.checkpoint_path.stem == first.work_key
    plain = LocalTrainer(device="cpu").run(replace(first, output_path=tmp_path / "plain"))
    control = PauseAt(5, die=True)
    control.path = first.checkpoint_path
    with pytest.raises(KeyboardInterrupt):
        LocalTrainer(device="cpu").run(first, control)
    # Another key at the same path (a job whose key was computed from other work):
    # the checkpoint is not trusted, and it is deleted.
    other = replace(first, work_key=job("r1", seed=4).work_key)
    progress: list[TrainProgress] = []
    LocalTrainer(device="cpu").run(
        replace(other, output_path=tmp_path / "o"), None, progress.append
    )
    assert progress[0].epoch == 1 and progress[0].step == 1
    assert not first.checkpoint_path.exists()
    # The same work under another round id resumes its checkpoint.
    control = PauseAt(5, die=True)
    control.path = first.checkpoint_path
    with pytest.raises(KeyboardInterrupt):
        LocalTrainer(device="cpu").run(first, control)
    resumed = LocalTrainer(device="cpu").run(replace(job("r2", seed=3)))
    assert resumed.output_path.read_bytes() == plain.output_path.read_bytes()
    assert resumed.round_id == "r2" and not first.checkpoint_path.exists()


def test_a_base_file_that_is_not_the_jobs_base_is_refused(tmp_path: Path) -> None:
    task = get_task("digits", {"hidden": 16})
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(_state_of(task.build_model(task.params, seed=1))))
    job = _job(tmp_path, base_weights_path=base, base_sha256="0" * 64)
    with pytest.raises(FedtrayError) as info:
        LocalTrainer(device="cpu").run(job)
    assert info.value.code == "stale_base"
    assert not job.output_path.exists()


def test_a_base_vouched_for_by_its_identity_is_not_hashed_and_a_replaced_one_is_refused(
    tmp_path: Path,
) -> None:
    task = get_task("digits", {"hidden": 16})
    base = tmp_path / "base.safetensors"
    write_atomic(base, encode(_state_of(task.build_model(task.params, seed=1))))
    # A digest the file does not have: trusted by its identity, it is not hashed again.
    job = _job(
        tmp_path, base_weights_path=base, base_sha256="0" * 64, base_identity=file_identity(base)
    )
    result = LocalTrainer(device="cpu").run(job)
    data = result.output_path.read_bytes()
    assert (result.size, result.sha256) == (len(data), sha256_hex(data))
    # Replaced (as the global store replaces it): another identity, refused.
    write_atomic(base, encode(_state_of(task.build_model(task.params, seed=2))))
    with pytest.raises(FedtrayError) as info:
        LocalTrainer(device="cpu").run(replace(job, output_path=tmp_path / "other.safetensors"))
    assert info.value.code == "stale_base"
    assert not (tmp_path / "other.safetensors").exists()


def test_the_kept_model_gives_the_update_a_fresh_model_gives(tmp_path: Path) -> None:
    builds: list[int] = []

    def loader(name: str, params: Mapping[str, JsonValue]) -> Task:
        task = get_task(name, params)
        build = task.build_model

        def counted(p: Mapping[str, JsonValue], seed: int) -> torch.nn.Module:
            builds.append(seed)
            return build(p, seed)

        task.build_model = counted  # type: ignore[method-assign]
        return task

    task = get_task("digits", {"hidden": 16})
    bases = []
    for seed in (11, 12):
        path = tmp_path / f"base{seed}.safetensors"
        path.write_bytes(encode(_state_of(task.build_model(task.params, seed=seed))))
        bases.append(path)
    kept = LocalTrainer(device="cpu", task_loader=loader)
    first = _job(tmp_path, base_weights_path=bases[0], output_path=tmp_path / "a.safetensors")
    kept.run(first)
    second = replace(
        first,
        round_id="round-2",
        base_weights_path=bases[1],
        config=first.config.model_copy(update={"seed": 5}),
        # Another part of the data (devices get other parts from round to round): the
        # same model.
        partition=first.partition.model_copy(update={"index": 2}),
        output_path=tmp_path / "b.safetensors",
    )
    got = kept.run(second).output_path.read_bytes()
    assert builds == [3], "the second job must load its base into the kept model"
    fresh = LocalTrainer(device="cpu").run(replace(second, output_path=tmp_path / "c.safetensors"))
    assert got == fresh.output_path.read_bytes()
    # Without a base, the model is built again from the seed; other parameters too.
    kept.run(replace(second, base_weights_path=None, output_path=tmp_path / "d.safetensors"))
    kept.run(
        replace(
            first,
            model_params={"hidden": 8},
            base_weights_path=None,
            output_path=tmp_path / "e.safetensors",
        )
    )
    assert builds == [3, 5, 3]


def test_the_kept_data_of_each_part_is_loaded_once_and_trains_as_fresh_data(
    tmp_path: Path,
) -> None:
    loads: list[tuple[str, int | None, int | None]] = []

    def loader(name: str, params: Mapping[str, JsonValue]) -> Task:
        task = get_task(name, params)
        load = task.load_data

        def counted(split: Any, partition: Partition | None) -> Any:
            loads.append(
                (
                    split,
                    None if partition is None else partition.index,
                    partition and partition.count,
                )
            )
            return load(split, partition)

        task.load_data = counted  # type: ignore[method-assign]
        return task

    task = get_task("digits", {"hidden": 16})
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(_state_of(task.build_model(task.params, seed=11))))
    kept = LocalTrainer(device="cpu", task_loader=loader)
    first = _job(
        tmp_path,
        base_weights_path=base,
        config=_job(tmp_path).config.model_copy(update={"epochs": 1}),
    )
    # Parts 1, 2, 1, 2 of three: each part's data loaded once, then kept.
    for n, index in enumerate((1, 2, 1, 2)):
        job = replace(
            first,
            round_id=f"round-{n}",
            partition=first.partition.model_copy(update={"index": index}),
            output_path=tmp_path / f"out{n}.safetensors",
        )
        got = kept.run(job).output_path.read_bytes()
        fresh = LocalTrainer(device="cpu").run(replace(job, output_path=tmp_path / "f.safetensors"))
        assert got == fresh.output_path.read_bytes(), f"job {n}: the kept data trains otherwise"
    assert loads == [("train", 1, 3), ("train", 2, 3)]
    # Another partitioning (count 2) drops the kept parts: loaded again, then part 1 of 3 too.
    for count, index in ((2, 1), (3, 1)):
        kept.run(
            replace(
                first,
                partition=first.partition.model_copy(update={"index": index, "count": count}),
                output_path=tmp_path / "g.safetensors",
            )
        )
    assert loads[2:] == [("train", 1, 2), ("train", 1, 3)]


def test_a_model_writing_into_its_input_leaves_the_kept_data_as_loaded(tmp_path: Path) -> None:
    class Doubling(torch.nn.Module):
        """Doubles its input in place first (as an in-place first op would)."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.mul_(2))  # type: ignore[no-any-return]

    def loader(name: str, params: Mapping[str, JsonValue]) -> Task:
        task = get_task(name, params)
        build = task.build_model
        task.build_model = lambda p, seed: Doubling(build(p, seed))  # type: ignore[method-assign]
        return task

    task = loader("digits", {"hidden": 16})
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(_state_of(task.build_model(task.params, seed=11))))
    job = _job(
        tmp_path,
        base_weights_path=base,
        config=_job(tmp_path).config.model_copy(update={"epochs": 1}),
    )
    kept = LocalTrainer(device="cpu", task_loader=loader)
    for n in range(2):  # the second job trains on the data the first one evaluated
        got = kept.run(replace(job, output_path=tmp_path / f"k{n}.safetensors"))
        fresh = LocalTrainer(device="cpu", task_loader=loader).run(
            replace(job, output_path=tmp_path / f"f{n}.safetensors")
        )
        assert got.output_path.read_bytes() == fresh.output_path.read_bytes(), f"job {n}"


def _vouched(job: TrainJob) -> TrainJob:
    """``job`` with its base file vouched for (as the session does after verifying it)."""
    assert job.base_weights_path is not None
    with job.base_weights_path.open("rb") as fh:
        identity = file_identity(fh.fileno())
    sha = sha256_hex(job.base_weights_path.read_bytes())
    return replace(job, base_identity=identity, base_sha256=sha)


@pytest.mark.parametrize("vouched", [False, True])
@pytest.mark.parametrize("hooked", [False, True])
def test_base_weights_are_copied_into_the_kept_model_in_place(
    tmp_path: Path, hooked: bool, vouched: bool
) -> None:
    task = get_task("digits", {"hidden": 16})
    base_state = _state_of(task.build_model(task.params, seed=21))
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(base_state))
    job = _job(tmp_path, base_weights_path=base)
    job = _vouched(job) if vouched else job
    built = KeptModel().for_training(job, torch.device("cpu"))
    loads: list[str] = []
    if hooked:  # a model with a state-dict hook is loaded through torch's load_state_dict
        built.model.register_load_state_dict_post_hook(lambda _m, _keys: loads.append("hook"))
    params_before = [id(p) for p in built.model.parameters()]
    with torch.no_grad():
        for p in built.model.parameters():
            p.fill_(7.0)
    assert load_base(built, job, "round-1") == sha256_hex(base.read_bytes())
    assert built.plain is (not hooked)
    assert loads == (["hook"] if hooked else [])
    got = _state_of(built.model)
    assert got.keys() == base_state.keys()
    for name, want in base_state.items():
        assert got[name].tobytes() == want.tobytes(), name
    assert [id(p) for p in built.model.parameters()] == params_before  # in place


@pytest.mark.parametrize(
    ("spoil", "code"),
    [
        # Refused before the model is touched:
        (lambda doc, s: encode({**s, "extra": np.zeros(3, np.float32)}), "layout_mismatch"),
        (lambda doc, s: encode({**s, "2.bias": np.zeros(11, np.float32)}), "shape_mismatch"),
        (lambda doc, s: doc[:-4], "truncated"),
        (lambda doc, s: doc[:6], "malformed"),
        (lambda doc, s: doc + b"\0" * 8, "bad_offsets"),
        # Found in the values read:
        (lambda doc, s: encode({**s, "2.bias": np.full(10, np.inf, np.float32)}), "non_finite"),
    ],
)
def test_a_vouched_base_is_checked_as_it_is_read(tmp_path: Path, spoil: Any, code: str) -> None:
    task = get_task("digits", {"hidden": 16})
    good = _state_of(task.build_model(task.params, seed=21))
    base = tmp_path / "base.safetensors"
    if code == "non_finite":  # encode refuses NaN/Inf: write the document by hand
        bad = {**good, "2.bias": np.full(10, np.inf, np.float32)}
        base.write_bytes(save({k: torch.from_numpy(v) for k, v in bad.items()}))
    else:
        base.write_bytes(spoil(encode(good), good))
    job = _vouched(_job(tmp_path, base_weights_path=base))
    built = KeptModel().for_training(job, torch.device("cpu"))
    before = _state_of(built.model)
    with pytest.raises(FedtrayError) as info:
        load_base(built, job, "round-1")
    assert info.value.code == code
    if code != "non_finite":
        after = _state_of(built.model)
        assert all(after[k].tobytes() == v.tobytes() for k, v in before.items())


# -- base weights that do not fit ------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda s: {**s, "extra.weight": np.zeros(3, np.float32)}, "layout_mismatch"),
        (lambda s: {k: v for k, v in s.items() if k != "2.bias"}, "layout_mismatch"),
        (lambda s: {**s, "2.bias": np.zeros(11, np.float32)}, "shape_mismatch"),
        (lambda s: {**s, "2.bias": s["2.bias"].astype(np.float64)}, "dtype_mismatch"),
    ],
)
def test_base_weights_of_another_layout_are_refused(tmp_path: Path, change: Any, code: str) -> None:
    task = get_task("digits", {"hidden": 16})
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(change(_state_of(task.build_model(task.params, 0)))))
    with pytest.raises(FedtrayError) as info:
        LocalTrainer(device="cpu").run(_job(tmp_path, base_weights_path=base))
    assert info.value.code == code
    assert not (tmp_path / "out.safetensors").exists()


# -- memory ------------------------------------------------------------------------------


class OomAbove(DigitsTask):
    """Digits, but a batch larger than ``limit`` 'runs out of memory'."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.sizes: list[int] = []

    def train_step(
        self, model: torch.nn.Module, x_batch: torch.Tensor, y_batch: torch.Tensor
    ) -> torch.Tensor:
        self.sizes.append(len(x_batch))
        if len(x_batch) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return super().train_step(model, x_batch, y_batch)


def _loader(task: Task) -> Any:
    def load(name: str, params: Mapping[str, JsonValue]) -> Task:
        return task.configure(params)

    return load


def test_out_of_memory_halves_the_batch_and_retries_the_epoch(tmp_path: Path) -> None:
    task = OomAbove(limit=10)
    config = TrainingConfig(epochs=1, batch_size=40, learning_rate=0.05, momentum=0.9, seed=3)
    result = LocalTrainer(device="cpu", task_loader=_loader(task)).run(
        _job(tmp_path, config=config)
    )
    assert result.batch_size == 10 and result.metrics["batchSize"] == 10
    assert task.sizes[:2] == [40, 20]
    # the retried epoch starts from the saved state: same as training with 10 from the start
    plain = LocalTrainer(device="cpu").run(
        _job(
            tmp_path,
            config=config.model_copy(update={"batch_size": 10}),
            output_path=tmp_path / "plain",
        )
    )
    assert result.output_path.read_bytes() == plain.output_path.read_bytes()


class ScribbleThenOom(DigitsTask):
    """Digits, but a batch larger than ``limit`` changes every weight in place, then 'runs
    out of memory' (what a retry must undo)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.sizes: list[int] = []

    def train_step(
        self, model: torch.nn.Module, x_batch: torch.Tensor, y_batch: torch.Tensor
    ) -> torch.Tensor:
        self.sizes.append(len(x_batch))
        if len(x_batch) > self.limit:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return super().train_step(model, x_batch, y_batch)


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_first_epoch_from_base_weights_is_retried_from_the_base_file(
    tmp_path: Path, epochs: int
) -> None:
    # The first epoch of a fresh job is retried from its base file (no up-front copy of
    # the model); a later epoch from its in-memory snapshot. Both undo the scribbles.
    task = get_task("digits").configure({"hidden": 16})
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(_state_of(task.build_model(task.params, seed=9))))
    config = TrainingConfig(epochs=epochs, batch_size=40, learning_rate=0.05, momentum=0.9, seed=3)
    oom = ScribbleThenOom(limit=10)
    result = LocalTrainer(device="cpu", task_loader=_loader(oom)).run(
        _job(tmp_path, config=config, base_weights_path=base)
    )
    assert result.batch_size == 10
    assert oom.sizes[:2] == [40, 20]
    plain = LocalTrainer(device="cpu").run(
        _job(
            tmp_path,
            config=config.model_copy(update={"batch_size": 10}),
            base_weights_path=base,
            output_path=tmp_path / "plain",
        )
    )
    assert result.output_path.read_bytes() == plain.output_path.read_bytes()


def test_a_later_epoch_is_retried_from_its_snapshot(tmp_path: Path) -> None:
    # The OOM comes in the second epoch only: its retry restores the in-memory snapshot.
    task = get_task("digits").configure({"hidden": 16})
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode(_state_of(task.build_model(task.params, seed=9))))

    class LateOom(ScribbleThenOom):
        def train_step(
            self, model: torch.nn.Module, x_batch: torch.Tensor, y_batch: torch.Tensor
        ) -> torch.Tensor:
            if len(self.sizes) < 3:  # the whole first epoch at 40
                self.sizes.append(len(x_batch))
                return DigitsTask.train_step(self, model, x_batch, y_batch)
            return super().train_step(model, x_batch, y_batch)

    config = TrainingConfig(epochs=2, batch_size=40, learning_rate=0.05, momentum=0.9, seed=3)
    oom = LateOom(limit=20)
    result = LocalTrainer(device="cpu", task_loader=_loader(oom)).run(
        _job(tmp_path, config=config, base_weights_path=base)
    )
    assert result.batch_size == 20
    assert oom.sizes[3:5] == [40, 20]


def test_out_of_memory_at_batch_size_one_fails(tmp_path: Path) -> None:
    task = OomAbove(limit=0)
    with pytest.raises(FedtrayError) as info:
        LocalTrainer(device="cpu", task_loader=_loader(task)).run(_job(tmp_path))
    assert info.value.code == "training_failed"
    assert "batch size of 1" in info.value.message
    assert task.sizes[-1] == 1


def test_the_batch_is_capped_by_free_memory(tmp_path: Path) -> None:
    # hidden=16: the estimate is 3 x (16 + 16 + 10) x 4 + 64 x 4 = 760 bytes per sample;
    # the model's 1210 float32 parameters and their momentum come first; 25 % is usable.
    fixed = 2 * 4 * 1210
    for fits, available in ((8, 4 * (8 * 760 + fixed)), (7, 4 * (8 * 760 + fixed) - 4)):
        trainer = LocalTrainer(device="cpu", available_memory=functools.partial(int, available))
        result = trainer.run(_job(tmp_path))
        assert result.batch_size == fits


# -- the target: federated digits -------------------------------------------------------


def test_three_label_skewed_clients_reach_90_percent_in_ten_fedavg_rounds(
    tmp_path: Path,
) -> None:
    task = get_task("digits")
    model = task.build_model(task.params, seed=0)
    state = _state_of(model)
    base = tmp_path / "global.safetensors"
    base.write_bytes(encode(state))
    config = TrainingConfig.model_validate(DigitsTask.default_config)
    x_test, y_test = task.load_data("test", None)
    accuracy = 0.0
    for rnd in range(10):
        updates = []
        for client in range(3):
            job = TrainJob(
                round_id=f"r{rnd}",
                task="digits",
                model_params={},
                config=config.model_copy(update={"seed": rnd}),
                partition=Partition(index=client, count=3, seed=0, scheme="label_skew"),
                base_weights_path=base,
                output_path=tmp_path / f"c{client}.safetensors",
                checkpoint_path=tmp_path / f"c{client}.ckpt",
            )
            result = LocalTrainer(device="cpu").run(job)
            updates.append((decode(result.output_path.read_bytes()), result.num_samples))
        total = sum(n for _, n in updates)
        state = {
            k: (np.sum([u[k].astype(np.float64) * n for u, n in updates], axis=0) / total).astype(
                np.float32
            )
            for k in state
        }
        base.write_bytes(encode(state))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        accuracy = task.evaluate(model, x_test, y_test)["accuracy"]
    assert accuracy >= 0.90


def test_warm_up_draws_no_random_number_and_a_run_after_it_is_unchanged(tmp_path: Path) -> None:
    before = LocalTrainer(device="cpu").run(_job(tmp_path / "a")).output_path.read_bytes()
    rng = torch.get_rng_state()
    warm_up()
    assert torch.equal(torch.get_rng_state(), rng)
    after = LocalTrainer(device="cpu").run(_job(tmp_path / "b")).output_path.read_bytes()
    assert after == before


class SpectralDigits(DigitsTask):
    """Digits with ``torch.nn.utils.spectral_norm`` on its first layer: a plain Linear
    whose forward pre-hook runs a power iteration (writing its buffers) in train mode only."""

    def build_model(self, params: Mapping[str, JsonValue], seed: int) -> torch.nn.Module:
        model = super().build_model(params, seed)
        seeded_build(seed, lambda: torch.nn.utils.spectral_norm(model[0]))
        return model


class SpectralDigitsEvaluated(SpectralDigits):
    """The same, with an ``evaluate`` of its own that is Task.evaluate (always called)."""

    def evaluate(self, model: torch.nn.Module, x: Any, y: Any) -> dict[str, float]:
        return super().evaluate(model, x, y)


def test_a_hooked_model_reports_the_accuracy_and_update_task_evaluate_gives(
    tmp_path: Path,
) -> None:
    results = []
    for name, task in (("a", SpectralDigits()), ("b", SpectralDigitsEvaluated())):
        job = _job(tmp_path, output_path=tmp_path / f"{name}.safetensors")
        results.append(LocalTrainer(device="cpu", task_loader=_loader(task)).run(job))
    direct, evaluated = results
    assert direct.metrics["trainAccuracy"] == evaluated.metrics["trainAccuracy"]
    assert direct.output_path.read_bytes() == evaluated.output_path.read_bytes()
