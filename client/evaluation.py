"""Federated evaluation of a global version on this device: :func:`evaluate_global`.

Contract (torch is imported only inside functions; the training worker is the one caller):

* :func:`evaluate_global` runs an :class:`client.worker_messages.EvalJob`: it loads the
  global into the kept model in place when it is the same task, parameters and files
  (whatever the partition), else builds one and keeps it
  (:meth:`client.kept_model.KeptModel.for_evaluation`), and measures the task's
  :meth:`~client.tasks.base.Task.evaluate` (batches of
  :func:`client.tasks.base.eval_batches`, no gradients) on the test split of the job's
  partition (a package: its shipped test set or the device's own test data). A task
  without test data is evaluated on a holdout: the last fifth (at least one sample) of
  the partition's train data.
* It writes nothing (no checkpoint, no output) and raises
  :class:`client.worker_messages.JobCancelled` when the control says pause or cancel
  before or after the pass (an evaluation is abandoned, never checkpointed).
* Raises :class:`client.errors.FedtrayError`: ``stale_base`` or a weights code for the
  global's file (:func:`client.kept_model.load_base`), ``bad_request`` when there is no
  data to evaluate on, ``training_failed`` when the measured loss or accuracy is not
  finite.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from client.errors import FedtrayError
from client.kept_model import KeptModel, load_base
from client.worker_messages import EvalJob, EvalResult, JobCancelled, TrainControl

if TYPE_CHECKING:
    import torch

__all__ = ["evaluate_global"]


def evaluate_global(
    job: EvalJob, control: TrainControl, kept: KeptModel, device: torch.device
) -> EvalResult:
    """Evaluate global ``job.version`` on this device's test split (module docstring)."""
    if control.check() != "run":
        raise JobCancelled(f"evaluation {job.eval_id} abandoned")
    built = kept.for_evaluation(job, device)
    task, model = built.task, built.model
    partition = None if job.data_path is not None else job.partition
    x, y = task.load_data("test", partition)
    holdout = len(y) == 0
    if holdout:
        x_train, y_train = task.load_data("train", partition)
        keep = max(1, len(y_train) // 5) if len(y_train) else 0
        x, y = x_train[len(y_train) - keep :], y_train[len(y_train) - keep :]
    if len(y) == 0:
        raise FedtrayError("bad_request", "this device holds no data to evaluate on")
    load_base(built, job, f"version {job.version}")
    model.to(device)
    scores = task.evaluate(model, x, y)
    if control.check() != "run":
        raise JobCancelled(f"evaluation {job.eval_id} abandoned")
    loss, accuracy = float(scores.get("loss", math.nan)), float(scores.get("accuracy", 0.0))
    if not math.isfinite(loss) or not math.isfinite(accuracy):
        raise FedtrayError("training_failed", f"the evaluation measured loss {loss}")
    return EvalResult(
        eval_id=job.eval_id,
        version=job.version,
        loss=loss,
        accuracy=min(1.0, max(0.0, accuracy)),
        num_samples=len(y),
        holdout=holdout,
    )
