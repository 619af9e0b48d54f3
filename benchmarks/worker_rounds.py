"""The client's per-round cost around training: the worker and the hand-over to pending.

Run ``python -m benchmarks.worker_rounds`` (``--size small|medium``, ``--rounds``;
``--help``). It writes only to a temporary directory and stops by itself.

A round here is what the client does between receiving a new global and holding the
update as pending, with a trivial fit (the ``synthetic`` task, 64 samples, one epoch of
one batch), so what is measured is the overhead, not training:

* store: :meth:`client.global_store.GlobalStore.save` of the new global (already verified);
* worker: ``submit()`` of the job until the ``Done`` event (reading and checking the
  base, the model, training, evaluation, encoding and writing the update);
* keep: the session's hand-over of the update to :class:`client.pending.PendingStore`.

Figures: the median of rounds 2.. (steady), and for round 1 the time from ``submit()`` to
the first progress event (the first batch trained: the worker's progress throttle is set
to 1 ms here) with a cold worker (spawned at the round) and, where the worker can be
warmed, a warm one (``warm()`` at "registration", then idle). It also works against an
older checkout (run with that checkout first on ``PYTHONPATH``), using only what exists
there, to give before/after figures.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.global_store import GlobalStore
from client.pending import PendingStore
from client.protocol import Partition, TrainingConfig
from client.weights import encode
from client.worker import Done, Failed, ProgressEvent, TrainingWorker, WorkerEvent
from client.workfiles import WorkDir

#: (features, hidden, classes) of the synthetic model: ~0.4 MB and ~25 MB of float32.
SIZES = {"small": (256, 380, 10), "medium": (1024, 6000, 10)}
SAMPLES = 80  # 64 train rows: one batch
TIMEOUT_S = 600.0


def _state(features: int, hidden: int, classes: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    scale = np.float32(0.01)
    return {
        "0.weight": rng.standard_normal((hidden, features), dtype=np.float32) * scale,
        "0.bias": np.zeros(hidden, np.float32),
        "2.weight": rng.standard_normal((classes, hidden), dtype=np.float32) * scale,
        "2.bias": np.zeros(classes, np.float32),
    }


class _Events:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.first_progress: float | None = None
        self.final: WorkerEvent | None = None
        self.final_at = 0.0

    def reset(self) -> None:
        with self.cond:
            self.first_progress, self.final = None, None

    def __call__(self, event: WorkerEvent) -> None:
        now = time.perf_counter()
        with self.cond:
            if isinstance(event, ProgressEvent) and self.first_progress is None:
                self.first_progress = now
            elif isinstance(event, Done | Failed):
                self.final, self.final_at = event, now
            self.cond.notify_all()

    def wait(self) -> WorkerEvent:
        with self.cond:
            if not self.cond.wait_for(lambda: self.final is not None, TIMEOUT_S):
                raise RuntimeError("the round did not finish in time")
            assert self.final is not None
            return self.final


def _wait_idle(pid: int, quiet_s: float = 0.5, limit_s: float = 120.0) -> float:
    """Seconds until the process ``pid`` has used no CPU for ``quiet_s`` (warmed up)."""
    proc = psutil.Process(pid)
    t0 = time.perf_counter()
    last = sum(proc.cpu_times()[:2])
    while time.perf_counter() - t0 < limit_s:
        time.sleep(quiet_s)
        now = sum(proc.cpu_times()[:2])
        if now - last < 0.01:
            return time.perf_counter() - t0 - quiet_s
        last = now
    raise RuntimeError("the warmed worker never went idle")


def run_rounds(size: str, rounds: int, warm: bool, root: Path) -> dict[str, Any]:
    features, hidden, classes = SIZES[size]
    params = {"features": features, "hidden": hidden, "classes": classes, "samples": SAMPLES}
    config = TrainingConfig(epochs=1, batch_size=64, learning_rate=0.01, seed=1)
    store = GlobalStore(root / "global")
    work = WorkDir(root / "work")
    pending = PendingStore(root / "pending")
    job_args = set(inspect.signature(WorkDir.job).parameters)
    add_args = set(inspect.signature(PendingStore.add).parameters)
    events = _Events()
    worker = TrainingWorker(events, simulation=False, progress_interval=0.001)
    rows: list[dict[str, float]] = []
    warmed_s = None
    try:
        if warm:
            worker.warm()  # absent in older checkouts (then only cold runs)
            assert worker.pid is not None
            warmed_s = _wait_idle(worker.pid)
        for index in range(rounds):
            data = encode(_state(features, hidden, classes, index))
            t0 = time.perf_counter()
            held = store.save(version=index + 1, task="synthetic", data=data, sha256=None)
            t_store = time.perf_counter() - t0
            extra: dict[str, Any] = {}
            if "base_identity" in job_args:
                extra["base_identity"] = getattr(held, "identity", None)
            job = work.job(
                round_id=f"r{index}",
                task="synthetic",
                model_params=params,
                config=config,
                partition=Partition(index=0, count=1),
                base_weights_path=held.path,
                base_version=held.version,
                base_sha256=held.sha256,
                torch_threads=1,
                **extra,
            )
            work.prepare(job)
            events.reset()
            t0 = time.perf_counter()
            worker.submit(job)
            final = events.wait()
            if not isinstance(final, Done):
                raise RuntimeError(f"round {index} failed: {final!r}")
            t_worker = events.final_at - t0
            # The child's first progress comes once the job has run progress_interval
            # (1 ms here); a job done sooner sent none: its end bounds its first batch.
            first = events.first_progress
            t_first = (first if first is not None else events.final_at) - t0
            result = final.result
            keep: dict[str, Any] = {}
            if "digest" in add_args and getattr(result, "sha256", None) is not None:
                keep["digest"] = (result.size, result.sha256)
            t0 = time.perf_counter()
            pending.add(
                work.files(job.work_key or ""),
                round_id=job.round_id,
                task="synthetic",
                base_version=held.version,
                num_samples=result.num_samples,
                metrics=result.metrics,
                fmt="safetensors",
                created=time.time(),
                **keep,
            )
            t_keep = time.perf_counter() - t0
            rows.append(
                {"store": t_store, "worker": t_worker, "keep": t_keep, "first_batch": t_first}
            )
    finally:
        worker.shutdown()
    steady = rows[1:] or rows
    med = statistics.median
    return {
        "size_mb": len(data) / 1e6,
        "first_batch_round1": rows[0]["first_batch"],
        "round1_worker": rows[0]["worker"],
        "warm_up_s": warmed_s,
        **{k: med(r[k] for r in steady) for k in ("store", "worker", "keep")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", choices=sorted(SIZES), action="append", help="model size(s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (>= 2)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    can_warm = hasattr(TrainingWorker, "warm")
    print(f"loadavg before: {_loadavg()}")
    print(
        f"{'model':<8}{'worker':>6}{'MB':>7}{'store s':>9}{'worker s':>10}{'keep s':>8}"
        f"{'r1 worker s':>13}{'r1 first batch s':>18}{'warm-up s':>11}"
    )
    for size in args.size or ["small", "medium"]:
        for warm in (False, True) if can_warm else (False,):
            with tempfile.TemporaryDirectory(prefix="fedtray-rounds-") as tmp:
                r = run_rounds(size, args.rounds, warm, Path(tmp))
            warm_up = f"{r['warm_up_s']:.2f}" if r["warm_up_s"] is not None else "-"
            print(
                f"{size:<8}{'warm' if warm else 'cold':>6}{r['size_mb']:>7.2f}{r['store']:>9.3f}"
                f"{r['worker']:>10.3f}{r['keep']:>8.3f}{r['round1_worker']:>13.2f}"
                f"{r['first_batch_round1']:>18.2f}{warm_up:>11}",
                flush=True,
            )
    print(f"loadavg after: {_loadavg()}")
    return 0


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
