"""An example fedtray task plugin: learn to echo the position of the largest input.

Installed, it registers the task ``echo`` through the ``fedtray.tasks`` entry point.
Features are ``width`` random numbers; the label is the index of the largest one.
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


class EchoTask(Task):
    name: ClassVar[str] = "echo"
    description: ClassVar[str] = "Echo the position of the largest of a few numbers"
    default_params: ClassVar[dict[str, JsonValue]] = {"width": 4}

    def validate_params(self, params: Mapping[str, JsonValue]) -> None:
        int_param(params, "width", 2, 64)

    def build_model(self, params: Mapping[str, JsonValue], seed: int) -> torch.nn.Module:
        from torch import nn  # torch only when a model is needed

        width = int_param(self.resolve_params(params), "width", 2, 64)
        return seeded_build(seed, lambda: nn.Linear(width, width))

    def load_data(
        self, split: Split, partition: Partition | None
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        width = int_param(self.params, "width", 2, 64)
        rng = np.random.default_rng(0 if split == "train" else 1)
        x = rng.random((200 if split == "train" else 50, width), dtype=np.float32)
        y = x.argmax(axis=1).astype(np.int64)
        return apply_partition(x, y, partition)
