"""The weight codec's shared validation checks, used by both document formats.

Contract: each check either returns the validated value or raises
:class:`~client.weights.spec.WeightsError` with its own code (``unsupported_format``,
``malformed``, ``unknown_dtype``, ``oversized``, ``layout_mismatch``, ``dtype_mismatch``,
``shape_mismatch``, ``non_finite``) and a plain-words message naming the tensor where
there is one. Nothing else escapes for bad input. Checks on a peer's header (dtype,
shape, size) run on plain Python values before any tensor memory is allocated; the
NaN/Inf and bool-byte checks read an array without copying it. The layout check
(:func:`check_layout_matches`) collects *every* difference from the expected layout
(missing and unexpected names, shapes, dtypes) before raising, and names them all in a
message bounded to fit an ErrorAck.

Never: unpickle, do I/O, or allocate a tensor-sized temporary. Internal to the codec;
code outside ``client.weights`` uses :func:`client.weights.encode` / ``decode``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from client.errors import ErrorCode
from client.weights.spec import (
    METADATA_KEY,
    NAME_TO_NP,
    WEIGHT_FORMATS,
    Entry,
    Layout,
    TensorSpec,
    WeightsError,
    dtype_name,
)

# The NaN/Inf check walks a tensor in slices of this many bytes: the second pass (max after
# min) then reads the slice from L2 cache instead of memory, and nothing big is allocated.
FINITE_CHUNK_BYTES = 1 << 20


def check_format(fmt: object) -> None:
    if fmt not in WEIGHT_FORMATS:
        raise WeightsError(
            "unsupported_format",
            f"weights format {fmt!r} is not supported; use one of {', '.join(WEIGHT_FORMATS)}",
        )


def checked_items(state: object) -> list[tuple[str, npt.NDArray[Any]]]:
    if not isinstance(state, dict):
        raise WeightsError("malformed", "weights must be a dict of name -> numpy array")
    items = []
    for name, arr in state.items():
        if not isinstance(name, str) or name == METADATA_KEY or not is_utf8(name):
            raise WeightsError("malformed", f"{name!r} cannot be used as a tensor name")
        if not isinstance(arr, np.ndarray):
            raise WeightsError(
                "malformed", f"tensor {name!r} is a {type(arr).__name__}, not a numpy array"
            )
        items.append((name, arr))
    return items


def le_dtype_of(name: str, arr: npt.NDArray[Any]) -> np.dtype[Any]:
    """The table's little-endian dtype for ``arr`` (whatever its byte order)."""
    # Look up by name so big-endian arrays ('>f4' is also "float32") are accepted too.
    dtype = NAME_TO_NP.get(dtype_name(arr.dtype))
    if dtype is None or dtype.kind != arr.dtype.kind or arr.dtype.fields is not None:
        raise WeightsError(
            "unknown_dtype",
            f"tensor {name!r} has dtype {arr.dtype}; supported: {', '.join(NAME_TO_NP)}",
        )
    return dtype


def is_utf8(name: str) -> bool:
    """False for names holding lone surrogates, which no UTF-8 document can carry."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_json_object(view: memoryview, what: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("duplicate key")
        return result

    try:
        doc = json.loads(bytes(view).decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WeightsError("malformed", f"the {what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise WeightsError("malformed", f"the {what} must be a JSON object")
    return doc


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def dtype_from(name: str, raw: object, table: dict[str, np.dtype[Any]]) -> np.dtype[Any]:
    if not isinstance(raw, str):
        raise WeightsError("malformed", f"tensor {name!r}: dtype must be a string")
    dtype = table.get(raw)
    if dtype is None:
        raise WeightsError(
            "unknown_dtype",
            f"tensor {name!r} has dtype {raw!r}; supported: {', '.join(table)}",
        )
    return dtype


def shape_from(name: str, raw: object) -> tuple[int, ...]:
    if not (isinstance(raw, list) and all(map(is_count, raw))):
        raise WeightsError(
            "malformed", f"tensor {name!r}: shape must be a list of non-negative integers"
        )
    return tuple(raw)


def checked_nbytes(name: str, dtype: np.dtype[Any], shape: tuple[int, ...], max_bytes: int) -> int:
    # Python ints cannot overflow, so a shape like [10**12, 10**12] is caught here.
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise WeightsError(
            "oversized",
            f"tensor {name!r} would need {nbytes} bytes; the limit is {max_bytes}",
        )
    return nbytes


#: At most this many characters of a layout refusal's message (an ErrorAck carries 1,000).
MAX_MISMATCH_TEXT = 900
#: A tensor name or shape is shown with at most this many characters in a mismatch line.
_MAX_ITEM_TEXT = 60


def layout_mismatches(got: Layout, expected: Layout) -> list[str]:
    """Every difference between ``got`` and ``expected``, one plain-words line each.

    In order: ``missing 'x'`` (expected, absent; in ``expected``'s order), ``unexpected
    'y'`` (present, not expected; in ``got``'s order), then for each shared tensor in
    ``got``'s order ``'w': shape [3, 4] expected [4, 4]`` and/or ``'b': dtype float64
    expected float32``. Empty when the layouts match. Pure; never raises.
    """
    lines = [f"missing {_name(n)}" for n in expected if n not in got]
    lines += [f"unexpected {_name(n)}" for n in got if n not in expected]
    for name, spec in got.items():
        want = expected.get(name)
        if want is None:
            continue
        if tuple(spec.shape) != tuple(want.shape):
            lines.append(f"{_name(name)}: shape {_shape(spec.shape)} expected {_shape(want.shape)}")
        if spec.dtype != want.dtype:
            lines.append(f"{_name(name)}: dtype {spec.dtype} expected {want.dtype}")
    return lines


def check_layout_matches(got: Layout, expected: Layout) -> None:
    """Raise :class:`LayoutMismatchError` listing every difference, or return when they match.

    The code is the first kind present of ``layout_mismatch`` (a name missing or
    unexpected), ``dtype_mismatch``, ``shape_mismatch``; the message lists all the
    differences (:func:`layout_mismatches`), bounded to :data:`MAX_MISMATCH_TEXT`
    characters with the count of the ones left out; ``problems`` holds them all.
    """
    problems = layout_mismatches(got, expected)
    if not problems:
        return
    names_differ = set(got) != set(expected)
    dtypes_differ = any(got[n].dtype != expected[n].dtype for n in got if n in expected)
    code: ErrorCode = (
        "layout_mismatch"
        if names_differ
        else "dtype_mismatch"
        if dtypes_differ
        else "shape_mismatch"
    )
    raise LayoutMismatchError(code, problems)


def check_layout(entries: list[Entry], expected: Layout) -> None:
    """:func:`check_layout_matches` for a document's entries (before any allocation)."""
    check_layout_matches(
        {e.name: TensorSpec(dtype_name(e.dtype), tuple(e.shape)) for e in entries}, expected
    )


class LayoutMismatchError(WeightsError):
    """Tensors that do not fit the expected model; ``problems`` lists every difference."""

    def __init__(self, code: ErrorCode, problems: list[str]) -> None:
        super().__init__(code, mismatch_text(problems))
        self.problems = problems


def mismatch_text(problems: list[str]) -> str:
    """``the tensors do not match the model (N differences): a; b; ... and K more``,
    at most :data:`MAX_MISMATCH_TEXT` characters."""
    head = f"the tensors do not match the model ({len(problems)} difference"
    head += "s): " if len(problems) != 1 else "): "
    shown: list[str] = []
    for i, line in enumerate(problems):
        left = len(problems) - i - 1
        tail = f" and {left} more" if left else ""
        candidate = "; ".join([*shown, line])
        if len(head) + len(candidate) + len(tail) > MAX_MISMATCH_TEXT:
            break
        shown.append(line)
    rest = len(problems) - len(shown)
    return head + "; ".join(shown) + (f" and {rest} more" if rest else "")


def _name(name: str) -> str:
    text = repr(name)
    return text if len(text) <= _MAX_ITEM_TEXT else text[: _MAX_ITEM_TEXT - 3] + "..."


def _shape(shape: tuple[int, ...]) -> str:
    text = str(list(shape))
    return text if len(text) <= _MAX_ITEM_TEXT else text[: _MAX_ITEM_TEXT - 4] + "...]"


def check_finite(name: str, arr: npt.NDArray[Any]) -> None:
    """Refuse NaN/Inf in a C-contiguous float tensor.

    min/max propagate NaN and surface ±Inf, are vectorised, and cannot overflow (a sum
    could turn large finite values into Inf). Slicing keeps the max pass in cache and
    avoids the tensor-sized bool temporary of ``np.isfinite(arr).all()``; measured on the
    benchmark's 100 MB float32 tensors it is about 1.4x faster than whole-array min/max.
    """
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    flat = arr.reshape(-1)  # a view: callers pass C-contiguous arrays
    step = max(1, FINITE_CHUNK_BYTES // arr.itemsize)
    for start in range(0, flat.size, step):
        chunk = flat[start : start + step]
        if not (np.isfinite(chunk.min()) and np.isfinite(chunk.max())):
            bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
            raise WeightsError(
                "non_finite",
                f"tensor {name!r} holds {bad} NaN or infinite value(s) out of {arr.size}",
            )


def check_bool_bytes(name: str, arr: npt.NDArray[Any]) -> None:
    # Any byte but 0/1 would make a bool that does not round-trip bit for bit.
    if arr.dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        raise WeightsError("malformed", f"tensor {name!r}: bool bytes must be 0 or 1")
