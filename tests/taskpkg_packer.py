"""A tiny test-only packer: a small CNN (batch norm + dropout) exported and written as a package.

The operators' packer is ``server/pack.py``; this fixture exists so the task-package
tests do not depend on it. Needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.protocol import TrainingConfig
from client.taskpkg.archive import PackageContents, write_package
from client.taskpkg.manifest import Manifest
from client.taskpkg.program import export_program, serialize_program

CLASSES = 4
TRAIN_N = 70
TEST_N = 30


class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(4 * 4 * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        out: torch.Tensor = self.fc(self.drop(x.flatten(1)))
        return out


def make_data(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A learnable 4-class problem on 1x8x8 images: the class lights one quadrant."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", TRAIN_N), ("test", TEST_N)):
        y = rng.integers(0, CLASSES, n).astype(np.int64)
        x = rng.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
        for i, label in enumerate(y):
            r, c = divmod(int(label), 2)
            x[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
        out[split] = (x, y)
    return out


def manifest(**changes: Any) -> Manifest:
    base: dict[str, Any] = {
        "format": "fedtray-task/1",
        "name": "tiny-cnn",
        "version": "1",
        "input": {"shape": [1, 8, 8], "dtype": "float32"},
        "label": {"shape": [], "dtype": "int64"},
        "loss": "cross_entropy",
        "metrics": ["loss", "accuracy"],
        "numClasses": CLASSES,
        "training": TrainingConfig(epochs=1, batch_size=16, learning_rate=0.05).model_dump(
            by_alias=True
        ),
        "data": {"source": "server", "trainSamples": TRAIN_N, "testSamples": TEST_N},
    }
    base.update(changes)
    return Manifest.model_validate(base)


def programs(model: nn.Module | None = None) -> tuple[nn.Module, bytes, bytes]:
    """The model (seeded) and its train and eval programs as JSON."""
    if model is None:
        torch.manual_seed(0)
        model = SmallCnn()
    example = torch.zeros(16, 1, 8, 8)
    model.train()
    train = serialize_program(export_program(model, example))
    model.eval()
    evaluation = serialize_program(export_program(model, example))
    model.train()
    return model, train, evaluation


def pack(path: Path, **manifest_changes: Any) -> PackageContents:
    """Write the tiny CNN package with server data to ``path``."""
    model, train, evaluation = programs()
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    m = manifest(**manifest_changes)
    data = make_data() if m.data.source == "server" else None
    return write_package(path, m, train, evaluation, weights, None, data)
