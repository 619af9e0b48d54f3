"""Time from ``python -m client --server URL`` start to registered, as the server sees it.

Run ``python -m benchmarks.startup`` (``--runs``, default 5; ``--warm-cache``; ``--help``).
Everything stays on loopback, in temporary directories (XDG dirs included), and stops by
itself.

It starts the reference server once (``python -m server``, small ``synthetic`` task,
``--min-clients 2`` so no round starts), then for each run starts a fresh
``python -m client --server URL --name startup-N`` subprocess and polls ``/api/status``
every 10 ms until that device is listed as connected; the time from just before the
client's ``Popen`` to that poll is the run's figure. Each run has its own user
directories, so the GPU answer is not cached (a first start after installing fedtray or
torch); ``--warm-cache`` reuses one set of directories so runs after the first find it.
``--compare TREE`` times the client of another source tree too, interleaved run by
run (e.g. the commit before a change, from ``git archive``). Prints each run, the
medians and ``/proc/loadavg`` before and after. Target: median <= 2 s.

``--first-update`` times issue 15's other start-up figure instead: per run, a server
sized as ``benchmarks.vs_flower``'s 0.4 MB workload (``synthetic``, 99,621 floats,
``--min-clients`` = ``--clients``, default 3, one round) and that many clients started
together (with ``FEDTRAY_SIMULATE_OTHER_CPU=0``: the step-aside rule would measure the
other clients' start-up); for each client, the wall time from its start to its log's
``connected to``, ``training process ready`` (its training process has imported torch and
warmed up) and ``update accepted`` lines, and the CPU seconds (user + system, from
``psutil``) its own process and its children (the training process) had used by then
(a tree whose training process does not say when it is ready, e.g. an older commit's for
``--compare``, shows ``n/a`` there).
The slowest client's figures are reported (target: first update <= 5 s). On a shared
machine the CPU seconds are the figure to compare; wall time depends on the load.

Both modes first byte-compile each timed tree's ``client`` and ``server`` packages
(``compileall``, into their ``__pycache__``, as installing does): in a checkout run with
``PYTHONDONTWRITEBYTECODE`` set, every client process and training process would
otherwise compile some 80 modules from source, about 0.3 s of CPU each.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server_harness import server_process, subprocess_env

TARGET_S = 2.0
FIRST_UPDATE_TARGET_S = 5.0
#: vs_flower's 0.4 MB model: features 1024, classes 2, hidden 97 (99,621 floats).
FIRST_UPDATE_TASK = ("features=1024", "classes=2", "samples=10", "hidden=97")
TIMEOUT_S = 120.0
POLL_S = 0.01
REPO_ROOT = Path(__file__).resolve().parent.parent


def loadavg() -> str:
    """The first three fields of ``/proc/loadavg`` (Linux), else ``n/a``."""
    try:
        return " ".join(Path("/proc/loadavg").read_text(encoding="ascii").split()[:3])
    except OSError:
        return "n/a"


def byte_compile(*trees: Path) -> None:
    """Byte-compile the ``client`` and ``server`` packages of ``trees`` (module docstring)."""
    dirs = [str(tree / pkg) for tree in trees for pkg in ("client", "server")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], check=True)


def _registered(status: dict[str, Any], name: str) -> bool:
    return any(d["name"] == name and d["connected"] for d in status["devices"])


def one_run(server: Any, name: str, user_dir: Path, root: Path = REPO_ROOT) -> float:
    """Seconds from starting the client process (from the source tree ``root``) to the
    server listing it as connected."""
    env = subprocess_env(user_dir)
    env["PYTHONPATH"] = str(root)
    t0 = time.monotonic()
    client = subprocess.Popen(
        [sys.executable, "-m", "client", "--server", server.url, "--name", name],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            if client.poll() is not None:
                raise RuntimeError(f"the client exited early with status {client.returncode}")
            if _registered(server.status(), name):
                return time.monotonic() - t0
            if time.monotonic() - t0 > TIMEOUT_S:
                raise TimeoutError(f"{name} did not register within {TIMEOUT_S:g} s")
            time.sleep(POLL_S)
    finally:
        client.terminate()
        try:
            client.wait(30)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait(5)


def run(runs: int, warm_cache: bool, compare: Path | None = None) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"this": []}
    roots = {"this": REPO_ROOT}
    if compare is not None:
        times["compare"] = []
        roots["compare"] = compare
    byte_compile(*roots.values())
    with tempfile.TemporaryDirectory(prefix="fedtray-startup-") as tmp:
        root = Path(tmp)
        args = ("--min-clients", "2", "--log-level", "WARNING")
        with server_process(root / "server", *args) as server:
            for i in range(runs):
                for label, tree in roots.items():  # interleaved: same load for both
                    user_dir = root / (f"{label}" if warm_cache else f"{label}-{i}")
                    seconds = one_run(server, f"{label}-{i}", user_dir, tree)
                    print(f"run {i + 1} ({label}): {seconds:.2f} s", flush=True)
                    times[label].append(seconds)
    return times


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    """CPU seconds (user + system) of ``proc`` itself and of its descendants, now."""
    try:
        own = sum(proc.cpu_times()[:2])
        kids = 0.0
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                kids += sum(child.cpu_times()[:2])
        return own, kids
    except psutil.Error:
        return math.nan, math.nan


def first_update_run(root: Path, clients: int, tree: Path = REPO_ROOT) -> list[dict[str, float]]:
    """One run of ``--first-update``: per client, wall and CPU seconds at registration
    (``reg_*``) and at its first accepted update (``upd_*``)."""
    args = ["--min-clients", str(clients), "--clients-per-round", str(clients)]
    args += ["--rounds", "3", "--evaluate-every", "0", "--partition", "iid"]
    args += ["--round-timeout", "300", "--log-level", "WARNING"]
    for param in FIRST_UPDATE_TASK:
        args += ["--task-param", param]
    marks = {"reg": "connected to ", "ready": "training process ready", "upd": "update accepted"}
    with server_process(root / "server", *args) as server:
        procs: list[tuple[subprocess.Popen[bytes], psutil.Process, Path, float]] = []
        try:
            for i in range(clients):
                env = subprocess_env(root / f"client-{i}")
                env["PYTHONPATH"] = str(tree)
                env["FEDTRAY_SIMULATE_OTHER_CPU"] = "0"
                log_path = root / f"client-{i}.log"
                with log_path.open("wb") as log_file:
                    t0 = time.monotonic()
                    popen = subprocess.Popen(
                        [sys.executable, "-m", "client", "--server", server.url],
                        cwd=tree,
                        env=env,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                    )
                procs.append((popen, psutil.Process(popen.pid), log_path, t0))
            figures: list[dict[str, float]] = [{} for _ in procs]
            while any("reg_wall" not in f or "upd_wall" not in f for f in figures):
                for (popen, proc, log_path, t0), got in zip(procs, figures, strict=True):
                    text = log_path.read_text(encoding="utf-8", errors="replace")
                    for key, needle in marks.items():
                        if f"{key}_wall" not in got and needle in text:
                            got[f"{key}_wall"] = time.monotonic() - t0
                            got[f"{key}_cpu"], got[f"{key}_child_cpu"] = _cpu(proc)
                    if popen.poll() is not None and "upd_wall" not in got:
                        raise RuntimeError(f"a client exited early:\n{text[-2000:]}")
                    if time.monotonic() - t0 > TIMEOUT_S:
                        raise TimeoutError(
                            f"no first update within {TIMEOUT_S:g} s: {figures}:\n{text[-3000:]}"
                        )
                time.sleep(POLL_S * 2)
            return figures
        finally:
            for popen, _, _, _ in procs:
                popen.terminate()
            for popen, _, _, _ in procs:
                try:
                    popen.wait(30)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait(5)


#: The figures of a client in ``--first-update``: wall and CPU seconds at each mark.
_KEYS = tuple(
    f"{mark}_{what}" for mark in ("reg", "ready", "upd") for what in ("wall", "cpu", "child_cpu")
)


def _worst(values: list[float]) -> float:
    """The largest of ``values`` that are known (NaN: none is)."""
    known = [v for v in values if not math.isnan(v)]
    return max(known) if known else math.nan


def _median(values: list[float]) -> float:
    """The median of ``values`` that are known (NaN: none is)."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


def _s(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds:.2f} s"


def first_update(runs: int, clients: int, compare: Path | None, keep: Path | None) -> int:
    """``--first-update``: print each run's slowest client and the medians."""
    roots = {"this": REPO_ROOT} | ({"compare": compare} if compare is not None else {})
    byte_compile(*roots.values())
    slowest: dict[str, list[dict[str, float]]] = {label: [] for label in roots}
    before = loadavg()
    with contextlib.ExitStack() as stack:
        if keep is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fedtray-first-update-"))
        else:
            tmp = str(keep)
        for i in range(runs):
            for label, tree in roots.items():
                load = loadavg()
                figures = first_update_run(Path(tmp) / f"{label}-{i}", clients, tree)
                worst = {k: _worst([f.get(k, math.nan) for f in figures]) for k in _KEYS}
                slowest[label].append(worst)
                print(
                    f"run {i + 1} ({label}, loadavg {load}): registered {worst['reg_wall']:.2f} s "
                    f"(client CPU {worst['reg_cpu']:.2f} s), training process ready "
                    f"{_s(worst['ready_wall'])}, first update "
                    f"{worst['upd_wall']:.2f} s (client CPU {worst['upd_cpu']:.2f} s, "
                    f"training process CPU {worst['upd_child_cpu']:.2f} s)",
                    flush=True,
                )
    print(f"loadavg before: {before}; after: {loadavg()}")
    for label, rows in slowest.items():
        med = {k: _median([r[k] for r in rows]) for k in _KEYS}
        print(
            f"median of the slowest client ({label}): registered {med['reg_wall']:.2f} s, "
            f"CPU {med['reg_cpu']:.2f} s; training process ready {_s(med['ready_wall'])}; "
            f"first update {med['upd_wall']:.2f} s, CPU "
            f"{med['upd_cpu']:.2f} s + training process {med['upd_child_cpu']:.2f} s"
        )
    median = statistics.median(r["upd_wall"] for r in slowest["this"])
    verdict = "meets" if median <= FIRST_UPDATE_TARGET_S else "MISSES"
    print(f"{verdict} target <= {FIRST_UPDATE_TARGET_S:g} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="client starts to time")
    parser.add_argument(
        "--warm-cache", action="store_true", help="keep the user directories between runs"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="another source tree (e.g. an older commit's, from git archive) to time, "
        "interleaved with this one",
    )
    parser.add_argument(
        "--first-update",
        action="store_true",
        help="time start to first update with --clients clients (see the module docstring)",
    )
    parser.add_argument(
        "--keep", type=Path, help="--first-update: keep the clients' logs under this folder"
    )
    parser.add_argument("--clients", type=int, default=3, help="clients for --first-update")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.clients < 1:
        parser.error("--runs and --clients must be at least 1")
    if args.first_update:
        return first_update(args.runs, args.clients, args.compare, args.keep)
    before = loadavg()
    times = run(args.runs, args.warm_cache, args.compare)
    after = loadavg()
    print(f"loadavg before: {before}; after: {after}")
    for label, values in times.items():
        print(
            f"start to registered ({label}): median {statistics.median(values):.2f} s, "
            f"min {min(values):.2f} s, max {max(values):.2f} s over {len(values)} runs"
        )
    median = statistics.median(times["this"])
    verdict = "meets" if median <= TARGET_S else "MISSES"
    print(f"{verdict} target <= {TARGET_S:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
