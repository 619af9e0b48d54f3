"""Per-hop timing of the server's path from a round collected to its new version published.

Run ``python -m benchmarks.publish_hops`` (defaults: 3 updates of the 0.4 MB synthetic
model, a history of 50 rounds, 30 repeats). Whole-round wall times on a loaded shared
machine vary by more than the milliseconds this path costs, so this times the path alone,
in one process, with the server's own parts (the round store's update files, FedAvg over
their mapped views, :class:`server.globalmodel.GlobalModel` and :class:`server.store.
Store`), both variants interleaved in the same run, each repeat in a fresh state
directory:

* **before**: the version's files saved as before this change: the weights file written
  and fsynced, its directory fsynced, then ``history.json`` the same way (four fsyncs one
  after the other), its history serialized by ``model_dump`` + ``json.dumps``; through the
  same :class:`GlobalModel` (the store's ``place_*``/``commit_version`` mapped onto
  ``save_weights``/``save_history``; so its ``prepare`` is the one thread hop of now).
* **after**: the server's path now (:meth:`server.store.Store.commit_version`, the history
  serialized by pydantic in one call).

Per hop (aggregate = ``strategy.result``, prepare, persist, publish; then, off the path,
the evaluation recorded): wall ms, CPU ms of the whole process (``time.process_time``:
every thread), the number of fsyncs and the *fsync wall* (the time at least one fsync was
running: fsyncs side by side count once). Every ``os.fsync`` in the process is counted
(a wrapper installed for the run). Medians over ``--repeats``. Writes only in a temporary
directory; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.atomicfile import write_atomic
from client.weights import StateDict, encode, layout_of
from server.globalmodel import GlobalModel, Prepared
from server.roundstore import RoundStore
from server.status import RoundRecord
from server.store import Saved, Store
from server.strategies import FileUpdates, build_strategy

HOPS = ("aggregate", "prepare", "persist", "publish", "path", "evaluation")


class _StoreBefore(Store):
    """The store as the server used it before: each file fsynced with its directory,
    one after the other."""

    def place_weights(self, version: int, data: bytes) -> str:
        return self.save_weights(version, data)

    def place_optimizer(self, version: int, data: bytes) -> str:
        return self.save_optimizer(version, data)

    def commit_version(self, **kwargs: Any) -> None:
        self.save_history(**kwargs)

    def save_history(self, **kwargs: Any) -> None:
        """As before: the history through ``model_dump`` + ``json.dumps``, then the
        atomic fsynced write."""
        history: list[RoundRecord] = kwargs["history"]
        meta: dict[str, Any] = {
            "format": 1,
            "task": kwargs["task"],
            "version": kwargs["version"],
            "roundsCompleted": kwargs["rounds_completed"],
            "weightsFile": kwargs["weights_name"],
            "weightsSha256": kwargs["weights_sha256"],
            "history": [r.model_dump(by_alias=True, mode="json") for r in history],
        }
        write_atomic(self.state_dir / "history.json", json.dumps(meta, indent=1).encode("utf-8"))


@dataclass
class FsyncMeter:
    """Every ``os.fsync`` while :meth:`installed` is active: count and intervals."""

    intervals: list[tuple[float, float]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def installed(self) -> Iterator[None]:
        real = os.fsync

        def counted(fd: Any) -> None:
            t0 = time.perf_counter()
            try:
                real(fd)
            finally:
                t1 = time.perf_counter()
                with self._lock:
                    self.intervals.append((t0, t1))

        os.fsync = counted
        try:
            yield
        finally:
            os.fsync = real

    def mark(self) -> int:
        with self._lock:
            return len(self.intervals)

    def since(self, mark: int) -> tuple[int, float]:
        """(fsyncs since ``mark``, seconds at least one of them was running)."""
        with self._lock:
            spans = sorted(self.intervals[mark:])
        return len(spans), union_seconds(spans)


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of sorted intervals."""
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


@dataclass(frozen=True)
class Hop:
    wall: float
    cpu: float
    fsyncs: int
    fsync_wall: float


def _state(hidden: int, features: int, classes: int, seed: int) -> StateDict:
    rng = np.random.default_rng(seed)
    return {
        "net.0.weight": rng.standard_normal((hidden, features)).astype(np.float32),
        "net.0.bias": rng.standard_normal(hidden).astype(np.float32),
        "net.2.weight": rng.standard_normal((classes, hidden)).astype(np.float32),
        "net.2.bias": rng.standard_normal(classes).astype(np.float32),
    }


def _record(number: int) -> RoundRecord:
    return RoundRecord(
        round_id=f"r{number}-1-bench",
        number=number,
        outcome="completed",
        version=number,
        clients_selected=3,
        clients_reported=3,
        train_loss=0.5,
        seconds=0.1,
        finished_at=time.time(),
    )


async def _timed(meter: FsyncMeter, out: dict[str, Hop], name: str, work: Any) -> Any:
    mark, c0, t0 = meter.mark(), time.process_time(), time.perf_counter()
    result = await work
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out[name] = Hop(wall, cpu, *meter.since(mark))
    return result


async def _publish(model: GlobalModel, prepared: Prepared, record: RoundRecord) -> None:
    model.publish(prepared, record, {})


def one_round(
    state_dir: Path,
    store_type: Callable[[Path], Store],
    base: StateDict,
    updates: list[bytes],
    history: int,
    meter: FsyncMeter,
) -> dict[str, Hop]:
    """One round's path from collected to published, then its evaluation recorded."""
    rounds = RoundStore(state_dir)
    names = [rounds.save_update(f"dev{i}", doc) for i, doc in enumerate(updates)]
    layout = layout_of(base)
    strategy = build_strategy()
    strategy.begin(base)
    for name in names:  # folded at intake, as the coordinator does
        rounds.fold_update(name, layout, lambda u: strategy.add(u, 10))
    store = store_type(state_dir)
    model = GlobalModel(store, "synthetic")
    saved = Saved("synthetic", history, history, base, [_record(n) for n in range(1, history + 1)])
    model.adopt(base, layout, saved if history else None)
    version = history + 1
    out: dict[str, Hop] = {}

    async def run() -> None:
        mark, c0, t0 = meter.mark(), time.process_time(), time.perf_counter()
        kept = FileUpdates(rounds, layout, [(n, 10) for n in names])
        aggregate = await _timed(meter, out, "aggregate", asyncio.to_thread(strategy.result, kept))
        prepared = await _timed(
            meter, out, "prepare", model.prepare(aggregate.weights, version, None)
        )
        record = _record(version)
        ok = await _timed(meter, out, "persist", model.persist(prepared, record))
        assert ok, "the version was not saved"
        await _timed(meter, out, "publish", _publish(model, prepared, record))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out["path"] = Hop(wall, cpu, *meter.since(mark))
        metrics = {"evalLoss": 0.25, "evalAccuracy": 0.75}
        ok = await _timed(meter, out, "evaluation", model.record_evaluation(version, metrics))
        assert ok, "the evaluation was not saved"

    asyncio.run(run())
    loaded = Store(state_dir).load("synthetic", layout)
    assert loaded is not None and loaded.version == version
    assert loaded.history[-1].eval_accuracy == 0.75, "the evaluation did not survive"
    return out


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=97, help="97: the 0.4 MB model")
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--updates", type=int, default=3)
    p.add_argument("--history", type=int, default=50, help="completed rounds before this one")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    base = _state(args.hidden, args.features, 2, 0)
    updates = [encode(_state(args.hidden, args.features, 2, 1 + i)) for i in range(args.updates)]
    variants: dict[str, Callable[[Path], Store]] = {"before": _StoreBefore, "after": Store}
    results: dict[str, list[dict[str, Hop]]] = {v: [] for v in variants}
    meter = FsyncMeter()
    load_start = _loadavg()
    with tempfile.TemporaryDirectory(prefix="fedtray-publish-hops-") as tmp, meter.installed():
        for repeat in range(args.repeats):
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                state_dir = Path(tmp) / f"{name}-{repeat}"
                results[name].append(
                    one_round(state_dir, variants[name], base, updates, args.history, meter)
                )
    size_mb = len(updates[0]) / 1e6
    print(
        f"# publish hops: {args.updates} updates of {size_mb:.2f} MB, history of "
        f"{args.history} rounds, {args.repeats} repeats (medians)"
    )
    print(f"loadavg {load_start} at the start, {_loadavg()} at the end")
    print(
        f"{'hop':<11} {'variant':<7} {'wall ms':>8} {'cpu ms':>7} {'fsyncs':>6} "
        f"{'fsync wall ms':>14}"
    )
    medians: dict[tuple[str, str], Hop] = {}
    for hop in HOPS:
        for name, runs in results.items():
            m = Hop(
                statistics.median(r[hop].wall for r in runs),
                statistics.median(r[hop].cpu for r in runs),
                round(statistics.median(r[hop].fsyncs for r in runs)),
                statistics.median(r[hop].fsync_wall for r in runs),
            )
            medians[(hop, name)] = m
            print(
                f"{hop:<11} {name:<7} {m.wall * 1e3:>8.2f} {m.cpu * 1e3:>7.2f} {m.fsyncs:>6} "
                f"{m.fsync_wall * 1e3:>14.2f}"
            )
    for hop in ("path", "evaluation"):
        before, after = medians[(hop, "before")], medians[(hop, "after")]
        print(
            f"ratio after / before, {hop}: wall {after.wall / before.wall:.2f}x, "
            f"cpu {after.cpu / max(before.cpu, 1e-9):.2f}x, "
            f"fsync wall {after.fsync_wall / max(before.fsync_wall, 1e-9):.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
