"""What this machine charges for the same work, by how often a process wakes up for it.

Run ``python -m benchmarks.wakeup_cost`` (defaults: rates 50, 100, 200, 400, 800 per
second, the ones ``benchmarks.server_capacity`` drives at 500 .. 8,000 devices with a 10 s
heartbeat; 4 s each, the list twice, interleaved). One process wakes ``rate`` times a
second from ``time.sleep`` and does the same small piece of pure-Python work each time
(JSON encoding and a dict, about what one heartbeat's handling touches), and the table is
its CPU time (``time.process_time``) per wakeup, the extra over the densest rate of the
same run, and the ratio. The extra is about the same whatever the work's size (a charge
per wake-up, not per unit of work): ``--work`` changes the size.

Why: the server's CPU ms per heartbeat in ``server_capacity`` is higher at 500 devices (a
wakeup of the event loop per heartbeat, 50 a second) than at 8,000 (800 a second, several
heartbeats per wakeup). This measures how much of that the machine itself adds for sparse
wakeups (cold caches, a descheduled virtual CPU, frequency scaling), with no server and
no network at all. Pure computation in one process; nothing is written; stops by itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _work(items: int = 20) -> int:
    """The fixed piece of work done at each wakeup."""
    seen: dict[str, str] = {}
    for i in range(items):
        seen[str(i)] = json.dumps({"deviceId": i, "cpu": [i, i + 1], "ok": True})
    return len(seen)


def cpu_per_wakeup(rate: float, seconds: float, items: int = 20) -> float:
    """CPU microseconds per wakeup of :func:`_work` done ``rate`` times a second."""
    period = 1.0 / rate
    cpu0 = time.process_time()
    wakeups = 0
    due = start = time.monotonic()
    while due - start < seconds:
        _work(items)
        wakeups += 1
        due += period
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return 1e6 * (time.process_time() - cpu0) / wakeups


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rates", default="50,100,200,400,800", help="wakeups per second")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per rate and pass")
    p.add_argument("--passes", type=int, default=2, help="passes over the rates")
    p.add_argument("--work", type=int, default=20, help="items encoded per wakeup")
    args = p.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",") if x]
    print(f"loadavg before: {_loadavg()}")
    samples: dict[float, list[float]] = {rate: [] for rate in rates}
    for _ in range(args.passes):
        for rate in rates:
            samples[rate].append(cpu_per_wakeup(rate, args.seconds, args.work))
    densest = statistics.median(samples[max(rates)])
    print(
        "| wakeups per second | CPU µs per wakeup (median) | extra µs over the densest rate "
        "| ratio to the densest rate |"
    )
    print("|---:|---:|---:|---:|")
    for rate in rates:
        cost = statistics.median(samples[rate])
        print(f"| {rate:g} | {cost:.0f} | {cost - densest:.0f} | {cost / densest:.2f}x |")
    print(f"loadavg after: {_loadavg()}")
    return 0


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    raise SystemExit(main())
