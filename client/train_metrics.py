"""The trained model's accuracy on its own training data (an update's ``trainAccuracy``).

Contract (torch is imported only inside functions; the training worker is the one caller):

* :func:`train_accuracy` is ``task.evaluate(model, x_np, y_np)["accuracy"]`` (``nan``
  when the task reports none), the value the trainer has always reported.
* :func:`mode_free` (pure over the model's module tree) says whether a model's output is
  the same in train and eval mode and a forward pass writes into nothing (its input, its
  buffers): every module is one of :data:`PLAIN_MODULES` (exactly that type, not a
  subclass; ``ReLU`` only when not in place) with the class's own ``forward`` and no
  forward hook or pre-hook (a hook may depend on the mode or write:
  ``torch.nn.utils.spectral_norm``'s power iteration runs in train mode only and
  updates its buffers). For such a model, while no global forward hook is registered
  (checked at every call), and a task that keeps both
  :meth:`client.tasks.base.Task.evaluate` and :meth:`~client.tasks.base.Task.train_step`
  (overridden neither by its class nor on the instance: training has then passed every
  row through the same cross-entropy, so ``evaluate``'s loss would not have raised), the
  same accuracy is computed directly, bit for bit: the model's output over the same
  batches (:data:`client.tasks.base.EVAL_BATCH` rows) of the kept tensors ``x``/``y``
  (the same values as the arrays), without gradients, without the loss the trainer does
  not report, without switching the model's mode (it makes no difference) and without
  copying the inputs (nothing writes into them). Any other task or model is evaluated by
  ``task.evaluate``.
* It never changes the model's parameters or mode, nor the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from client.tasks.base import EVAL_BATCH, Task

if TYPE_CHECKING:
    import torch

__all__ = ["PLAIN_MODULES", "mode_free", "train_accuracy"]

#: torch.nn module class names whose output does not depend on train/eval mode and that
#: never write into their input (``ReLU``: only with ``inplace=False``).
PLAIN_MODULES: frozenset[str] = frozenset(
    {"Sequential", "Linear", "ReLU", "Flatten", "Identity", "Tanh", "Sigmoid", "GELU"}
)


def mode_free(model: torch.nn.Module) -> bool:
    """Whether every module of ``model`` is a plain one (module docstring)."""
    from torch import nn

    for module in model.modules():
        kind = type(module)
        if kind.__name__ not in PLAIN_MODULES or getattr(nn, kind.__name__, None) is not kind:
            return False
        if kind is nn.ReLU and module.inplace:
            return False
        if module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module):
            return False
    return True


def train_accuracy(
    task: Task,
    model: torch.nn.Module,
    data: tuple[npt.NDArray[Any], npt.NDArray[Any], torch.Tensor, torch.Tensor],
    *,
    direct: bool,
) -> float:
    """The accuracy of ``model`` on ``data`` (``(x_np, y_np, x, y)``: the arrays and the
    tensors made from them, on the model's device); ``direct``: :func:`mode_free` holds
    for ``model`` (the caller remembers it). Module docstring."""
    x_np, y_np, x, y = data
    import torch
    from torch.nn.modules import module as modules

    if (
        not direct
        or not _is_tasks_own(task.evaluate, Task.evaluate)
        or not _is_tasks_own(task.train_step, Task.train_step)
        or modules._global_forward_hooks
        or modules._global_forward_pre_hooks
    ):
        return float(task.evaluate(model, x_np, y_np).get("accuracy", math.nan))

    n = len(y)
    if n == 0:
        return math.nan
    correct = 0
    with torch.no_grad():
        for start in range(0, n, EVAL_BATCH):
            logits = model(x[start : start + EVAL_BATCH])
            labels = y[start : start + EVAL_BATCH].long()
            correct += int((logits.argmax(dim=1) == labels).sum().item())
    return correct / n


def _is_tasks_own(method: Callable[..., object], default: Callable[..., object]) -> bool:
    """Whether a task's bound ``method`` is :class:`~client.tasks.base.Task`'s ``default``
    (overridden neither by its class nor on the instance)."""
    return getattr(method, "__func__", None) is default
