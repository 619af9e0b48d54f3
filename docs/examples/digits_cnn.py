"""A small CNN for the 8x8 handwritten digits, to pack as a fedtray task package.

    python docs/examples/digits_data.py digits.npz
    fedtray-server pack docs/examples/digits_cnn.py:make_model --data digits.npz \\
        -o digits_cnn.fedtask --name digits_cnn
    fedtray-server --task-file digits_cnn.fedtask

The package carries the model as a graph of PyTorch operators plus its weights, so this
file is needed only to pack: devices never import it. Input: a batch of images
``(batch, 1, 8, 8)`` float32 in [0, 1]; output: 10 logits per image.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv(1->16) -> batch norm -> ReLU -> conv(16->32) -> batch norm -> ReLU -> 2x2 max pool
    -> dropout -> linear(32*4*4 -> 64) -> ReLU -> dropout -> linear(64 -> 10)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
        )
        self.head = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(64, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten(1), not view(32, -1): the batch size must stay free.
        out: torch.Tensor = self.head(self.features(x).flatten(1))
        return out


def make_model() -> nn.Module:
    """The factory ``fedtray-server pack`` calls (``digits_cnn.py:make_model``)."""
    return DigitsCNN()
