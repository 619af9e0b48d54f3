"""The training process started before the session (:func:`client.worker.start_early`),
its priority from the moment it exists, and the CLI's rule for starting it early.

Real child processes with the simulated trainer (no torch: the fast tier).
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from client.cli import early_start_wanted
from client.config import Settings
from client.worker import Done, Failed, TrainingWorker, start_early
from client.worker_child import low_priority_nice, lower_priority
from tests.test_worker import Events, digits_job, sim_base
from tests.waiting import scaled, wait_until


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_early_child_is_low_priority_at_once_and_adopted_by_the_next_worker(
    tmp_path: Path,
) -> None:
    pid = start_early(simulation=True)
    assert pid is not None
    # Lowered by the parent before start_early returned, not later by the child itself.
    assert psutil.Process(pid).nice() == low_priority_nice(psutil.Process().nice())
    assert start_early(simulation=True) is None, "one early child waits at a time"
    events = Events()
    w = TrainingWorker(events, simulation=True)
    try:
        assert w.pid == pid, "the worker adopts the early child at construction"
        w.submit(digits_job(tmp_path, "early", base_weights_path=sim_base(tmp_path)))
        assert isinstance(events.wait_for(Done, Failed), Done)
        assert w.pid == pid, "the job ran in the early child"
    finally:
        w.shutdown(scaled(10.0))
    wait_until(lambda: _gone(pid), what="the adopted child stopped by shutdown")
    # Adopted: nothing waits any more, so a new early start is possible; a second worker
    # of the same settings built now would adopt it, this one is stopped with its worker.
    again = start_early(simulation=True)
    assert again is not None and again != pid
    other = TrainingWorker(Events(), simulation=True)
    try:
        assert other.pid == again
    finally:
        other.shutdown(scaled(10.0))


def test_a_worker_of_other_settings_stops_the_early_child_and_starts_its_own(
    tmp_path: Path,
) -> None:
    pid = start_early(simulation=True, progress_interval=0.5)
    assert pid is not None
    events = Events()
    w = TrainingWorker(events, simulation=True, progress_interval=3600)
    try:
        wait_until(lambda: _gone(pid), what="the unsuitable early child stopped")
        assert w.pid is None
        w.submit(digits_job(tmp_path, "own", base_weights_path=sim_base(tmp_path)))
        assert isinstance(events.wait_for(Done, Failed), Done)
        assert w.pid not in (None, pid)
    finally:
        w.shutdown(scaled(10.0))


def test_an_adopted_early_child_is_released_when_idle() -> None:
    pid = start_early(simulation=True)
    assert pid is not None
    w = TrainingWorker(Events(), simulation=True, idle_timeout=scaled(1.0))
    try:
        assert w.pid == pid
        wait_until(lambda: w.pid is None and _gone(pid), timeout=scaled(15.0))
    finally:
        w.shutdown(scaled(10.0))


def test_lower_priority_only_ever_lowers() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        own = psutil.Process().nice()
        lower_priority(proc.pid, low_priority_nice(own))
        assert psutil.Process(proc.pid).nice() == low_priority_nice(own)
        lower_priority(proc.pid, own)  # never raised back
        assert psutil.Process(proc.pid).nice() == low_priority_nice(own)
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize(
    ("parent", "child"), [(0, 10), (5, 15), (9, 19), (10, 19), (19, 19), (-5, 5)]
)
def test_low_priority_nice(parent: int, child: int) -> None:
    assert low_priority_nice(parent) == child


@pytest.mark.parametrize(
    ("paused", "schedule", "hour", "wanted"),
    [
        (False, "", 3, True),
        (True, "", 3, False),
        (False, "09:00-17:00", 10, True),
        (False, "09:00-17:00", 20, False),
        (False, "22:00-07:00", 3, True),
        (False, "22:00-07:00", 12, False),
        (True, "09:00-17:00", 10, False),
    ],
)
def test_early_start_wanted(paused: bool, schedule: str, hour: int, wanted: bool) -> None:
    settings = Settings(paused=paused, schedule=schedule)
    now = datetime(2026, 11, 30, hour, 30).astimezone()
    assert early_start_wanted(settings, now) is wanted
