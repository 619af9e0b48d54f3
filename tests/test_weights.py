"""Tests for client.weights: bit-exact round trips and one error code per kind of bad input."""

from __future__ import annotations

import json
import pickle
import random
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from client.weights import (
    WEIGHT_FORMATS,
    LayoutMismatchError,
    StateDict,
    TensorSpec,
    WeightsError,
    decode,
    decode_views,
    encode,
    encode_parts,
    layout_of,
    sha256_hex,
    verify_blob,
)
from client.weights.checks import MAX_MISMATCH_TEXT

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]
FLOATS = ["float16", "float32", "float64"]


def edge_values(dtype_name: str) -> np.ndarray:
    """Values that expose lossy codecs: signed zero, subnormals, extremes."""
    dt = np.dtype(dtype_name)
    if dt.kind == "f":
        fi = np.finfo(dt)
        vals = [0.0, -0.0, fi.smallest_subnormal, -fi.smallest_subnormal, fi.tiny, fi.eps]
        vals += [fi.max, fi.min, 1 / 3, -2.5, -fi.tiny, 7.0]
        return np.array(vals, dtype=dt)
    if dt.kind == "b":
        return np.array([True, False, True, True, False, False] * 2, dtype=dt)
    ii = np.iinfo(dt)
    return np.array([ii.min, ii.max, 0, 1, ii.min + 1, ii.max - 1, 2, 3, 4, 5, 6, 7], dtype=dt)


def assert_bit_equal(got: StateDict, want: StateDict) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for name, arr in want.items():
        out = got[name]
        assert out.dtype == arr.dtype.newbyteorder("="), name
        assert out.shape == arr.shape, name
        assert out.tobytes() == np.ascontiguousarray(arr).astype(out.dtype).tobytes(), name


def st_doc(header: dict[str, Any], body: bytes = b"") -> bytes:
    """A hand-built safetensors document, so the header can lie."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def st_raw(header: str, body: bytes = b"") -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + body


def code_of(excinfo: pytest.ExceptionInfo[WeightsError]) -> str:
    return excinfo.value.code


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(12,), (3, 4), (2, 3, 2)])
def test_round_trip_is_bit_exact(fmt: str, dtype: str, shape: tuple[int, ...]) -> None:
    state = {"w": edge_values(dtype).reshape(shape), "b": edge_values(dtype)[:2].copy()}
    out = decode(encode(state, fmt), fmt)  # type: ignore[arg-type]
    assert_bit_equal(out, state)


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_scalars_and_zero_size(fmt: str, dtype: str) -> None:
    state = {
        "scalar": np.array(edge_values(dtype)[1]),
        "empty": np.zeros((0,), dtype=dtype),
        "empty3d": np.zeros((2, 0, 3), dtype=dtype),
    }
    out = decode(encode(state, fmt), fmt)  # type: ignore[arg-type]
    assert_bit_equal(out, state)
    assert out["scalar"].shape == ()


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_parts_joined_are_the_document_without_copying_tensors(dtype: str) -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {
        "w": edge_values(dtype).reshape(3, 4),
        "scalar": np.array(edge_values(dtype)[1]),
        "empty": np.zeros((0,), dtype=dtype),
        "t": base.T,  # not contiguous: copied once, as encode does
    }
    parts = encode_parts(state)
    assert b"".join(parts) == encode(state, "safetensors")
    # The contiguous tensors are views of the arrays' own memory, not copies.
    arrays = [np.frombuffer(p, np.uint8) for p in parts[1:]]
    assert any(np.shares_memory(a, state["w"]) for a in arrays)
    assert any(np.shares_memory(a, state["scalar"]) for a in arrays)


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_round_trip_empty_dict(fmt: str) -> None:
    assert decode(encode({}, fmt), fmt) == {}  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_encode_accepts_non_contiguous_and_big_endian(fmt: str) -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {"t": base.T, "be": np.arange(5, dtype=">i4"), "step": base[:, ::2]}
    out = decode(encode(state, fmt), fmt)  # type: ignore[arg-type]
    for name, arr in state.items():
        np.testing.assert_array_equal(out[name], arr)
        assert out[name].flags.c_contiguous and out[name].dtype.isnative
    np.testing.assert_array_equal(base, np.arange(12, dtype=np.float32).reshape(3, 4))


def test_decode_returns_writable_arrays_independent_of_input() -> None:
    state: StateDict = {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), dtype=np.int16)}
    blob = bytearray(encode(state))
    out = decode(blob)
    snapshot = bytes(blob)
    for arr in out.values():
        assert arr.flags.writeable
        arr[...] = 7
    assert bytes(blob) == snapshot  # writing the result did not touch the input
    blob[-8:] = b"\xff" * 8
    np.testing.assert_array_equal(out["a"], np.full(4, 7, dtype=np.float32))


def test_decode_reads_memoryview_and_library_metadata() -> None:
    state = {"a": np.arange(3, dtype=np.float64)}
    blob = safetensors.numpy.save(state, metadata={"format": "np", "round": "3"})
    out = decode(memoryview(blob))
    assert_bit_equal(out, state)


def test_safetensors_library_reads_our_output() -> None:
    state = {"w": edge_values("float32"), "m": edge_values("bool")}
    assert_bit_equal(safetensors.numpy.load(encode(state)), state)


def mixed_state() -> StateDict:
    """Every dtype, with names whose order differs from the layout order."""
    state: StateDict = {f"t.{dt}": edge_values(dt).reshape(3, 4) for dt in DTYPES}
    state["a.scalar"] = np.array(2.5, np.float16)
    state["z.empty"] = np.zeros((2, 0, 3), np.int32)
    state['名前 "quoted"\n\t\x01'] = np.arange(3, dtype=np.int64)
    return state


# Documents whose bytes must equal what safetensors.numpy.save writes for the same state.
LIBRARY_CASES: list[tuple[str, StateDict]] = [
    ("empty dict", {}),
    ("one float32", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}),
    ("every dtype", mixed_state()),
    ("header needs no padding", {"abcdefghi": np.zeros(1, np.uint8)}),
    *[(f"only {dt}", {"b": edge_values(dt), "a": edge_values(dt)[:5].copy()}) for dt in DTYPES],
]


@pytest.mark.parametrize("state", [c[1] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES])
def test_safetensors_bytes_equal_the_library(state: StateDict) -> None:
    ours = encode(state)
    assert ours == safetensors.numpy.save(state)
    assert_bit_equal(safetensors.numpy.load(ours), state)
    assert_bit_equal(decode(safetensors.numpy.save(state)), state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_reads_library_output_for_every_dtype(dtype: str) -> None:
    state = {"x": edge_values(dtype).reshape(2, 6), "y": edge_values(dtype)[::-1].copy()}
    assert_bit_equal(decode(safetensors.numpy.save(state)), state)


def test_safetensors_layout_is_padded_and_aligned() -> None:
    blob = encode(mixed_state())
    (header_len,) = struct.unpack_from("<Q", blob)
    assert header_len % 8 == 0
    header = json.loads(blob[8 : 8 + header_len])
    itemsize = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "I16": 2}
    for name, spec in header.items():
        assert spec["data_offsets"][0] % itemsize.get(spec["dtype"], 1) == 0, name


def test_encode_copies_the_tensor_bytes_once() -> None:
    state = {f"w{i}": np.ones(500_000, np.float32) for i in range(4)}  # 8 MB
    nbytes = sum(a.nbytes for a in state.values())
    tracemalloc.start()
    try:
        blob = encode(state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(blob) > nbytes
    assert peak < nbytes + 1_000_000  # the returned bytes, and no second buffer


def test_json_encoding_is_the_documented_shape() -> None:
    doc = json.loads(encode({"w": np.array([[1.5, -0.0]], dtype=np.float32)}, "json"))
    assert doc == {"w": {"dtype": "float32", "shape": [1, 2], "data": [1.5, -0.0]}}


def test_json_accepts_integers_for_float_tensors() -> None:
    doc = {"w": {"dtype": "float16", "shape": [2], "data": [1, 2.5]}}
    out = decode(json.dumps(doc).encode(), "json")
    np.testing.assert_array_equal(out["w"], np.array([1, 2.5], dtype=np.float16))


def test_layout_of_and_expected_layout_accepts_match() -> None:
    state: StateDict = {"w": np.zeros((2, 3), np.float32), "n": np.array(3, np.int64)}
    layout = layout_of(state)
    assert layout == {"w": TensorSpec("float32", (2, 3)), "n": TensorSpec("int64", ())}
    for fmt in WEIGHT_FORMATS:
        assert_bit_equal(decode(encode(state, fmt), fmt, expected=layout), state)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
        st.sampled_from(DTYPES).flatmap(
            lambda dt: hnp.arrays(
                np.dtype(dt),
                hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
                elements={"allow_nan": False, "allow_infinity": False}
                if np.dtype(dt).kind == "f"
                else None,
            )
        ),
        max_size=4,
    ),
    st.sampled_from(WEIGHT_FORMATS),
)
def test_round_trip_property(state: StateDict, fmt: str) -> None:
    blob = encode(state, fmt)  # type: ignore[arg-type]
    assert_bit_equal(decode(blob, fmt), state)  # type: ignore[arg-type]
    if fmt == "safetensors":
        assert blob == safetensors.numpy.save(state)


# --------------------------------------------------------------------------- bad safetensors

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
GOOD_BODY = np.array([1, 2], dtype="<f4").tobytes()


def _truncated() -> bytes:
    return encode({"a": np.ones(10, np.float32)})[:-4]


def _random_garbage(seed: int) -> bytes:
    return random.Random(seed).randbytes(4096)


BAD_SAFETENSORS: list[tuple[str, bytes, str]] = [
    ("pickle payload", pickle.dumps({"w": [1.0, 2.0]}), "malformed"),
    ("pickle of array", pickle.dumps({"w": np.ones(3)}), "malformed"),
    ("random garbage 0", _random_garbage(0), "malformed"),
    ("random garbage 1", _random_garbage(1), "malformed"),
    ("random garbage 2", _random_garbage(2), "malformed"),
    ("empty", b"", "malformed"),
    ("shorter than length", b"\x02\x00\x00", "malformed"),
    ("header length past end", struct.pack("<Q", 100) + b"{}", "malformed"),
    ("header length huge", struct.pack("<Q", 2**63) + b"{}", "malformed"),
    ("non-JSON header", struct.pack("<Q", 8) + b"not json", "malformed"),
    ("non-UTF-8 header", struct.pack("<Q", 4) + b"\xff\xfe{}", "malformed"),
    ("header is a list", st_doc([]), "malformed"),  # type: ignore[arg-type]
    ("entry not an object", st_doc({"a": [1, 2]}), "malformed"),
    ("entry missing key", st_doc({"a": {"dtype": "F32", "shape": [2]}}, GOOD_BODY), "malformed"),
    ("entry extra key", st_doc({"a": {**F32x2, "x": 1}}, GOOD_BODY), "malformed"),
    ("dtype not a string", st_doc({"a": {**F32x2, "dtype": 4}}, GOOD_BODY), "malformed"),
    ("negative dim", st_doc({"a": {**F32x2, "shape": [-2]}}, GOOD_BODY), "malformed"),
    ("float dim", st_doc({"a": {**F32x2, "shape": [2.0]}}, GOOD_BODY), "malformed"),
    ("bool dim", st_doc({"a": {**F32x2, "shape": [True, 2]}}, GOOD_BODY), "malformed"),
    ("shape not a list", st_doc({"a": {**F32x2, "shape": 2}}, GOOD_BODY), "malformed"),
    ("offsets one int", st_doc({"a": {**F32x2, "data_offsets": [8]}}, GOOD_BODY), "malformed"),
    ("offsets negative", st_doc({"a": {**F32x2, "data_offsets": [-8, 0]}}), "malformed"),
    (
        "duplicate tensor name",
        st_raw('{"a":' + json.dumps(F32x2) + ',"a":' + json.dumps(F32x2) + "}", GOOD_BODY),
        "malformed",
    ),
    ("metadata not strings", st_doc({"__metadata__": {"a": 1}}), "malformed"),
    ("metadata not object", st_doc({"__metadata__": "x"}), "malformed"),
    (
        "bool byte not 0/1",
        st_doc({"m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02"),
        "malformed",
    ),
    (
        "unknown dtype F8_E4M3",
        st_doc({"a": {**F32x2, "dtype": "F8_E4M3"}}, GOOD_BODY),
        "unknown_dtype",
    ),
    ("unknown dtype C64", st_doc({"a": {**F32x2, "dtype": "C64"}}, GOOD_BODY), "unknown_dtype"),
    ("unknown dtype U64", st_doc({"a": {**F32x2, "dtype": "U64"}}, GOOD_BODY), "unknown_dtype"),
    ("unknown dtype BF16", st_doc({"a": {**F32x2, "dtype": "BF16"}}, GOOD_BODY), "unknown_dtype"),
    (
        "numpy name in header",
        st_doc({"a": {**F32x2, "dtype": "float32"}}, GOOD_BODY),
        "unknown_dtype",
    ),
    (
        "span smaller than shape",
        st_doc({"a": {**F32x2, "data_offsets": [0, 4]}}, GOOD_BODY[:4]),
        "bad_offsets",
    ),
    (
        "span larger than shape",
        st_doc({"a": {**F32x2, "data_offsets": [0, 12]}}, GOOD_BODY + b"xxxx"),
        "bad_offsets",
    ),
    (
        "end before begin",
        st_doc({"a": {**F32x2, "data_offsets": [8, 0]}}, GOOD_BODY),
        "bad_offsets",
    ),
    (
        "does not start at 0",
        st_doc({"a": {**F32x2, "data_offsets": [4, 12]}}, GOOD_BODY + b"xxxx"),
        "bad_offsets",
    ),
    (
        "overlapping offsets",
        st_doc({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, GOOD_BODY + b"xxxx"),
        "bad_offsets",
    ),
    (
        "same span twice",
        st_doc({"a": F32x2, "b": F32x2}, GOOD_BODY),
        "bad_offsets",
    ),
    (
        "gap in offsets",
        st_doc({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, GOOD_BODY * 2 + b"xxxx"),
        "bad_offsets",
    ),
    ("trailing bytes", st_doc({"a": F32x2}, GOOD_BODY + b"\x00"), "bad_offsets"),
    ("truncated data", _truncated(), "truncated"),
    ("header promises more", st_doc({"a": F32x2}, GOOD_BODY[:5]), "truncated"),
    (
        "NaN",
        encode({"a": np.ones(2, np.float32)}).replace(b"\x00\x00\x80\x3f", b"\x00\x00\xc0\x7f", 1),
        "non_finite",
    ),
]


@pytest.mark.parametrize(
    ("data", "code"), [c[1:] for c in BAD_SAFETENSORS], ids=[c[0] for c in BAD_SAFETENSORS]
)
def test_bad_safetensors_input_has_its_own_code(data: bytes, code: str) -> None:
    with pytest.raises(WeightsError) as excinfo:
        decode(data)
    assert code_of(excinfo) == code, excinfo.value.message
    assert excinfo.value.message  # plain words, never empty


@pytest.mark.parametrize(
    "header",
    [
        {"a": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4]}},
        {"a": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}},
        {"a": {"dtype": "F64", "shape": [10**9, 10**9, 10**9], "data_offsets": [0, 8]}},
    ],
)
def test_huge_shape_is_refused_without_allocating(header: dict[str, Any]) -> None:
    data = st_doc(header, b"\x00" * 4)
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError) as excinfo:
            decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code_of(excinfo) == "oversized"
    assert "'a'" in excinfo.value.message
    assert peak < 1_000_000


def test_header_over_limit_is_oversized() -> None:
    header = b"{" + b" " * 100_000_001 + b"}"
    with pytest.raises(WeightsError) as excinfo:
        decode(struct.pack("<Q", len(header)) + header, max_bytes=2 * len(header))
    assert code_of(excinfo) == "oversized"


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_document_over_max_bytes_is_oversized(fmt: str) -> None:
    blob = encode({"a": np.zeros(100, np.float32)}, fmt)  # type: ignore[arg-type]
    assert decode(blob, fmt, max_bytes=len(blob))  # type: ignore[arg-type]
    with pytest.raises(WeightsError) as excinfo:
        decode(blob, fmt, max_bytes=len(blob) - 1)  # type: ignore[arg-type]
    assert code_of(excinfo) == "oversized"


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_refused_on_decode(fmt: str, dtype: str, bad: float) -> None:
    arr = np.ones(5, dtype=dtype)
    # Build the document by hand: encode itself would refuse this tensor.
    if fmt == "safetensors":
        arr[3] = bad
        data = safetensors.numpy.save({"w": arr})
    else:
        values = [1.0, 1.0, 1.0, bad, 1.0]
        data = json.dumps({"w": {"dtype": dtype, "shape": [5], "data": values}}).encode()
    with pytest.raises(WeightsError) as excinfo:
        decode(data, fmt)  # type: ignore[arg-type]
    assert code_of(excinfo) == "non_finite"
    assert "'w'" in excinfo.value.message


# The check walks 1 MiB slices; a bad value must be found in any slice, at either edge.
SLICE = {"float16": 1 << 19, "float32": 1 << 18, "float64": 1 << 17}


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("where", ["first", "slice end", "slice start", "last"])
def test_non_finite_is_found_in_every_slice(fmt: str, dtype: str, where: str) -> None:
    step = SLICE[dtype]
    arr = np.ones(2 * step + 7, dtype=dtype)
    index = {"first": 0, "slice end": step - 1, "slice start": step, "last": arr.size - 1}
    ok = {"w": arr}
    if fmt == "json":
        ok = {"w": arr[: 3 * step // 100]}  # JSON is slow; the slicing is the same code
        index = {k: min(v, ok["w"].size - 1) for k, v in index.items()}
    blob = encode(ok, fmt)  # type: ignore[arg-type]
    bad = ok["w"].copy()
    bad[index[where]] = np.inf
    with pytest.raises(WeightsError) as excinfo:
        encode({"w": bad}, fmt)  # type: ignore[arg-type]
    assert code_of(excinfo) == "non_finite"
    if fmt == "safetensors":
        poisoned = blob[: len(blob) - bad.nbytes] + bad.tobytes()
        with pytest.raises(WeightsError) as excinfo:
            decode(poisoned)
        assert code_of(excinfo) == "non_finite"
        assert "1 NaN or infinite" in excinfo.value.message


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_refused_on_encode(fmt: str, dtype: str, bad: float) -> None:
    arr = np.zeros((2, 2), dtype=dtype)
    arr[1, 0] = bad
    with pytest.raises(WeightsError) as excinfo:
        encode({"ok": np.zeros(2, dtype), "w": arr}, fmt)  # type: ignore[arg-type]
    assert code_of(excinfo) == "non_finite"
    assert "'w'" in excinfo.value.message


# --------------------------------------------------------------------------- bad json


def jdoc(obj: object) -> bytes:
    return json.dumps(obj).encode()


def jt(**overrides: Any) -> bytes:
    entry: dict[str, Any] = {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}
    entry.update(overrides)
    return jdoc({"w": entry})


BAD_JSON: list[tuple[str, bytes, str]] = [
    ("not JSON", b"{nope", "malformed"),
    ("pickle payload", pickle.dumps({"w": [1.0]}), "malformed"),
    ("non-UTF-8", b'{"w": "\xff"}', "malformed"),
    ("top-level list", jdoc([1, 2]), "malformed"),
    ("entry is a list", jdoc({"w": [1, 2]}), "malformed"),
    ("missing data", jdoc({"w": {"dtype": "float32", "shape": [2]}}), "malformed"),
    ("extra key", jt(extra=1), "malformed"),
    ("data not a list", jt(data="1,2"), "malformed"),
    ("data nested", jt(data=[[1.0], [2.0]]), "malformed"),
    ("data strings", jt(data=["1.0", "2.0"]), "malformed"),
    ("data null", jt(data=[None, 1.0]), "malformed"),
    ("data objects", jt(data=[{}, {}]), "malformed"),
    ("data too long", jt(data=[1.0, 2.0, 3.0]), "malformed"),
    ("bools for floats", jt(data=[True, False]), "malformed"),
    ("floats for ints", jt(dtype="int32", data=[1.5, 2.0]), "malformed"),
    ("ints for bools", jt(dtype="bool", data=[1, 0]), "malformed"),
    ("int out of range", jt(dtype="int8", data=[1, 200]), "malformed"),
    ("negative for uint8", jt(dtype="uint8", data=[-1, 2]), "malformed"),
    ("int beyond int64", jt(dtype="int64", data=[2**70, 1]), "malformed"),
    ("shape negative", jt(shape=[-2]), "malformed"),
    ("shape strings", jt(shape=["2"]), "malformed"),
    ("dtype not string", jt(dtype=None), "malformed"),
    ("unknown dtype complex", jt(dtype="complex64"), "unknown_dtype"),
    ("unknown dtype safetensors name", jt(dtype="F32"), "unknown_dtype"),
    ("unknown dtype uint64", jt(dtype="uint64"), "unknown_dtype"),
    ("data too short", jt(data=[1.0]), "truncated"),
    ("data empty", jt(shape=[2, 2], data=[]), "truncated"),
    ("huge shape", jt(shape=[10**12]), "oversized"),
    ("NaN token", b'{"w": {"dtype": "float32", "shape": [1], "data": [NaN]}}', "non_finite"),
    (
        "Infinity token",
        b'{"w": {"dtype": "float64", "shape": [1], "data": [-Infinity]}}',
        "non_finite",
    ),
    ("overflows float16", jt(dtype="float16", data=[1.0, 1e6]), "non_finite"),
]


@pytest.mark.parametrize(("data", "code"), [c[1:] for c in BAD_JSON], ids=[c[0] for c in BAD_JSON])
def test_bad_json_input_has_its_own_code(data: bytes, code: str) -> None:
    with pytest.raises(WeightsError) as excinfo:
        decode(data, "json")
    assert code_of(excinfo) == code, excinfo.value.message
    assert excinfo.value.message


# --------------------------------------------------------------------------- encode refusals

BAD_STATE: list[tuple[str, Any, str]] = [
    ("complex", {"c": np.zeros(2, np.complex64)}, "unknown_dtype"),
    ("uint64", {"u": np.zeros(2, np.uint64)}, "unknown_dtype"),
    ("object", {"o": np.array([None, 1], dtype=object)}, "unknown_dtype"),
    ("string", {"s": np.array(["a"])}, "unknown_dtype"),
    ("structured", {"s": np.zeros(2, dtype=[("x", "<f4")])}, "unknown_dtype"),
    ("float128", {"q": np.zeros(2, np.longdouble)}, "unknown_dtype"),
    ("list value", {"l": [1.0, 2.0]}, "malformed"),
    ("int name", {1: np.zeros(2, np.float32)}, "malformed"),
    ("reserved name", {"__metadata__": np.zeros(2, np.float32)}, "malformed"),
    ("not a dict", [np.zeros(2)], "malformed"),
    ("lone surrogate name", {"w\ud800": np.zeros(2, np.float32)}, "malformed"),
    ("bool byte not 0/1", {"m": np.array([1, 2], np.uint8).view(np.bool_)}, "malformed"),
]


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize(
    ("state", "code"), [c[1:] for c in BAD_STATE], ids=[c[0] for c in BAD_STATE]
)
def test_bad_state_is_refused_on_encode(fmt: str, state: Any, code: str) -> None:
    with pytest.raises(WeightsError) as excinfo:
        encode(state, fmt)  # type: ignore[arg-type]
    assert code_of(excinfo) == code, excinfo.value.message


def test_layout_of_refuses_unknown_dtype() -> None:
    with pytest.raises(WeightsError) as excinfo:
        layout_of({"c": np.zeros(1, np.complex128)})
    assert code_of(excinfo) == "unknown_dtype"


@pytest.mark.parametrize("fmt", ["pickle", "npz", "", "SAFETENSORS", None])
def test_unsupported_format(fmt: Any) -> None:
    for call in (lambda: encode({}, fmt), lambda: decode(b"{}", fmt)):
        with pytest.raises(WeightsError) as excinfo:
            call()
        assert code_of(excinfo) == "unsupported_format"


# --------------------------------------------------------------------------- expected layout

MODEL = {"conv.w": np.zeros((4, 3), np.float32), "conv.b": np.zeros(4, np.float32)}
EXPECTED = layout_of(MODEL)

LAYOUT_CASES: list[tuple[str, StateDict, str, list[str]]] = [
    ("missing", {"conv.w": MODEL["conv.w"]}, "layout_mismatch", ["missing", "'conv.b'"]),
    (
        "extra",
        {**MODEL, "fc.w": np.zeros(2, np.float32)},
        "layout_mismatch",
        ["unexpected", "'fc.w'"],
    ),
    (
        "renamed",
        {"conv.w": MODEL["conv.w"], "conv.bias": MODEL["conv.b"]},
        "layout_mismatch",
        ["missing 'conv.b'", "unexpected 'conv.bias'"],
    ),
    (
        "shape",
        {**MODEL, "conv.w": np.zeros((3, 4), np.float32)},
        "shape_mismatch",
        ["'conv.w'", "[4, 3]", "[3, 4]"],
    ),
    (
        "scalar vs vector",
        {**MODEL, "conv.b": np.zeros((), np.float32)},
        "shape_mismatch",
        ["'conv.b'"],
    ),
    (
        "dtype",
        {**MODEL, "conv.b": np.zeros(4, np.float64)},
        "dtype_mismatch",
        ["'conv.b'", "float32", "float64"],
    ),
]


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize(
    ("state", "code", "words"), [c[1:] for c in LAYOUT_CASES], ids=[c[0] for c in LAYOUT_CASES]
)
def test_expected_layout_mismatch(fmt: str, state: StateDict, code: str, words: list[str]) -> None:
    blob = encode(state, fmt)  # type: ignore[arg-type]
    assert decode(blob, fmt)  # type: ignore[arg-type]  # fine without an expectation
    with pytest.raises(WeightsError) as excinfo:
        decode(blob, fmt, expected=EXPECTED)  # type: ignore[arg-type]
    assert code_of(excinfo) == code
    for word in words:
        assert word in excinfo.value.message


def test_layout_mismatch_lists_every_difference_within_the_ack_limit() -> None:
    state = {f"t{i}": np.zeros(1, np.float32) for i in range(200)}
    with pytest.raises(LayoutMismatchError) as excinfo:
        decode(encode(state), expected=EXPECTED)
    err = excinfo.value
    assert err.code == "layout_mismatch"
    assert sorted(err.problems) == sorted(
        ["missing 'conv.w'", "missing 'conv.b'"] + [f"unexpected 't{i}'" for i in range(200)]
    )
    assert "(202 differences)" in err.message
    assert len(err.message) <= MAX_MISMATCH_TEXT
    shown = err.message.count("; ") + 1
    assert err.message.endswith(f" and {202 - shown} more")


# --------------------------------------------------------------------------- blob checks


def test_sha256_hex_known_vector() -> None:
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_hex(b"abc") == digest
    assert sha256_hex(memoryview(b"abc")) == digest


@pytest.mark.parametrize(
    ("data", "size", "digest", "code"),
    [
        (b"abc", 3, sha256_hex(b"abc"), None),
        (b"abc", 3, sha256_hex(b"abc").upper(), None),
        (memoryview(b"xabc")[1:], 3, sha256_hex(b"abc"), None),
        (b"abc", 4, sha256_hex(b"abc"), "size_mismatch"),
        (b"ab", 3, sha256_hex(b"abc"), "size_mismatch"),
        (b"abd", 3, sha256_hex(b"abc"), "checksum_mismatch"),
        (b"abc", 3, "", "checksum_mismatch"),
    ],
)
def test_verify_blob(data: bytes, size: int, digest: str, code: str | None) -> None:
    if code is None:
        verify_blob(data, size=size, sha256=digest)
        return
    with pytest.raises(WeightsError) as excinfo:
        verify_blob(data, size=size, sha256=digest)
    assert code_of(excinfo) == code


def test_a_remembered_header_is_still_checked_against_each_documents_size() -> None:
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(2, np.int64)}
    doc = encode(state)
    for _ in range(2):  # the second parse of the same header is the remembered one
        got = decode_views(doc)
        assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in state.items()}
    # The same header over fewer or more bytes: refused as the first parse would.
    with pytest.raises(WeightsError) as info:
        decode(doc[:-4])
    assert info.value.code == "truncated"
    with pytest.raises(WeightsError) as info:
        decode_views(doc + b"\0" * 8)
    assert info.value.code == "bad_offsets"
    # Under a smaller limit the remembered header is not taken either.
    with pytest.raises(WeightsError) as info:
        decode(doc, max_bytes=len(doc) - 1)
    assert info.value.code == "oversized"
    # A NaN in the remembered layout is still found (the values are never remembered).
    bad = dict(state, w=np.full((3, 4), np.nan, np.float32))
    with pytest.raises(WeightsError) as info:
        decode(safetensors.numpy.save(bad))
    assert info.value.code == "non_finite"
