"""Simulated training for machines without torch (``simulation: true`` at registration).

Contract:

* :class:`SimulatedTrainer` is the torch-free :class:`client.worker_messages.Trainer`: it
  reads the job's base weights (safetensors), runs :func:`simulate_round` on them with
  :data:`SIMULATED_SAMPLES` samples, seeded by the config's seed and the partition, and
  writes the result to the job's output (:class:`client.workfiles.JobFiles`). It has
  nothing to checkpoint. A job without base weights, or an unreadable base, raises
  :class:`client.errors.FedtrayError` ``training_failed``.
* Never imports torch. :func:`simulate_round` returns weights with exactly the names,
  shapes and dtypes of ``base_state``: float tensors get a small seeded random
  perturbation, other tensors are copied unchanged, so the server can aggregate them.
* It reports progress over ``steps`` steps, waiting ``step_seconds`` between steps (by
  default 10 x 0.05 s, under a second in total), and asks ``control.check()`` at every
  step boundary: ``"pause"`` calls ``control.wait_while_paused()`` (nothing to
  checkpoint), ``"cancel"`` raises :class:`client.worker_messages.JobCancelled`. It
  reports :class:`client.worker_messages.TrainProgress` after every step.
* The same ``base_state`` and ``seed`` give the same result.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt

from client.errors import FedtrayError
from client.protocol import TrainingConfig
from client.weights import decode, encode
from client.worker_messages import (
    JobCancelled,
    NeverInterrupt,
    ProgressCallback,
    TrainControl,
    TrainJob,
    TrainProgress,
    TrainResult,
)
from client.workfiles import JobFiles

__all__ = ["SIMULATED_SAMPLES", "SimulatedTrainer", "simulate_round"]

#: The sample count a simulated round reports.
SIMULATED_SAMPLES = 100

#: Relative size of the random perturbation added to float tensors.
PERTURBATION = 1e-3


def simulate_round(
    base_state: dict[str, npt.NDArray[Any]],
    config: TrainingConfig,
    control: TrainControl | None,
    on_progress: ProgressCallback | None,
    *,
    seed: int,
    round_id: str = "simulated",
    num_samples: int = 100,
    steps: int = 10,
    step_seconds: float = 0.05,
) -> tuple[dict[str, npt.NDArray[Any]], int, dict[str, float]]:
    """Fake one local round: ``(new_state, num_samples, metrics)``; see the module docstring."""
    ctl = control or NeverInterrupt()
    report = on_progress or (lambda _p: None)
    rng = np.random.default_rng(seed)
    steps = max(1, steps)
    started = time.monotonic()
    loss = 2.3
    for step in range(1, steps + 1):
        command = ctl.check()
        while command == "pause":
            ctl.wait_while_paused()
            command = ctl.check()
        if command == "cancel":
            raise JobCancelled(f"round {round_id} was cancelled")
        time.sleep(step_seconds)
        loss *= 0.9
        report(
            TrainProgress(
                round_id=round_id,
                epoch=min(config.epochs, 1 + (step - 1) * config.epochs // steps),
                epochs=config.epochs,
                step=step,
                steps=steps,
                fraction=step / steps,
                loss=loss,
                samples_per_sec=None,
                batch_size=min(config.batch_size, num_samples),
            )
        )
    new_state: dict[str, npt.NDArray[Any]] = {}
    for name, arr in base_state.items():
        if np.issubdtype(arr.dtype, np.floating):
            scale = float(np.std(arr)) if arr.size > 1 else 0.0
            noise = rng.standard_normal(arr.shape) * PERTURBATION * (scale or 1.0)
            new_state[name] = (arr + noise).astype(arr.dtype)
        else:
            new_state[name] = arr.copy()
    metrics = {
        "trainLoss": loss,
        "trainAccuracy": 0.5,
        "seconds": time.monotonic() - started,
        "batchSize": float(min(config.batch_size, num_samples)),
    }
    return new_state, num_samples, metrics


class SimulatedTrainer:
    """The torch-free trainer (module docstring); ``steps`` x ``step_seconds`` per round."""

    def __init__(self, *, steps: int = 10, step_seconds: float = 0.05) -> None:
        self._steps = steps
        self._step_seconds = step_seconds

    @property
    def checkpoints(self) -> bool:
        """False: a simulated round has nothing to checkpoint."""
        return False

    def run(
        self,
        job: TrainJob,
        control: TrainControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TrainResult:
        if job.base_weights_path is None:
            raise FedtrayError("training_failed", "simulated training needs the global weights")
        try:
            raw = job.base_weights_path.read_bytes()
        except OSError as exc:
            raise FedtrayError("training_failed", f"cannot read the base weights: {exc}") from exc
        state, samples, metrics = simulate_round(
            decode(raw, "safetensors"),
            job.config,
            control,
            on_progress,
            seed=job.config.seed * 1_000_003 + job.partition.index,
            round_id=job.round_id,
            num_samples=SIMULATED_SAMPLES,
            steps=self._steps,
            step_seconds=self._step_seconds,
        )
        JobFiles.of(job).write_output(encode(state, "safetensors"))
        return TrainResult(
            round_id=job.round_id,
            output_path=job.output_path,
            num_samples=samples,
            metrics=metrics,
            batch_size=int(metrics["batchSize"]),
        )
