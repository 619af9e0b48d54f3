"""The built-in ``digits`` task: 8x8 handwritten digits with a small MLP.

Data: the 1,797 real samples of scikit-learn's ``load_digits`` (UCI "Optical Recognition
of Handwritten Digits", see ``data/README.md``), shipped as ``data/digits.npz`` so there
is no run-time dependency on scikit-learn and no download.

Contract:

* The split is fixed: a seeded permutation holds out :data:`TEST_FRACTION` of the samples
  as ``test``; the rest is ``train``. Partitions apply to the chosen split.
* Features are scaled to ``[0, 1]`` float32 (shape ``(n, 64)``), labels are int64 0-9.
* The model is ``Linear(64, hidden) -> ReLU -> Linear(hidden, 10)``; ``hidden``
  (default 64) must be an integer in ``[1, 4096]``.
* The data file is read with ``allow_pickle=False``; a missing or damaged file raises
  :class:`client.errors.FedtrayError` ``unknown_task``. Torch is imported only by
  :meth:`DigitsTask.build_model`.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import JsonValue

from client.errors import FedtrayError
from client.protocol import Partition
from client.tasks.base import (
    Split,
    Task,
    apply_partition,
    check_split,
    int_param,
    mlp_layout,
    seeded_mlp,
)
from client.weights import Layout

if TYPE_CHECKING:
    import torch

__all__ = ["TEST_FRACTION", "DigitsTask"]

TEST_FRACTION = 0.2
_SPLIT_SEED = 1797
_FEATURES = 64
_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _splits() -> dict[Split, tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]:
    resource = importlib.resources.files("client.tasks").joinpath("data/digits.npz")
    try:
        with resource.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
            x_raw, y_raw = npz["x"], npz["y"]
    except (OSError, KeyError, ValueError) as exc:
        raise FedtrayError(
            "unknown_task", f"the digits data file is missing or damaged: {exc}"
        ) from exc
    if x_raw.shape != (len(y_raw), _FEATURES) or len(y_raw) == 0:
        raise FedtrayError("unknown_task", f"the digits data has shape {x_raw.shape}")
    x = np.ascontiguousarray(x_raw, dtype=np.float32) / np.float32(16.0)
    y = y_raw.astype(np.int64)
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
    n_test = round(len(y) * TEST_FRACTION)
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}


class DigitsTask(Task):
    """Handwritten digit classification (1,797 samples, 10 classes) with an MLP."""

    name: ClassVar[str] = "digits"
    description: ClassVar[str] = "8x8 handwritten digits (UCI/scikit-learn), small MLP"
    default_params: ClassVar[dict[str, JsonValue]] = {"hidden": 64}
    # Reaches >= 90 % test accuracy in 10 FedAvg rounds with 3 label-skewed clients.
    default_config: ClassVar[dict[str, JsonValue]] = {
        "epochs": 3,
        "batch_size": 32,
        "learning_rate": 0.05,
        "optimizer": "sgd",
        "momentum": 0.9,
    }

    def validate_params(self, params: Mapping[str, JsonValue]) -> None:
        int_param(params, "hidden", 1, 4096)

    def build_model(self, params: Mapping[str, JsonValue], seed: int) -> torch.nn.Module:
        hidden = int_param(self.resolve_params(params), "hidden", 1, 4096)
        return seeded_mlp(seed, _FEATURES, hidden, _CLASSES)

    def weights_layout(self, params: Mapping[str, JsonValue]) -> Layout:
        hidden = int_param(self.resolve_params(params), "hidden", 1, 4096)
        return mlp_layout(_FEATURES, hidden, _CLASSES)

    def load_data(
        self, split: Split, partition: Partition | None
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        check_split(split)
        x, y = _splits()[split]
        # Copies, so a caller that writes into the arrays cannot corrupt the cache.
        px, py = apply_partition(x, y, partition)
        return px.copy(), py.copy()
