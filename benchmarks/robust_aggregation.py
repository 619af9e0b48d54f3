"""Robust aggregation benchmark: median and trimmed mean against the running-sum FedAvg.

Writes K updates of a P-parameter float32 model as safetensors files in a temporary round
store (as the server keeps them), then aggregates them three ways with the server's own
strategies: FedAvg (each update folded as it arrives, as read-only views over its mapped
file: :class:`server.strategies.fedavg.WeightedMean`), coordinate-wise median and trimmed
mean (block by block over the mapped files at the end of the round:
:mod:`server.strategies.robust`). For each it reports seconds and the peak memory Python
allocates (tracemalloc; the mapped files are the page cache, not counted) and the growth
of the process's peak RSS, each also as a ratio to FedAvg's. The promise checked: robust
memory is O(block x devices) on top of the O(model) result, not O(model x devices).

    .venv/bin/python benchmarks/robust_aggregation.py                      # P = 1M, K = 10, 50
    .venv/bin/python benchmarks/robust_aggregation.py --params 200000 --devices 5,20
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.weights import encode, layout_of  # noqa: E402
from server.roundstore import RoundStore  # noqa: E402
from server.strategies import FileUpdates, StrategySettings, build_strategy  # noqa: E402

STRATEGIES = ("fedavg", "median", "trimmed-mean")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(run: Callable[[], object]) -> tuple[float, int]:
    """Seconds and tracemalloc peak bytes of ``run()``."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        run()
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return seconds, peak


def _aggregate(
    name: str, store: RoundStore, base: dict[str, np.ndarray], files: list[tuple[str, int]]
) -> object:
    """One round as the server runs it: each update folded from its file as it arrives,
    then the result (robust strategies read the files again)."""
    layout = layout_of(base)
    strategy = build_strategy(StrategySettings(name=name))
    strategy.begin(base)
    for file_name, samples in files:
        store.fold_update(file_name, layout, lambda u, n=samples: strategy.add(u, n))
    return strategy.result(FileUpdates(store, layout, files))


def one_size(params: int, devices: int, work: Path) -> dict[str, tuple[float, int, int]]:
    """{strategy: (seconds, traced peak bytes, peak RSS growth bytes)} for one size."""
    rng = np.random.default_rng(0)
    base = {"w": np.zeros(params, np.float32)}
    store = RoundStore(work / f"k{devices}")
    files = []
    for i in range(devices):
        update = {"w": rng.standard_normal(params).astype(np.float32)}
        files.append((store.save_update(f"device-{i}", encode(update)), 1 + i % 7))
    del update
    out: dict[str, tuple[float, int, int]] = {}
    for name in STRATEGIES:
        rss_before = _peak_rss_bytes()
        seconds, peak = measure(lambda name=name: _aggregate(name, store, base, files))
        out[name] = (seconds, peak, max(0, _peak_rss_bytes() - rss_before))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=1_000_000, help="model parameters (float32)")
    p.add_argument("--devices", default="10,50", help="comma-separated update counts")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.devices.split(",") if x.strip()]
    model_mb = args.params * 4 / 1e6
    print(f"model: {args.params} float32 parameters ({model_mb:.1f} MB per update)")
    with tempfile.TemporaryDirectory(prefix="fedtray-robust-") as tmp:
        for devices in sizes:
            results = one_size(args.params, devices, Path(tmp))
            fed_s, fed_peak, _ = results["fedavg"]
            print(f"\n{devices} updates ({devices * model_mb:.1f} MB on disk)")
            print(
                f"{'strategy':<14}{'seconds':>9}{'peak MB':>9}{'x model':>9}{'RSS+ MB':>9}"
                f"{'time x':>8}{'mem x':>7}"
            )
            for name, (seconds, peak, rss) in results.items():
                print(
                    f"{name:<14}{seconds:>9.3f}{peak / 1e6:>9.1f}"
                    f"{peak / (args.params * 4):>9.1f}{rss / 1e6:>9.1f}"
                    f"{seconds / fed_s:>8.1f}{peak / fed_peak:>7.2f}"
                )
            worst = max(results[name][1] for name in STRATEGIES if name != "fedavg")
            print(
                f"ratio robust / fedavg peak memory {worst / fed_peak:.2f}x "
                f"(holding every update would be {devices * args.params * 4 / fed_peak:.1f}x)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
