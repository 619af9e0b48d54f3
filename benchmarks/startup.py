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
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server_harness import server_process, subprocess_env

TARGET_S = 2.0
TIMEOUT_S = 120.0
POLL_S = 0.01
REPO_ROOT = Path(__file__).resolve().parent.parent


def loadavg() -> str:
    """The first three fields of ``/proc/loadavg`` (Linux), else ``n/a``."""
    try:
        return " ".join(Path("/proc/loadavg").read_text(encoding="ascii").split()[:3])
    except OSError:
        return "n/a"


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
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
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
