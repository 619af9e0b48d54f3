"""FedAvg: hand-computed tables, streaming equals the batch mean, memory stays O(model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server.aggregation import FedAvg, weighted_mean


def _state(value: float, dtype: Any = np.float32) -> dict[str, np.ndarray[Any, Any]]:
    return {"w": np.full((2, 2), value, dtype=dtype), "b": np.array([value, -value], dtype)}


@pytest.mark.parametrize(
    ("updates", "expected"),
    [
        ([(1.0, 1)], 1.0),
        ([(1.0, 1), (3.0, 1)], 2.0),
        ([(1.0, 1), (3.0, 3)], 2.5),  # (1*1 + 3*3) / 4
        ([(0.0, 10), (10.0, 30), (-4.0, 60)], 0.6),  # (0 + 300 - 240) / 100
        ([(2.0, 7), (2.0, 1_000_000)], 2.0),
    ],
)
def test_fedavg_matches_hand_computation(updates: list[tuple[float, int]], expected: float) -> None:
    agg = FedAvg()
    agg.begin(_state(99.0))
    for value, n in updates:
        agg.add(_state(value), n)
    out = agg.result()
    assert out["w"].dtype == np.float32
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["b"], [expected, -expected], rtol=1e-6)
    assert agg.count == len(updates)


def test_streaming_equals_batch_mean_and_memory_is_o_model() -> None:
    rng = np.random.default_rng(0)
    shapes = {"a": (30, 20), "b": (20,), "c": (5, 4, 3)}
    agg = FedAvg()
    agg.begin({k: np.zeros(s, np.float32) for k, s in shapes.items()})
    updates, weights = [], []
    for _ in range(40):
        upd = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        n = int(rng.integers(1, 500))
        agg.add(upd, n)
        updates.append(upd)
        weights.append(n)
        # One accumulator per tensor, however many updates came in.
        assert agg.accumulators == len(shapes)
    out = agg.result()
    for k in shapes:
        batch = np.average(
            np.stack([u[k] for u in updates]).astype(np.float64), axis=0, weights=weights
        )
        np.testing.assert_allclose(out[k], batch.astype(np.float32), rtol=1e-5, atol=1e-6)


def test_integer_tensors_are_rounded_and_keep_dtype() -> None:
    agg = FedAvg()
    agg.begin({"steps": np.array([0], np.int64)})
    agg.add({"steps": np.array([1], np.int64)}, 1)
    agg.add({"steps": np.array([4], np.int64)}, 2)
    out = agg.result()
    assert out["steps"].dtype == np.int64 and out["steps"].tolist() == [3]


@pytest.mark.parametrize(
    ("update", "num_samples", "message"),
    [
        ({"w": np.zeros((2, 2), np.float32)}, 1, "names differ"),
        ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}, 1, "shape"),
        (_state(1.0), 0, "positive"),
    ],
)
def test_bad_updates_are_refused(update: Any, num_samples: int, message: str) -> None:
    agg = FedAvg()
    agg.begin(_state(0.0))
    with pytest.raises(ValueError, match=message):
        agg.add(update, num_samples)
    assert agg.count == 0


def test_result_without_updates_raises_and_begin_resets() -> None:
    agg = FedAvg()
    agg.begin(_state(0.0))
    with pytest.raises(ValueError, match="no update"):
        agg.result()
    agg.add(_state(5.0), 1)
    agg.begin(_state(0.0))
    agg.add(_state(1.0), 1)
    np.testing.assert_allclose(agg.result()["w"], 1.0)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [([], None), ([(1.0, 1), (3.0, 3)], 2.5), ([(2.0, 5)], 2.0)],
)
def test_weighted_mean(pairs: list[tuple[float, int]], expected: float | None) -> None:
    assert weighted_mean(pairs) == expected
