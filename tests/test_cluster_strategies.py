"""server.cluster.aggregate: every strategy of the single-process server in a cluster round,
checked against the strategy code itself (server.strategies) over the same updates.

Shared storage is the in-memory one (tests/cluster_memory.py: it verifies SHA-256 as the
real ones do); the real engines are in tests/test_cluster_strategies_pg.py. Updates are
integer-valued floats, so every float64 sum is exact in any grouping: the partial sums'
path must give the strategy's weights bit for bit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.weights import StateDict, encode, layout_of
from server.aggregation import FedAvg
from server.cluster.aggregate import (
    Outcome,
    RoundAggregator,
    decode_state,
    encode_state,
    reads_every_update,
)
from server.cluster.contracts import PartialRow, UpdateRow, VersionRow
from server.cluster.partial import PartialSum
from server.strategies import STRATEGIES, MemoryUpdates, StrategySettings, build_strategy
from tests.cluster_memory import MemoryBlobs
from tests.test_cluster_coordinator import INITIAL, Cluster, Worker, _stop
from tests.waiting import scaled, wait_until_async

BASE: StateDict = {
    "w": np.arange(-6, 6, dtype=np.float32).reshape(4, 3),
    "b": np.zeros(3, np.float64),
    "n": np.zeros(2, np.int64),
}
LAYOUT = layout_of(BASE)
MAX_BYTES = 1 << 20
#: Samples per device: a weight that would sway a weighted rule but not a robust one.
SAMPLES = {"a": 3, "b": 5, "c": 1, "d": 7, "e": 2}


def _update(seed: int, spread: int = 20) -> StateDict:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.integers(-spread, spread, (4, 3)).astype(np.float32),
        "b": rng.integers(-spread, spread, 3).astype(np.float64),
        "n": rng.integers(0, 9, 2).astype(np.int64),
    }


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=scaled(30)))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _put(blobs: MemoryBlobs, data: bytes) -> tuple[str, str]:
    sha = _sha(data)
    return await blobs.put_bytes(data, sha), sha


async def _version(
    blobs: MemoryBlobs, version: int, state: StateDict, optimizer: dict[str, Any] | None = None
) -> VersionRow:
    key, sha = await _put(blobs, encode(state))
    opt_key = opt_sha = None
    if optimizer:
        opt_key, opt_sha = await _put(blobs, encode_state(optimizer))
    return VersionRow(version, key, sha, 0, None, 0.0, {}, opt_key, opt_sha)


async def _round(
    blobs: MemoryBlobs, round_id: str, updates: dict[str, StateDict]
) -> tuple[list[UpdateRow], list[PartialRow]]:
    """Update rows for ``updates`` (devices a, b on worker w1, the rest on w2) and each
    worker's partial sum."""
    rows: list[UpdateRow] = []
    partials = {"w1": PartialSum(LAYOUT), "w2": PartialSum(LAYOUT)}
    for device_id, state in updates.items():
        worker = "w1" if device_id in "ab" else "w2"
        key, sha = await _put(blobs, encode(state))
        rows.append(UpdateRow(round_id, device_id, SAMPLES[device_id], worker, key, sha))
        partials[worker].add(device_id, state, SAMPLES[device_id])
    prows = []
    for worker, partial in partials.items():
        if partial.count:
            key, sha = await _put(blobs, partial.to_bytes())
            prows.append(
                PartialRow(round_id, worker, partial.device_ids, partial.total_samples, key, sha)
            )
    return rows, prows


def _expected(
    settings: StrategySettings, rounds: list[dict[str, StateDict]], base: StateDict = BASE
) -> StateDict:
    """The single-process server's strategy over the same rounds (device-id order)."""
    strategy = build_strategy(settings)
    current = base
    for updates in rounds:
        strategy.begin(current)
        kept = [(updates[d], SAMPLES[d]) for d in sorted(updates)]
        for state, samples in kept:
            strategy.add(state, samples)
        aggregate = strategy.result(MemoryUpdates(kept))
        strategy.commit(aggregate)
        current = aggregate.weights
    return current


def _assert_same(got: StateDict, want: StateDict) -> None:
    assert set(got) == set(want)
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


# ============================================================ pure parts

READS = [
    # strategy, clip_norm -> the coordinator reads every update back
    ("fedavg", None, False),
    ("fedprox", None, False),
    ("fedavgm", None, False),
    ("fedadam", None, False),
    ("median", None, True),
    ("trimmed-mean", None, True),
    ("fedavg", 1.0, True),
    ("fedadam", 1.0, True),
    ("median", 1.0, True),
]


@pytest.mark.parametrize(("name", "clip", "reads"), READS)
def test_reads_every_update(name: str, clip: float | None, reads: bool) -> None:
    assert reads_every_update(StrategySettings(name=name, clip_norm=clip)) is reads


def test_partial_means_equal_fedavg_means() -> None:
    updates = {d: _update(i) for i, d in enumerate("abcde")}
    acc = FedAvg()
    acc.begin(BASE)
    one, two = PartialSum(LAYOUT), PartialSum(LAYOUT)
    for d, state in updates.items():
        acc.add(state, SAMPLES[d])
        (one if d in "ab" else two).add(d, state, SAMPLES[d])
    one.merge(two)
    got, want = one.means(), acc.means()
    for name in want:
        assert got[name].dtype == np.float64
        np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(ValueError, match="no update"):
        PartialSum(LAYOUT).means()


def test_optimizer_state_round_trips_bit_for_bit() -> None:
    state = {"adam.m/w": np.linspace(-1, 1, 12).reshape(4, 3) / 3.0}
    back = decode_state(encode_state(state))
    assert back["adam.m/w"].dtype == np.float64
    np.testing.assert_array_equal(back["adam.m/w"], state["adam.m/w"])
    with pytest.raises(ValueError):
        decode_state(b"not a safetensors document")


# ============================================================ one round, every strategy

CASES = [(name, clip) for name in STRATEGIES for clip in (None, 15.0)]


@pytest.mark.parametrize(("name", "clip"), CASES)
def test_a_round_gives_the_strategys_weights(tmp_path: Path, name: str, clip: float | None) -> None:
    settings = StrategySettings(name=name, clip_norm=clip)
    updates = {d: _update(i) for i, d in enumerate("abcde")}
    updates["e"] = _update(99, spread=10_000)  # an outlier: clipped, or out-voted

    async def body(tmp: Path) -> Outcome | None:
        blobs = MemoryBlobs()
        base = await _version(blobs, 0, BASE)
        rows, partials = await _round(blobs, "r1", updates)
        aggregator = RoundAggregator(settings, blobs, LAYOUT, MAX_BYTES)
        return await aggregator.aggregate("r1", base, rows, partials, tmp)

    outcome = _run(body(tmp_path))
    assert list(tmp_path.iterdir()) == []  # every fetched file removed
    assert outcome is not None
    assert outcome.counted == frozenset("abcde")
    _assert_same(outcome.weights, _expected(settings, [updates]))
    stateful = name in ("fedavgm", "fedadam")
    assert bool(outcome.optimizer_state) is stateful
    if clip is not None:
        assert set(outcome.clipped) >= {"e"}
        assert outcome.clipped["e"] > clip


def test_two_rounds_of_fedadam_go_on_with_the_saved_state(tmp_path: Path) -> None:
    """Round 2 by ANOTHER aggregator (a coordinator that took over) from the state saved
    with version 1 gives what one strategy running both rounds gives."""
    settings = StrategySettings(name="fedadam")
    rounds = [{d: _update(10 * r + i) for i, d in enumerate("abcd")} for r in range(2)]

    async def body(tmp: Path) -> StateDict:
        blobs = MemoryBlobs()
        base = await _version(blobs, 0, BASE)
        rows, partials = await _round(blobs, "r1", rounds[0])
        first = RoundAggregator(settings, blobs, LAYOUT, MAX_BYTES)
        one = await first.aggregate("r1", base, rows, partials, tmp)
        assert one is not None and one.optimizer_state
        v1 = await _version(blobs, 1, one.weights, one.optimizer_state)
        rows, partials = await _round(blobs, "r2", rounds[1])
        second = RoundAggregator(settings, blobs, LAYOUT, MAX_BYTES)
        two = await second.aggregate("r2", v1, rows, partials, tmp)
        assert two is not None
        # Without the saved state round 2 differs (the state matters to this test).
        fresh = dataclasses.replace(v1, optimizer_key=None, optimizer_sha256=None)
        other = await RoundAggregator(settings, blobs, LAYOUT, MAX_BYTES).aggregate(
            "r2", fresh, rows, partials, tmp
        )
        assert other is not None
        assert not np.array_equal(other.weights["w"], two.weights["w"])
        return two.weights

    got = _run(body(tmp_path))
    _assert_same(got, _expected(settings, rounds))


def test_a_state_that_does_not_fit_starts_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = StrategySettings(name="fedavgm")
    updates = {d: _update(i) for i, d in enumerate("abc")}

    async def body(tmp: Path) -> Outcome | None:
        blobs = MemoryBlobs()
        # FedAdam's state where FedAvgM's is expected.
        base = await _version(blobs, 0, BASE, {"adam.m/w": np.zeros((4, 3))})
        rows, partials = await _round(blobs, "r1", updates)
        aggregator = RoundAggregator(settings, blobs, LAYOUT, MAX_BYTES)
        return await aggregator.aggregate("r1", base, rows, partials, tmp)

    with caplog.at_level(logging.WARNING, "server.cluster.aggregate"):
        outcome = _run(body(tmp_path))
    assert outcome is not None
    _assert_same(outcome.weights, _expected(settings, [updates]))
    assert "fresh optimizer state" in caplog.text


def test_an_unreadable_update_is_left_out_of_a_robust_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = StrategySettings(name="median")
    updates = {d: _update(i) for i, d in enumerate("abcd")}

    async def body(tmp: Path) -> Outcome | None:
        blobs = MemoryBlobs()
        base = await _version(blobs, 0, BASE)
        rows, _ = await _round(blobs, "r1", updates)
        blobs.data[rows[1].blob_key] = b"tampered"  # b's blob fails its SHA-256
        aggregator = RoundAggregator(settings, blobs, LAYOUT, MAX_BYTES)
        return await aggregator.aggregate("r1", base, rows, [], tmp)

    with caplog.at_level(logging.ERROR):
        outcome = _run(body(tmp_path))
    assert outcome is not None
    assert outcome.counted == frozenset("acd")
    del updates["b"]
    _assert_same(outcome.weights, _expected(settings, [updates]))
    assert "the update of b cannot be read back" in caplog.text


# ============================================================ the coordinator


@pytest.mark.parametrize("name", ["median", "fedavgm"])
def test_the_coordinator_publishes_the_strategys_versions(tmp_path: Path, name: str) -> None:
    """Two rounds through ClusterCoordinator (in-memory engines): each version is the
    strategy's, and a stateful optimizer's state is saved beside it."""
    settings = StrategySettings(name=name)
    c = Cluster(tmp_path, clients_per_round=3, min_clients=3, rounds=2, strategy=settings)
    sent: list[dict[str, StateDict]] = []

    async def body() -> None:
        worker = Worker(c, "w1")
        worker.connect("a", "b", "c")
        task = asyncio.create_task(c.coordinator().run())
        try:
            for attempt in (1, 2):
                row = await _opened(c, attempt)
                updates = {
                    p.device_id: _small(10 * attempt + p.index) for p in c.assigned(row.round_id)
                }
                sent.append(updates)
                for device_id, state in updates.items():
                    await worker.report(row.round_id, device_id, state, SAMPLES[device_id], 1.0)
                await wait_until_async(
                    lambda rid=row.round_id: c.db.rounds[rid].state != "open",
                    what="the round to close",
                )
                await worker.write_partial(row.round_id)  # (median closes without it)
                await c.state_is(row.round_id, "completed")
            await asyncio.wait_for(task, timeout=scaled(10))
        finally:
            if not task.done():
                await _stop(task)

    _run(body())
    _assert_same(c.version(2), _expected(settings, sent, base=INITIAL))
    stateful = name == "fedavgm"
    for n in (1, 2):
        row = c.db.versions[n]
        assert (row.optimizer_key is not None) is stateful
        if row.optimizer_key is not None:
            data = c.blobs.data[row.optimizer_key]
            assert _sha(data) == row.optimizer_sha256
            assert set(decode_state(data)) == {"momentum.m/w"}


# ------------------------------------------------------------ helpers


def _small(seed: int) -> StateDict:
    # The layout of tests/test_cluster_coordinator.py's INITIAL.
    rng = np.random.default_rng(seed)
    return {
        "w": rng.integers(-20, 20, (3, 2)).astype(np.float32),
        "n": rng.integers(0, 9, 2).astype(np.int64),
    }


async def _opened(c: Cluster, number: int) -> Any:
    await wait_until_async(
        lambda: any(r.number == number and r.state == "open" for r in c.db.rounds.values()),
        what=f"round {number} to open",
    )
    return next(r for r in c.db.rounds.values() if r.number == number and r.state == "open")
