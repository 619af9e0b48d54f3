"""The safetensors document format of the weight codec, written and read without the library.

Contract:

* :func:`write` turns validated, C-contiguous little-endian arrays into the document
  ``safetensors.numpy.save`` writes, byte for byte (compact header JSON in layout order,
  padded with spaces to 8 bytes), copying the tensor bytes exactly once;
  :func:`write_parts` gives the same document as its pieces (the header, then views of
  the arrays' own buffers: no copy at all), for a writer that writes them one by one.
* :func:`parse` checks every byte of a peer's header (length and size, JSON structure,
  dtypes, shapes, and that the data offsets tile the data section exactly) before
  anything is allocated for its tensors; :func:`materialise` then makes one writable,
  C-contiguous, native-byte-order array per tensor, or :func:`view_of` a read-only
  array over the document's own bytes (no copy; little-endian as stored).
* :func:`parse` is a pure function of the header's bytes, the document's size and the
  limit: the last header accepted (at most :data:`PARSE_MEMO_BYTES`) is remembered with
  what it gave, so the same header again (every version of one model) is not read
  again; a header that was refused is never remembered. :func:`write_parts` likewise
  remembers the header bytes of the last layouts it wrote.
* Refusals raise :class:`~client.weights.spec.WeightsError`: ``malformed``, ``oversized``,
  ``unknown_dtype``, ``bad_offsets``, ``truncated``.

Never: unpickle, call ``numpy.load``, import the ``safetensors`` library (the tests hold
both directions to it), or do I/O. Internal to the codec; code outside ``client.weights``
uses :func:`client.weights.encode` / ``decode``.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from client.weights.checks import (
    check_bool_bytes,
    checked_nbytes,
    dtype_from,
    is_count,
    load_json_object,
    shape_from,
)
from client.weights.spec import (
    MAX_HEADER_BYTES,
    METADATA_KEY,
    NAME_TO_ST,
    ST_TO_NP,
    Entry,
    WeightsError,
    dtype_name,
)

HEADER_LEN = struct.Struct("<Q")
#: The safetensors header is padded with spaces to this boundary, as the library does, so
#: the data section (and, with the layout order, every tensor) is aligned.
ST_ALIGN = 8


def write(arrays: list[tuple[str, npt.NDArray[Any]]]) -> bytes:
    """The safetensors document for validated, C-contiguous little-endian ``arrays``, as
    one ``bytes``: :func:`write_parts` joined (the one copy of the tensor bytes)."""
    return b"".join(write_parts(arrays))


def write_parts(arrays: list[tuple[str, npt.NDArray[Any]]]) -> list[bytes | memoryview]:
    """The safetensors document for validated, C-contiguous little-endian ``arrays``, as
    its pieces in order: the header, then a view of each array's own buffer (no copy;
    they keep the arrays alive).

    ``safetensors.numpy.save`` is not used: it copies every tensor twice (into its own
    buffer, then into a ``bytes``), and everything it would check has been checked by
    :func:`client.weights.encode` already. The header is what the library writes:
    compact JSON in layout order, padded with spaces.
    """
    named = [(name, dtype_name(arr.dtype), arr) for name, arr in arrays]
    ordered = sorted(named, key=lambda item: (NAME_TO_ST[item[1]][0], item[0]))
    layout = tuple((name, dtype, arr.shape, arr.nbytes) for name, dtype, arr in ordered)
    parts: list[bytes | memoryview] = [_header(layout)]
    parts.extend(arr.reshape(-1).view(np.uint8).data for _, _, arr in ordered if arr.nbytes)
    return parts


@functools.lru_cache(maxsize=8)
def _header(layout: tuple[tuple[str, str, tuple[int, ...], int], ...]) -> bytes:
    """The length-prefixed, padded header of tensors ``(name, dtype name, shape, nbytes)``
    in layout order (pure, so remembered)."""
    header: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, dtype, shape, nbytes in layout:
        end = offset + nbytes
        header[name] = {
            "dtype": NAME_TO_ST[dtype][1],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % ST_ALIGN)
    return HEADER_LEN.pack(len(raw)) + raw


def parse(view: memoryview, max_bytes: int, total: int | None = None) -> tuple[list[Entry], int]:
    """Validate the safetensors header; return the entries and where the data section starts.

    Offsets are checked here rather than left to the library so that a hostile header is
    refused with a precise code before any tensor memory is allocated. ``total``: the
    document's size when ``view`` holds only its start (at least the length and header).
    """
    total = view.nbytes if total is None else total
    if total < HEADER_LEN.size or view.nbytes < HEADER_LEN.size:
        raise WeightsError(
            "malformed", f"not a safetensors document: only {total} bytes, need at least 8"
        )
    (header_len,) = HEADER_LEN.unpack_from(view, 0)
    if header_len > total - HEADER_LEN.size:
        raise WeightsError(
            "malformed",
            f"not a safetensors document: the header length {header_len} runs past the end "
            f"of the {total} bytes received",
        )
    if header_len > MAX_HEADER_BYTES:
        raise WeightsError(
            "oversized", f"the header is {header_len} bytes; the limit is {MAX_HEADER_BYTES}"
        )
    body_start = HEADER_LEN.size + header_len
    if view.nbytes < body_start:
        raise WeightsError(
            "malformed", f"only {view.nbytes} bytes of the {body_start}-byte header were given"
        )
    memo = _last_parse[0]
    small = header_len <= PARSE_MEMO_BYTES
    raw_header = bytes(view[HEADER_LEN.size : body_start]) if small else None
    if memo is not None and (raw_header, total, max_bytes) == memo[0]:
        return list(memo[1]), body_start
    header = load_json_object(view[HEADER_LEN.size : body_start], "safetensors header")

    entries: list[tuple[int, int, Entry]] = []
    for name, spec in header.items():
        if name == METADATA_KEY:
            _check_metadata(spec)
            continue
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(
                "malformed",
                f"tensor {name!r}: the entry must have exactly dtype, shape and data_offsets",
            )
        dtype = dtype_from(name, spec["dtype"], ST_TO_NP)
        shape = shape_from(name, spec["shape"])
        nbytes = checked_nbytes(name, dtype, shape, max_bytes)
        offsets = spec["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
            raise WeightsError(
                "malformed", f"tensor {name!r}: data_offsets must be two non-negative integers"
            )
        begin, end = offsets
        if end - begin != nbytes:
            raise WeightsError(
                "bad_offsets",
                f"tensor {name!r}: data_offsets [{begin}, {end}] span {end - begin} bytes, "
                f"but {dtype.name} {list(shape)} needs {nbytes}",
            )
        entries.append((begin, end, Entry(name, dtype, shape, start=begin)))

    # The spans must tile [0, body) exactly: sorted, each starting where the last ended.
    position, last = 0, None
    for begin, end, entry in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin != position:
            kind = "overlaps" if begin < position else "leaves a gap after"
            after = f"tensor {last!r}" if last is not None else "the start of the data"
            raise WeightsError(
                "bad_offsets", f"tensor {entry.name!r} (offset {begin}) {kind} {after}"
            )
        position, last = end, entry.name
    body = total - body_start
    if position > body:
        raise WeightsError(
            "truncated",
            f"the header promises {position} bytes of tensor data but only {body} arrived",
        )
    if position < body:
        raise WeightsError(
            "bad_offsets", f"{body - position} bytes after the last tensor belong to no tensor"
        )
    accepted = [entry for _, _, entry in entries]
    if raw_header is not None:
        _remember_parse((raw_header, total, max_bytes), tuple(accepted))
    return accepted, body_start


#: Headers up to this many bytes are remembered by :func:`parse` (the last one).
PARSE_MEMO_BYTES = 1 << 16
# The last header parse accepted: ((header, size, limit), entries). One tuple, replaced
# whole, so any thread reads a consistent one.
_last_parse: list[tuple[tuple[bytes, int, int], tuple[Entry, ...]] | None] = [None]


def _remember_parse(key: tuple[bytes, int, int], entries: tuple[Entry, ...]) -> None:
    _last_parse[0] = (key, entries)


def _check_metadata(spec: object) -> None:
    if not isinstance(spec, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in spec.items()
    ):
        raise WeightsError("malformed", f"{METADATA_KEY} must map strings to strings")


def materialise(view: memoryview, body_start: int, entry: Entry) -> npt.NDArray[Any]:
    """The one copy: little-endian bytes in the document -> a native array we own.

    ``safetensors.numpy.load`` would copy every tensor into a read-only ``bytes`` object,
    so writable arrays would cost a second copy; the header has already been checked more
    strictly than the library does, so the bytes are read in place instead.
    """
    count = math.prod(entry.shape)
    if count == 0:
        return np.empty(entry.shape, dtype=entry.dtype.newbyteorder("="))
    raw = np.frombuffer(view, dtype=entry.dtype, count=count, offset=body_start + entry.start)
    check_bool_bytes(entry.name, raw)
    return raw.reshape(entry.shape).astype(entry.dtype.newbyteorder("="), order="C")


def view_of(view: memoryview, body_start: int, entry: Entry) -> npt.NDArray[Any]:
    """A read-only array over the tensor's bytes in the document: no copy at all.

    The dtype is the document's (little-endian); it keeps ``view``'s buffer alive. Bool
    tensors are checked for bytes other than 0/1, as :func:`materialise` does.
    """
    count = math.prod(entry.shape)
    if count == 0:
        empty = np.empty(entry.shape, dtype=entry.dtype)
        empty.flags.writeable = False
        return empty
    raw = np.frombuffer(view, dtype=entry.dtype, count=count, offset=body_start + entry.start)
    check_bool_bytes(entry.name, raw)
    arr = raw.reshape(entry.shape)
    arr.flags.writeable = False
    return arr
