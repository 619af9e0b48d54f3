"""server.cluster.partial: partial FedAvg sums against server.aggregation.FedAvg, by tables."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from client.weights import Layout, StateDict, encode, layout_of
from server.aggregation import FedAvg
from server.cluster.partial import PartialSum, combine


def _layout() -> Layout:
    return layout_of(_state(np.random.default_rng(0)))


def _state(rng: np.random.Generator, scale: float = 1.0) -> StateDict:
    return {
        "w": (rng.standard_normal((3, 4)) * scale).astype(np.float32),
        "b": (rng.standard_normal(4) * scale).astype(np.float64),
        "h": rng.standard_normal(2).astype(np.float16),
        "steps": rng.integers(0, 100, size=(2,)).astype(np.int64),
        "mask": rng.integers(0, 2, size=(5,)).astype(np.bool_),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def _updates(n: int, seed: int = 1) -> list[tuple[str, StateDict, int]]:
    rng = np.random.default_rng(seed)
    return [(f"dev-{i:02d}", _state(rng), int(rng.integers(1, 500))) for i in range(n)]


def _fedavg(updates: list[tuple[str, StateDict, int]]) -> StateDict:
    acc = FedAvg()
    acc.begin(updates[0][1])
    for _, state, samples in updates:
        acc.add(state, samples)
    return acc.result()


def _assert_close(got: StateDict, want: StateDict, *, exact: bool = False) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        if exact or not np.issubdtype(want[name].dtype, np.floating):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        else:
            rtol = 1e-3 if want[name].dtype == np.float16 else 1e-6
            np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-12, err_msg=name)


# How the updates are split over workers' partials: each tuple is the sizes of the groups.
SPLITS = [
    pytest.param((1,), id="one-update"),
    pytest.param((5,), id="one-partial"),
    pytest.param((2, 3), id="two-workers"),
    pytest.param((1, 1, 1, 1), id="one-each"),
    pytest.param((3, 0, 4), id="an-idle-worker"),
]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("through_bytes", [False, True], ids=["in-memory", "via-bytes"])
def test_combined_partials_equal_fedavg(split: tuple[int, ...], through_bytes: bool) -> None:
    updates = _updates(sum(split))
    layout = _layout()
    partials: list[PartialSum] = []
    pos = 0
    for size in split:
        partial = PartialSum(layout)
        for device_id, state, samples in updates[pos : pos + size]:
            partial.add(device_id, state, samples)
        pos += size
        if size == 0:
            continue  # a worker that folded nothing writes no partial
        if through_bytes:
            partial = PartialSum.from_bytes(partial.to_bytes(), layout)
        partials.append(partial)
    mean = combine(partials)
    _assert_close(mean, _fedavg(updates), exact=len(partials) == 1)
    assert sum(p.total_samples for p in partials) == sum(s for _, _, s in updates)


def test_exact_when_sums_are_exact() -> None:
    # Integer-valued weights and counts: every float64 sum is exact in any grouping.
    layout = layout_of({"w": np.zeros(6, np.float32), "n": np.zeros(6, np.int64)})
    rng = np.random.default_rng(3)
    updates = [
        (
            f"d{i}",
            {
                "w": rng.integers(-50, 50, 6).astype(np.float32),
                "n": rng.integers(0, 9, 6).astype(np.int64),
            },
            int(rng.integers(1, 30)),
        )
        for i in range(7)
    ]
    a, b = PartialSum(layout), PartialSum(layout)
    for i, (device_id, state, samples) in enumerate(updates):
        (a if i % 2 else b).add(device_id, state, samples)
    _assert_close(combine([a, b]), _fedavg(updates), exact=True)


def test_read_only_views_in_any_byte_order() -> None:
    layout = layout_of({"w": np.zeros((2, 3), np.float32)})
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    big.flags.writeable = False
    partial = PartialSum(layout)
    partial.add("d", {"w": big}, 2)
    np.testing.assert_array_equal(partial.sums["w"], 2 * np.arange(6.0).reshape(2, 3))
    assert partial.device_ids == ("d",) and "d" in partial and partial.count == 1


def test_round_trip_keeps_devices_samples_and_bits() -> None:
    layout = _layout()
    partial = PartialSum(layout)
    for device_id, state, samples in _updates(3):
        partial.add(device_id, state, samples)
    back = PartialSum.from_bytes(partial.to_bytes(), layout)
    assert back.device_ids == partial.device_ids
    assert back.total_samples == partial.total_samples
    for name in layout:
        assert back.sums[name].dtype == np.float64
        np.testing.assert_array_equal(back.sums[name], partial.sums[name])


# --- refusals ---------------------------------------------------------------------


def _doc(sums: dict[str, npt.NDArray[Any]], meta: dict[str, str] | None) -> bytes:
    """A safetensors document of ``sums`` with ``meta`` as its metadata (None: none)."""
    plain = encode(sums)
    (n,) = struct.unpack_from("<Q", plain)
    header = json.loads(plain[8 : 8 + n])
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + plain[8 + n :]


_GOOD_META = {
    "fedtray": "partial-sum",
    "format": "1",
    "deviceIds": '["a","b"]',
    "totalSamples": "5",
}
_SUMS = {"w": np.ones((2, 2), np.float64)}
_LAYOUT = layout_of({"w": np.zeros((2, 2), np.float32)})

BAD_BYTES = [
    pytest.param(b"", "not a partial sum", id="empty"),
    pytest.param(b"\x00" * 7, "not a partial sum", id="short"),
    pytest.param(b"\xff" * 64, "not a partial sum", id="garbage"),
    pytest.param(_doc(_SUMS, None), "no metadata", id="no-metadata"),
    pytest.param(_doc(_SUMS, {**_GOOD_META, "fedtray": "x"}), "metadata fedtray", id="kind"),
    pytest.param(_doc(_SUMS, {**_GOOD_META, "format": "9"}), "format", id="format"),
    pytest.param(_doc(_SUMS, {**_GOOD_META, "deviceIds": "[1]"}), "deviceIds", id="ids-type"),
    pytest.param(_doc(_SUMS, {**_GOOD_META, "deviceIds": "[]"}), "deviceIds", id="no-ids"),
    pytest.param(_doc(_SUMS, {**_GOOD_META, "deviceIds": "{"}), "unreadable", id="ids-json"),
    pytest.param(_doc(_SUMS, {**_GOOD_META, "deviceIds": '["a","a"]'}), "twice", id="dup"),
    pytest.param(_doc(_SUMS, {**_GOOD_META, "totalSamples": "x"}), "unreadable", id="total"),
    pytest.param(_doc(_SUMS, {**_GOOD_META, "totalSamples": "1"}), "at least one", id="few"),
    pytest.param(
        _doc({"w": np.ones((2, 2), np.float32)}, _GOOD_META), "of this model", id="float32-sums"
    ),
    pytest.param(_doc({"w": np.ones((2, 3), np.float64)}, _GOOD_META), "of this model", id="shape"),
    pytest.param(
        _doc({**_SUMS, "x": np.ones(1, np.float64)}, _GOOD_META), "of this model", id="extra"
    ),
    pytest.param(
        _doc(_SUMS, _GOOD_META).replace(
            np.ones(4, "<f8").tobytes(), np.full(4, np.inf, "<f8").tobytes()
        ),
        "of this model",
        id="non-finite",
    ),
    pytest.param(_doc(_SUMS, _GOOD_META)[:-1], "of this model", id="truncated"),
]


def test_the_good_document_of_the_refusal_table_is_accepted() -> None:
    partial = PartialSum.from_bytes(_doc(_SUMS, _GOOD_META), _LAYOUT)
    assert partial.device_ids == ("a", "b") and partial.total_samples == 5
    np.testing.assert_array_equal(partial.mean()["w"], np.full((2, 2), 0.2, np.float32))


@pytest.mark.parametrize(("data", "says"), BAD_BYTES)
def test_bad_bytes_are_refused_with_one_line(data: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        PartialSum.from_bytes(data, _LAYOUT)
    assert "\n" not in str(info.value)


def test_oversized_refused_before_parsing() -> None:
    data = _doc(_SUMS, _GOOD_META) + b"\x00" * 100_000
    with pytest.raises(ValueError, match="the limit is"):
        PartialSum.from_bytes(data, _LAYOUT, max_devices=2)


def test_too_many_devices_refused() -> None:
    meta = {**_GOOD_META, "deviceIds": json.dumps([f"d{i}" for i in range(5)]), "totalSamples": "9"}
    with pytest.raises(ValueError, match="deviceIds"):
        PartialSum.from_bytes(_doc(_SUMS, meta), _LAYOUT, max_devices=4)


BAD_ADDS = [
    pytest.param({"w": np.ones((2, 2), np.float32)}, 0, "positive", id="zero-samples"),
    pytest.param({"w": np.ones((2, 3), np.float32)}, 1, "shape", id="shape"),
    pytest.param({"v": np.ones((2, 2), np.float32)}, 1, "names", id="names"),
    pytest.param({}, 1, "names", id="nothing"),
]


@pytest.mark.parametrize(("update", "samples", "says"), BAD_ADDS)
def test_bad_adds_are_refused_and_change_nothing(
    update: StateDict, samples: int, says: str
) -> None:
    partial = PartialSum(_LAYOUT)
    partial.add("a", {"w": np.ones((2, 2), np.float32)}, 3)
    with pytest.raises(ValueError, match=says):
        partial.add("b", update, samples)
    assert partial.device_ids == ("a",) and partial.total_samples == 3
    np.testing.assert_array_equal(partial.sums["w"], np.full((2, 2), 3.0))


def test_a_device_is_counted_once() -> None:
    a, b = PartialSum(_LAYOUT), PartialSum(_LAYOUT)
    a.add("x", {"w": np.ones((2, 2), np.float32)}, 1)
    with pytest.raises(ValueError, match="already"):
        a.add("x", {"w": np.ones((2, 2), np.float32)}, 1)
    b.add("x", {"w": np.ones((2, 2), np.float32)}, 1)
    with pytest.raises(ValueError, match="two partial sums"):
        combine([a, b])


def test_empty_and_mismatched_partials_refused() -> None:
    empty = PartialSum(_LAYOUT)
    with pytest.raises(ValueError, match="no update"):
        empty.mean()
    with pytest.raises(ValueError, match="empty partial"):
        empty.to_bytes()
    with pytest.raises(ValueError, match="no partial"):
        combine([])
    other = PartialSum(layout_of({"w": np.zeros((2, 2), np.float64)}))
    with pytest.raises(ValueError, match="different model layouts"):
        combine([empty, other])
    with pytest.raises(ValueError, match="at least one tensor"):
        PartialSum({})
