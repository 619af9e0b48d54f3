"""The server's update path: each byte hashed once, checked once, never re-encoded.

Tables for the zero-copy reader (:func:`client.weights.decode_views` against ``decode``),
the blob store handing over a verified spilled file, the round store's incoming ->
checked -> committed -> folded steps, FedAvg over read-only and foreign-order views, the
kept evaluation model; then a real server on loopback keeping an update byte for byte.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from client.protocol import BlobChunk, WeightsRef
from client.transfer import BlobStore, send_blob
from client.weights import (
    WeightsError,
    decode,
    decode_views,
    layout_of,
    sha256_hex,
)
from server.aggregation import FedAvg
from server.intake import INLINE_WORK_BYTES, _land, aggregate_runs_inline, land_checked, runs_inline
from server.roundstore import ROUND_DIR, RoundStore
from server.strategies import build_strategy
from server.strategies.settings import StrategySettings
from tests.server_harness import ScriptedDevice, run_devices, running_server

STATE: dict[str, np.ndarray[Any, Any]] = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
    "b": np.array([1.5, -0.0], dtype=np.float64),
    "n": np.array([3, -7], dtype=np.int64),
    "m": np.array([True, False, True]),
    "e": np.zeros((0, 2), dtype=np.float32),
}
LAYOUT = layout_of(STATE)


def _doc(state: dict[str, np.ndarray[Any, Any]], *, metadata: bool = False) -> bytes:
    """A safetensors document written by the reference library."""
    return st_save(state, metadata={"by": "a device"} if metadata else None)


def _nan_doc() -> bytes:
    bad = dict(STATE, w=STATE["w"].copy())
    bad["w"][1, 1] = np.nan
    return _doc(bad)


def _bool_doc() -> bytes:
    data = bytearray(_doc(STATE))
    (header_len,) = struct.unpack_from("<Q", data, 0)
    data[-1] = 2  # the bool tensor is last in the layout order
    assert header_len > 0
    return bytes(data)


# ------------------------------------------------------------------ zero-copy reading


@pytest.mark.parametrize("metadata", [False, True])
def test_decode_views_equal_decode_and_copy_nothing(metadata: bool) -> None:
    data = _doc(STATE, metadata=metadata)
    views = decode_views(data, expected=LAYOUT)
    copies = decode(data, "safetensors", expected=LAYOUT)
    assert set(views) == set(STATE)
    buffer = np.frombuffer(data, dtype=np.uint8)
    for name, arr in views.items():
        np.testing.assert_array_equal(arr, copies[name])
        assert arr.dtype == copies[name].dtype and arr.shape == STATE[name].shape
        assert not arr.flags.writeable
        if arr.size:
            assert np.shares_memory(arr, buffer), f"{name} was copied"


@pytest.mark.parametrize(
    ("data", "expected", "code"),
    [
        (b"", LAYOUT, "malformed"),
        (_doc(STATE)[:-3], LAYOUT, "truncated"),
        (_doc({"w": STATE["w"]}), LAYOUT, "layout_mismatch"),
        (_doc(dict(STATE, w=STATE["w"].astype(np.float64))), LAYOUT, "dtype_mismatch"),
        (_doc(dict(STATE, w=STATE["w"].reshape(4, 3))), LAYOUT, "shape_mismatch"),
        (_nan_doc(), LAYOUT, "non_finite"),
        (_nan_doc(), None, "non_finite"),
        (_bool_doc(), LAYOUT, "malformed"),
    ],
)
def test_decode_views_refuses_what_decode_refuses_with_its_code(
    data: bytes, expected: Any, code: str
) -> None:
    with pytest.raises(WeightsError) as by_decode:
        decode(data, "safetensors", expected=expected)
    with pytest.raises(WeightsError) as by_views:
        decode_views(data, expected=expected)
    assert by_views.value.code == by_decode.value.code == code


def test_decode_views_without_the_finite_pass_still_checks_the_structure() -> None:
    assert np.isnan(decode_views(_nan_doc(), finite=False)["w"][1, 1])
    with pytest.raises(WeightsError) as err:
        decode_views(_doc(STATE)[:-3], finite=False)
    assert err.value.code == "truncated"


# ------------------------------------------------------------------ the blob's file


def _spilled(tmp_path: Path, data: bytes) -> BlobStore:
    blobs = BlobStore(max_chunk_bytes=1 << 20, max_blob_bytes=1 << 20, spill_dir=tmp_path / "b")
    digest = sha256_hex(data)
    blobs.accept_chunk(
        "dev", BlobChunk(blob_id="x", offset=0, total=len(data), sha256=digest, data=data), now=0
    )
    return blobs


def test_take_file_moves_the_verified_blob_and_forgets_it(tmp_path: Path) -> None:
    data = _doc(STATE)
    blobs = _spilled(tmp_path, data)
    ref = WeightsRef(format="safetensors", size=len(data), sha256=sha256_hex(data), blob_id="x")
    dest = tmp_path / "dest.bin"
    assert blobs.take_file("dev", ref, dest) is True
    assert dest.read_bytes() == data
    assert blobs.status("dev", "x", now=1).received == 0
    assert [p for p in (tmp_path / "b").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    "case", ["memory", "inline", "unknown", "other_sha", "other_size", "incomplete", "restored"]
)
def test_take_file_declines_and_changes_nothing(tmp_path: Path, case: str) -> None:
    data = _doc(STATE)
    digest = sha256_hex(data)
    ref_kw: dict[str, Any] = {
        "format": "safetensors",
        "size": len(data),
        "sha256": digest,
        "blob_id": "x",
    }
    if case == "memory":
        blobs = BlobStore(max_chunk_bytes=1 << 20, max_blob_bytes=1 << 20)
        blobs.accept_chunk(
            "dev",
            BlobChunk(blob_id="x", offset=0, total=len(data), sha256=digest, data=data),
            now=0,
        )
    elif case == "incomplete":
        blobs = BlobStore(max_chunk_bytes=1 << 20, max_blob_bytes=1 << 20, spill_dir=tmp_path / "b")
        blobs.accept_chunk(
            "dev",
            BlobChunk(blob_id="x", offset=0, total=len(data), sha256=digest, data=data[:10]),
            now=0,
        )
    elif case == "restored":  # complete before a restart: not verified by this process
        _spilled(tmp_path, data)
        blobs = BlobStore(max_chunk_bytes=1 << 20, max_blob_bytes=1 << 20, spill_dir=tmp_path / "b")
        assert blobs.restore(now=0) == 1
    else:
        blobs = _spilled(tmp_path, data)
    if case == "inline":
        ref_kw = {**ref_kw, "blob_id": None, "data": data}
    elif case == "unknown":
        ref_kw["blob_id"] = "y"
    elif case == "other_sha":
        ref_kw["sha256"] = hashlib.sha256(b"other").hexdigest()
    elif case == "other_size":
        ref_kw["size"] = len(data) - 1
    held = blobs.bytes_held()
    dest = tmp_path / "dest.bin"
    assert blobs.take_file("dev", WeightsRef(**ref_kw), dest) is False
    assert not dest.exists() and blobs.bytes_held() == held
    if case == "restored":  # take still hands it over, hashed from disk
        assert blobs.take("dev", WeightsRef(**ref_kw)) == data


# ------------------------------------------------------------------ the round store


def test_an_update_is_kept_byte_for_byte_and_folded_as_views(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    data = _doc(STATE, metadata=True)  # re-encoding would drop the metadata
    incoming = store.incoming_path("dev")
    store.write_incoming(incoming, data)
    store.check_update(incoming, LAYOUT, 1 << 20)
    store.sync(incoming)
    name = store.commit_update("dev", incoming)
    assert name == store.update_file_name("dev") and not incoming.exists()
    assert (tmp_path / ROUND_DIR / name).read_bytes() == data

    def look(update: dict[str, np.ndarray[Any, Any]]) -> list[str]:
        for key, arr in update.items():
            assert not arr.flags.writeable
            np.testing.assert_array_equal(arr, STATE[key])
        return sorted(update)

    assert store.fold_update(name, LAYOUT, look) == sorted(STATE)
    assert sorted(store.load_update(name, LAYOUT)) == sorted(STATE)


@pytest.mark.parametrize(
    ("data", "code"),
    [(b"", "malformed"), (_nan_doc(), "non_finite"), (_doc({"w": STATE["w"]}), "layout_mismatch")],
)
def test_check_update_refuses_with_the_codec_code(tmp_path: Path, data: bytes, code: str) -> None:
    store = RoundStore(tmp_path)
    incoming = store.incoming_path("dev")
    store.write_incoming(incoming, data)
    with pytest.raises(WeightsError) as err:
        store.check_update(incoming, LAYOUT, 1 << 20)
    assert err.value.code == code


@pytest.mark.parametrize(
    ("data", "code"),
    [(None, None), (b"", "malformed"), (_nan_doc(), "non_finite")],
)
def test_an_inline_update_is_written_and_checked_in_one_step_or_leaves_nothing(
    tmp_path: Path, data: bytes | None, code: str | None
) -> None:
    store = RoundStore(tmp_path)
    if code is None:
        doc = _doc(STATE, metadata=True)
        incoming = _land(store, "dev", doc, layout=LAYOUT, max_bytes=1 << 20)
        assert incoming.parent == tmp_path / ROUND_DIR and incoming.read_bytes() == doc
        return
    assert data is not None
    with pytest.raises(WeightsError) as err:
        _land(store, "dev", data, layout=LAYOUT, max_bytes=1 << 20)
    assert err.value.code == code
    assert list((tmp_path / ROUND_DIR).iterdir()) == []


@pytest.mark.parametrize(
    ("data", "code"),
    [(None, None), (b"", "malformed"), (_nan_doc(), "non_finite")],
)
def test_a_small_inline_update_is_checked_in_memory_then_written_or_leaves_nothing(
    tmp_path: Path, data: bytes | None, code: str | None
) -> None:
    store = RoundStore(tmp_path)
    if code is None:
        doc = _doc(STATE, metadata=True)
        incoming, views = land_checked(store, "dev", doc, layout=LAYOUT, max_bytes=1 << 20)
        assert incoming.parent == tmp_path / ROUND_DIR and incoming.read_bytes() == doc
        assert views.keys() == STATE.keys()
        for name, arr in STATE.items():
            assert np.array_equal(views[name], arr) and not views[name].flags.writeable
        return
    assert data is not None
    with pytest.raises(WeightsError) as err:
        land_checked(store, "dev", data, layout=LAYOUT, max_bytes=1 << 20)
    assert err.value.code == code
    assert not (tmp_path / ROUND_DIR).exists() or list((tmp_path / ROUND_DIR).iterdir()) == []


@pytest.mark.parametrize(
    ("nbytes", "passes", "inline"),
    [
        (0, 1, True),
        (400_000, 1, True),
        (INLINE_WORK_BYTES, 1, True),
        (INLINE_WORK_BYTES + 1, 1, False),
        (400_000, 2, True),
        (400_000, 3, False),  # a robust rule over two kept updates, plus the global
        (INLINE_WORK_BYTES // 2, 2, True),
        (100, 0, True),  # no pass counts as one
        (100 << 20, 1, False),
    ],
)
def test_work_runs_on_the_loop_only_up_to_the_inline_bound(
    nbytes: int, passes: int, inline: bool
) -> None:
    assert runs_inline(nbytes, passes) is inline


def test_only_the_robust_rules_read_the_kept_updates_again() -> None:
    names = ("fedavg", "fedprox", "fedavgm", "fedadam", "median", "trimmed-mean")
    reads = {name: build_strategy(StrategySettings(name=name)).reads_kept_updates for name in names}
    assert reads == {name: name in ("median", "trimmed-mean") for name in names}


@pytest.mark.parametrize(
    ("name", "model_bytes", "reported", "inline"),
    [
        ("fedavg", 400_000, 3, True),
        ("fedprox", 400_000, 3, True),
        ("fedavg", INLINE_WORK_BYTES + 1, 1, False),
        ("median", 400_000, 1, True),  # the global and one kept update
        ("median", 400_000, 3, False),  # read again per kept update
        ("trimmed-mean", 200_000, 3, True),
        ("fedavgm", 400_000, 3, False),  # server optimizer state: in a thread
        ("fedadam", 1_000, 1, False),
    ],
)
def test_the_aggregate_runs_on_the_loop_only_when_small_and_read_once_without_state(
    name: str, model_bytes: int, reported: int, inline: bool
) -> None:
    strategy = build_strategy(StrategySettings(name=name))
    assert aggregate_runs_inline(model_bytes, strategy, reported) is inline


def test_clear_removes_a_leftover_incoming_file(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    incoming = store.incoming_path("dev")
    store.write_incoming(incoming, b"half")
    store.clear()
    assert list((tmp_path / ROUND_DIR).iterdir()) == []


# ------------------------------------------------------------------ FedAvg over views


def _foreign(arr: np.ndarray[Any, Any], kind: str) -> np.ndarray[Any, Any]:
    if kind == "readonly":
        out = arr.copy()
        out.flags.writeable = False
        return out
    if kind == "big_endian":
        return arr.astype(arr.dtype.newbyteorder(">"))
    # unaligned: the same values one byte into a buffer
    raw = np.zeros(arr.nbytes + 1, dtype=np.uint8)
    raw[1:] = np.frombuffer(arr.tobytes(), dtype=np.uint8)
    return np.frombuffer(raw.data, dtype=arr.dtype, offset=1).reshape(arr.shape)


@pytest.mark.parametrize("kind", ["readonly", "big_endian", "unaligned"])
def test_fedavg_over_views_equals_fedavg_over_copies(kind: str) -> None:
    rng = np.random.default_rng(1)
    big = {"w": rng.standard_normal(70_000).astype(np.float32), "i": np.arange(5, dtype=np.int64)}
    updates = [({k: v + i for k, v in big.items()}, 1 + 2 * i) for i in range(3)]
    plain, viewed = FedAvg(), FedAvg()
    plain.begin(big)
    viewed.begin(big)
    for update, n in updates:
        plain.add(update, n)
        viewed.add({k: _foreign(v, kind) for k, v in update.items()}, n)
    for name, arr in plain.result().items():
        got = viewed.result()[name]
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)


# ------------------------------------------------------------------ one kept model


def test_the_evaluator_keeps_one_model_and_matches_a_fresh_one() -> None:
    from client.tasks import get_task
    from server.model import Evaluator, evaluate_state, initial_state

    params = {"features": 8, "classes": 3, "hidden": 16, "samples": 200}
    task = get_task("synthetic", params)
    x, y = task.load_data("test", None)
    evaluator = Evaluator(task, task.params)
    for seed in (1, 2):
        state = initial_state(task, task.params, seed)
        assert evaluator.evaluate(state, x, y) == evaluate_state(task, task.params, state, x, y)
    first = evaluator._model
    evaluator.evaluate(initial_state(task, task.params, 3), x, y)
    assert evaluator._model is first, "the model was built again"


def test_the_evaluator_runs_torch_on_its_thread_count() -> None:
    import torch

    from client.tasks import get_task
    from server.model import EVALUATION_THREADS, Evaluator, initial_state

    task = get_task("synthetic", {"features": 8, "classes": 3, "hidden": 16, "samples": 20})
    x, y = task.load_data("test", None)
    before = torch.get_num_threads()
    torch.set_num_threads(EVALUATION_THREADS + 1)
    try:
        Evaluator(task, task.params).evaluate(initial_state(task, task.params, 1), x, y)
        assert torch.get_num_threads() == EVALUATION_THREADS
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ a real server


async def _submit_raw(dev: ScriptedDevice, data: bytes) -> dict[str, Any]:
    """Send ``data`` as a blob (in three chunks) and submit it for the device's round."""
    digest = sha256_hex(data)
    await send_blob(dev.call, data, blob_id=digest, chunk_bytes=max(1024, len(data) // 3))
    ref = WeightsRef(format="safetensors", size=len(data), sha256=digest, blob_id=digest)
    payload = {
        "roundId": str(dev.starts[0]["roundId"]),
        "baseVersion": 0,
        "numSamples": 1,
        "metrics": {},
        "weights": ref.to_wire(),
    }
    ack: dict[str, Any] = await dev.call("weights:submit", payload)
    return ack


@pytest.mark.parametrize("value", [2.0, np.nan])
def test_the_server_keeps_a_blob_update_as_received_or_nothing(
    tmp_path: Path, value: float
) -> None:
    config = {"min_clients": 2, "clients_per_round": 2, "round_timeout": 60}
    with running_server(tmp_path, **config) as srv:
        a, b = ScriptedDevice(srv.url, name="a"), ScriptedDevice(srv.url, name="b")

        async def scenario() -> tuple[bytes, dict[str, Any]]:
            await a.join()
            await b.join()
            await a.until(lambda: bool(a.starts) and bool(b.starts), 20, "both started")
            update = {k: np.full_like(v, value) for k, v in a.weights[0].items()}
            data = _doc(update, metadata=True)  # re-encoding would drop the metadata
            return data, await _submit_raw(a, data)

        sent, ack = run_devices(scenario())
        state_dir = tmp_path / "server-state"
        kept = [p.read_bytes() for p in (state_dir / ROUND_DIR).iterdir()]
        if np.isnan(value):
            assert ack["ok"] is False and ack["code"] == "non_finite", ack
            assert kept == []
        else:
            assert ack["ok"] is True, ack
            assert kept == [sent]
        assert [p for p in (state_dir / "blobs").rglob("*") if p.is_file()] == []


# Slow: the benchmark builds torch models in this process.
@pytest.mark.slow
def test_server_round_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import server_round

    argv = ["--features", "16", "--hidden", "32", "--samples", "200", "--repeats", "1"]
    assert server_round.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ratio after / before \(total\)\s+\d+\.\d+x", out, re.M), out
    assert re.search(r"^ratio after / beside \(last update accepted -> published\)", out, re.M)
    assert re.search(r"^after( +\d+\.\d+){4}$", out, re.M), out  # its eval column
