"""Overhead of the client's training worker against a bare torch loop doing the same work.

Run ``python -m benchmarks.training_overhead`` (``--epochs``, ``--samples``, ``--hidden``,
``--threads``, ``--repeats``; ``--help``). It writes only to a temporary directory and
stops by itself.

Both sides train the ``synthetic`` task (``features=512, classes=10``, ``--hidden``,
``--samples``) from the same seeded model, on the same data (the whole training split as
partition 0 of 1), with the same SGD settings, batch size, per-epoch sample order
(:func:`client.trainer.epoch_seed`) and torch thread count, each in a freshly spawned child
process at ``nice 10``, then evaluate the model on the data and write its weights as
safetensors:

* worker: :class:`client.worker.TrainingWorker` running :class:`client.trainer.LocalTrainer`
  (progress throttled to one event per 0.5 s, pause/cancel checks at every batch);
* bare: a plain loop (index, zero_grad, forward, cross-entropy, backward, step,
  ``loss.item()``) in a child process started the same way (``spawn``), which records a
  ``time.perf_counter()`` stamp after every step (CLOCK_MONOTONIC: comparable across
  processes on Linux).

Figures, medians over ``--repeats`` (worker and bare runs alternate):

(a) steady state: the time between the first and the last mid-training progress event the
    parent receives from the worker (the final event, flushed after evaluation and the
    weights write, is left out), against the bare loop's time between the same two steps;
(b) end to end: ``submit()`` until the ``Done`` event, against starting the bare child
    until its result arrives; both include process spawn, torch import, data, model,
    training, evaluation and the weights write.

The trained weights of both sides are compared; they are bit-identical when the work is
the same. Target: overhead (a) <= 3 %.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.protocol import Partition, TrainingConfig
from client.trainer import TrainJob, epoch_seed
from client.weights import decode
from client.worker import DEFAULT_PROGRESS_INTERVAL

OVERHEAD_TARGET = 0.03
FEATURES = 512
CLASSES = 10
SEED = 7
RUN_TIMEOUT_S = 600.0


def _params(hidden: int, samples: int) -> dict[str, Any]:
    return {"features": FEATURES, "classes": CLASSES, "hidden": hidden, "samples": samples}


def _config(epochs: int, batch_size: int) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": 0.01,
            "optimizer": "sgd",
            "momentum": 0.9,
            "seed": SEED,
        }
    )


PARTITION = Partition(index=0, count=1, seed=0, scheme="iid")


# -- the bare loop (child process) -------------------------------------------------------


def _bare_child(
    conn: Connection, params: dict[str, Any], config: TrainingConfig, threads: int, out: str
) -> None:
    """Train with a plain torch loop; send back per-step time stamps."""
    os.nice(10)  # the worker's child lowers itself the same way
    import torch
    from safetensors.numpy import save_file
    from torch.nn import functional

    from client.tasks import get_task

    torch.set_num_threads(threads)
    task = get_task("synthetic", params)
    x_np, y_np = task.load_data("train", PARTITION)
    model = task.build_model(task.params, config.seed)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.learning_rate, momentum=config.momentum
    )
    x, y = torch.as_tensor(x_np), torch.as_tensor(y_np)
    n = len(y)
    bs = min(config.batch_size, n)
    stamps: list[float] = []
    loss_sum = 0.0
    for epoch in range(config.epochs):
        gen = torch.Generator().manual_seed(epoch_seed(config.seed, PARTITION.index, epoch))
        order = torch.randperm(n, generator=gen)
        for pos in range(0, n, bs):
            idx = order[pos : pos + bs]
            optimizer.zero_grad(set_to_none=True)
            loss = functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            loss_sum += float(loss.detach().item()) * len(idx)
            stamps.append(time.perf_counter())
    task.evaluate(model, x_np, y_np)
    state = {k: np.ascontiguousarray(v.detach().numpy()) for k, v in model.state_dict().items()}
    save_file(state, out)
    conn.send(stamps)
    conn.close()


def bare_run(params: dict[str, Any], config: TrainingConfig, threads: int, out: Path) -> Any:
    """(end-to-end seconds, per-step stamps) of one bare run in a spawned child."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(
        target=_bare_child, args=(child, params, config, threads, str(out)), daemon=True
    )
    proc.start()
    child.close()
    try:
        if not parent.poll(RUN_TIMEOUT_S):
            raise RuntimeError("the bare training run did not finish in time")
        stamps: list[float] = parent.recv()
        elapsed = time.perf_counter() - t0
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()
    return elapsed, stamps


# -- the worker --------------------------------------------------------------------------


def worker_run(
    params: dict[str, Any],
    config: TrainingConfig,
    threads: int,
    work: Path,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
) -> tuple[float, list[tuple[float, int]], int]:
    """(end-to-end seconds, [(receive time, global step)], steps per epoch) of one round."""
    from client.worker import Cancelled, Done, Failed, ProgressEvent, TrainingWorker, WorkerEvent

    events: list[tuple[float, int]] = []
    finished = threading.Event()
    outcome: list[WorkerEvent] = []
    steps_per_epoch = [0]

    def on_event(event: WorkerEvent) -> None:
        now = time.perf_counter()
        if isinstance(event, ProgressEvent):
            p = event.progress
            steps_per_epoch[0] = p.steps
            events.append((now, (p.epoch - 1) * p.steps + p.step))
        elif isinstance(event, Done | Failed | Cancelled):
            outcome.append(event)
            finished.set()

    worker = TrainingWorker(on_event, simulation=False, progress_interval=progress_interval)
    job = TrainJob(
        round_id=f"bench-{time.monotonic_ns()}",
        task="synthetic",
        model_params=params,
        config=config,
        partition=PARTITION,
        base_weights_path=None,
        output_path=work / "worker.safetensors",
        checkpoint_path=work / "worker.ckpt",
        torch_threads=threads,
    )
    try:
        t0 = time.perf_counter()
        worker.submit(job)
        if not finished.wait(RUN_TIMEOUT_S):
            raise RuntimeError("the worker's round did not finish in time")
        elapsed = time.perf_counter() - t0
    finally:
        worker.shutdown()
    last = outcome[-1] if outcome else None
    if not isinstance(last, Done):
        raise RuntimeError(f"the worker's round did not succeed: {last!r}")
    return elapsed, events, steps_per_epoch[0]


def steady_pair(
    events: list[tuple[float, int]], total_steps: int, stamps: list[float]
) -> tuple[float, float, int, list[float], list[float]]:
    """Worker against bare over the mid-round progress events (the final one is left out).

    Returns (worker seconds, bare seconds, steps) between the first and the last such
    event, and the per-interval milliseconds per step of each side between consecutive
    events (their medians shrug off short bursts of load from other processes).
    """
    mid = [e for e in events if e[1] < total_steps]
    if len(mid) < 2:
        raise RuntimeError(
            "too few progress events for a steady-state figure: make the round longer"
        )
    worker_ms: list[float] = []
    bare_ms: list[float] = []
    for (ta, sa), (tb, sb) in itertools.pairwise(mid):
        if sb > sa:
            worker_ms.append(1000 * (tb - ta) / (sb - sa))
            bare_ms.append(1000 * (stamps[sb - 1] - stamps[sa - 1]) / (sb - sa))
    (t1, s1), (t2, s2) = mid[0], mid[-1]
    return t2 - t1, stamps[s2 - 1] - stamps[s1 - 1], s2 - s1, worker_ms, bare_ms


# -- the run -----------------------------------------------------------------------------


def run(
    epochs: int,
    samples: int,
    hidden: int,
    batch: int,
    threads: int,
    repeats: int,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
    concurrent: bool = False,
) -> Any:
    params = _params(hidden, samples)
    config = _config(epochs, batch)
    steady_w: list[float] = []
    steady_b: list[float] = []
    e2e_w: list[float] = []
    e2e_b: list[float] = []
    identical = True
    intervals_w: list[float] = []
    intervals_b: list[float] = []
    steps = 0
    with tempfile.TemporaryDirectory(prefix="fedtray-bench-") as tmp:
        for i in range(repeats):
            work = Path(tmp) / f"run-{i}"
            work.mkdir()
            bare_out = work / "bare.safetensors"
            if concurrent:
                # Both sides at once: load from other processes hits both alike.
                with ThreadPoolExecutor(1) as pool:
                    bare = pool.submit(bare_run, params, config, threads, bare_out)
                    w_e2e, events, per_epoch = worker_run(
                        params, config, threads, work, progress_interval
                    )
                    b_e2e, stamps = bare.result(RUN_TIMEOUT_S)
            else:
                w_e2e, events, per_epoch = worker_run(
                    params, config, threads, work, progress_interval
                )
                b_e2e, stamps = bare_run(params, config, threads, bare_out)
            total = per_epoch * epochs
            if total != len(stamps):
                raise RuntimeError(f"worker ran {total} steps, bare loop {len(stamps)}")
            w_s, b_s, steps, w_ms, b_ms = steady_pair(events, total, stamps)
            intervals_w += w_ms
            intervals_b += b_ms
            steady_w.append(w_s)
            steady_b.append(b_s)
            e2e_w.append(w_e2e)
            e2e_b.append(b_e2e)
            a = decode((work / "worker.safetensors").read_bytes(), "safetensors")
            b = decode((work / "bare.safetensors").read_bytes(), "safetensors")
            identical = (
                identical and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
            )
            total_steps = total
    med = statistics.median
    return {
        "steps": total_steps,
        "steady_steps": steps,
        "steady_worker": med(steady_w),
        "steady_bare": med(steady_b),
        "steady_ratios": [w / b for w, b in zip(steady_w, steady_b, strict=True)],
        "step_ms_worker": med(intervals_w),
        "step_ms_bare": med(intervals_b),
        "intervals": len(intervals_w),
        "e2e_worker": med(e2e_w),
        "e2e_bare": med(e2e_b),
        "identical": identical,
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    steady = r["steady_worker"] / r["steady_bare"] - 1
    e2e = r["e2e_worker"] / r["e2e_bare"] - 1
    per_step = r["step_ms_worker"] / r["step_ms_bare"] - 1
    per_run = ", ".join(f"{x - 1:+.1%}" for x in r["steady_ratios"])
    lines = [
        f"training overhead: synthetic {FEATURES}->{args.hidden}->{CLASSES}, "
        f"{args.samples} samples, {args.epochs} epoch(s), batch {args.batch_size}, "
        f"{r['steps']} steps, {args.threads} torch thread(s), median of {args.repeats}, "
        f"{'concurrent' if args.concurrent else 'sequential'} pairs",
        "",
        f"{'measure':<48}{'worker':>10}{'bare':>10}{'overhead':>10}",
        f"{'(a) steady state, ms/step (median of ' + str(r['intervals']) + ' intervals)':<48}"
        f"{r['step_ms_worker']:>10.3f}{r['step_ms_bare']:>10.3f}{per_step:>+10.1%}",
        f"{'(a) steady state, s over ' + str(r['steady_steps']) + ' steps':<48}"
        f"{r['steady_worker']:>10.3f}{r['steady_bare']:>10.3f}{steady:>+10.1%}",
        f"{'(b) end to end, s (spawn, import, eval, write)':<48}"
        f"{r['e2e_worker']:>10.3f}{r['e2e_bare']:>10.3f}{e2e:>+10.1%}",
        "",
        f"steady-state overhead per run (whole window): {per_run}",
        f"trained weights bit-identical: {'yes' if r['identical'] else 'NO'}",
        "",
        f"ratio worker / bare (steady, ms/step) {1 + per_step:>8.3f}x   "
        f"{'meets' if per_step <= OVERHEAD_TARGET else 'MISSES'} target <= "
        f"{1 + OVERHEAD_TARGET:g}x (overhead <= {OVERHEAD_TARGET:.0%})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per round")
    parser.add_argument("--samples", type=int, default=20000, help="data set rows (80 %% train)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden units of the MLP")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch threads on both sides (default: the worker's own, all cores but one)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side")
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=DEFAULT_PROGRESS_INTERVAL,
        help="the worker's progress throttle in seconds (default: the client's, %(default)s)",
    )
    parser.add_argument(
        "--concurrent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the worker and the bare loop at the same time (default: when 2 x threads "
        "fit the cores), so load from other processes affects both alike",
    )
    args = parser.parse_args(argv)
    if args.concurrent is None:
        args.concurrent = 2 * args.threads <= (os.cpu_count() or 1)
    if min(args.epochs, args.hidden, args.batch_size, args.threads, args.repeats) < 1:
        parser.error("--epochs, --hidden, --batch-size, --threads and --repeats must be >= 1")
    if args.samples < 10:
        parser.error("--samples must be at least 10")
    if args.progress_interval <= 0:
        parser.error("--progress-interval must be positive")
    r = run(
        args.epochs,
        args.samples,
        args.hidden,
        args.batch_size,
        args.threads,
        args.repeats,
        args.progress_interval,
        args.concurrent,
    )
    print(report(r, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
