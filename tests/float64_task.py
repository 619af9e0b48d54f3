"""A small test task whose model is float64 (a plugin-style :class:`client.tasks.Task`).

The label is whether the sum of the features is positive; data is float64 too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import JsonValue

from client.protocol import Partition
from client.tasks.base import Split, Task, apply_partition, int_param, seeded_build

if TYPE_CHECKING:
    import torch


class Float64Task(Task):
    name: ClassVar[str] = "float64"
    description: ClassVar[str] = "A float64 linear classifier (tests)"
    default_params: ClassVar[dict[str, JsonValue]] = {"width": 6}
    default_config: ClassVar[dict[str, JsonValue]] = {
        "batchSize": 16,
        "learningRate": 0.1,
        "momentum": 0.9,
    }

    def validate_params(self, params: Mapping[str, JsonValue]) -> None:
        int_param(params, "width", 2, 64)

    def build_model(self, params: Mapping[str, JsonValue], seed: int) -> torch.nn.Module:
        from torch import nn

        width = int_param(self.resolve_params(params), "width", 2, 64)
        return seeded_build(seed, lambda: nn.Linear(width, 2).double())

    def load_data(
        self, split: Split, partition: Partition | None
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        width = int_param(self.params, "width", 2, 64)
        rng = np.random.default_rng(0 if split == "train" else 1)
        x = rng.standard_normal((120 if split == "train" else 40, width))
        y = (x.sum(axis=1) > 0).astype(np.int64)
        return apply_partition(x, y, partition)
