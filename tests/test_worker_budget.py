"""The worker's CPU budget with real child processes: ``TrainingWorker.set_budget``
reaches the running child and every child started later (fast tier: simulated trainer),
and a real torch child keeps it (slow): its measured CPU share over a job stays within
the budget, and the weights are bit-identical to an unbudgeted run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from client.budget import DEFAULT_WINDOW_S
from client.weights import decode, encode
from client.worker import Done, Failed, SetBudget, TrainingWorker
from tests.test_worker import Events, digits_job
from tests.waiting import scaled, wait_until


@dataclass(frozen=True)
class Budget:
    """The session's budget shape (anything with ``cores`` and ``cpu_percent``)."""

    cores: int
    cpu_percent: int


def _kept(caplog: pytest.LogCaptureFixture, words: str) -> int:
    """How many times a child said it keeps the budget ``words``."""
    return sum(
        r.getMessage() == f"keeping a CPU budget of {words}"
        for r in caplog.records
        if r.name == "client.worker_child"
    )


def test_a_budget_reaches_the_running_child_and_every_child_started_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="client")
    events = Events()
    # Long enough that the child's log lines arrive before it is released as idle.
    w = TrainingWorker(events, simulation=True, idle_timeout=scaled(3.0))
    try:
        assert w.budget is None
        with pytest.raises(ValueError, match="1-100 %"):
            w.set_budget(Budget(0, 50))
        w.set_budget(Budget(1, 50))
        assert w.budget == SetBudget(1, 50)
        assert w.pid is None  # remembered; no child started for it
        w.warm()
        w.set_budget(Budget(2, 25))  # to the running (idle) child at once
        wait_until(lambda: _kept(caplog, "1 core at 50 %") == 1, what="the budget in the child")
        wait_until(lambda: _kept(caplog, "2 cores at 25 %") == 1, what="the new budget")
        pid = w.pid
        assert pid is not None
        wait_until(lambda: w.pid is None and not psutil.pid_exists(pid), timeout=20)
        # A fresh child gets the budget before its first job.
        base = tmp_path / "base.safetensors"
        base.write_bytes(encode({"w": np.ones((2, 2), np.float32)}))
        w.submit(digits_job(tmp_path, "sim", base_weights_path=base))
        assert isinstance(events.wait_for(Done, Failed), Done)
        assert w.pid not in (None, pid)
        assert _kept(caplog, "2 cores at 25 %") == 2
        w.set_budget(Budget(2, 25))  # the same budget again: not sent again
        events.clear()
        w.submit(digits_job(tmp_path, "sim2", base_weights_path=base))
        assert isinstance(events.wait_for(Done, Failed), Done)
        assert _kept(caplog, "2 cores at 25 %") == 2
    finally:
        w.shutdown(5)


def _train(
    w: TrainingWorker, events: Events, tmp: Path, name: str, epochs: int
) -> tuple[dict[str, np.ndarray], float, float]:
    """Weights, child CPU seconds and wall seconds of one job (the child is warm)."""
    events.clear()
    pid = w.pid
    assert pid is not None
    proc = psutil.Process(pid)
    cpu0 = sum(proc.cpu_times()[:2])
    wall0 = _now()
    w.submit(digits_job(tmp, name, epochs=epochs, batch=1, checkpoint_path=tmp / f"{name}.ckpt"))
    done = events.wait_for(Done, Failed, timeout=scaled(300))
    wall = _now() - wall0
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    assert isinstance(done, Done), done
    assert w.pid == pid  # the same child: its CPU times cover the job
    return decode(done.result.output_path.read_bytes()), cpu, wall


def _now() -> float:
    import time

    return time.monotonic()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_child_keeps_its_cpu_share_and_the_weights_stay_bit_identical(
    tmp_path: Path,
) -> None:
    events = Events()
    w = TrainingWorker(events, simulation=False)
    try:
        w.warm()
        # Size the job from the work: one unbudgeted epoch's CPU time, then enough epochs
        # that the 50 % job below spans at least 4 duty-cycle windows.
        _, epoch_cpu, _ = _train(w, events, tmp_path, "probe", 1)
        epochs = max(2, math.ceil(4 * DEFAULT_WINDOW_S * 0.5 / max(epoch_cpu, 1e-3)))
        plain, plain_cpu, plain_wall = _train(w, events, tmp_path, "plain", epochs)
        # What this (shared) machine gives the niced child at most.
        available = plain_cpu / plain_wall

        w.set_budget(Budget(1, 50))
        light, light_cpu, light_wall = _train(w, events, tmp_path, "light", epochs)
        share = light_cpu / light_wall
        for key in plain:
            assert plain[key].tobytes() == light[key].tobytes(), key
        # The budget is a ceiling: at most 50 % of one core, within 10 points (the
        # unbudgeted run above had ``available``). How close it comes from below depends on
        # what a shared machine gives the niced child at that moment, so that is measured
        # by benchmarks/politeness.py, not asserted here.
        assert share <= 0.60, (share, available)

        w.set_budget(Budget(1, 20))
        tight, tight_cpu, tight_wall = _train(w, events, tmp_path, "tight", epochs)
        tight_share = tight_cpu / tight_wall
        for key in plain:
            assert plain[key].tobytes() == tight[key].tobytes(), key
        assert tight_share <= 0.30, (tight_share, available)
    finally:
        w.shutdown(10)
