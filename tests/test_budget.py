"""The CPU budget's arithmetic (client/budget.py), by table, and the training process's
control keeping it (client/worker_child.py ``_ChildControl``) with injected clocks and
real threads (no torch)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from client.budget import DutyCycle, Sample, duty_sleep, threads_for
from client.worker_child import _ChildControl
from client.worker_messages import Cancel, ChildMessage, Pause, Resume, SetBudget, TrainJob
from tests.waiting import scaled


@pytest.mark.parametrize(
    ("start", "now", "cores", "percent", "sleep"),
    [
        # 1 core at 50 %: 1 s of CPU in 1 s of wall needs 1 s more wall.
        ((0.0, 0.0), (1.0, 1.0), 1, 50, 1.0),
        # already slept enough: 1 s of CPU in 2 s of wall is 50 %.
        ((0.0, 0.0), (2.0, 1.0), 1, 50, 0.0),
        # under budget (a busy machine gave less): never made to catch up.
        ((0.0, 0.0), (4.0, 1.0), 1, 50, 0.0),
        # 25 %: 0.5 s of CPU needs 2 s of wall.
        ((10.0, 3.0), (10.5, 3.5), 1, 25, 1.5),
        # 2 cores at 50 % = one core's worth: 2 s CPU (both threads) in 1 s needs 1 s more.
        ((0.0, 0.0), (1.0, 2.0), 2, 50, 1.0),
        # 4 cores at 25 % allow 1 CPU-second per second.
        ((0.0, 0.0), (1.0, 1.0), 4, 25, 0.0),
        ((0.0, 0.0), (1.0, 3.0), 4, 25, 2.0),
        # 100 % never sleeps, whatever was used.
        ((0.0, 0.0), (1.0, 8.0), 1, 100, 0.0),
        # 1 %: 0.01 s of CPU needs 1 s of wall.
        ((0.0, 0.0), (0.01, 0.01), 1, 1, 0.99),
        # clocks that went nowhere (same sample): nothing to sleep.
        ((5.0, 5.0), (5.0, 5.0), 1, 50, 0.0),
    ],
)
def test_duty_sleep(
    start: tuple[float, float],
    now: tuple[float, float],
    cores: int,
    percent: int,
    sleep: float,
) -> None:
    got = duty_sleep(Sample(*start), Sample(*now), cores, percent)
    assert got == pytest.approx(sleep, abs=1e-9)
    if got > 0:  # the sleep brings the share exactly to the budget
        share = (now[1] - start[1]) / ((now[0] + got - start[0]) * cores)
        assert share == pytest.approx(percent / 100)


@pytest.mark.parametrize(("cores", "percent"), [(0, 50), (1, 0), (1, 101), (-1, 100)])
def test_a_budget_out_of_range_is_refused(cores: int, percent: int) -> None:
    with pytest.raises(ValueError, match="1-100 %"):
        duty_sleep(Sample(0, 0), Sample(1, 1), cores, percent)
    with pytest.raises(ValueError, match="1-100 %"):
        SetBudget(cores, percent)


def _steady(window: float, batch_cpu: float, cores: int, percent: int, steps: int) -> float:
    """The share a process gets that runs batches of ``batch_cpu`` (wall = CPU, one
    thread) and sleeps what the duty cycle says after each; over ``steps`` batches."""
    duty = DutyCycle(window)
    wall = cpu = 0.0
    for _ in range(steps):
        wall += duty.sleep_for(Sample(wall, cpu), cores, percent)
        wall += batch_cpu
        cpu += batch_cpu
    wall += duty.sleep_for(Sample(wall, cpu), cores, percent)
    return cpu / (wall * cores)


@pytest.mark.parametrize(
    ("window", "batch_cpu", "cores", "percent", "steps"),
    [
        (2.0, 0.01, 1, 50, 2000),
        (2.0, 0.003, 1, 25, 5000),
        (2.0, 0.2, 1, 50, 100),  # batches longer than a tenth of the window
        (0.5, 0.01, 1, 10, 1000),
        (2.0, 0.01, 2, 50, 2000),  # one busy thread on a 2-core budget: no sleep needed
    ],
)
def test_the_duty_cycle_keeps_the_share_over_a_long_run(
    window: float, batch_cpu: float, cores: int, percent: int, steps: int
) -> None:
    share = _steady(window, batch_cpu, cores, percent, steps)
    if cores * percent / 100 >= 1:
        assert share == pytest.approx(1 / cores)
    else:
        assert share == pytest.approx(percent / 100, rel=0.02)


def test_the_window_forgets_old_samples_and_a_reset_forgets_all() -> None:
    duty = DutyCycle(window=1.0)
    assert duty.sleep_for(Sample(0.0, 0.0), 1, 50) == 0.0  # the window's start
    # Busy at 100 % for 10 s: only the last ~1 s of history counts.
    sleeps = [duty.sleep_for(Sample(float(t), float(t)), 1, 100) for t in range(1, 11)]
    assert sleeps == [0.0] * 10  # 100 % never sleeps, but the samples are kept
    sleep = duty.sleep_for(Sample(11.0, 11.0), 1, 50)
    assert sleep == pytest.approx(1.0)  # from the sample 1 s back, not 11 s
    duty.reset()
    assert duty.sleep_for(Sample(13.0, 13.0), 1, 50) == 0.0  # no debt from before


@pytest.mark.parametrize(
    ("cores", "job_threads", "cpu_count", "threads"),
    [
        (1, None, 8, 1),
        (4, None, 8, 4),
        (4, 2, 8, 2),  # the job's own thread count caps the budget
        (2, 4, 8, 2),
        (16, None, 8, 8),  # never more than the machine has
        (3, None, 0, 1),  # an unknown core count: one
    ],
)
def test_threads_for(cores: int, job_threads: int | None, cpu_count: int, threads: int) -> None:
    assert threads_for(cores, job_threads, cpu_count) == threads


# -- the control in the training process (real threads, injected CPU clock) ----------------


class FakeCpu:
    """A CPU clock the test moves: the control measures it, not the real one."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def _control(cpu: FakeCpu) -> tuple[_ChildControl, list[ChildMessage], list[int]]:
    sent: list[ChildMessage] = []
    threads: list[int] = []
    control = _ChildControl(sent.append, cpu_clock=cpu)
    job = TrainJob.__new__(TrainJob)
    object.__setattr__(job, "round_id", "r1")
    object.__setattr__(job, "torch_threads", None)
    control.reset(job)

    class _Trainer:
        checkpoints = True

    control.use(_Trainer(), threads.append)  # type: ignore[arg-type]
    return control, sent, threads


def test_the_control_sleeps_the_measured_cpu_and_a_pause_or_cancel_ends_the_sleep() -> None:
    cpu = FakeCpu()
    control, _sent, threads = _control(cpu)
    control.set_budget(SetBudget(1, 50))
    assert control.check() == "run"  # the window's start: no sleep
    assert threads[-1] == 1  # the budget's cores, set at that batch boundary

    cpu.seconds += 0.2  # a "batch" of 0.2 CPU-seconds, in next to no wall time
    started = time.monotonic()
    assert control.check() == "run"
    slept = time.monotonic() - started
    assert 0.2 * 0.9 <= slept <= scaled(1.0)  # ~0.4 s of wall for 0.2 s of CPU, minus wall

    # A long sleep owed (100 CPU-seconds), cut short by a pause, then by a cancel.
    cpu.seconds += 100
    timer = threading.Timer(0.2, control.apply, args=(Pause(),))
    timer.start()
    started = time.monotonic()
    assert control.check() == "pause"
    assert time.monotonic() - started <= scaled(1.0)
    timer.join()
    control.apply(Resume())
    assert control.check() == "run"  # a new window after the pause: nothing owed
    cpu.seconds += 100
    threading.Timer(0.1, control.apply, args=(Cancel(),)).start()
    started = time.monotonic()
    assert control.check() == "cancel"
    assert time.monotonic() - started <= scaled(1.0)


def test_a_new_budget_ends_the_sleep_and_starts_a_new_window() -> None:
    cpu = FakeCpu()
    control, _sent, threads = _control(cpu)
    control.set_budget(SetBudget(1, 10))
    assert control.check() == "run"
    cpu.seconds += 100  # 1000 s owed at 10 %
    threading.Timer(0.2, control.set_budget, args=(SetBudget(2, 100),)).start()
    started = time.monotonic()
    assert control.check() == "run"  # the new budget (100 %) owes nothing
    assert time.monotonic() - started <= scaled(1.0)
    assert threads[-1] == 2  # and its cores were set
    control.set_budget(SetBudget(1, 50))
    cpu.seconds += 100  # spent before the budget: a new window owes nothing for it
    started = time.monotonic()
    assert control.check() == "run"
    assert time.monotonic() - started < 0.5


def test_the_thread_count_is_set_again_only_when_it_changes() -> None:
    cpu = FakeCpu()
    control, _sent, threads = _control(cpu)
    control.set_budget(SetBudget(1, 100))
    assert control.check() == "run"
    assert threads == [1]

    class _Trainer:
        checkpoints = True

    def next_job(torch_threads: int | None, setter: Callable[[int], None]) -> None:
        job = TrainJob.__new__(TrainJob)
        object.__setattr__(job, "round_id", "r2")
        object.__setattr__(job, "torch_threads", torch_threads)
        control.reset(job)
        control.use(_Trainer(), setter)  # type: ignore[arg-type]
        assert control.check() == "run"

    next_job(None, threads.append)  # the same count with the same setter: not set again
    assert threads == [1]
    control.set_budget(SetBudget(2, 100))
    next_job(None, threads.append)
    assert threads == [1, 2]
    next_job(1, threads.append)  # the job's own cap
    assert threads == [1, 2, 1]
    other: list[int] = []
    next_job(1, other.append)  # another way to set them: its count is unknown, set it
    assert other == [1]
