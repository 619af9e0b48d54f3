"""A poisoned test device: the real client, training honestly, sending a poisoned update.

For tests and benchmarks only (it lives in ``tests/``, outside the packaged ``client``,
``server`` and ``tray``); it is the "finite poisoned update every round" device of
docs/strategies.md's figures.

Contract:

* :func:`poison` (pure): the poisoned weights of one honestly trained state. With
  ``delta = w - w_base`` per float tensor, ``"scale"`` gives ``w_base + factor * delta``
  and ``"flip"`` gives ``w_base - delta`` (the sign-flipped update). Non-float tensors
  (integer counters, booleans) are sent as trained. Every value stays finite: a result
  that is not raises ``ValueError`` (the server would refuse it, which is not the attack
  under test). Raises ``ValueError`` for an unknown kind, a factor that is not finite and
  positive, or a base whose names, shapes or dtypes differ from the trained state.
* :class:`PoisoningTrainer` is a :class:`client.worker_messages.Trainer`: it runs the
  process's own trainer (:class:`client.trainer.LocalTrainer`) unchanged, then rewrites
  the job's output through the one owner of work files
  (:meth:`client.workfiles.JobFiles.write_output`) with :func:`poison` of it against the
  job's base weights, and returns the inner result with the new size and SHA-256. The
  base is the job's base file, or, for a job without one, the task's model built from
  ``config.seed`` (what the trainer starts from then).
* :func:`poisoned_child_main` is the training process's entry with that trainer in place
  of the stock one (:func:`client.worker_child.make_trainer`); everything else is
  :func:`client.worker_child.child_main`.
* ``python -m tests.poison_device --poison scale|flip [--factor F] -- CLIENT ARGS`` runs
  the real client CLI (:func:`client.cli.main`) whose training worker
  (:class:`client.worker.TrainingWorker`) starts :func:`poisoned_child_main`: session,
  upload, pause rules and protocol are the product's; only the weights written differ.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Literal

import numpy as np

from client.weights import StateDict, decode, encode
from client.worker_messages import (
    ProgressCallback,
    TrainControl,
    Trainer,
    TrainJob,
    TrainResult,
)

__all__ = ["KINDS", "PoisonKind", "PoisoningTrainer", "main", "poison", "poisoned_child_main"]

PoisonKind = Literal["scale", "flip"]
KINDS: tuple[PoisonKind, ...] = ("scale", "flip")
DEFAULT_FACTOR = 100.0


def poison(
    base: StateDict, trained: StateDict, kind: str, factor: float = DEFAULT_FACTOR
) -> StateDict:
    """The poisoned state of ``trained`` against ``base`` (module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown poison kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"the factor must be finite and positive, got {factor}")
    if set(base) != set(trained):
        raise ValueError(f"base and trained names differ: {sorted(set(base) ^ set(trained))}")
    out: StateDict = {}
    for name, w in trained.items():
        b = base[name]
        if b.shape != w.shape or b.dtype != w.dtype:
            raise ValueError(f"{name}: base {b.dtype}{b.shape} vs trained {w.dtype}{w.shape}")
        if not np.issubdtype(w.dtype, np.floating):
            out[name] = w.copy()
            continue
        b64, delta = b.astype(np.float64), w.astype(np.float64) - b.astype(np.float64)
        value = b64 + factor * delta if kind == "scale" else b64 - delta
        with np.errstate(over="ignore"):  # an overflow is refused just below
            poisoned = value.astype(w.dtype)
        if not np.isfinite(poisoned).all():
            raise ValueError(f"{name}: the poisoned values are not finite")
        out[name] = poisoned
    return out


class PoisoningTrainer:
    """Trains honestly with ``inner``, then writes the poisoned weights (module docstring)."""

    def __init__(self, inner: Trainer, kind: PoisonKind, factor: float = DEFAULT_FACTOR) -> None:
        poison({}, {}, kind, factor)  # the kind and factor are checked once, here
        self._inner = inner
        self._kind: PoisonKind = kind
        self._factor = factor

    @property
    def checkpoints(self) -> bool:
        return self._inner.checkpoints

    def run(
        self,
        job: TrainJob,
        control: TrainControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TrainResult:
        from client.workfiles import JobFiles

        result = self._inner.run(job, control, on_progress)
        trained = decode(result.output_path.read_bytes(), "safetensors")
        data = encode(poison(_base_of(job), trained, self._kind, self._factor), "safetensors")
        digest = JobFiles.of(job).write_output(data)
        return TrainResult(
            round_id=result.round_id,
            output_path=result.output_path,
            num_samples=result.num_samples,
            metrics=result.metrics,
            batch_size=result.batch_size,
            sha256=digest,
            size=len(data),
        )


def _base_of(job: TrainJob) -> StateDict:
    """The weights the job's training started from."""
    if job.base_weights_path is not None:
        return decode(job.base_weights_path.read_bytes(), "safetensors")
    from client.tasks.base import model_state
    from client.trainer import resolve_task

    task, _ = resolve_task(job)
    return model_state(task.build_model(job.model_params, job.config.seed))


def poisoned_child_main(
    kind: PoisonKind,
    factor: float,
    conn: Connection,
    simulation: bool,
    progress_interval: float,
) -> None:
    """The training process's entry, with :class:`PoisoningTrainer` (module docstring)."""
    from client import worker_child

    stock: Callable[[bool], Trainer] = worker_child.make_trainer

    def make_trainer(simulation: bool) -> Trainer:
        return PoisoningTrainer(stock(simulation), kind, factor)

    worker_child.make_trainer = make_trainer
    worker_child.child_main(conn, simulation, progress_interval)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.poison_device --poison KIND [--factor F] -- CLIENT ARGS``."""
    parser = argparse.ArgumentParser(prog="python -m tests.poison_device")
    parser.add_argument("--poison", choices=KINDS, required=True)
    parser.add_argument("--factor", type=float, default=DEFAULT_FACTOR)
    parser.add_argument("client_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = list(args.client_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    try:
        poison({}, {}, args.poison, args.factor)
    except ValueError as exc:
        parser.error(str(exc))
    from client import worker
    from client.cli import main as client_main

    # The session's worker starts its training process with this target (spawned: the
    # partial pickles by reference, and the child imports this module).
    worker.child_main = functools.partial(poisoned_child_main, args.poison, args.factor)  # type: ignore[attr-defined]
    return client_main(rest)


if __name__ == "__main__":
    sys.exit(main())
