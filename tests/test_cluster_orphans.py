"""A cluster worker never outlives its supervisor: one killed with SIGKILL (no chance to
stop its workers) leaves no worker behind holding the port (server/cluster/worker_cli.py
``watch_parent``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from server.cluster.worker_cli import watch_parent
from tests.cluster_harness import cluster, cluster_flags
from tests.engines import RedisServer
from tests.waiting import poll, scaled


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_watch_fires_only_when_the_parent_changes() -> None:
    async def watch_for(seconds: float) -> bool:
        stop = asyncio.Event()
        task = asyncio.create_task(watch_parent(stop, poll=0.01))
        await asyncio.sleep(seconds)
        task.cancel()
        return stop.is_set()

    assert asyncio.run(watch_for(0.2)) is False  # our parent (pytest's) stays


def test_a_child_whose_parent_dies_stops(tmp_path: Path) -> None:
    # A middle process starts a watcher and dies at once: the watcher is re-parented.
    watcher = (
        "import asyncio, sys\n"
        "from server.cluster.worker_cli import watch_parent\n"
        "async def main():\n"
        "    stop = asyncio.Event()\n"
        "    print('watching', flush=True)\n"
        "    await watch_parent(stop, poll=0.05)\n"
        "    print('stopped', flush=True)\n"
        "asyncio.run(main())\n"
    )
    out = tmp_path / "out"
    middle = (
        "import subprocess, sys\n"
        f"out = open({str(out)!r}, 'w')\n"
        f"p = subprocess.Popen([sys.executable, '-c', {watcher!r}], stdout=out)\n"
        "print(p.pid, flush=True)\n"
        "import time\n"
        f"while 'watching' not in open({str(out)!r}).read(): time.sleep(0.01)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run(
        [sys.executable, "-c", middle],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=scaled(60),
    )
    pid = int(done.stdout.split()[0])
    poll(lambda: _gone(pid), bool, 30, "the orphaned watcher to stop")
    assert out.read_text().split() == ["watching", "stopped"]


# Slow: the supervisor and a worker (it imports torch) on real Redis and PostgreSQL.
@pytest.mark.slow
def test_workers_stop_when_the_supervisor_is_killed(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    flags = cluster_flags(tmp_path, private_redis.url(), postgres_url, workers=2)
    with cluster(tmp_path, private_redis.url(), postgres_url, *flags) as fed:
        pids = poll(fed.worker_pids, lambda p: len(p) == 2, 60, "2 workers")
        fed.srv.kill()  # SIGKILL: the supervisor cannot stop its workers
        for pid in pids.values():
            poll(lambda pid=pid: _gone(pid), bool, 30, f"worker {pid} to stop")
