"""The task package a server trains (``fedtray-server --task-file OUT.fedtask``).

Contract:

* :func:`open_package` is THE server's seam to the package reader: it checks the file
  with :func:`client.taskpkg.archive.read_package` (the same checks a device makes;
  a bad package raises :class:`client.errors.FedtrayError` with that reader's code) and
  returns a :class:`ServedPackage`: the package devices are sent (without its data
  members) and its SHA-256, the manifest, initial weights (``weights.safetensors``)
  and, when the manifest says ``server``, the train and test arrays. It never imports torch.
* :class:`DataShares` cuts the train arrays per device with the existing schemes
  (:func:`client.tasks.base.apply_partition`) and encodes each share once, as
  safetensors holding exactly ``x`` and ``y`` (the same partition gives the same bytes,
  so the same SHA-256, across rounds and restarts); thread-safe.
* :class:`PackageTask` is the server's :class:`client.tasks.Task` for a package: its
  training defaults are the manifest's, it has no parameters, ``load_data`` serves the
  package's arrays, and the torch verbs (``build_model``, ``train_step``,
  ``evaluate``, used only to evaluate new globals) come from
  :func:`client.taskpkg.task.load_packaged_task`, loaded on first use (a server
  without torch serves the package without evaluating).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from pydantic import JsonValue

from client.errors import FedtrayError
from client.protocol import FileRef, Partition
from client.taskpkg.manifest import Manifest
from client.tasks.base import Split, Task, apply_partition, check_split
from client.weights import StateDict, encode, sha256_hex

if TYPE_CHECKING:
    import torch

__all__ = ["DataShares", "PackageTask", "ServedPackage", "Share", "open_package"]

Arrays = tuple[npt.NDArray[Any], npt.NDArray[Any]]


@dataclass(frozen=True)
class ServedPackage:
    """A checked package, as the server serves it."""

    path: Path
    content: bytes
    sha256: str
    manifest: Manifest
    weights: StateDict
    train: Arrays | None
    test: Arrays | None

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def ref(self) -> FileRef:
        return FileRef(sha256=self.sha256, size=self.size)


def open_package(path: Path) -> ServedPackage:
    """Check ``path`` and hold what serving it needs; FedtrayError for a bad package.

    What devices are sent is the package WITHOUT its data members (rebuilt with the
    package writer, byte-for-byte the same for the same package): each device gets only
    its own share of the data (:class:`DataShares`), never the whole set.
    """
    # The package reader and writer: the same checks a device makes before it trains.
    from client.taskpkg.archive import (
        package_bytes,
        read_package,
    )

    contents = read_package(path)
    manifest: Manifest = contents.manifest
    # np.require, not np.ascontiguousarray: the latter turns a 0-d tensor (batch norm's
    # num_batches_tracked) into shape (1,), which devices refuse as shape_mismatch.
    weights: StateDict = {k: np.require(v, requirements="C") for k, v in contents.weights.items()}
    device_package: bytes = package_bytes(
        manifest,
        contents.train_program,
        contents.eval_program,
        contents.weights,
        contents.constants,
        None,
    )
    data = contents.data
    return ServedPackage(
        path=path,
        content=device_package,
        sha256=sha256_hex(device_package),
        manifest=manifest,
        weights=weights,
        train=data["train"] if data else None,
        test=data["test"] if data else None,
    )


@dataclass(frozen=True)
class Share:
    """One device's share of the train data, encoded (safetensors ``x``, ``y``)."""

    content: bytes
    sha256: str

    @property
    def ref(self) -> FileRef:
        return FileRef(sha256=self.sha256, size=len(self.content))


def _key(partition: Partition) -> tuple[int, int, int, str, float]:
    return (partition.index, partition.count, partition.seed, partition.scheme, partition.alpha)


class DataShares:
    """Per-partition shares of the train arrays, each encoded once (module docstring)."""

    def __init__(self, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> None:
        self._x, self._y = x, y
        self._cache: dict[tuple[int, int, int, str, float], Share] = {}
        self._lock = threading.Lock()

    def share(self, partition: Partition) -> Share:
        """The encoded share of ``partition`` (blocking: run it in a thread)."""
        key = _key(partition)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            x, y = apply_partition(self._x, self._y, partition)
            content = encode(
                {"x": np.ascontiguousarray(x), "y": np.ascontiguousarray(y)}, "safetensors"
            )
            share = Share(content=content, sha256=sha256_hex(content))
            self._cache[key] = share
            return share


class PackageTask(Task):
    """The server's view of a packaged task (module docstring)."""

    name = "package"
    description = "a task package"

    def __init__(self, package: ServedPackage) -> None:
        super().__init__()
        self.package = package
        self.shares = DataShares(*package.train) if package.train is not None else None
        self._loaded: Task | None = None
        self._load_lock = threading.Lock()

    def training_defaults(self) -> dict[str, JsonValue]:
        """The manifest's training config, as TrainingConfig fields."""
        return self.package.manifest.training.model_dump(mode="json")

    def _torch_task(self) -> Task:
        with self._load_lock:
            if self._loaded is None:
                # The package adapter (needs torch); the package was checked by open_package.
                from client.taskpkg.task import (
                    load_packaged_task,
                )

                self._loaded = load_packaged_task(self.package.path)
            return self._loaded

    def build_model(self, params: Mapping[str, JsonValue], seed: int) -> torch.nn.Module:
        return self._torch_task().build_model(params, seed)

    def train_step(
        self, model: torch.nn.Module, x_batch: torch.Tensor, y_batch: torch.Tensor
    ) -> torch.Tensor:
        return self._torch_task().train_step(model, x_batch, y_batch)

    def evaluate(
        self, model: torch.nn.Module, x: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> dict[str, float]:
        return self._torch_task().evaluate(model, x, y)

    def load_data(self, split: Split, partition: Partition | None) -> Arrays:
        check_split(split)
        arrays = self.package.train if split == "train" else self.package.test
        if arrays is None:
            raise FedtrayError(
                "bad_request", f"the package {self.package.manifest.name} carries no data"
            )
        return apply_partition(*arrays, partition)
