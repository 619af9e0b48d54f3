"""Politeness: does training at the in-use budget leave the user's own work alone?

Run ``python -m benchmarks.politeness`` (``--seconds`` per phase, ``--repeats``; ``--help``).
It writes only to a temporary directory and stops by itself.

One :class:`client.worker.TrainingWorker` trains one long job (the ``digits`` task, batch
1) for the whole run; the job is steered with ``pause``/``resume`` and ``set_budget``
only, as the session does. Measured, in one run:

* **Foreground slowdown.** A CPU-bound foreground workload (a pure-Python loop in its
  own process, pinned to one core where the OS allows: the user's work) counts
  iterations per second for ``--seconds``, alone (training paused) and with training at
  the light budget (1 core at 50 %), interleaved ``--repeats`` times; the ratio of the
  medians is the slowdown (goal <= 5 %).
* **The worker's CPU share per setting** (1 core at 50 %, 1 core at 25 %, full: all
  cores but one at 100 %), each over ``--seconds`` with no foreground: the child's CPU
  time (psutil, all threads) over wall time times the budget's cores (goal: within 10
  points of the setting; the budget is an upper bound, so a busy machine may give less).
* **How fast training gets out of the way**: from ``pause()`` until the child's CPU
  time stops growing, and from ``set_budget`` (full -> 1 core at 25 %) until its CPU
  rate over the next 0.5 s is within the new budget (goal <= 1 s). This is the worker's
  part; the end-to-end path from the user's input adds the activity rules' poll
  interval (measured once those are merged).

On a machine shared with other work the figures are noisy: phases are interleaved and
ratios reported; ``/proc/loadavg`` is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import psutil

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.protocol import Partition, TrainingConfig
from client.worker import Done, Failed, Paused, Resumed, TrainingWorker, WorkerEvent
from client.worker_messages import TrainJob

LIGHT = (1, 50)
SETTINGS = {"1 core at 50 %": (1, 50), "1 core at 25 %": (1, 25)}
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Budget:
    cores: int
    cpu_percent: int


def _foreground(conn: Connection, seconds: float) -> None:
    """The user's work: a pure-Python loop on one core; sends iterations per second."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    deadline = time.perf_counter() + seconds
    count = 0
    x = 0
    while time.perf_counter() < deadline:
        for i in range(1000):
            x = (x * 31 + i) & 0xFFFFFFFF
        count += 1000
    conn.send(count / seconds)
    conn.close()


def foreground_rate(seconds: float) -> float:
    """Iterations per second of one foreground run of ``seconds``."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_foreground, args=(child, seconds), daemon=True)
    proc.start()
    child.close()
    if not parent.poll(seconds + TIMEOUT_S):
        proc.kill()
        raise RuntimeError("the foreground workload did not answer")
    rate: float = parent.recv()
    proc.join(TIMEOUT_S)
    return rate


class Events:
    """The worker's events, waited for by kind."""

    def __init__(self) -> None:
        import threading

        self.cond = threading.Condition()
        self.items: list[WorkerEvent] = []

    def __call__(self, event: WorkerEvent) -> None:
        with self.cond:
            self.items.append(event)
            self.cond.notify_all()

    def wait_for(self, kind: type, timeout: float = TIMEOUT_S) -> None:
        with self.cond:
            if not self.cond.wait_for(
                lambda: any(isinstance(e, kind) for e in self.items), timeout
            ):
                raise RuntimeError(f"no {kind.__name__} within {timeout} s: {self.items}")
            failed = [e for e in self.items if isinstance(e, Failed | Done)]
            if failed:
                raise RuntimeError(f"the training job ended early: {failed}")
            self.items.clear()


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def share(proc: psutil.Process, seconds: float, cores: int) -> float:
    """The child's CPU time over ``seconds`` of wall time times ``cores``."""
    cpu0, wall0 = _cpu(proc), time.monotonic()
    time.sleep(seconds)
    return (_cpu(proc) - cpu0) / ((time.monotonic() - wall0) * cores)


def _samples(proc: psutil.Process, seconds: float) -> list[tuple[float, float]]:
    """(time, child CPU time) every 10 ms for ``seconds``."""
    out = []
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        out.append((now, _cpu(proc)))
        time.sleep(0.01)
    return out


def settle_time(
    samples: list[tuple[float, float]], start: float, rate: float, span: float
) -> float:
    """Seconds from ``start`` to the first sample after which the CPU rate over the next
    ``span`` seconds is at most ``rate`` (CPU-seconds per second); the whole length when
    it never is."""
    for i, (t, c) in enumerate(samples):
        ahead = [s for s in samples[i:] if s[0] - t <= span]
        if ahead[-1][0] - t < span * 0.9:
            break
        if (ahead[-1][1] - c) / (ahead[-1][0] - t) <= rate:
            return max(0.0, t - start)
    return samples[-1][0] - start


def run(seconds: float, repeats: int) -> dict[str, object]:
    cpus = os.cpu_count() or 2
    full = Budget(max(1, cpus - 1), 100)
    tmp = Path(tempfile.mkdtemp(prefix="fedtray-politeness-"))
    events = Events()
    worker = TrainingWorker(events, simulation=False)
    job = TrainJob(
        round_id="politeness",
        task="digits",
        model_params={"hidden": 64},
        config=TrainingConfig(epochs=1000, batch_size=1, learning_rate=0.01, momentum=0.9, seed=1),
        partition=Partition(index=0, count=1),
        base_weights_path=None,
        output_path=tmp / "out.safetensors",
        checkpoint_path=tmp / "job.ckpt",
        checkpoint_interval=0,
    )
    result: dict[str, object] = {"loadavg_start": _loadavg(), "cpus": cpus}
    try:
        worker.set_budget(Budget(*LIGHT))
        worker.submit(job)
        pid = worker.pid
        assert pid is not None
        proc = psutil.Process(pid)
        time.sleep(min(seconds, 2.0))  # past the job's start (model, data)

        alone: list[float] = []
        light: list[float] = []
        for _ in range(repeats):
            worker.pause()
            events.wait_for(Paused)
            alone.append(foreground_rate(seconds))
            worker.resume()
            events.wait_for(Resumed)
            light.append(foreground_rate(seconds))
        result["alone"], result["light"] = alone, light

        shares: dict[str, tuple[float, float]] = {}
        for name, (cores, percent) in [
            *SETTINGS.items(),
            (f"full ({full.cores}x100 %)", (full.cores, 100)),
        ]:
            worker.set_budget(Budget(cores, percent))
            time.sleep(0.5)  # the new budget's first window
            shares[name] = (percent / 100, share(proc, seconds, cores))
        result["shares"] = shares

        # Out of the way: full -> pause, and full -> 1 core at 25 %.
        time.sleep(0.5)
        start = time.monotonic()
        worker.pause()
        samples = _samples(proc, 1.5 + seconds / 4)
        result["pause_s"] = settle_time(samples, start, 0.02, 0.3)
        events.wait_for(Paused)
        worker.set_budget(full)
        worker.resume()
        events.wait_for(Resumed)
        time.sleep(1.0)
        start = time.monotonic()
        worker.set_budget(Budget(1, 25))
        samples = _samples(proc, 2.0 + seconds / 2)
        result["budget_s"] = settle_time(samples, start, 0.25 * 1.4, 0.5)
        worker.cancel()
    finally:
        worker.shutdown(10)
    result["loadavg_end"] = _loadavg()
    return result


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def report(r: dict[str, object], seconds: float, repeats: int) -> str:
    alone, light = r["alone"], r["light"]
    assert isinstance(alone, list) and isinstance(light, list)
    ratio = statistics.median(light) / statistics.median(alone)
    lines = [
        f"loadavg at the start: {r['loadavg_start']}  ({r['cpus']} cores)",
        f"phases: {seconds:g} s each, {repeats} interleaved repeats",
        "foreground it/s alone:      " + " ".join(f"{x / 1e6:.2f}M" for x in alone),
        "foreground it/s with light: " + " ".join(f"{x / 1e6:.2f}M" for x in light),
        f"ratio foreground with light / alone  {ratio:.3f}x  "
        f"(slowdown {100 * (1 - ratio):.1f} %, goal <= 5 %)",
    ]
    shares = r["shares"]
    assert isinstance(shares, dict)
    for name, (want, got) in shares.items():
        verdict = (
            "ok" if abs(got - want) <= 0.10 else ("under (busy machine?)" if got < want else "OVER")
        )
        lines.append(
            f"worker share {name}: {100 * got:.1f} % of its cores "
            f"(setting {100 * want:.0f} %, goal +-10 points: {verdict})"
        )
    lines.append(f"out of the way after pause: {r['pause_s']:.2f} s (goal <= 1 s)")
    lines.append(
        f"out of the way after full -> 1 core at 25 %: {r['budget_s']:.2f} s (goal <= 1 s)"
    )
    lines.append(f"loadavg at the end: {r['loadavg_end']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase (s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved alone/light pairs")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeats < 1:
        parser.error("--seconds must be positive and --repeats at least 1")
    r = run(args.seconds, args.repeats)
    print(report(r, args.seconds, args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
