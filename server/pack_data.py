"""The operator's data set for ``fedtray-server pack``: read it, check it, describe it.

Contract: torch-free. :func:`read_dataset` reads a ``.npz`` (``numpy.load`` with
``allow_pickle=False``, so an object array is refused, never unpickled) or a
``.safetensors`` file holding the arrays ``x_train``, ``y_train``, ``x_test`` and
``y_test`` (other arrays are ignored) and returns a checked :class:`Dataset`: every array
has a package dtype, features and labels of a split have the same number of samples, both
splits have the same sample shapes, the training split is not empty, and the labels suit
the loss (``cross_entropy``: integer class indices ``>= 0``, stored as int64 -- a lossless
widening -- with ``numClasses`` = largest label + 1 unless given; ``mse`` and
``bce_with_logits``: floating labels). Every problem raises :class:`PackError` with one
line of plain words saying what to change. Nothing here writes files.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast, get_args

import numpy as np
import numpy.typing as npt

from client.taskpkg.manifest import Loss, TensorDtype, TensorSpec

__all__ = [
    "ARRAY_NAMES",
    "Dataset",
    "PackError",
    "check_dataset",
    "example_batch",
    "parse_shape",
    "read_dataset",
    "spec_of",
    "synthetic_samples",
]

#: The arrays a data file must hold.
ARRAY_NAMES: Final = ("x_train", "y_train", "x_test", "y_test")
#: Numpy dtype names a package can carry (the manifest's dtypes numpy has natively).
_NUMPY_DTYPES: Final[frozenset[str]] = frozenset(get_args(TensorDtype)) - {"bfloat16"}
_INT_DTYPES: Final = frozenset({"int64", "int32", "uint8"})
_FLOAT_DTYPES: Final = frozenset({"float16", "float32", "float64"})
#: Samples in the example batch torch.export traces with (>= 2: a batch of 1 would be
#: specialised to a constant instead of staying dynamic).
EXAMPLE_BATCH: Final = 8


class PackError(Exception):
    """Packing refused; the message is one line of plain words (what is wrong, what to do)."""


Arrays = npt.NDArray[Any]


@dataclass(frozen=True)
class Dataset:
    """A checked data set: both splits, the sample specs and (cross_entropy) the classes."""

    x_train: Arrays
    y_train: Arrays
    x_test: Arrays
    y_test: Arrays
    input: TensorSpec
    label: TensorSpec
    num_classes: int | None


def spec_of(array: Arrays) -> TensorSpec:
    """The per-sample spec of ``array`` (its shape without the first axis, its dtype)."""
    return TensorSpec(shape=[int(d) for d in array.shape[1:]], dtype=cast(Any, array.dtype.name))


def parse_shape(text: str) -> list[int]:
    """``"1,8,8"`` -> ``[1, 8, 8]``; ``""`` (a scalar) -> ``[]``; PackError otherwise."""
    if text.strip() == "":
        return []
    try:
        dims = [int(part) for part in text.split(",")]
    except ValueError:
        raise PackError(
            f"a shape is comma-separated positive integers such as 1,8,8; got {text!r}"
        ) from None
    if any(d < 1 for d in dims) or len(dims) > 8:
        raise PackError(f"a shape has 0 to 8 positive dimensions; got {text!r}")
    return dims


def read_dataset(path: Path, loss: Loss, num_classes: int | None = None) -> Dataset:
    """The checked data set in ``path`` (``.npz`` or ``.safetensors``); PackError otherwise."""
    arrays = _read_arrays(path)
    missing = [name for name in ARRAY_NAMES if name not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)) or "none"
        raise PackError(
            f"{path.name} has no array {', '.join(missing)}; a data file needs "
            f"{', '.join(ARRAY_NAMES)} (found: {found})"
        )
    return check_dataset(arrays, loss, num_classes, source=path.name)


def _read_arrays(path: Path) -> dict[str, Arrays]:
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".safetensors"):
        raise PackError(
            f"data file {path.name}: use a .npz or .safetensors file with arrays "
            f"{', '.join(ARRAY_NAMES)}"
        )
    if not path.is_file():
        raise PackError(f"data file {path} does not exist")
    try:
        if suffix == ".npz":
            if not zipfile.is_zipfile(path):
                raise PackError(f"cannot read {path.name}: it is not a .npz (zip) archive")
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files if name in ARRAY_NAMES}
        from safetensors.numpy import load_file

        return {k: v for k, v in load_file(str(path)).items() if k in ARRAY_NAMES}
    except PackError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise PackError(
                f"{path.name} holds Python objects (pickled arrays), which are never loaded; "
                "save plain numeric arrays"
            ) from None
        raise PackError(f"cannot read {path.name}: {_one_line(exc)}") from None
    except Exception as exc:  # zipfile, OSError, safetensors' own errors
        raise PackError(f"cannot read {path.name}: {_one_line(exc)}") from None


def check_dataset(
    arrays: Mapping[str, Arrays], loss: Loss, num_classes: int | None, *, source: str = "data"
) -> Dataset:
    """Check the four arrays (see the module contract); PackError naming the first problem."""
    for name in ARRAY_NAMES:
        array = arrays[name]
        if array.dtype.name not in _NUMPY_DTYPES:
            raise PackError(
                f"{source}: {name} has dtype {array.dtype}; a package carries "
                f"{', '.join(sorted(_NUMPY_DTYPES))} (convert with .astype(...))"
            )
        if array.ndim == 0:
            raise PackError(f"{source}: {name} is a scalar; its first axis must be the samples")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise PackError(f"{source}: x_{split} has {len(x)} samples but y_{split} has {len(y)}")
    if len(arrays["x_train"]) == 0:
        raise PackError(f"{source}: x_train has no samples")
    for kind in ("x", "y"):
        train, test = arrays[f"{kind}_train"], arrays[f"{kind}_test"]
        if train.shape[1:] != test.shape[1:] or train.dtype != test.dtype:
            raise PackError(
                f"{source}: {kind}_train samples are {_describe(train)} but {kind}_test "
                f"samples are {_describe(test)}; both splits must match"
            )
    if arrays["x_train"].dtype.name == "bool":
        raise PackError(f"{source}: x_train is bool; convert the features to a number type")
    y_train, y_test, classes = _labels(
        arrays["y_train"], arrays["y_test"], loss, num_classes, source
    )
    x_train = np.ascontiguousarray(arrays["x_train"])
    x_test = np.ascontiguousarray(arrays["x_test"])
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        input=spec_of(x_train),
        label=spec_of(y_train),
        num_classes=classes,
    )


def _labels(
    y_train: Arrays, y_test: Arrays, loss: Loss, num_classes: int | None, source: str
) -> tuple[Arrays, Arrays, int | None]:
    dtype = y_train.dtype.name
    if loss != "cross_entropy":
        if dtype not in _FLOAT_DTYPES:
            raise PackError(
                f"{source}: {loss} needs floating labels but y_train is {dtype}; "
                "convert with y.astype(np.float32)"
            )
        return np.ascontiguousarray(y_train), np.ascontiguousarray(y_test), None
    if dtype not in _INT_DTYPES:
        raise PackError(
            f"{source}: cross_entropy needs integer class labels (0, 1, 2, ...) but y_train "
            f"is {dtype}; convert with y.astype(np.int64)"
        )
    if y_train.ndim != 1:
        raise PackError(
            f"{source}: cross_entropy needs one class index per sample (y_train of shape "
            f"(N,)), got shape {y_train.shape}"
        )
    both = np.concatenate([y_train.astype(np.int64), y_test.astype(np.int64)])
    if both.min() < 0:
        raise PackError(f"{source}: class labels must be >= 0, found {int(both.min())}")
    largest = int(both.max())
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise PackError(
            f"{source}: label {largest} does not fit {num_classes} classes (labels are "
            f"0..{num_classes - 1})"
        )
    return (
        np.ascontiguousarray(y_train, dtype=np.int64),
        np.ascontiguousarray(y_test, dtype=np.int64),
        num_classes,
    )


def synthetic_samples(
    input_spec: TensorSpec, label_spec: TensorSpec, n: int, num_classes: int | None, seed: int = 0
) -> tuple[Arrays, Arrays]:
    """``n`` made-up samples matching the specs (for packing without data: export, check)."""
    rng = np.random.default_rng(seed)
    x = _random(rng, input_spec, n, high=2)
    if num_classes is not None and label_spec.dtype in _INT_DTYPES:
        y = rng.integers(0, num_classes, size=(n, *label_spec.shape)).astype(label_spec.dtype)
    else:
        y = _random(rng, label_spec, n, high=2)
    return x, y


def _random(rng: np.random.Generator, spec: TensorSpec, n: int, high: int) -> Arrays:
    shape = (n, *spec.shape)
    if spec.dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if spec.dtype in _INT_DTYPES:
        return rng.integers(0, high, size=shape).astype(spec.dtype)
    if spec.dtype not in _NUMPY_DTYPES:
        raise PackError(f"dtype {spec.dtype} cannot be used without a data file")
    return rng.random(size=shape).astype(spec.dtype)


def example_batch(x: Arrays) -> Arrays:
    """Up to :data:`EXAMPLE_BATCH` samples of ``x``, at least 2 (repeated if needed)."""
    batch = x[:EXAMPLE_BATCH]
    while len(batch) < 2:
        batch = np.concatenate([batch, batch[:1]])
    return np.ascontiguousarray(batch)


def _describe(array: Arrays) -> str:
    return f"{tuple(array.shape[1:])} {array.dtype}"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message collapsed to one line of at most ``limit`` characters."""
    return _one_line(exc, limit)
