"""benchmarks/server_capacity.py never leaves a server behind: stop_server ends the server's
whole process group, also processes that ignore SIGTERM (fast tier: no server is started,
plain shell processes stand in for the server and its workers)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks.server_capacity import stop_server
from tests.waiting import scaled, wait_until


def live_members(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that are alive (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields 3 (state) and 5 (pgrp)
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize(
    "script",
    [
        "sleep 300 & sleep 300 & wait",  # a leader and two workers that obey SIGTERM
        "trap '' TERM; sleep 300 & sleep 300 & wait",  # all of them ignore SIGTERM
    ],
)
def test_stop_server_ends_the_whole_group(script: str) -> None:
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True, text=True)
    wait_until(lambda: len(live_members(proc.pid)) == 3, timeout=10, what="three processes")
    stop_server(proc, grace=scaled(1))
    assert proc.returncode is not None
    wait_until(lambda: not live_members(proc.pid), timeout=10, what="the group gone")
