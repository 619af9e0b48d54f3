"""The built-in ``synthetic`` task: a seeded, learnable classification problem of any size.

For benchmarks and tests: the data set and the model grow with the parameters, so one
task covers a 1 KB smoke test and a ~100 MB model (e.g. ``features=1024, hidden=24000``).

Contract:

* Parameters (integers): ``features`` [1, 65536], ``classes`` [2, 1000], ``hidden``
  [1, 1_000_000], ``samples`` [10, 10_000_000] with ``samples * features`` at most
  :data:`MAX_CELLS`; anything else raises :class:`client.errors.FedtrayError`
  ``bad_request``.
* Data: ``samples`` rows drawn from a numpy RNG with a fixed seed; a label is the arg-max
  of a fixed random linear map of the features plus a little noise, so a linear model
  can learn it well. The last :data:`TEST_FRACTION` of the rows are ``test``. The same
  parameters always give the same data. Features are float32, labels int64.
* The model is ``Linear(features, hidden) -> ReLU -> Linear(hidden, classes)``.
"""

from __future__ import annotations

import functools
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

__all__ = ["MAX_CELLS", "TEST_FRACTION", "SyntheticTask"]

TEST_FRACTION = 0.2
MAX_CELLS = 100_000_000
_DATA_SEED = 20_170_217
_NOISE = 0.1


def _sizes(params: Mapping[str, JsonValue]) -> tuple[int, int, int, int]:
    features = int_param(params, "features", 1, 65_536)
    classes = int_param(params, "classes", 2, 1000)
    hidden = int_param(params, "hidden", 1, 1_000_000)
    samples = int_param(params, "samples", 10, 10_000_000)
    if samples * features > MAX_CELLS:
        raise FedtrayError(
            "bad_request",
            f"samples x features = {samples * features} is over the limit of {MAX_CELLS}",
        )
    return features, classes, hidden, samples


@functools.lru_cache(maxsize=2)
def _generate(
    features: int, classes: int, samples: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(_DATA_SEED)
    weights = rng.standard_normal((features, classes), dtype=np.float32)
    x = rng.standard_normal((samples, features), dtype=np.float32)
    scores = x @ weights / np.float32(np.sqrt(features))
    scores += rng.standard_normal(scores.shape, dtype=np.float32) * np.float32(_NOISE)
    y = scores.argmax(axis=1).astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


class SyntheticTask(Task):
    """A seeded linear-rule classification problem with a configurable MLP."""

    name: ClassVar[str] = "synthetic"
    description: ClassVar[str] = "Seeded synthetic classification of configurable size"
    default_params: ClassVar[dict[str, JsonValue]] = {
        "features": 32,
        "classes": 4,
        "hidden": 64,
        "samples": 2048,
    }
    default_config: ClassVar[dict[str, JsonValue]] = {
        "epochs": 1,
        "batch_size": 64,
        "learning_rate": 0.05,
        "optimizer": "sgd",
        "momentum": 0.9,
    }

    def validate_params(self, params: Mapping[str, JsonValue]) -> None:
        _sizes(params)

    def build_model(self, params: Mapping[str, JsonValue], seed: int) -> torch.nn.Module:
        features, classes, hidden, _ = _sizes(self.resolve_params(params))
        return seeded_mlp(seed, features, hidden, classes)

    def weights_layout(self, params: Mapping[str, JsonValue]) -> Layout:
        features, classes, hidden, _ = _sizes(self.resolve_params(params))
        return mlp_layout(features, hidden, classes)

    def load_data(
        self, split: Split, partition: Partition | None
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        check_split(split)
        features, classes, _, samples = _sizes(self.params)
        x, y = _generate(features, classes, samples)
        n_train = samples - max(1, round(samples * TEST_FRACTION))
        rows = slice(0, n_train) if split == "train" else slice(n_train, samples)
        px, py = apply_partition(x[rows], y[rows], partition)
        return np.array(px), np.array(py)

    def sample_bytes_hint(self, params: Mapping[str, JsonValue]) -> int | None:
        features, classes, hidden, _ = _sizes(self.resolve_params(params))
        # input + (pre/post activation + their gradients) for both layers, float32.
        return 4 * (features + 4 * hidden + 2 * classes)
