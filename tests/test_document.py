"""A document written in place is ``encode``'s document, byte for byte (server.document),
and the new version's encoding as it is (``GlobalModel.prepare_blocking``).

Tables: layouts of every dtype the format has (scalars, empty tensors, names out of
order), filled through the views, give exactly ``client.weights.encode``'s bytes of the
same state; values ``encode`` refuses are refused by ``finish`` the same way; FedAvg's
result written into a document equals its result in new arrays, and is the document;
``prepare_blocking`` takes the document as the encoding (a small one as bytes, a large one
itself, written while hashed): the same bytes, digest and weights file as ``encode``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.weights import StateDict, TensorSpec, WeightsError, decode, encode, sha256_hex
from server.aggregation import FedAvg
from server.document import IN_PLACE_MIN_BYTES, blank_document, data_bytes
from server.globalmodel import SIDE_BY_SIDE_BYTES, GlobalModel
from server.store import Store


def _state(layout: dict[str, TensorSpec], seed: int) -> StateDict:
    rng = np.random.default_rng(seed)
    state: StateDict = {}
    for name, spec in layout.items():
        values = rng.standard_normal(spec.shape) * 10
        if spec.dtype == "bool":
            state[name] = values > 0
        else:
            state[name] = np.asarray(values).astype(spec.dtype)
    return state


LAYOUTS: list[dict[str, TensorSpec]] = [
    {"w": TensorSpec("float32", (3, 4)), "b": TensorSpec("float32", (3,))},
    {
        "z.f64": TensorSpec("float64", (2, 2)),
        "a.f16": TensorSpec("float16", (5,)),
        "m.i64": TensorSpec("int64", (3,)),
        "c.i32": TensorSpec("int32", ()),
        "k.i16": TensorSpec("int16", (2, 1)),
        "q.i8": TensorSpec("int8", (4,)),
        "u.u8": TensorSpec("uint8", (4,)),
        "flag": TensorSpec("bool", (3,)),
        "ü": TensorSpec("float32", (0, 3)),  # non-ASCII name, empty tensor
    },
    {"only": TensorSpec("float32", ())},
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_filled_document_is_encodes_document(layout: dict[str, TensorSpec]) -> None:
    state = _state(layout, 1)
    document = blank_document(layout)
    assert list(document.views) == list(layout)
    for name, arr in state.items():
        view = document.views[name]
        assert view.shape == arr.shape and view.dtype == arr.dtype
        assert view.flags.c_contiguous and view.flags.writeable
        view[...] = arr
    data = document.finish()
    assert data.readonly and data.obj is document.buffer  # the buffer itself, read-only
    assert bytes(data) == encode(state, "safetensors")
    back = decode(bytes(data), "safetensors")
    assert all(np.array_equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("name", "value", "code"),
    [
        ("w", np.nan, "non_finite"),
        ("w", np.inf, "non_finite"),
        ("flag", 2, "malformed"),
    ],
)
def test_finish_refuses_what_encode_refuses(name: str, value: Any, code: str) -> None:
    layout = {"w": TensorSpec("float32", (4,)), "flag": TensorSpec("bool", (2,))}
    document = blank_document(layout)
    for view in document.views.values():  # not initialised: the caller writes every byte
        view[...] = 0
    document.views[name].view(np.uint8 if name == "flag" else np.float32)[0] = value
    with pytest.raises(WeightsError) as finished:
        document.finish()
    state = {k: v.copy() for k, v in document.views.items()}
    with pytest.raises(WeightsError) as encoded:
        encode(state, "safetensors")
    assert finished.value.code == encoded.value.code == code


def test_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(WeightsError) as refused:
        blank_document({"w": TensorSpec("complex64", (2,))})
    assert refused.value.code == "unknown_dtype"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fedavg_into_a_document_equals_fedavg(layout: dict[str, TensorSpec]) -> None:
    base = _state(layout, 0)
    sums = FedAvg()
    sums.begin(base)
    for seed, samples in ((1, 3), (2, 5)):
        sums.add(_state(layout, seed), samples)
    plain = sums.result()
    document = blank_document(layout)
    into = sums.result(document.views)
    assert into is document.views
    assert bytes(document.finish()) == encode(plain, "safetensors")


def test_fedavg_refuses_an_output_that_does_not_fit() -> None:
    layout = {"w": TensorSpec("float32", (2, 3))}
    sums = FedAvg()
    sums.begin(_state(layout, 0))
    sums.add(_state(layout, 1), 1)
    with pytest.raises(ValueError):
        sums.result({"w": np.empty((3, 2), dtype=np.float32)})


@pytest.mark.parametrize(
    ("floats", "is_bytes"),
    [
        (1_000, True),  # a small document: bytes, copied once (it rides inline)
        (3_000_000, False),  # 12 MB: the document itself, written while it is hashed
    ],
)
def test_prepare_takes_the_document_as_the_encoding(
    tmp_path: Path, floats: int, is_bytes: bool
) -> None:
    layout = {"w": TensorSpec("float32", (floats,)), "b": TensorSpec("float32", (2,))}
    assert (floats * 4 >= SIDE_BY_SIDE_BYTES) is not is_bytes
    state = _state(layout, 3)
    model = GlobalModel(Store(tmp_path), "synthetic")
    model.adopt(state, layout, None)
    document = blank_document(layout)
    for name, arr in state.items():
        document.views[name][...] = arr
    prepared = model.prepare_blocking(document.views, 1, None, document)
    expected = encode(state, "safetensors")
    assert isinstance(prepared.encoded, bytes) is is_bytes
    if not is_bytes:  # the document's own buffer, read-only
        assert isinstance(prepared.encoded, memoryview) and prepared.encoded.readonly
        assert prepared.encoded.obj is document.buffer
    assert bytes(prepared.encoded) == expected
    assert prepared.sha256 == sha256_hex(expected)
    assert prepared.state is document.views
    assert prepared.weights_file is not None
    assert (tmp_path / prepared.weights_file).read_bytes() == expected


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        ({}, 0),
        ({"w": TensorSpec("float32", (3, 4)), "b": TensorSpec("float16", (3,))}, 48 + 6),
        ({"s": TensorSpec("int64", ()), "e": TensorSpec("bool", (0, 5))}, 8),
        ({"w": TensorSpec("float32", (IN_PLACE_MIN_BYTES // 4,))}, IN_PLACE_MIN_BYTES),
    ],
)
def test_data_bytes(layout: dict[str, TensorSpec], size: int) -> None:
    assert data_bytes(layout) == size
    if layout:
        assert len(blank_document(layout).buffer) - data_bytes(layout) == len(
            encode(_state(layout, 0), "safetensors")
        ) - sum(arr.nbytes for arr in _state(layout, 0).values())
