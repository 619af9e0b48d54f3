"""Aggregation strategies against numpy references computed here, clipping, optimizer state.

Each strategy's aggregate of a few fixed updates equals the arithmetic it promises,
written out in numpy in the test (tables); robust strategies are fed through the round
store's real files (mapped views), with a tensor larger than one block; one 1000x update
cannot move the model by more than ``--clip-norm``; the optimizer state written beside a
version and read back gives the same next step, bit for bit; flags are checked with one
clear line each.
"""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.protocol import DeviceRegister, parse
from client.weights import encode, layout_of
from server.aggregation import BLOCK
from server.cli import build_parser as server_parser, config_from_args, main
from server.demo import main as demo_main
from server.registry import Registry
from server.roundstore import RoundStore
from server.status import build_status
from server.store import Store
from server.strategies import (
    FileUpdates,
    MemoryUpdates,
    Strategy,
    StrategySettings,
    build_strategy,
)
from server.strategies.robust import trimmed_count
from tests.server_harness import register_payload

Arrays = dict[str, np.ndarray[Any, Any]]

#: A tensor over one block, a small one and an integer counter.
SHAPES = {"big": (BLOCK + 1234,), "w": (3, 4)}


def _base() -> Arrays:
    rng = np.random.default_rng(7)
    out: Arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    out["steps"] = np.array([10, 20], np.int64)
    return out


def _updates(base: Arrays, count: int, seed: int = 1) -> list[tuple[Arrays, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        upd: Arrays = {
            k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in base.items()
            if k != "steps"
        }
        upd["steps"] = base["steps"] + np.array([i + 1, 3 * i], np.int64)
        out.append((upd, int(rng.integers(1, 50))))
    return out


def _stack(updates: list[tuple[Arrays, int]], name: str) -> np.ndarray[Any, Any]:
    return np.stack([u[name].astype(np.float64) for u, _ in updates])


def _cast(values: np.ndarray[Any, Any], like: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (
        np.rint(values).astype(like.dtype) if like.dtype.kind == "i" else values.astype(like.dtype)
    )


def _mean(updates: list[tuple[Arrays, int]], name: str) -> np.ndarray[Any, Any]:
    return np.average(_stack(updates, name), axis=0, weights=[n for _, n in updates])


def _trimmed(updates: list[tuple[Arrays, int]], name: str, fraction: float) -> np.ndarray[Any, Any]:
    values = np.sort(_stack(updates, name), axis=0)
    k = math.floor(fraction * len(updates) + 1e-9)
    return values[k : len(updates) - k].mean(axis=0)


def _reference(name: str, base: Arrays, rounds: list[list[tuple[Arrays, int]]]) -> Arrays:
    """The numpy reference of ``name`` with its default parameters over several rounds
    (each round's updates given as offsets added to that round's base)."""
    m: dict[str, np.ndarray[Any, Any]] = {}
    v: dict[str, np.ndarray[Any, Any]] = {}
    current = base
    for updates in rounds:
        new: Arrays = {}
        for key, ref in current.items():
            if name == "median":
                agg = np.median(_stack(updates, key), axis=0)
            elif name == "trimmed-mean":
                agg = _trimmed(updates, key, 0.2)
            else:
                agg = _mean(updates, key)
            if key == "steps" or name in ("fedavg", "fedprox", "median", "trimmed-mean"):
                new[key] = _cast(agg, ref)
                continue
            x = ref.astype(np.float64)
            delta = agg - x
            if name == "fedavgm":  # Hsu et al.: m = 0.9 m + delta; w = x + 1.0 m
                m[key] = 0.9 * m.get(key, 0.0) + delta
                new[key] = _cast(x + 1.0 * m[key], ref)
            else:  # fedadam, Reddi et al. Algorithm 2 (eta 0.1, betas 0.9/0.99, tau 1e-3)
                m[key] = 0.9 * m.get(key, 0.0) + 0.1 * delta
                v[key] = 0.99 * v.get(key, 0.0) + 0.01 * delta**2
                new[key] = _cast(x + 0.1 * m[key] / (np.sqrt(v[key]) + 1e-3), ref)
        current = new
    return current


def _run_round(strategy: Strategy, base: Arrays, updates: list[tuple[Arrays, int]]) -> Arrays:
    strategy.begin(base)
    for upd, n in updates:
        strategy.add(upd, n)
    aggregate = strategy.result(MemoryUpdates(updates))
    strategy.commit(aggregate)
    return aggregate.weights


def _shifted(
    updates: list[tuple[Arrays, int]], old: Arrays, new: Arrays
) -> list[tuple[Arrays, int]]:
    """The same offsets from a new base (round 2's updates)."""
    return [
        ({k: (u[k] - old[k] + new[k]).astype(old[k].dtype) for k in old}, n) for u, n in updates
    ]


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("fedavg", 3),
        ("fedprox", 3),
        ("fedavgm", 3),
        ("fedadam", 3),
        ("median", 5),
        ("median", 4),  # even: mean of the two middle values
        ("trimmed-mean", 5),  # drops 1 at each end
        ("trimmed-mean", 10),  # drops 2 at each end
    ],
)
def test_each_strategy_equals_its_numpy_reference_over_two_rounds(name: str, count: int) -> None:
    base = _base()
    strategy = build_strategy(StrategySettings(name=name))
    round1 = _updates(base, count)
    got1 = _run_round(strategy, base, round1)
    ref1 = _reference(name, base, [round1])
    round2 = _shifted(_updates(base, count, seed=2), base, got1)
    got2 = _run_round(strategy, got1, round2)
    ref2 = _reference(name, base, [round1, _shifted(_updates(base, count, seed=2), base, ref1)])
    for got, ref in ((got1, ref1), (got2, ref2)):
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key].dtype == ref[key].dtype, key
            np.testing.assert_allclose(got[key], ref[key], rtol=2e-6, atol=2e-6, err_msg=key)


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_robust_strategies_read_the_round_files_block_by_block(name: str, tmp_path: Path) -> None:
    base = _base()
    updates = _updates(base, 6)
    store = RoundStore(tmp_path)
    files = [(store.save_update(f"device-{i}", encode(u)), n) for i, (u, n) in enumerate(updates)]
    strategy = build_strategy(StrategySettings(name=name))
    strategy.begin(base)
    for upd, n in updates:
        strategy.add(upd, n)
    got = strategy.result(FileUpdates(store, layout_of(base), files)).weights
    ref = _reference(name, base, [updates])
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_robust_memory_is_block_times_devices_not_model_times_devices(tmp_path: Path) -> None:
    devices, size = 12, 400_000  # 12 updates of 1.6 MB float32 each
    base = {"w": np.zeros(size, np.float32)}
    rng = np.random.default_rng(3)
    store = RoundStore(tmp_path)
    files = []
    strategy = build_strategy(StrategySettings(name="median"))
    strategy.begin(base)
    for i in range(devices):
        upd = {"w": rng.standard_normal(size).astype(np.float32)}
        files.append((store.save_update(f"d{i}", encode(upd)), 1))
        strategy.add(upd, 1)
    del upd
    tracemalloc.start()
    try:
        strategy.result(FileUpdates(store, layout_of(base), files))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    model64 = size * 8
    # The float64 aggregate and its cast result, plus one block buffer: never the updates.
    assert peak < 2 * model64 + 4 * BLOCK * 8 + (1 << 20), peak
    assert peak < devices * size * 4 / 2  # far below holding every update


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "median", "trimmed-mean"])
def test_one_1000x_update_cannot_move_the_model_by_more_than_c(name: str) -> None:
    base = _base()
    clip = 0.5
    honest = [({k: v.copy() for k, v in base.items()}, 10) for _ in range(2)]
    poisoned = {k: (v * 1000 + 1).astype(v.dtype) for k, v in base.items() if k != "steps"}
    poisoned["steps"] = base["steps"].copy()
    strategy = build_strategy(StrategySettings(name=name, clip_norm=clip))
    strategy.begin(base)
    outcomes = [strategy.add(u, n) for u, n in [*honest, (poisoned, 1000)]]
    assert [o.clipped for o in outcomes] == [False, False, True]
    assert outcomes[2].norm is not None and outcomes[2].norm > 1000
    new = strategy.result(MemoryUpdates([*honest, (poisoned, 1000)])).weights
    moved = math.sqrt(
        sum(float(np.sum((new[k].astype(np.float64) - base[k]) ** 2)) for k in base if k != "steps")
    )
    assert moved <= clip * (1 + 1e-5), moved
    # Without clipping the same update moves FedAvg far away.
    if name == "fedavg":
        plain = build_strategy(StrategySettings(name=name))
        got = _run_round(plain, base, [*honest, (poisoned, 1000)])
        assert float(np.abs(got["w"] - base["w"]).max()) > 100


def test_clipping_scales_to_exactly_c_and_matches_the_reference() -> None:
    base = {"w": np.zeros(4, np.float32), "n": np.array([5], np.int64)}
    far = {"w": np.array([3.0, 4.0, 0.0, 0.0], np.float32), "n": np.array([9], np.int64)}
    near = {"w": np.array([0.1, 0.0, 0.0, 0.0], np.float32), "n": np.array([7], np.int64)}
    strategy = build_strategy(StrategySettings(name="fedavg", clip_norm=1.0))
    strategy.begin(base)
    assert strategy.add(far, 1).norm == pytest.approx(5.0)
    assert not strategy.add(near, 1).clipped
    got = strategy.result(MemoryUpdates([])).weights
    # far clipped to [0.6, 0.8]: mean with near; the integer counter is not clipped.
    np.testing.assert_allclose(got["w"], [0.35, 0.4, 0, 0], rtol=1e-6)
    assert got["n"].tolist() == [8]


def test_result_changes_nothing_until_commit() -> None:
    base = _base()
    strategy = build_strategy(StrategySettings(name="fedadam"))
    updates = _updates(base, 2)
    strategy.begin(base)
    for u, n in updates:
        strategy.add(u, n)
    first = strategy.result(MemoryUpdates(updates))
    again = strategy.result(MemoryUpdates(updates))
    for key in first.weights:
        assert np.array_equal(first.weights[key], again.weights[key])
    assert strategy.optimizer_state() == {}
    strategy.commit(first)
    assert set(strategy.optimizer_state()) == set(first.optimizer_state)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_optimizer_state_saved_beside_the_version_gives_the_same_next_step(
    name: str, tmp_path: Path
) -> None:
    base = _base()
    live = build_strategy(StrategySettings(name=name))
    v1 = _run_round(live, base, _updates(base, 3))
    store = Store(tmp_path)
    opt = encode(live.optimizer_state())
    store.save_weights(1, encode(v1))
    opt_name = store.save_optimizer(1, opt)
    from client.weights import sha256_hex

    store.save_history(
        task="t",
        version=1,
        rounds_completed=1,
        weights_name="global-v1.safetensors",
        weights_sha256=sha256_hex(encode(v1)),
        history=[],
        optimizer_name=opt_name,
        optimizer_sha256=sha256_hex(opt),
    )
    saved = store.load("t", layout_of(base))
    assert saved is not None
    restarted = build_strategy(StrategySettings(name=name))
    restarted.load_optimizer_state(saved.optimizer, saved.state)
    round2 = _shifted(_updates(base, 3, seed=5), base, v1)
    a = _run_round(live, v1, round2)
    b = _run_round(restarted, saved.state, round2)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    other = build_strategy(StrategySettings(name="fedavgm" if name == "fedadam" else "fedadam"))
    with pytest.raises(ValueError, match="optimizer state"):
        other.load_optimizer_state(saved.optimizer, saved.state)


def test_store_keeps_a_newer_version_and_removes_older_optimizer_files(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for version in (1, 2, 3):
        store.save_weights(version, b"w")
        store.save_optimizer(version, b"o")
    store.save_history(
        task="t",
        version=2,
        rounds_completed=2,
        weights_name="global-v2.safetensors",
        weights_sha256="x",
        history=[],
        optimizer_name="optimizer-v2.safetensors",
        optimizer_sha256="y",
    )
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "global-v2.safetensors",
        "global-v3.safetensors",
        "optimizer-v2.safetensors",
        "optimizer-v3.safetensors",
    ]


@pytest.mark.parametrize(
    ("fraction", "n", "dropped"),
    [(0.2, 5, 1), (0.2, 4, 0), (0.29, 100, 29), (0.1, 30, 3), (0.49, 3, 1), (0.0, 7, 0)],
)
def test_trimmed_count(fraction: float, n: int, dropped: int) -> None:
    assert trimmed_count(fraction, n) == dropped


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "krum"], "invalid choice"),
        (["--proximal-mu", "0.1"], "--proximal-mu applies to --strategy fedprox, not fedavg"),
        (["--strategy", "fedprox", "--proximal-mu", "-1"], "--proximal-mu must be in [0, inf)"),
        (["--strategy", "fedavgm", "--server-momentum", "1"], "--server-momentum must be in"),
        (["--strategy", "fedadam", "--server-lr", "0"], "--server-lr must be in (0, 10]"),
        (["--strategy", "fedadam", "--tau", "0"], "--tau must be in (0, inf)"),
        (["--strategy", "median", "--trim-fraction", "0.1"], "applies to --strategy trimmed"),
        (["--strategy", "trimmed-mean", "--trim-fraction", "0.5"], "--trim-fraction must be"),
        (["--clip-norm", "0"], "--clip-norm must be a positive number"),
        (["--strategy", "median", "--clip-norm", "nan"], "--clip-norm must be a positive number"),
    ],
)
def test_bad_strategy_flags_give_one_line_and_status_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    if args[:2] != ["--strategy", "krum"]:
        assert demo_main(args) == 2
        assert message in capsys.readouterr().err


def test_strategy_flags_reach_the_config_the_round_config_and_the_status() -> None:
    args = server_parser().parse_args(
        ["--strategy", "fedprox", "--proximal-mu", "0.05", "--clip-norm", "2"]
    )
    config = config_from_args(args)
    assert config.strategy == StrategySettings(name="fedprox", proximal_mu=0.05, clip_norm=2.0)
    assert config.training_overrides() == {"proximal_mu": 0.05}
    fedavg = config_from_args(server_parser().parse_args([]))
    assert "proximal_mu" not in fedavg.training_overrides()
    status = build_status(
        server_version="x",
        protocol=1,
        task="t",
        global_version=0,
        rounds_target=0,
        phase="closed",
        current=None,
        history=[],
        registry=Registry(30.0),
        now_mono=0.0,
        now_unix=0.0,
        strategy=StrategySettings(name="fedadam"),
    )
    doc = status.model_dump(by_alias=True, mode="json")
    assert doc["strategy"] == {
        "name": "fedadam",
        "parameters": {"serverLr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.001},
    }


def test_a_clipped_device_is_flagged_in_the_status() -> None:
    device = "6f1c2d3e-0000-4000-8000-0000000000aa"
    registry = Registry(30.0)
    registry.register(parse(DeviceRegister, register_payload(device, "volunteer")), "s1", 1.0)

    def device_doc() -> dict[str, Any]:
        status = build_status(
            server_version="x",
            protocol=1,
            task="t",
            global_version=0,
            rounds_target=0,
            phase="closed",
            current=None,
            history=[],
            registry=registry,
            now_mono=1.0,
            now_unix=1.0,
        )
        [doc] = status.model_dump(by_alias=True, mode="json")["devices"]
        return dict(doc)

    assert (device_doc()["clippedInRound"], device_doc()["clippedNorm"]) == (None, None)
    registry.update_clipped(device, 3, 1234.5)
    assert (device_doc()["clippedInRound"], device_doc()["clippedNorm"]) == (3, 1234.5)
