"""A task package as a :class:`client.tasks.base.Task`: the trainer's adapter.

Contract (torch is imported only inside methods; the worker process is the one caller):

* :func:`load_packaged_task` reads and checks a package (:func:`read_package`) and,
  given ``data_path``, the device's own data (:func:`client.taskpkg.localdata.read_data`),
  and returns a :class:`PackagedTask`. Every refusal is a ``FedtrayError`` with a
  ``package_*`` code (or ``bad_package``).
* :meth:`PackagedTask.build_model` rebuilds the train and eval programs
  (:func:`client.taskpkg.program.load_program`) into one :class:`PackagedModule`: a
  trainable ``nn.Module`` whose ``state_dict()`` keys are exactly the package's weight
  names, initialised with the package's weights (the ``seed`` changes nothing: the
  package fixes the initial weights). In train mode it runs the train program, in eval
  mode the eval program (dropout off, batch-norm running statistics); both read the
  same parameter and buffer objects. It calls a program's ``forward`` past the hooks
  ``torch.export`` put on it when they would only re-check what its signature fixes
  (call overhead; the graph's own shape guards still run).
* The loss is the manifest's (``cross_entropy`` with integer labels, ``mse``,
  ``bce_with_logits``); :meth:`PackagedTask.evaluate` reports ``loss`` and, when the
  manifest lists it, ``accuracy``.
* :meth:`PackagedTask.load_data` gives the package's arrays cut by
  :func:`client.tasks.base.apply_partition`; data the device brought (``data_path``:
  its local data or its downloaded partition) is used whole, whatever the partition.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import JsonValue

from client.errors import FedtrayError
from client.protocol import Partition
from client.taskpkg.archive import (
    EVAL_PROGRAM,
    TRAIN_PROGRAM,
    Arrays,
    DataSplit,
    PackageContents,
    read_package,
)
from client.taskpkg.graphcheck import check_program, parse_program_json
from client.taskpkg.localdata import read_data
from client.tasks.base import Split, Task, check_split, eval_batches
from client.tasks.partition import partition_indices

if TYPE_CHECKING:
    import torch

__all__ = ["PackagedTask", "build_packaged_module", "load_packaged_task"]


def build_packaged_module(contents: PackageContents) -> torch.nn.Module:
    """The trainable module of a package (module docstring), initialised from its weights."""
    from client.taskpkg.program import example_inputs, load_program

    spec = contents.manifest.input
    programs = [
        load_program(
            raw,
            contents.weights,
            contents.constants,
            example_inputs(spec),
            member=member,
        ).module()
        for raw, member in (
            (contents.train_program, TRAIN_PROGRAM),
            (contents.eval_program, EVAL_PROGRAM),
        )
    ]
    module: torch.nn.Module = _packaged_module_class()(programs[0], programs[1])
    return module


@functools.cache
def _packaged_module_class() -> Any:
    """:class:`PackagedModule`, defined on first use so this module imports without torch."""
    import torch

    class PackagedModule(torch.nn.Module):
        """Train program in train mode, eval program in eval mode, one set of tensors.

        The parameter-holding submodules of the train program's module are this
        module's children (so ``state_dict()``, ``parameters()``, ``to()`` see each
        tensor once, under its package name); the eval program's module is given the
        same children. The two graph modules are kept outside the module tree.
        """

        def __init__(self, train: torch.nn.Module, evaluation: torch.nn.Module) -> None:
            super().__init__()
            for name, child in train.named_children():
                if name == "_guards_fn":
                    continue
                self.add_module(name, child)
                evaluation._modules[name] = child
            for name, param in train._parameters.items():
                self._parameters[name] = param
            for name, buf in train._buffers.items():
                self._buffers[name] = buf
                if name in train._non_persistent_buffers_set:
                    self._non_persistent_buffers_set.add(name)
            object.__setattr__(self, "_programs", (train, evaluation))
            direct = (_hooks_are_exports_own(train), _hooks_are_exports_own(evaluation))
            object.__setattr__(self, "_direct", direct)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            programs: tuple[torch.nn.Module, torch.nn.Module] = object.__getattribute__(
                self, "_programs"
            )
            which = 0 if self.training else 1
            program = programs[which]
            for name, param in self._parameters.items():
                program._parameters[name] = param
            for name, buf in self._buffers.items():
                program._buffers[name] = buf
            out: torch.Tensor
            if object.__getattribute__(self, "_direct")[which]:
                # Past the program's hooks (about 60 us a call, 2-4 % of a small
                # model's training step; see _hooks_are_exports_own): its graph still
                # checks the input's shape (_guards_fn).
                if not isinstance(x, torch.Tensor):
                    raise TypeError(
                        f"a task package's model takes one tensor, got {type(x).__name__}"
                    )
                out = program.forward(x)
            else:
                out = program(x)
            return out

    return PackagedModule


def _hooks_are_exports_own(program: torch.nn.Module) -> bool:
    """Whether calling ``program.forward`` directly does all that calling ``program`` does.

    ``torch.export``'s rebuilt module has two input pre-hooks and one forward hook: the
    enter/exit pair for ``nn.Module`` inputs (a no-op for a tensor input) and
    ``_check_input_constraints_pre_hook``, which, when the module has a ``_guards_fn``
    (the graph calls it first thing and it checks the input's shape), only checks that
    the call's arguments have the exported structure: one positional input, no keywords
    -- what :class:`PackagedModule`'s ``forward`` signature already fixes. Anything else
    (other hooks, no guards function, a torch that moved the hook) keeps the hooks.
    """
    try:  # private, torch pinned; if it moves, the program keeps its own hooks
        from torch.export._unlift import _check_input_constraints_pre_hook
    except ImportError:
        return False
    pre = list(program._forward_pre_hooks.values())
    return (
        hasattr(program, "_guards_fn")
        and len(pre) == 2
        and pre[1] is _check_input_constraints_pre_hook
        and len(program._forward_hooks) == 1
        and not program._backward_hooks
        and not program._backward_pre_hooks
    )


class PackagedTask(Task):
    """A :class:`Task` whose model and data come from a task package."""

    name: ClassVar[str] = "package"
    description: ClassVar[str] = "A task package (.fedtask)"

    def __init__(
        self, contents: PackageContents, data: Mapping[DataSplit, Arrays] | None = None
    ) -> None:
        super().__init__()
        self.contents = contents
        self.manifest = contents.manifest
        self._own_data = data is not None
        chosen = data if data is not None else contents.data
        if chosen is None:
            raise FedtrayError(
                "package_data_mismatch",
                f"task package '{self.manifest.name}' uses local data and none was given",
            )
        self._data: Mapping[DataSplit, Arrays] = chosen
        info = check_program(
            parse_program_json(contents.train_program, TRAIN_PROGRAM), TRAIN_PROGRAM
        )
        self._sample_bytes = 3 * info.sample_bytes

    @property
    def task_name(self) -> str:
        """The package's name (``manifest.name``)."""
        return self.manifest.name

    def build_model(self, params: Mapping[str, JsonValue], seed: int) -> torch.nn.Module:
        return build_packaged_module(self.contents)

    def load_data(
        self, split: Split, partition: Partition | None
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        check_split(split)
        x, y = self._data.get(split, self._empty())
        if self._own_data or partition is None:
            return np.array(x), np.array(y)
        labels = y if y.ndim == 1 else np.zeros(len(y), dtype=np.int64)
        idx = partition_indices(labels, partition)
        return np.array(x[idx]), np.array(y[idx])

    def _empty(self) -> Arrays:
        m = self.manifest
        return (
            np.zeros((0, *m.input.shape), dtype=m.input.dtype),
            np.zeros((0, *m.label.shape), dtype=m.label.dtype),
        )

    def loss(
        self, output: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """The manifest's loss of ``output`` against ``target``."""
        from torch.nn import functional

        result: torch.Tensor
        if self.manifest.loss == "cross_entropy":
            result = functional.cross_entropy(output, target.long(), reduction=reduction)
        elif self.manifest.loss == "mse":
            result = functional.mse_loss(output, target.to(output.dtype), reduction=reduction)
        else:
            result = functional.binary_cross_entropy_with_logits(
                output, target.to(output.dtype), reduction=reduction
            )
        return result

    def train_step(
        self, model: torch.nn.Module, x_batch: torch.Tensor, y_batch: torch.Tensor
    ) -> torch.Tensor:
        return self.loss(model(x_batch), y_batch)

    def evaluate(
        self, model: torch.nn.Module, x: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> dict[str, float]:
        """``loss`` (mean per sample) and, when listed in the manifest, ``accuracy``."""
        n = len(y)
        want_accuracy = "accuracy" in self.manifest.metrics and self.manifest.loss != "mse"
        if n == 0:
            empty = {"loss": math.nan}
            return empty | ({"accuracy": math.nan} if want_accuracy else {})
        loss_sum = 0.0
        correct = 0.0
        for out, yb in eval_batches(model, x, y):
            per = self.loss(out, yb, reduction="none")
            loss_sum += float(per.reshape(len(yb), -1).mean(dim=1).sum().item())
            if self.manifest.loss == "cross_entropy":
                correct += float((out.argmax(dim=1) == yb.long()).sum().item())
            elif want_accuracy:
                hits = ((out > 0) == (yb > 0.5)).reshape(len(yb), -1)
                correct += float(hits.float().mean(dim=1).sum().item())
        result = {"loss": loss_sum / n}
        if want_accuracy:
            result["accuracy"] = correct / n
        return result

    def sample_bytes_hint(self, params: Mapping[str, JsonValue]) -> int | None:
        """Activations of one sample from the program's tensor sizes, x 3 for gradients."""
        return self._sample_bytes or None


def load_packaged_task(package_path: Path, data_path: Path | None = None) -> PackagedTask:
    """The task of the package at ``package_path``; ``data_path`` is the device's own data."""
    contents = read_package(package_path, require_data=data_path is None)
    data = read_data(data_path, contents.manifest) if data_path is not None else None
    return PackagedTask(contents, data)
