"""Server capacity: how many heartbeating devices one server holds, and what each costs.

For each size N it starts ``python -m server`` (synthetic task; ``--min-clients`` above N,
so no round starts; ``--heartbeat-interval`` as given) and ``--generators`` load-generator
processes, each holding its share of N raw python-socketio ``AsyncClient`` connections
(websocket, loopback), registered, heartbeating every interval at a random phase (as a
fleet does). After every device has joined and one interval has spread the phases, it
measures over ``--window`` seconds:

* server CPU ms per heartbeat: the server's utime + stime from ``/proc/<pid>/stat`` (its
  whole process tree with ``--workers``) over the window, divided by the heartbeats
  acknowledged in it (Engine.IO's pings fall in the window too and are included);
* heartbeat ack p50/p99 (from each generator, send to ack);
* server RSS per device (RSS with N held minus RSS before the first device, over N);
* devices per core: ``1000 × interval / (CPU ms per heartbeat)``;
* the server's and the generators' CPU % (a generator near 100 % of a core is the limit,
  not the server: the table says so).

``--workers N`` measures the multi-process server instead: a throwaway ``redis-server`` and
PostgreSQL are started (:mod:`benchmarks.cluster_engines`), the server gets ``--workers N
--redis --database --shared-dir``, and Redis's and PostgreSQL's CPU per heartbeat, Redis's
commands per heartbeat and PostgreSQL's statements per second are reported too, with the most
frequent statements of the window. Without it: the single-process server.

After the sizes, the machine's own charge for sparse wakeups is measured in the same run
(:func:`wakeup_baseline`): a process waking at one size's heartbeat rate pays more CPU
for the same work than one waking at the largest size's rate (cold caches, a descheduled
virtual CPU); that extra per wake-up is printed, and the server's CPU ms per heartbeat
less it.

``RLIMIT_NOFILE`` is raised to its hard limit (the server and the generators inherit it).
Everything stays on loopback, in temporary directories, and stops by itself.

    .venv/bin/python -m benchmarks.server_capacity                  # 500 .. 8000 devices
    .venv/bin/python -m benchmarks.server_capacity --sizes 20 --interval 1 --window 2
    .venv/bin/python -m benchmarks.server_capacity --scaling 2000   # 1 worker vs 2

``--scaling N`` measures what a second worker adds: ``--workers 1`` holding N devices and
``--workers 2`` holding 2N, alternated ``--pairs`` times; each deployment's capacity is its
devices over its busiest worker's CPU fraction (the fleet at which that worker fills a
core), and the median ratio of the two capacities is printed (see :func:`scaling`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import socketio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cluster_engines import ClusterEngines, cluster_engines  # noqa: E402
from benchmarks.wakeup_cost import cpu_per_wakeup  # noqa: E402
from tests.server_harness import register_payload, resources  # noqa: E402

#: Longest wait for a generator's report (joining thousands of devices on a loaded machine).
JOIN_TIMEOUT_S = 600.0
LISTENING = re.compile(r"listening on (http://\S+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` from /proc, in seconds (a gone pid counts 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / CLK_TCK


# --------------------------------------------------------------- the load generators


@dataclass
class Beat:
    sent: float  # time.monotonic() (system-wide on Linux)
    rtt: float


async def _generate(url: str, n: int, interval: float, conn: Any, seed: int) -> None:
    rng = random.Random(seed)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    gate = asyncio.Semaphore(32)
    beats: list[Beat] = []
    failed = 0
    stop = asyncio.Event()

    async def join(i: int) -> socketio.AsyncClient | None:
        nonlocal failed
        sio = socketio.AsyncClient(reconnection=False, http_session=session)
        async with gate:
            try:
                await sio.connect(url, transports=["websocket"], wait_timeout=60)
                ack = await sio.call(
                    "device:register",
                    register_payload(str(uuid.uuid4()), f"sim-{seed}-{i}", weights_version=0),
                    timeout=60,
                )
            except Exception:
                failed += 1
                return None
        return sio if isinstance(ack, dict) and ack.get("ok") else None

    async def beat_forever(sio: socketio.AsyncClient) -> None:
        nonlocal failed
        payload = {"state": "idle", "resources": resources()}
        await asyncio.sleep(rng.uniform(0, interval))
        next_at = time.monotonic()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                ack = await sio.call("device:heartbeat", payload, timeout=60)
            except Exception:
                failed += 1
                return
            if isinstance(ack, dict) and ack.get("ok"):
                beats.append(Beat(sent, time.monotonic() - sent))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    joined = [c for c in await asyncio.gather(*(join(i) for i in range(n))) if c is not None]
    loop = asyncio.get_running_loop()
    conn.send(("joined", len(joined), failed))
    beaters = [asyncio.create_task(beat_forever(c)) for c in joined]
    await loop.run_in_executor(None, conn.recv)  # "stop"
    stop.set()
    for task in beaters:
        task.cancel()
    await asyncio.gather(*beaters, return_exceptions=True)
    held = sum(1 for c in joined if c.connected)
    conn.send(("beats", [(b.sent, b.rtt) for b in beats], held, failed))
    await asyncio.gather(*(c.disconnect() for c in joined), return_exceptions=True)
    await session.close()


def _generator_main(url: str, n: int, interval: float, conn: Any, seed: int) -> None:
    raise_nofile()
    asyncio.run(_generate(url, n, interval, conn, seed))


# --------------------------------------------------------------- one size


def start_server(
    tmp: str, n: int, interval: float, workers: int | None, engines: ClusterEngines | None
) -> subprocess.Popen[str]:
    env = dict(os.environ)
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        env[var] = str(Path(tmp) / var.lower())
    args = [sys.executable, "-m", "server", "--port", "0", "--task", "synthetic"]
    args += ["--min-clients", str(n + 1), "--clients-per-round", str(n + 1)]
    args += ["--heartbeat-interval", str(interval), "--state-dir", str(Path(tmp) / "state")]
    args += ["--log-level", "WARNING"]
    if workers is not None:
        assert engines is not None
        args += ["--workers", str(workers), "--redis", engines.redis_url]
        args += ["--database", engines.database_url, "--shared-dir", str(Path(tmp) / "shared")]
    # Its own process group (and session): stop_server() ends it and every worker it
    # started, whatever way this benchmark ends; Ctrl-C in the terminal reaches only us.
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def stop_server(proc: subprocess.Popen[str], grace: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; workers of its group may still linger.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


def _recv(pipe: Any, timeout: float, what: str) -> Any:
    """The next message on ``pipe``; RuntimeError when none comes within ``timeout``."""
    if not pipe.poll(timeout):
        raise RuntimeError(f"no {what} from a load generator within {timeout:g} s")
    return pipe.recv()


def measure(
    n: int, *, interval: float, window: float, generators: int, workers: int | None
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        engines = stack.enter_context(cluster_engines()) if workers is not None else None
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        return _measure(tmp, engines, n, interval, window, generators, workers)


def _engine_counters(engines: ClusterEngines | None) -> tuple[float, float, int, int]:
    """Redis CPU s, PostgreSQL CPU s, Redis commands, PostgreSQL statements (zeros
    without engines)."""
    if engines is None:
        return 0.0, 0.0, 0, 0
    return (
        engines.redis_cpu_s(),
        engines.postgres_cpu_s(),
        engines.redis_commands(),
        engines.pg_calls(),
    )


def _measure(
    tmp: str,
    engines: ClusterEngines | None,
    n: int,
    interval: float,
    window: float,
    generators: int,
    workers: int | None,
) -> dict[str, Any]:
    proc = start_server(tmp, n, interval, workers, engines)
    pipes: list[Any] = []
    gens: list[mp.process.BaseProcess] = []
    clean = False
    try:
        assert proc.stdout is not None
        url = next((m.group(1) for line in proc.stdout if (m := LISTENING.search(line))), None)
        if url is None:
            raise RuntimeError("the server did not start")
        server = psutil.Process(proc.pid)

        def tree() -> list[int]:
            return [proc.pid, *(c.pid for c in server.children(recursive=True))]

        def rss() -> int:
            return sum(psutil.Process(p).memory_info().rss for p in tree())

        rss_before = rss()
        ctx = mp.get_context("spawn")
        shares = [n // generators + (1 if i < n % generators else 0) for i in range(generators)]
        for i, share in enumerate(shares):
            here, there = ctx.Pipe()
            gen = ctx.Process(target=_generator_main, args=(url, share, interval, there, i))
            gen.start()
            pipes.append(here)
            gens.append(gen)
        t_join = time.monotonic()
        joined = [_recv(pipe, JOIN_TIMEOUT_S, "join report") for pipe in pipes]
        join_s = time.monotonic() - t_join
        held = sum(j[1] for j in joined)
        time.sleep(interval)  # every device has sent its first heartbeat: phases spread
        gen_procs = [psutil.Process(g.pid) for g in gens if g.pid is not None]
        for p in gen_procs:
            p.cpu_percent(None)
        if engines is not None:
            engines.pg_reset()  # the statements of the window alone
        eng0 = _engine_counters(engines)
        pids = tree()
        t0, per0 = time.monotonic(), {pid: cpu_seconds([pid]) for pid in pids}
        time.sleep(window)
        t1, per1 = time.monotonic(), {pid: cpu_seconds([pid]) for pid in pids}
        cpu0, cpu1 = sum(per0.values()), sum(per1.values())
        # The busiest worker (cluster mode: a child of the supervisor; else the server).
        workers_cpu = [per1[pid] - per0[pid] for pid in (pids[1:] if workers else pids)]
        eng1 = _engine_counters(engines)
        pg_top = engines.pg_top(5) if engines is not None else []
        gen_cpu = max(p.cpu_percent(None) for p in gen_procs)
        rss_held = rss()
        for pipe in pipes:
            pipe.send("stop")
        results = [_recv(pipe, JOIN_TIMEOUT_S, "results") for pipe in pipes]
        load = _loadavg()
        clean = True
    finally:
        for gen in gens:
            gen.join(60 if clean else 0)  # told to stop: they disconnect and exit
            if gen.is_alive():
                gen.kill()
                gen.join(10)
        stop_server(proc)
    rtts = sorted(rtt for r in results for sent, rtt in r[1] if t0 <= sent < t1)
    beats = len(rtts)
    cpu_ms = 1000 * (cpu1 - cpu0)
    per_beat = cpu_ms / beats if beats else float("nan")
    return {
        "n": n,
        "held": sum(r[2] for r in results),
        "joined": held,
        "failed": sum(j[2] for j in joined) + sum(r[3] for r in results),
        "join_s": join_s,
        "beats_per_s": beats / (t1 - t0),
        "server_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "ms_per_beat": per_beat,
        "p50_ms": 1000 * statistics.median(rtts) if rtts else float("nan"),
        "p99_ms": 1000 * rtts[int(0.99 * (beats - 1))] if rtts else float("nan"),
        "rss_kb_per_device": (rss_held - rss_before) / 1024 / max(held, 1),
        "devices_per_core": 1000 * interval / per_beat if beats and per_beat > 0 else float("nan"),
        "generator_cpu_pct": gen_cpu,
        "busiest_worker_cpu_pct": 100 * max(workers_cpu) / (t1 - t0),
        "loadavg": load,
        "redis_ms_per_beat": 1000 * (eng1[0] - eng0[0]) / beats if beats else float("nan"),
        "pg_ms_per_beat": 1000 * (eng1[1] - eng0[1]) / beats if beats else float("nan"),
        "redis_cmds_per_beat": (eng1[2] - eng0[2]) / beats if beats else float("nan"),
        "pg_statements_per_s": (eng1[3] - eng0[3]) / (t1 - t0),
        "pg_top": pg_top,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--sizes", default="500,1000,2000,4000,8000", help="device counts")
    p.add_argument("--interval", type=float, default=10.0, help="heartbeat interval, s")
    p.add_argument("--window", type=float, default=20.0, help="measuring window, s")
    p.add_argument("--generators", type=int, default=2, help="load-generator processes")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="cluster mode: this many workers on a throwaway Redis and PostgreSQL "
        "(default: the single-process server)",
    )
    p.add_argument(
        "--scaling",
        type=int,
        default=None,
        metavar="N",
        help="instead of --sizes: --workers 1 holding N devices against --workers 2 "
        "holding 2N, alternated --pairs times (the cluster's scaling, see the module)",
    )
    p.add_argument("--pairs", type=int, default=2, help="with --scaling: alternated pairs")
    args = p.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so measure()'s cleanup stops the server and generators.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.scaling is not None:
        return scaling(args.scaling, args.pairs, args.interval, args.window, args.generators)
    cluster = args.workers is not None
    print(f"open files limit: {raise_nofile()}; loadavg before: {_loadavg()}")
    mode = f"cluster mode, {args.workers} worker(s)" if cluster else "single process"
    print(f"server: {mode}")
    engine_head = (
        " Redis CPU ms per heartbeat | PostgreSQL CPU ms per heartbeat "
        "| Redis commands per heartbeat | PostgreSQL statements/s |"
        if cluster
        else ""
    )
    print(
        "| devices | held | join s | heartbeats/s | server CPU | CPU ms per heartbeat "
        "| ack p50 / p99 ms | RSS KB per device | devices per core | busiest generator CPU "
        "| loadavg 1/5/15 min at the end |" + engine_head
    )
    print(
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" * 4 if cluster else "")
    )
    tops: list[tuple[int, list[tuple[int, str]]]] = []
    costs: list[tuple[int, float, float]] = []  # devices, heartbeats/s, CPU ms per heartbeat
    for n in (int(x) for x in args.sizes.split(",") if x):
        r = measure(
            n,
            interval=args.interval,
            window=args.window,
            generators=args.generators,
            workers=args.workers,
        )
        engines = (
            f" {r['redis_ms_per_beat']:.3f} | {r['pg_ms_per_beat']:.3f} | "
            f"{r['redis_cmds_per_beat']:.2f} | {r['pg_statements_per_s']:.1f} |"
            if cluster
            else ""
        )
        print(
            f"| {n} | {r['held']} | {r['join_s']:.1f} | {r['beats_per_s']:.0f} | "
            f"{r['server_cpu_pct']:.0f} % | {r['ms_per_beat']:.3f} | "
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {r['rss_kb_per_device']:.0f} | "
            f"{r['devices_per_core']:.0f} | {r['generator_cpu_pct']:.0f} % | {r['loadavg']} |"
            + engines,
            flush=True,
        )
        tops.append((n, r["pg_top"]))
        costs.append((n, r["beats_per_s"], r["ms_per_beat"]))
    wakeup_baseline(costs, seconds=min(3.0, args.window))
    for n, top in tops if cluster else []:
        print(f"most frequent PostgreSQL statements at {n} devices (calls in the window):")
        for calls, query in top:
            print(f"  {calls:>7}  {query}")
    print(f"loadavg after: {_loadavg()}")
    return 0


def wakeup_baseline(costs: list[tuple[int, float, float]], seconds: float) -> None:
    """This machine's charge for sparse wakeups, measured in the same run, beside the
    server's cost (:mod:`benchmarks.wakeup_cost`: the same small piece of work done at
    each size's heartbeat rate and at the largest size's rate, interleaved twice): the
    extra CPU per wake-up the machine charges at the sparser rate, and the server's CPU
    per heartbeat less that extra (one wake-up per heartbeat at the sparse rates)."""
    if not costs:
        return
    rates = [max(rate, 1.0) for _, rate, _ in costs]
    samples: list[list[float]] = [[] for _ in rates]
    for _ in range(2):
        for i, rate in enumerate(rates):
            samples[i].append(cpu_per_wakeup(rate, seconds))
    densest = statistics.median(samples[rates.index(max(rates))])
    print(
        "the machine's extra CPU for sparse wakeups (same run, benchmarks.wakeup_cost): the "
        "same work at each size's heartbeat rate, against the largest size's rate"
    )
    print(
        "| devices | heartbeats/s | extra CPU µs per wake-up | CPU ms per heartbeat "
        "| CPU ms per heartbeat less the extra |"
    )
    print("|---:|---:|---:|---:|---:|")
    for (n, rate, cost), runs in zip(costs, samples, strict=True):
        extra = statistics.median(runs) - densest
        print(f"| {n} | {rate:.0f} | {extra:.0f} | {cost:.3f} | {cost - extra / 1000:.3f} |")


def scaling(n: int, pairs: int, interval: float, window: float, generators: int) -> int:
    """``--workers 1`` at ``n`` devices against ``--workers 2`` at ``2n``, ``pairs`` times.

    A deployment's capacity is the fleet at which its busiest worker fills a core:
    ``devices / busiest worker's CPU fraction``; the ratio of the two capacities is what
    the second worker adds (2.0: it doubles what one holds). CPU ms per heartbeat of the
    whole tree is printed beside it (the same in both: no cost that grows per worker).
    """
    print(f"open files limit: {raise_nofile()}; loadavg before: {_loadavg()}")
    print(f"scaling: --workers 1 at {n} devices against --workers 2 at {2 * n}")
    print(
        "| pair | workers | devices | held | CPU ms per heartbeat | busiest worker CPU "
        "| capacity (devices at a full core) | ack p50 / p99 ms | loadavg 1/5/15 min |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    ratios: list[float] = []
    cost_ratios: list[float] = []
    for pair in range(1, pairs + 1):
        runs = []
        for workers, devices in ((1, n), (2, 2 * n)):
            r = measure(
                devices,
                interval=interval,
                window=window,
                generators=generators,
                workers=workers,
            )
            busiest = r["busiest_worker_cpu_pct"] / 100
            capacity = r["held"] / busiest if busiest > 0 else float("nan")
            runs.append((capacity, r["ms_per_beat"]))
            print(
                f"| {pair} | {workers} | {devices} | {r['held']} | {r['ms_per_beat']:.3f} | "
                f"{100 * busiest:.1f} % | {capacity:,.0f} | "
                f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {r['loadavg']} |",
                flush=True,
            )
        ratios.append(runs[1][0] / runs[0][0])
        cost_ratios.append(runs[1][1] / runs[0][1])
    print(
        f"capacity --workers 2 / --workers 1: {statistics.median(ratios):.2f}x (median of "
        f"{pairs}: {', '.join(f'{x:.2f}' for x in ratios)})"
    )
    print(
        f"CPU ms per heartbeat --workers 2 / --workers 1: {statistics.median(cost_ratios):.2f}x "
        f"(median of {pairs}: {', '.join(f'{x:.2f}' for x in cost_ratios)})"
    )
    print(f"loadavg after: {_loadavg()}")
    return 0


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    raise SystemExit(main())
