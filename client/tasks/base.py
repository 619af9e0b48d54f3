"""The task plugin API: what a federated learning task must provide.

A *task* bundles a model architecture, a data set and the loss. fedtray's trainer
(:mod:`client.trainer`) and the reference server only talk to tasks through
:class:`Task`, so a third-party package can add a task by subclassing it and
registering the class under the ``fedtray.tasks`` entry-point group (see
``docs/tasks.md``).

Contract:

* Importing this module never imports torch. Methods that need torch import it
  inside their body, so the tray and session processes can list and describe tasks
  without paying for (or even having) torch.
* :meth:`Task.build_model` is deterministic for a seed: the server builds the initial
  global weights with it and every client must get the same layout.
* :meth:`Task.load_data` returns plain numpy arrays and never imports torch. The same
  parameters, files and partition give the same data: the trainer keeps a job's arrays
  for the next job of the same partition (:func:`client.kept_model.train_data`) and
  makes them read-only, so :meth:`Task.evaluate` must not change them in place.
* Parameters: a task instance holds its resolved parameters in :attr:`Task.params`
  (``default_params`` overridden by :meth:`Task.configure`). An unknown or badly typed
  parameter raises :class:`client.errors.FedtrayError` with code ``bad_request``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import JsonValue

from client.errors import FedtrayError
from client.protocol import Partition
from client.tasks.partition import partition_indices
from client.weights import Layout, TensorSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "Split",
    "Task",
    "apply_partition",
    "eval_batches",
    "int_param",
    "mlp_layout",
    "model_state",
    "seeded_build",
]

Split = Literal["train", "test"]

#: Batch size :meth:`Task.evaluate` uses, so evaluating a large split stays within memory.
EVAL_BATCH = 1024

M = TypeVar("M")


class Task(ABC):
    """A federated learning task (in the spirit of Flower's client verbs).

    Subclasses set the class attributes and implement :meth:`build_model` and
    :meth:`load_data`; :meth:`train_step`, :meth:`evaluate` and
    :meth:`sample_bytes_hint` have sensible defaults for classification.

    Class attributes:

    * ``name`` -- the identifier used on the wire (``[A-Za-z0-9_.:-]{1,128}``).
    * ``description`` -- one line of plain words, shown in the tray.
    * ``default_params`` -- model/data parameters (a JSON object); the server's
      ``modelParams`` override them key by key.
    * ``default_config`` -- recommended :class:`client.protocol.TrainingConfig` values
      (camelCase or snake_case keys) a server may use when it has none of its own.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_params: ClassVar[dict[str, JsonValue]] = {}
    default_config: ClassVar[dict[str, JsonValue]] = {}

    def __init__(self) -> None:
        self.params: dict[str, JsonValue] = dict(self.default_params)

    # -- parameters ---------------------------------------------------------------

    def resolve_params(self, params: Mapping[str, JsonValue] | None) -> dict[str, JsonValue]:
        """``default_params`` overridden by ``params``; unknown keys raise ``bad_request``.

        Tasks with stricter rules override :meth:`validate_params`.
        """
        merged: dict[str, JsonValue] = dict(self.default_params)
        for key, value in (params or {}).items():
            if key not in self.default_params:
                known = ", ".join(sorted(self.default_params)) or "none"
                raise FedtrayError(
                    "bad_request",
                    f"task '{self.name}' has no parameter '{key}' (known: {known})",
                )
            merged[key] = value
        self.validate_params(merged)
        return merged

    def validate_params(self, params: Mapping[str, JsonValue]) -> None:
        """Raise ``FedtrayError('bad_request', ...)`` when ``params`` are unusable.

        The default accepts anything; built-in tasks check ranges with :func:`int_param`.
        """
        return None

    def configure(self, params: Mapping[str, JsonValue] | None) -> Self:
        """Resolve and store ``params`` in :attr:`params` (for :meth:`load_data`); return self."""
        self.params = self.resolve_params(params)
        return self

    # -- the verbs ----------------------------------------------------------------

    @abstractmethod
    def build_model(self, params: Mapping[str, JsonValue], seed: int) -> torch.nn.Module:
        """A freshly initialised model; the same ``params`` and ``seed`` give the same weights.

        Use :func:`seeded_build` to make initialisation deterministic without touching
        the caller's global random state.
        """

    @abstractmethod
    def load_data(
        self, split: Split, partition: Partition | None
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """Features and labels of ``split`` as numpy arrays (first axis = samples).

        ``partition=None`` means the whole split; otherwise only this device's share
        (use :func:`apply_partition`). Data may depend on :attr:`params`
        (set by :meth:`configure`). Never imports torch.
        """

    def train_step(
        self, model: torch.nn.Module, x_batch: torch.Tensor, y_batch: torch.Tensor
    ) -> torch.Tensor:
        """The loss of one batch (a scalar tensor); the trainer calls ``backward`` on it.

        Default: cross-entropy of the model's logits against integer labels.
        """
        from torch.nn import functional

        loss: torch.Tensor = functional.cross_entropy(model(x_batch), y_batch.long())
        return loss

    def evaluate(
        self, model: torch.nn.Module, x: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> dict[str, float]:
        """``{"loss": mean cross-entropy, "accuracy": fraction correct}`` of ``model`` on x, y.

        Runs in eval mode without gradients, in batches of :data:`EVAL_BATCH`, on the
        device of the model's parameters; the model's training mode is restored after.
        """
        from torch.nn import functional

        n = len(y)
        if n == 0:
            return {"loss": math.nan, "accuracy": math.nan}
        loss_sum = 0.0
        correct = 0
        for logits, labels in eval_batches(model, x, y):
            yb = labels.long()
            loss_sum += float(functional.cross_entropy(logits, yb, reduction="sum").item())
            correct += int((logits.argmax(dim=1) == yb).sum().item())
        return {"loss": loss_sum / n, "accuracy": correct / n}

    def weights_layout(self, params: Mapping[str, JsonValue]) -> Layout | None:
        """Optional, torch-free: the layout of :meth:`build_model`'s state dict for
        ``params`` (names, numpy dtype names, shapes), or ``None`` (the default) when it
        cannot be known without building the model.

        The session checks received global weights against it before storing them, so a
        server's weights that do not fit are refused at once. Raises ``bad_request`` for
        bad parameters.
        """
        return None

    def sample_bytes_hint(self, params: Mapping[str, JsonValue]) -> int | None:
        """Optional: memory one training sample needs (activations + gradients), in bytes.

        ``None`` (the default) lets the trainer estimate it from the model.
        """
        return None


# -- helpers for task authors -----------------------------------------------------------


def eval_batches(
    model: torch.nn.Module, x: npt.NDArray[Any], y: npt.NDArray[Any]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(model output, labels)`` per batch of :data:`EVAL_BATCH`, in eval mode without
    gradients, on the device of the model's parameters; the model's training mode is
    restored after (also when the caller stops early or raises). ``x`` and ``y`` are only
    read (they may be read-only: the trainer keeps a round's data, :mod:`client.kept_model`)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(y), EVAL_BATCH):
                xb = _read_tensor(x[start : start + EVAL_BATCH]).to(device)
                yb = _read_tensor(y[start : start + EVAL_BATCH]).to(device)
                yield model(xb), yb
    finally:
        model.train(was_training)


def _read_tensor(values: npt.NDArray[Any]) -> torch.Tensor:
    """A tensor of ``values``: over them when they may be written (a fresh load), a copy
    when they are read-only (data the worker keeps across jobs): a model may write into its
    input (``ReLU(inplace=True)`` first), and torch does not honour numpy's read-only flag."""
    import torch

    if values.flags.writeable:
        return torch.as_tensor(values)
    return torch.tensor(values)


def apply_partition(
    x: npt.NDArray[Any], y: npt.NDArray[Any], partition: Partition | None
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The rows of ``x``/``y`` that belong to ``partition`` (all rows for ``None``)."""
    if partition is None:
        return x, y
    idx = partition_indices(y, partition)
    return x[idx], y[idx]


def int_param(params: Mapping[str, JsonValue], key: str, low: int, high: int) -> int:
    """``params[key]`` as an int in ``[low, high]``, or ``FedtrayError('bad_request')``."""
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FedtrayError("bad_request", f"parameter '{key}' must be an integer, got {value!r}")
    if not low <= value <= high:
        raise FedtrayError(
            "bad_request", f"parameter '{key}' must be between {low} and {high}, got {value}"
        )
    return value


def model_state(model: torch.nn.Module) -> dict[str, npt.NDArray[Any]]:
    """The model's state dict as C-contiguous numpy arrays on the CPU: THE model -> numpy
    helper of fedtray (the server's initial weights and every trained update use it).

    Dtype rule: every tensor keeps its own dtype. Nothing is cast -- a float64 model gives
    float64 arrays, a float32 one float32 -- so the server's global weights, a device's
    base and its update always have the layout the codec checks (``dtype_mismatch``
    otherwise). Works without importing torch (it only calls tensor methods).
    """
    # np.asarray keeps 0-d tensors 0-d (np.ascontiguousarray would make them 1-d, so a
    # batch norm's num_batches_tracked would change shape between layouts).
    return {
        name: np.asarray(tensor.detach().cpu().numpy(), order="C")
        for name, tensor in model.state_dict().items()
    }


def seeded_build(seed: int, factory: Callable[[], M]) -> M:
    """Call ``factory`` with torch's CPU RNG seeded by ``seed``, restoring the RNG after.

    So model initialisation is deterministic and the caller's random stream is unchanged.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def seeded_mlp(seed: int, features: int, hidden: int, classes: int) -> torch.nn.Module:
    """A one-hidden-layer ReLU MLP, initialised deterministically from ``seed``."""
    from torch import nn

    return seeded_build(
        seed,
        lambda: nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes)),
    )


def mlp_layout(features: int, hidden: int, classes: int) -> Layout:
    """The state-dict layout of :func:`seeded_mlp` with these sizes (float32), torch-free."""
    return {
        "0.weight": TensorSpec("float32", (hidden, features)),
        "0.bias": TensorSpec("float32", (hidden,)),
        "2.weight": TensorSpec("float32", (classes, hidden)),
        "2.bias": TensorSpec("float32", (classes,)),
    }


def check_split(split: object) -> None:
    """Raise FedtrayError('bad_request') unless ``split`` is ``"train"`` or ``"test"``."""
    if split not in ("train", "test"):
        raise FedtrayError("bad_request", f"unknown data split {split!r}")
