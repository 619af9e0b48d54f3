"""Packing, for operators: a PyTorch model and a data set -> one checked ``.fedtask`` file.

Contract: :func:`pack` (the Python API, also for notebooks) builds the model from its
factory, checks the data (:mod:`server.pack_data`), runs the model once eagerly, exports it
in train and eval mode with a dynamic batch axis (:mod:`server.pack_export`), serializes
both programs as JSON (``client.taskpkg.program.serialize_program``), takes the weights
with :func:`client.tasks.base.model_state`, and writes the package with
``client.taskpkg.archive.write_package`` to a temporary file next to ``out``. Then it
checks that file the way a device would -- ``read_package`` and ``load_packaged_task``
(no ``torch.load``), one training step with a finite loss and gradients, and an evaluation
whose loss matches the operator's own model in eval mode -- and only then renames it to
``out``. On any failure nothing is left at ``out`` (an existing file there is kept
unchanged) and :class:`PackError` says why in one line; a model torch.export cannot export
is explained in plain words. :func:`load_factory` resolves ``path/to/file.py:factory`` (the
operator's own file, imported from its path) or ``package.module:factory``. Never calls
``torch.load``, ``torch.export.load`` or pickle; data files are read without pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from client.errors import FedtrayError
from client.protocol import Optimizer, TrainingConfig
from client.taskpkg.manifest import FORMAT, Loss, Manifest, Metric, TensorDtype, TensorSpec
from server.pack_data import (
    Dataset,
    PackError,
    example_batch,
    one_line,
    read_dataset,
    synthetic_samples,
)

if TYPE_CHECKING:
    from torch import nn

    from client.tasks.base import Task

__all__ = ["PackError", "PackResult", "load_factory", "pack"]

SUFFIX: Final = ".fedtask"
#: Samples the check step trains and evaluates on.
CHECK_SAMPLES: Final = 64
#: Relative tolerance between the package's evaluation loss and the model's own.
CHECK_RTOL: Final = 1e-3

ModelSource = Callable[[], "nn.Module"] | str


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack` wrote."""

    path: Path
    size: int
    sha256: str
    parameters: int
    manifest: Manifest

    def summary(self) -> str:
        """The one-line summary ``fedtray-server pack`` prints."""
        return (
            f"packed {self.path} ({self.size:,} bytes, sha256 {self.sha256}, "
            f"{self.parameters:,} parameters, data: {self.manifest.data.source})"
        )


def pack(
    model: ModelSource,
    data: Path | str | None,
    out: Path | str,
    *,
    loss: Loss = "cross_entropy",
    name: str | None = None,
    version: str = "1",
    description: str = "",
    local_data: bool = False,
    input_shape: list[int] | None = None,
    input_dtype: TensorDtype = "float32",
    label_shape: list[int] | None = None,
    label_dtype: TensorDtype | None = None,
    num_classes: int | None = None,
    epochs: int = 3,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    optimizer: Optimizer = "sgd",
    momentum: float = 0.9,
    seed: int = 0,
) -> PackResult:
    """Pack ``model`` (a factory, or ``"file.py:factory"`` / ``"pkg.mod:factory"``) with
    ``data`` into ``out``: what was written (path, size, sha256, parameter count). See the
    module contract; raises PackError."""
    out = Path(out)
    factory = load_factory(model) if isinstance(model, str) else model
    if name is None:
        name = _default_name(out)
    if data is None and not local_data:
        raise PackError("no data: give a data file, or --local-data for data kept on devices")
    training = _training(epochs, batch_size, learning_rate, optimizer, momentum, seed)
    dataset: Dataset | None = None
    if data is not None:
        dataset = read_dataset(Path(data), loss, num_classes)
        input_spec, label_spec = dataset.input, dataset.label
        classes = dataset.num_classes
    else:
        if input_shape is None:
            raise PackError("--local-data without a data file needs --input-shape (e.g. 1,8,8)")
        input_spec = TensorSpec(shape=input_shape, dtype=input_dtype)
        default_label: TensorDtype = "int64" if loss == "cross_entropy" else "float32"
        label_spec = TensorSpec(shape=label_shape or [], dtype=label_dtype or default_label)
        classes = num_classes

    import torch

    from client.tasks.base import model_state
    from server import pack_export

    module = _build(factory, seed)
    if dataset is not None:
        x_check, y_check = dataset.x_train[:CHECK_SAMPLES], dataset.y_train[:CHECK_SAMPLES]
    else:
        x_check, y_check = (None, None)
    example = example_batch(
        x_check if x_check is not None else synthetic_samples(input_spec, label_spec, 2, 2)[0]
    )
    pack_export.check_model_output(module, example, loss, label_spec, classes)
    if loss == "cross_entropy" and classes is None:
        with torch.no_grad():
            classes = int(module.eval()(torch.from_numpy(example)).shape[1])
        module.train()
    if x_check is None or y_check is None:
        x_check, y_check = synthetic_samples(input_spec, label_spec, CHECK_SAMPLES, classes)
    weights = model_state(module)
    programs = pack_export.export_programs(module, example)
    constants = pack_export.lifted_constants(programs)
    manifest = _manifest(
        name,
        version,
        description,
        input_spec,
        label_spec,
        loss,
        classes,
        training,
        None if local_data else dataset,
    )
    from client.taskpkg.archive import write_package
    from client.taskpkg.program import serialize_program

    try:
        train_json = serialize_program(programs.train)
        eval_json = serialize_program(programs.eval)
    except FedtrayError as exc:
        raise PackError(f"the exported model cannot be packaged: {exc}") from None
    except Exception as exc:
        raise PackError(
            f"the exported model cannot be serialized: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_next_to(out) as tmp:
        try:
            write_package(
                tmp,
                manifest,
                train_json,
                eval_json,
                weights,
                constants or None,
                None
                if dataset is None or local_data
                else {
                    "train": (dataset.x_train, dataset.y_train),
                    "test": (dataset.x_test, dataset.y_test),
                },
            )
        except FedtrayError as exc:
            raise PackError(f"the package cannot be written: {exc}") from None
        _check_package(
            tmp, module, loss, x_check, y_check, local_data=dataset is None or local_data
        )
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, out)
    raw = out.read_bytes()
    return PackResult(
        path=out,
        size=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
        parameters=pack_export.count_parameters(module),
        manifest=manifest,
    )


# -- the model factory -------------------------------------------------------------------


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The factory named by ``path/to/file.py:factory`` or ``package.module:factory``."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise PackError(f"MODEL is path/to/file.py:factory or package.module:factory; got {spec!r}")
    if where.endswith(".py") or os.sep in where or "/" in where:
        module = _import_file(Path(where))
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise PackError(
                f"cannot import {where}: {type(exc).__name__}: {one_line(exc)}"
            ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise PackError(f"{where} has no function or class {attr!r}")
    return factory  # type: ignore[no-any-return]


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise PackError(f"model file {path} does not exist")
    stem = re.sub(r"\W", "_", path.stem)
    module_name = (
        f"_fedtray_pack_{stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
    )
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PackError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and friends look their module up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise PackError(f"{path} fails to import: {type(exc).__name__}: {one_line(exc)}") from None
    return module


def _build(factory: Callable[[], Any], seed: int) -> nn.Module:
    from torch import nn

    from client.tasks.base import seeded_build

    try:
        module = seeded_build(seed, factory)
    except Exception as exc:
        raise PackError(
            f"the model factory failed: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    if not isinstance(module, nn.Module):
        raise PackError(
            f"the model factory must return a torch.nn.Module, got {type(module).__name__}"
        )
    return module


# -- manifest ----------------------------------------------------------------------------


def _default_name(out: Path) -> str:
    stem = out.name.removesuffix(SUFFIX).removesuffix(out.suffix) or "task"
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", stem)[:128]


def _training(
    epochs: int, batch_size: int, lr: float, optimizer: str, momentum: float, seed: int
) -> TrainingConfig:
    from pydantic import ValidationError

    try:
        return TrainingConfig.model_validate(
            {
                "epochs": epochs,
                "batch_size": batch_size,
                "learning_rate": lr,
                "optimizer": optimizer,
                "momentum": momentum,
                "seed": seed,
            }
        )
    except ValidationError as exc:
        raise PackError(f"bad training defaults: {_pydantic_line(exc)}") from None


def _manifest(
    name: str,
    version: str,
    description: str,
    input_spec: TensorSpec,
    label_spec: TensorSpec,
    loss: Loss,
    classes: int | None,
    training: TrainingConfig,
    dataset: Dataset | None,
) -> Manifest:
    from pydantic import ValidationError

    metrics: list[Metric] = ["loss", "accuracy"] if loss == "cross_entropy" else ["loss"]
    data: dict[str, Any] = (
        {"source": "local"}
        if dataset is None
        else {
            "source": "server",
            "trainSamples": len(dataset.y_train),
            "testSamples": len(dataset.y_test),
        }
    )
    try:
        return Manifest.model_validate(
            {
                "format": FORMAT,
                "name": name,
                "version": version,
                "description": description,
                "input": input_spec.model_dump(),
                "label": label_spec.model_dump(),
                "loss": loss,
                "metrics": metrics,
                "numClasses": classes if loss == "cross_entropy" else None,
                "training": training.model_dump(by_alias=True),
                "data": data,
            }
        )
    except ValidationError as exc:
        raise PackError(f"bad package description: {_pydantic_line(exc)}") from None


def _pydantic_line(exc: Any) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
        for err in exc.errors(include_url=False)[:4]
    )


# -- writing and checking ----------------------------------------------------------------


@contextlib.contextmanager
def _temporary_next_to(out: Path) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _check_package(
    path: Path,
    model: nn.Module,
    loss: Loss,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    *,
    local_data: bool,
) -> None:
    """Load ``path`` as a device would and train one step; PackError if anything fails."""
    from client.taskpkg.task import load_packaged_task  # reads and checks the whole package

    try:
        with _local_data_file(x, y) if local_data else contextlib.nullcontext(None) as data:
            task = load_packaged_task(path, data)
            train_loss = _train_step(task, x, y)
            # A fresh copy of the initial weights for the eval comparison.
            packaged = task.build_model(task.params, 0)
            metrics = task.evaluate(packaged, x, y)
    except PackError:
        raise
    except FedtrayError as exc:
        raise PackError(f"the written package does not load: {exc}") from None
    except Exception as exc:
        raise PackError(
            f"the written package fails its check: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    if not math.isfinite(train_loss):
        raise PackError(f"a training step of the package gives loss {train_loss}")
    expected = _eager_loss(model, loss, x, y)
    got = metrics.get("loss", math.nan)
    if not math.isclose(got, expected, rel_tol=CHECK_RTOL, abs_tol=1e-5):
        raise PackError(
            f"the packaged model computes a different loss than the model itself "
            f"({got:.6g} vs {expected:.6g} in eval mode); please report this with the model"
        )


def _train_step(task: Task, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> float:
    """One SGD step of ``task``'s model on a few samples; the step's loss."""
    import torch

    model = task.build_model(task.params, 0)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    step_loss = task.train_step(
        model, torch.from_numpy(example_batch(x)), torch.from_numpy(example_batch(y))
    )
    step_loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return float(step_loss.item())


def _eager_loss(model: nn.Module, loss: Loss, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> float:
    import torch
    from torch.nn import functional

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(x)))
            target = torch.from_numpy(np.ascontiguousarray(y))
            if loss == "cross_entropy":
                value = functional.cross_entropy(out, target.long())
            elif loss == "mse":
                value = functional.mse_loss(out, target.to(out.dtype))
            else:
                value = functional.binary_cross_entropy_with_logits(out, target.to(out.dtype))
    finally:
        model.train(was_training)
    return float(value.item())


@contextlib.contextmanager
def _local_data_file(x: npt.NDArray[Any], y: npt.NDArray[Any]) -> Iterator[Path]:
    """A device-local data folder (``train.npz`` with ``x`` and ``y``) for the check."""
    with tempfile.TemporaryDirectory(prefix="fedtray-pack-") as tmp:
        folder = Path(tmp)
        np.savez(folder / "train.npz", x=x, y=y)
        yield folder


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_of(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
