"""The weight codec: model weights (a dict of numpy arrays) to bytes and back.

Contract:

* :func:`encode` turns a :data:`StateDict` into a ``safetensors`` document or a plain JSON
  document (for simple servers in other languages). The safetensors document is written
  here, byte for byte as ``safetensors.numpy.save`` writes it (same header JSON, padding
  and tensor order), in a single copy of the tensor bytes; the library reads it back.
  :func:`encode_parts` gives that safetensors document as its pieces (header, then views
  of the arrays' buffers): no copy of the tensor bytes at all, for a writer to a file.
* :func:`decode` turns bytes from a peer back into a :data:`StateDict` of writable,
  C-contiguous, native-byte-order arrays owned by the caller. Every byte of a peer's
  document is checked *before* anything is allocated for its tensors: header length and
  size, JSON structure, dtypes, shapes, and that the data offsets tile the data section
  exactly. Optionally the result is checked against an expected :data:`Layout` (every
  difference listed, :func:`check_layout_matches`), and float tensors are checked for NaN/Inf.
* :func:`decode_views` runs exactly the checks of :func:`decode` on a safetensors document
  but makes no copy: each tensor is a read-only array over the given buffer (``bytes``,
  an ``mmap`` of a file, ...), valid while that buffer is.
* :func:`check_head` and :func:`check_values` split :func:`decode_views`' checks for a
  caller that reads the tensor bytes into memory of its own: every check up to the
  layout's on the document's start and size, then the checks of the values read.
* ``decode(encode(x))`` equals ``x`` bit for bit (including ``-0.0``, subnormals and the
  payload of every dtype) for every supported dtype, in both formats.
* Every refusal raises :class:`WeightsError` with its own :data:`client.errors.ErrorCode`
  and a plain-words message naming the tensor where there is one. Nothing else escapes
  for bad input.

Never: unpickle anything, call ``numpy.load`` (with or without ``allow_pickle``), import
torch, or do I/O. Only numpy and the standard library are used; the ``safetensors``
library is the reference the tests hold both directions to.

This module is the codec's one public entry point. Its parts: :mod:`.spec` (the dtype
table, limits and shared types), :mod:`.checks` (the validation both formats share),
:mod:`.safetensors_format` and :mod:`.json_format` (one document format each).
"""

from __future__ import annotations

import hashlib
import mmap
from typing import Any

import numpy as np
import numpy.typing as npt

from client.protocol import WeightFormat
from client.weights import json_format, safetensors_format
from client.weights.checks import (
    LayoutMismatchError,
    check_bool_bytes,
    check_finite,
    check_format,
    check_layout,
    check_layout_matches,
    checked_items,
    layout_mismatches,
    le_dtype_of,
)
from client.weights.spec import (
    DEFAULT_MAX_BYTES,
    MAX_HEADER_BYTES,
    WEIGHT_FORMATS,
    Layout,
    StateDict,
    TensorSpec,
    WeightsError,
    dtype_name,
)


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Lower-case hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def verify_blob(data: bytes | bytearray | memoryview, *, size: int, sha256: str) -> None:
    """Check that ``data`` has the announced size and hash.

    Raises :class:`WeightsError` ``size_mismatch`` or ``checksum_mismatch``.
    """
    got = memoryview(data).nbytes
    if got != size:
        raise WeightsError("size_mismatch", f"received {got} bytes but {size} were announced")
    digest = sha256_hex(data)
    if digest != sha256.strip().lower():
        raise WeightsError(
            "checksum_mismatch",
            f"the data hashes to sha256 {digest}, not the announced {sha256}",
        )


def layout_of(state: StateDict) -> Layout:
    """The :data:`Layout` of ``state``; raises ``unknown_dtype`` for an unsupported dtype."""
    return {
        name: TensorSpec(dtype_name(le_dtype_of(name, arr)), tuple(int(d) for d in arr.shape))
        for name, arr in checked_items(state)
    }


def encode(state: StateDict, fmt: WeightFormat = "safetensors") -> bytes:
    """Serialise ``state`` as ``fmt``.

    Raises :class:`WeightsError`: ``unsupported_format``, ``malformed`` (a name that is not
    a string, is reserved or is not valid Unicode, a value that is not a numpy array, a bool
    tensor holding bytes other than 0/1), ``unknown_dtype``, ``non_finite`` (NaN/Inf in a
    float tensor).
    """
    check_format(fmt)
    arrays = _encodable(state)
    if fmt == "safetensors":
        return safetensors_format.write(arrays)
    return json_format.write(arrays)


def encode_parts(state: StateDict) -> list[bytes | memoryview]:
    """``encode(state, "safetensors")`` as its pieces in order (joined, they are exactly
    those bytes): the header, then read-only views of the arrays' own buffers, copied
    nowhere (a writer writes and hashes them one by one). Raises what :func:`encode` does.
    The views keep the arrays alive; change no array while they are in use."""
    return safetensors_format.write_parts(_encodable(state))


def _encodable(state: StateDict) -> list[tuple[str, npt.NDArray[Any]]]:
    """``state``'s arrays checked for encoding, dense and little-endian (module codes)."""
    arrays: list[tuple[str, npt.NDArray[Any]]] = []
    for name, given in checked_items(state):
        dtype = le_dtype_of(name, given)
        # Both formats need dense little-endian values; copy only when the input is not.
        arr = given
        if not (given.flags.c_contiguous and given.dtype == dtype):
            arr = np.array(given, dtype=dtype, order="C")
        check_finite(name, arr)
        check_bool_bytes(name, arr)
        arrays.append((name, arr))
    return arrays


def decode(
    data: bytes | bytearray | memoryview,
    fmt: WeightFormat = "safetensors",
    *,
    expected: Layout | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> StateDict:
    """Parse a peer's weights document into writable arrays owned by the caller.

    Raises :class:`WeightsError`: ``unsupported_format``, ``oversized``, ``malformed``,
    ``unknown_dtype``, ``bad_offsets``, ``truncated``, then (with ``expected``)
    ``layout_mismatch`` / ``dtype_mismatch`` / ``shape_mismatch``, then ``non_finite``.
    Nothing is allocated for a tensor until the whole document has passed the structural
    and layout checks.
    """
    check_format(fmt)
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if view.nbytes > max_bytes:
        raise WeightsError(
            "oversized", f"the weights are {view.nbytes} bytes; the limit is {max_bytes}"
        )
    if fmt == "safetensors":
        entries, body_start = safetensors_format.parse(view, max_bytes)
    else:
        entries, body_start = json_format.parse(view, max_bytes), 0
    if expected is not None:
        check_layout(entries, expected)
    out: StateDict = {}
    for entry in entries:
        arr = (
            safetensors_format.materialise(view, body_start, entry)
            if fmt == "safetensors"
            else json_format.materialise(entry)
        )
        check_finite(entry.name, arr)
        out[entry.name] = arr
    return out


def check_head(
    head: bytes | bytearray | memoryview,
    total: int,
    *,
    expected: Layout,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[list[tuple[str, np.dtype[Any], tuple[int, ...], int]], int]:
    """Every check :func:`decode_views` makes before it reads a tensor's values, for a
    safetensors document of ``total`` bytes of which ``head`` is the start (its length and
    header at least): its ``(name, dtype, shape, offset)`` tensors, in the document's order
    (offsets into the data section, which starts at the returned position). Raises
    :class:`WeightsError` with the codes of :func:`decode_views`, in its order, up to the
    layout's; the values are the caller's to check (:func:`check_values`)."""
    view = memoryview(head)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if total > max_bytes:
        raise WeightsError("oversized", f"the weights are {total} bytes; the limit is {max_bytes}")
    entries, body_start = safetensors_format.parse(view, max_bytes, total)
    check_layout(entries, expected)
    return [(e.name, e.dtype, e.shape, e.start) for e in entries], body_start


def check_values(state: StateDict) -> None:
    """The checks of a decoded document's values (:func:`decode`'s last): no NaN or
    infinity in a float tensor, only 0/1 bytes in a bool one (``non_finite``,
    ``malformed``), for arrays read by the caller (:func:`check_head`)."""
    for name, arr in state.items():
        check_bool_bytes(name, arr)
        check_finite(name, arr)


def decode_views(
    data: bytes | bytearray | memoryview | mmap.mmap,
    *,
    expected: Layout | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    finite: bool = True,
) -> StateDict:
    """Check a safetensors document like :func:`decode`, without copying its tensors.

    Returns read-only arrays over ``data`` itself (little-endian dtypes as stored; they
    keep ``data``'s buffer exported until they are dropped). Raises :class:`WeightsError`
    with the same codes, in the same order, as ``decode(data, "safetensors", ...)``.
    ``finite=False`` skips only the NaN/Inf pass, for a document this process has
    already checked (every structural and layout check still runs).
    """
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if view.nbytes > max_bytes:
        raise WeightsError(
            "oversized", f"the weights are {view.nbytes} bytes; the limit is {max_bytes}"
        )
    entries, body_start = safetensors_format.parse(view, max_bytes)
    if expected is not None:
        check_layout(entries, expected)
    out: StateDict = {}
    for entry in entries:
        arr = safetensors_format.view_of(view, body_start, entry)
        if finite:
            check_finite(entry.name, arr)
        out[entry.name] = arr
    return out


__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_HEADER_BYTES",
    "WEIGHT_FORMATS",
    "Layout",
    "LayoutMismatchError",
    "StateDict",
    "TensorSpec",
    "WeightFormat",
    "WeightsError",
    "check_head",
    "check_layout_matches",
    "check_values",
    "decode",
    "decode_views",
    "encode",
    "encode_parts",
    "layout_mismatches",
    "layout_of",
    "sha256_hex",
    "verify_blob",
]
