"""The weight codec's vocabulary: the supported dtypes, the limits and the shared types.

Contract: this module declares, once, everything both document formats agree on: the one
table of supported dtypes (safetensors name <-> little-endian numpy dtype, in safetensors
layout order), the default size limits, :data:`StateDict`, :class:`TensorSpec` /
:data:`Layout`, :class:`WeightsError` and :class:`Entry` (one validated but not yet
materialised tensor of a peer's document). Every other table is derived from the dtype
table here.

Pure declarations: no I/O, nothing raises at import. Internal to the codec; code outside
``client.weights`` imports these names from :mod:`client.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import numpy.typing as npt

from client.errors import FedtrayError
from client.protocol import WeightFormat

StateDict = dict[str, npt.NDArray[Any]]
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)

#: The largest document (and the largest single tensor) ``decode`` accepts by default.
DEFAULT_MAX_BYTES = 1 << 30
#: The largest safetensors JSON header accepted; the safetensors library uses the same cap.
MAX_HEADER_BYTES = 100_000_000

#: The reserved safetensors header key; never a tensor name in either format.
METADATA_KEY = "__metadata__"

# The one table of supported dtypes: safetensors name -> little-endian numpy dtype.
# safetensors stores little-endian bytes, so the table names the byte order explicitly.
# The order is the order safetensors lays tensors out in (it sorts by its dtype enum,
# widest first, then by name), so every tensor starts at a multiple of its item size.
ST_TO_NP: dict[str, np.dtype[Any]] = {
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "I32": np.dtype("<i4"),
    "F16": np.dtype("<f2"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# numpy name ("float32") -> little-endian numpy dtype; the names used in TensorSpec and JSON.
NAME_TO_NP: dict[str, np.dtype[Any]] = {dt.name: dt for dt in ST_TO_NP.values()}
# numpy name -> (position in the safetensors layout order, safetensors name).
NAME_TO_ST: dict[str, tuple[int, str]] = {
    dt.name: (rank, st_name) for rank, (st_name, dt) in enumerate(ST_TO_NP.items())
}

# dtype -> its numpy name, filled as dtypes are seen: ``dtype.name`` is computed by numpy
# in Python on every access (microseconds; several per tensor per document).
_DTYPE_NAMES: dict[np.dtype[Any], str] = {}
_MAX_DTYPE_NAMES = 256


def dtype_name(dtype: np.dtype[Any]) -> str:
    """``dtype.name`` (e.g. ``"float32"``, whatever the byte order), remembered."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = dtype.name
        if len(_DTYPE_NAMES) < _MAX_DTYPE_NAMES:
            _DTYPE_NAMES[dtype] = name
    return name


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor must look like: numpy dtype name (e.g. ``"float32"``) and shape."""

    dtype: str
    shape: tuple[int, ...]


Layout = dict[str, TensorSpec]


class WeightsError(FedtrayError):
    """A weights document or state dict was refused; ``code`` says why."""


@dataclass(frozen=True)
class Entry:
    """One tensor as announced by a document, validated but not yet materialised."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    start: int = 0  # safetensors: offset into the data section
    values: Any = None  # json: the flat list of values
