"""A new global's safetensors document, written in place: the aggregate computed into it.

Contract: :func:`blank_document` lays out, for a model :class:`client.weights.Layout`, the
document :func:`client.weights.encode` would write for a state of that layout (the same
header bytes: compact JSON in safetensors order, padded with spaces to 8 bytes; the same
data offsets) as one buffer (its tensor bytes NOT initialised: the caller writes every
one), and hands out one writable, C-contiguous, little-endian array per tensor over the
document's own bytes. Whatever is written into those arrays is the document:
:meth:`Document.finish` checks the values as ``encode`` does (finite floats, 0/1 bools;
:class:`client.weights.WeightsError` ``non_finite`` / ``malformed``) and returns a
read-only view of the whole buffer, so the aggregate is never copied into a second
buffer (``tests/test_document.py`` holds the bytes equal to ``encode``'s); worth it from
:data:`IN_PLACE_MIN_BYTES` of tensor data (:func:`data_bytes`). Raises
:class:`client.weights.WeightsError` ``unknown_dtype`` for a dtype the format lacks. No
I/O.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from client.weights import Layout, StateDict, WeightsError
from client.weights.checks import check_bool_bytes, check_finite
from client.weights.spec import NAME_TO_NP, NAME_TO_ST

__all__ = ["IN_PLACE_MIN_BYTES", "Document", "blank_document", "data_bytes"]

#: Below this many bytes of tensor data, writing in place saves nothing (a fresh zeroed
#: buffer costs what the copy it avoids costs): the aggregate is encoded as usual.
IN_PLACE_MIN_BYTES = 1 << 20

#: The header's length field, and the boundary it is padded to (as the format writer).
_HEADER_LEN = struct.Struct("<Q")
_ALIGN = 8


@dataclass(frozen=True)
class Document:
    """A safetensors document being filled: ``buffer`` (bytes as ``uint8``) and ``views``
    share their memory."""

    buffer: npt.NDArray[np.uint8]
    views: StateDict

    def finish(self) -> memoryview:
        """The document (read-only), once its values pass ``encode``'s checks
        (WeightsError)."""
        for name, arr in self.views.items():
            check_finite(name, arr)
            check_bool_bytes(name, arr)
        return self.buffer.data.toreadonly()


def data_bytes(layout: Layout) -> int:
    """The bytes of tensor data a state of ``layout`` holds (0 for an unknown dtype)."""
    total = 0
    for spec in layout.values():
        dtype = NAME_TO_NP.get(spec.dtype)
        if dtype is not None:
            total += math.prod(spec.shape) * dtype.itemsize
    return total


def blank_document(layout: Layout) -> Document:
    """A document of ``layout`` (tensor bytes not yet written) and its tensors' arrays
    (module docstring)."""
    specs: list[tuple[str, np.dtype[Any], tuple[int, ...]]] = []
    for name, spec in layout.items():
        dtype = NAME_TO_NP.get(spec.dtype)
        if dtype is None:
            raise WeightsError("unknown_dtype", f"tensor {name!r} has dtype {spec.dtype}")
        specs.append((name, dtype, tuple(spec.shape)))
    specs.sort(key=lambda item: (NAME_TO_ST[item[1].name][0], item[0]))
    header: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, dtype, shape in specs:
        end = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": NAME_TO_ST[dtype.name][1],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _ALIGN)
    start = _HEADER_LEN.size + len(raw)
    # Not zero-filled (a pass over the whole buffer for nothing): every tensor byte is
    # written by the caller; the header is written here.
    buffer = np.empty(start + offset, dtype=np.uint8)
    buffer[: _HEADER_LEN.size] = np.frombuffer(_HEADER_LEN.pack(len(raw)), dtype=np.uint8)
    buffer[_HEADER_LEN.size : start] = np.frombuffer(raw, dtype=np.uint8)
    views: StateDict = {}
    for name, dtype, shape in specs:
        begin, end = header[name]["data_offsets"]
        views[name] = buffer[start + begin : start + end].view(dtype).reshape(shape)
    return Document(buffer, {name: views[name] for name in layout})
