"""The plain JSON document format of the weight codec, for simple servers in other languages.

Contract:

* :func:`write` turns validated, C-contiguous little-endian arrays into compact JSON,
  ``{name: {"dtype": "float32", "shape": [...], "data": [flat values]}}``; Python's float
  repr round-trips exactly, so every float16/32/64 value survives the trip.
* :func:`parse` checks a peer's document (JSON structure, dtypes, shapes, sizes and value
  counts) before anything is allocated for its tensors; :func:`materialise` then makes one
  writable, C-contiguous, native-byte-order array per tensor, refusing values of the wrong
  kind (strings, nulls, nested lists, floats for an integer dtype) or out of range.
* Refusals raise :class:`~client.weights.spec.WeightsError`: ``malformed``, ``oversized``,
  ``unknown_dtype``, ``truncated``. A value too large for a float16/32 becomes Inf and is
  refused as ``non_finite`` by the caller's finite check.

Never: execute or unpickle anything, or do I/O. Internal to the codec; code outside
``client.weights`` uses :func:`client.weights.encode` / ``decode``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from client.weights.checks import checked_nbytes, dtype_from, load_json_object, shape_from
from client.weights.spec import NAME_TO_NP, Entry, WeightsError

# Which kinds of JSON-parsed numpy arrays may become which target kind.
_JSON_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}


def write(arrays: list[tuple[str, npt.NDArray[Any]]]) -> bytes:
    """The JSON document for validated, C-contiguous little-endian ``arrays``."""
    doc = {
        name: {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.ravel().tolist()}
        for name, arr in arrays
    }
    # Python's float repr round-trips exactly, so float16/32 values survive the trip.
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


def parse(view: memoryview, max_bytes: int) -> list[Entry]:
    """Validate a peer's JSON document; return its entries, values not yet converted."""
    doc = load_json_object(view, "JSON weights document")
    entries = []
    for name, spec in doc.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
            raise WeightsError(
                "malformed", f"tensor {name!r}: the entry must have exactly dtype, shape and data"
            )
        dtype = dtype_from(name, spec["dtype"], NAME_TO_NP)
        shape = shape_from(name, spec["shape"])
        checked_nbytes(name, dtype, shape, max_bytes)
        values = spec["data"]
        if not isinstance(values, list):
            raise WeightsError("malformed", f"tensor {name!r}: data must be a flat list")
        count = math.prod(shape)
        if len(values) < count:
            raise WeightsError(
                "truncated",
                f"tensor {name!r}: data has {len(values)} values but shape {list(shape)} "
                f"needs {count}",
            )
        if len(values) > count:
            raise WeightsError(
                "malformed",
                f"tensor {name!r}: data has {len(values)} values but shape {list(shape)} "
                f"holds only {count}",
            )
        entries.append(Entry(name, dtype, shape, values=values))
    return entries


def materialise(entry: Entry) -> npt.NDArray[Any]:
    """The entry's values as a native array we own; refuses values of the wrong kind."""
    target = entry.dtype.newbyteorder("=")
    if not entry.values:
        return np.empty(entry.shape, dtype=target)
    try:
        # Let numpy infer first, so strings, nested lists and nulls show up as a wrong kind
        # instead of being silently converted (numpy would happily parse "1.5" as float).
        parsed = np.asarray(entry.values)
    except (ValueError, TypeError, OverflowError) as exc:
        raise WeightsError("malformed", f"tensor {entry.name!r}: data is not numeric") from exc
    if parsed.ndim != 1 or parsed.dtype.kind not in _JSON_KINDS[target.kind]:
        what = {"f": "numbers", "i": "integers", "u": "integers", "b": "true/false"}
        raise WeightsError(
            "malformed",
            f"tensor {entry.name!r}: data must be a flat list of {what[target.kind]} "
            f"for dtype {target.name}",
        )
    if target.kind in "iu":
        info = np.iinfo(target)
        low, high = parsed.min(), parsed.max()
        if low < info.min or high > info.max:
            raise WeightsError(
                "malformed",
                f"tensor {entry.name!r}: values {low}..{high} do not fit in {target.name}",
            )
    # A value too large for a float16/32 becomes Inf here and is refused as non_finite.
    with np.errstate(over="ignore"):
        return parsed.reshape(entry.shape).astype(target, order="C")
