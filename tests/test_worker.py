"""TrainingWorker with real child processes: events, control, crashes, idle exit.

The fast tier uses the simulated trainer (its child never imports torch); the tests whose
child trains with torch are marked slow.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from safetensors import safe_open

from client.errors import FedtrayError
from client.protocol import Partition, TrainingConfig, TrainingProgress
from client.trainer import TrainJob
from client.weights import TensorSpec, decode, encode, layout_of
from client.worker import (
    Cancelled,
    Done,
    Failed,
    Paused,
    ProgressEvent,
    ProgressThrottle,
    Resumed,
    TrainingWorker,
    WorkerEvent,
)
from client.worker_messages import LogRecord, TrainProgress
from tests.waiting import scaled, wait_until

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60.0
DIGITS16_LAYOUT = {
    "0.weight": TensorSpec("float32", (16, 64)),
    "0.bias": TensorSpec("float32", (16,)),
    "2.weight": TensorSpec("float32", (10, 16)),
    "2.bias": TensorSpec("float32", (10,)),
}


class Events:
    """Collects worker events and waits for them (with a timeout, never a blind sleep)."""

    def __init__(self) -> None:
        self.items: list[tuple[float, WorkerEvent]] = []
        self.cond = threading.Condition()
        self.threads: set[str] = set()

    def __call__(self, event: WorkerEvent) -> None:
        with self.cond:
            self.items.append((time.monotonic(), event))
            self.threads.add(threading.current_thread().name)
            self.cond.notify_all()

    def clear(self) -> None:
        with self.cond:
            self.items.clear()

    def wait_for(self, *kinds: type, timeout: float = TIMEOUT) -> Any:
        """The first collected event of one of ``kinds``."""
        with self.cond:
            found = self.cond.wait_for(
                lambda: any(isinstance(e, kinds) for _, e in self.items), timeout
            )
            assert found, f"no {kinds} within {timeout} s; got {self.kinds()}"
            return next(e for _, e in self.items if isinstance(e, kinds))

    def of(self, kind: type) -> list[Any]:
        with self.cond:
            return [e for _, e in self.items if isinstance(e, kind)]

    def kinds(self) -> list[str]:
        return [type(e).__name__ for _, e in self.items]


def digits_job(
    tmp: Path, name: str, *, epochs: int = 1, batch: int = 32, **changes: Any
) -> TrainJob:
    job = TrainJob(
        round_id=name,
        task="digits",
        model_params={"hidden": 16},
        config=TrainingConfig(
            epochs=epochs, batch_size=batch, learning_rate=0.02, momentum=0.9, seed=7
        ),
        partition=Partition(index=0, count=1),
        base_weights_path=None,
        output_path=tmp / f"{name}.safetensors",
        checkpoint_path=tmp / f"{name}.ckpt",
        torch_threads=1,
    )
    return replace(job, **changes)


# A job of a few seconds on one core (batch 1): long enough to pause, cancel or kill
# it after its first progress report (0.5 s in).
def long_job(tmp: Path, name: str) -> TrainJob:
    return digits_job(tmp, name, epochs=4, batch=1, checkpoint_path=tmp / "long.ckpt")


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[TrainingWorker, Events]]:
    events = Events()
    worker = TrainingWorker(events, simulation=False)
    yield worker, events
    worker.shutdown(10)


@pytest.fixture
def worker(shared: tuple[TrainingWorker, Events]) -> tuple[TrainingWorker, Events]:
    w, events = shared
    wait_until(lambda: not w.is_busy)
    events.clear()
    return w, events


@pytest.mark.slow
def test_a_job_completes_in_a_niced_child_and_writes_decodable_weights(
    worker: tuple[TrainingWorker, Events], tmp_path: Path
) -> None:
    w, events = worker
    w.submit(digits_job(tmp_path, "simple"))
    done = events.wait_for(Done, Failed)
    assert isinstance(done, Done), done
    assert not w.is_busy  # already idle when Done is delivered
    assert done.result.round_id == "simple" and done.result.num_samples == 1438
    state = decode(done.result.output_path.read_bytes())
    assert layout_of(state) == DIGITS16_LAYOUT
    assert w.pid is not None and w.pid != os.getpid()
    assert psutil.Process(w.pid).nice() >= 10
    assert events.threads == {"fedtray-worker-reader"}


@pytest.mark.slow
def test_busy_worker_refuses_a_second_job(
    worker: tuple[TrainingWorker, Events], tmp_path: Path
) -> None:
    w, events = worker
    w.submit(long_job(tmp_path, "first"))
    with pytest.raises(FedtrayError) as info:
        w.submit(digits_job(tmp_path, "second"))
    assert info.value.code == "busy"
    w.cancel()
    assert isinstance(events.wait_for(Cancelled, Done, Failed), Cancelled)


@pytest.mark.slow
def test_progress_is_throttled_and_pause_resume_is_bit_identical(
    worker: tuple[TrainingWorker, Events], tmp_path: Path
) -> None:
    w, events = worker
    started = time.monotonic()
    w.submit(long_job(tmp_path, "plain"))
    plain = events.wait_for(Done, Failed)
    assert isinstance(plain, Done), plain
    elapsed = time.monotonic() - started
    progress = events.of(ProgressEvent)
    assert 1 <= len(progress) <= 2 * elapsed + 1  # 1 per 0.5 s from the start, the last
    assert plain.progress is None  # it was sent: Done carries none
    messages = [
        TrainingProgress.model_validate({**asdict(p.progress), "state": "training"})
        for p in progress
    ]
    assert messages[-1].fraction == 1.0  # the last one of the round is always sent
    assert len(messages) < 4 * 1438 / 10  # throttled: far fewer than one per batch

    events.clear()
    job = long_job(tmp_path, "paused")
    w.submit(job)
    events.wait_for(ProgressEvent)  # now it is mid-run
    w.pause()
    paused = events.wait_for(Paused, Done, Failed)
    assert paused == Paused(checkpointed=True, round_id="paused")
    assert w.is_paused and w.is_busy
    assert job.checkpoint_path.exists()
    w.resume()
    events.wait_for(Resumed)
    done = events.wait_for(Done, Failed)
    assert isinstance(done, Done), done
    assert events.kinds().index("Paused") < events.kinds().index("Resumed")
    assert done.result.output_path.read_bytes() == plain.result.output_path.read_bytes()
    assert not job.checkpoint_path.exists()


@pytest.mark.slow
def test_cancel_stops_the_job_and_the_worker_goes_on(
    worker: tuple[TrainingWorker, Events], tmp_path: Path
) -> None:
    w, events = worker
    job = long_job(tmp_path, "cancelled")
    w.submit(job)
    events.wait_for(ProgressEvent)
    w.cancel()
    assert events.wait_for(Cancelled, Done, Failed) == Cancelled(round_id="cancelled")
    assert not w.is_busy
    assert not job.output_path.exists() and not job.checkpoint_path.exists()
    events.clear()
    w.submit(digits_job(tmp_path, "after-cancel"))
    assert isinstance(events.wait_for(Done, Failed), Done)


@pytest.mark.slow
def test_kill_9_of_the_child_fails_the_job_and_the_next_job_works(
    worker: tuple[TrainingWorker, Events], tmp_path: Path
) -> None:
    w, events = worker
    w.submit(long_job(tmp_path, "killed"))
    events.wait_for(ProgressEvent)
    pid = w.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    failed = events.wait_for(Failed, Done)
    assert failed == Failed(
        "training_failed",
        "the training process exited unexpectedly (signal 9)",
        "killed",
    )
    assert not w.is_busy
    events.clear()
    w.submit(digits_job(tmp_path, "after-kill"))
    assert isinstance(events.wait_for(Done, Failed), Done)
    assert w.pid not in (None, pid)


@pytest.mark.slow
@pytest.mark.parametrize("mu", [0.0, 0.5])  # 0.5: FedProx, its base taken again in the new child
def test_kill_9_after_a_periodic_checkpoint_resumes_bit_identically(
    worker: tuple[TrainingWorker, Events],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mu: float,
) -> None:
    w, events = worker
    job = digits_job(tmp_path, "periodic", epochs=2, batch=1, checkpoint_interval=0.05)
    job = replace(job, config=job.config.model_copy(update={"proximal_mu": mu}))
    assert job.proximal_mu == mu
    w.submit(replace(job, output_path=tmp_path / "plain.safetensors", checkpoint_interval=0))
    plain = events.wait_for(Done, Failed)
    assert isinstance(plain, Done), plain

    events.clear()
    w.submit(job)
    wait_until(job.checkpoint_path.exists, timeout=TIMEOUT)
    pid = w.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert isinstance(events.wait_for(Failed, Done), Failed)
    assert job.checkpoint_path.exists() and not job.output_path.exists()
    with safe_open(str(job.checkpoint_path), framework="numpy") as fh:
        position = json.loads((fh.metadata() or {})["fedtray.checkpoint"])["position"]
    at = f"epoch {position['epoch'] + 1} step {position['pos']}"  # batch size 1

    events.clear()
    # A fresh child, and the round retried under a new id: the same work resumes.
    with caplog.at_level(logging.INFO, logger="client.trainer"):
        w.submit(replace(job, round_id="periodic-retry"))
        done = events.wait_for(Done, Failed)
    assert isinstance(done, Done), done
    assert w.pid not in (None, pid)
    assert f"resuming round periodic-retry from {at}" in caplog.text
    assert done.result.output_path.read_bytes() == plain.result.output_path.read_bytes()
    assert not job.checkpoint_path.exists()


@pytest.mark.slow
def test_base_weights_of_another_layout_fail_with_the_codec_code(
    worker: tuple[TrainingWorker, Events], tmp_path: Path
) -> None:
    w, events = worker
    base = tmp_path / "base.safetensors"
    base.write_bytes(encode({"fc.weight": np.zeros((16, 64), np.float32)}))
    w.submit(digits_job(tmp_path, "mismatch", base_weights_path=base))
    failed = events.wait_for(Failed, Done)
    assert isinstance(failed, Failed)
    assert failed.code == "layout_mismatch" and failed.round_id == "mismatch"
    assert "fc.weight" in failed.message


@pytest.mark.slow
def test_an_unknown_task_fails_cleanly(
    worker: tuple[TrainingWorker, Events], tmp_path: Path
) -> None:
    w, events = worker
    w.submit(digits_job(tmp_path, "nope", task="no-such-task"))
    failed = events.wait_for(Failed, Done)
    assert isinstance(failed, Failed) and failed.code == "unknown_task"


def test_simulation_idle_timeout_and_restart(tmp_path: Path) -> None:
    events = Events()
    w = TrainingWorker(events, simulation=True, idle_timeout=0.5)
    try:
        assert w.simulation
        base = tmp_path / "base.safetensors"
        original: dict[str, np.ndarray[Any, Any]] = {
            "w": np.ones((4, 3), np.float32),
            "steps": np.arange(3, dtype=np.int64),
        }
        base.write_bytes(encode(original))
        w.submit(digits_job(tmp_path, "sim", base_weights_path=base))
        w.pause()
        assert events.wait_for(Paused, Done, Failed) == Paused(checkpointed=False, round_id="sim")
        w.resume()
        done = events.wait_for(Done, Failed)
        assert isinstance(done, Done), done
        state = decode(done.result.output_path.read_bytes())
        assert layout_of(state) == layout_of(original)
        assert np.array_equal(state["steps"], original["steps"])
        assert 0 < np.abs(state["w"] - 1).max() < 0.01
        pid = w.pid
        assert pid is not None
        # idle for 0.5 s: the child is told to exit
        wait_until(lambda: w.pid is None and not psutil.pid_exists(pid), timeout=15)
        events.clear()
        w.submit(digits_job(tmp_path, "sim2", base_weights_path=base))
        assert isinstance(events.wait_for(Done, Failed), Done)
        assert w.pid not in (None, pid)
    finally:
        w.shutdown(5)
    assert w.pid is None


def test_a_warmed_child_is_started_before_the_job_kept_for_it_and_released_when_idle(
    tmp_path: Path,
) -> None:
    events = Events()
    w = TrainingWorker(events, simulation=True, idle_timeout=scaled(2.0))
    try:
        w.warm()
        pid = w.pid
        assert pid is not None
        wait_until(lambda: psutil.Process(pid).nice() >= 10, what="a low-priority child")
        base = tmp_path / "base.safetensors"
        base.write_bytes(encode({"w": np.ones((2, 2), np.float32)}))
        w.submit(digits_job(tmp_path, "warm", base_weights_path=base))
        assert isinstance(events.wait_for(Done, Failed), Done)
        assert w.pid == pid, "the job must run in the warmed child"
        w.warm()  # idle: keeps the child (and restarts its idle clock)
        assert w.pid == pid
        wait_until(lambda: w.pid is None and not psutil.pid_exists(pid), timeout=15)
    finally:
        w.shutdown(5)


def test_shutdown_of_a_child_without_a_job_does_not_wait_the_whole_timeout(
    tmp_path: Path,
) -> None:
    """A child that reads no command (stopped here, as one importing torch on a busy
    machine would be) and has no job is killed after the short grace, not the timeout."""
    events = Events()
    w = TrainingWorker(events, simulation=True)
    w.warm()
    pid = w.pid
    assert pid is not None
    child = psutil.Process(pid)
    child.suspend()  # SIGSTOP: it will never read Exit
    timeout = scaled(60.0)
    started = time.monotonic()
    w.shutdown(timeout)
    elapsed = time.monotonic() - started
    assert not psutil.pid_exists(pid) or child.status() == psutil.STATUS_ZOMBIE
    assert w.pid is None
    # Killed after NO_JOB_EXIT_GRACE_S (plus the kill itself), far from the whole timeout.
    assert elapsed < timeout / 2, elapsed


@pytest.mark.slow
def test_shutdown_while_training_keeps_the_checkpoint(tmp_path: Path) -> None:
    events = Events()
    w = TrainingWorker(events, simulation=False)
    job = long_job(tmp_path, "interrupted")
    w.submit(job)
    events.wait_for(ProgressEvent)
    pid = w.pid
    assert pid is not None
    w.shutdown(10)
    assert not psutil.pid_exists(pid)
    assert job.checkpoint_path.exists() and not job.output_path.exists()
    with pytest.raises(FedtrayError) as info:
        w.submit(job)
    assert info.value.code == "internal_error"


# -- the simulated trainer: the same seam without torch (fast tier) --------------------


def sim_base(tmp: Path) -> Path:
    base = tmp / "base.safetensors"
    base.write_bytes(encode({"w": np.ones((4, 3), np.float32)}))
    return base


@pytest.fixture(scope="module")
def sim_shared() -> Iterator[tuple[TrainingWorker, Events]]:
    events = Events()
    worker = TrainingWorker(events, simulation=True)
    yield worker, events
    worker.shutdown(10)


@pytest.fixture
def sim(sim_shared: tuple[TrainingWorker, Events]) -> tuple[TrainingWorker, Events]:
    w, events = sim_shared
    wait_until(lambda: not w.is_busy)
    events.clear()
    return w, events


def test_simulated_round_delivers_typed_events_throttled_in_the_child(
    sim: tuple[TrainingWorker, Events], tmp_path: Path
) -> None:
    w, events = sim
    started = time.monotonic()
    w.submit(digits_job(tmp_path, "typed", base_weights_path=sim_base(tmp_path)))
    done = events.wait_for(Done, Failed)
    elapsed = time.monotonic() - started
    assert isinstance(done, Done), done
    assert done.result.round_id == "typed" and done.result.num_samples == 100
    progress = [e.progress for e in events.of(ProgressEvent)]
    assert all(isinstance(p, TrainProgress) and p.round_id == "typed" for p in progress)
    # Throttled to one per 0.5 s from the job's start (plus the last), however long it
    # took; "fewer than one per step" would assume how fast this machine is.
    assert len(progress) <= 2 * elapsed + 1
    # The last progress is sent when any was, else it rides in Done (a short job).
    assert (done.progress is None) == bool(progress)
    last = done.progress or progress[-1]
    assert last.fraction == 1.0 and last.step == last.steps and last.round_id == "typed"
    wire = TrainingProgress.model_validate({**asdict(last), "state": "training"})
    assert wire.round_id == "typed" and wire.batch_size == 32
    assert events.kinds()[-1] == "Done" and events.threads == {"fedtray-worker-reader"}


def test_a_job_within_the_first_progress_interval_sends_no_progress(tmp_path: Path) -> None:
    events = Events()
    w = TrainingWorker(events, simulation=True, progress_interval=3600)
    try:
        w.submit(digits_job(tmp_path, "short", base_weights_path=sim_base(tmp_path)))
        done = events.wait_for(Done, Failed)
    finally:
        w.shutdown(10)
    assert isinstance(done, Done), done
    assert events.of(ProgressEvent) == []  # nothing to the session, nothing to the server
    # The round's last progress rides in Done, for the session's snapshot.
    assert done.progress is not None
    assert (done.progress.round_id, done.progress.fraction) == ("short", 1.0)


def test_simulated_busy_cancel_and_kill_9(
    sim: tuple[TrainingWorker, Events], tmp_path: Path
) -> None:
    w, events = sim
    base = sim_base(tmp_path)
    w.submit(digits_job(tmp_path, "first", base_weights_path=base))
    with pytest.raises(FedtrayError) as info:
        w.submit(digits_job(tmp_path, "second", base_weights_path=base))
    assert info.value.code == "busy"
    w.cancel()
    assert events.wait_for(Cancelled, Done, Failed) == Cancelled(round_id="first")
    assert not w.is_busy and not (tmp_path / "first.safetensors").exists()

    events.clear()
    w.submit(digits_job(tmp_path, "killed", base_weights_path=base))
    w.pause()  # hold it mid-round, so the kill lands while it runs
    assert events.wait_for(Paused, Done, Failed) == Paused(checkpointed=False, round_id="killed")
    pid = w.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert events.wait_for(Failed, Done) == Failed(
        "training_failed", "the training process exited unexpectedly (signal 9)", "killed"
    )
    events.clear()
    w.submit(digits_job(tmp_path, "after-kill", base_weights_path=base))
    assert isinstance(events.wait_for(Done, Failed), Done)
    assert w.pid not in (None, pid)


def test_a_simulated_job_without_base_weights_fails_with_a_code(
    sim: tuple[TrainingWorker, Events], tmp_path: Path
) -> None:
    w, events = sim
    w.submit(digits_job(tmp_path, "no-base"))
    failed = events.wait_for(Failed, Done)
    assert failed == Failed("training_failed", failed.message, "no-base")
    assert "needs the global weights" in failed.message


def test_child_log_records_are_logged_and_unknown_messages_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = Events()
    w = TrainingWorker(events, simulation=True)
    with caplog.at_level(logging.INFO):
        w._handle(LogRecord(logging.INFO, "client.trainer", "resuming round r from epoch 2"))
        w._handle(("progress", {"epoch": 1}))  # the old untyped shape is not an event
    assert events.items == []
    assert any(
        r.name == "client.trainer" and r.getMessage() == "resuming round r from epoch 2"
        for r in caplog.records
    )
    assert "ignoring an unknown message" in caplog.text
    w.shutdown(1)


PARENT_SCRIPT = """
import sys, threading
from pathlib import Path
from client.protocol import Partition, TrainingConfig
from client.trainer import TrainJob
from client.worker import Done, TrainingWorker

out = Path(sys.argv[1])
finished = threading.Event()
seen = []
def on_event(event):
    seen.append(event)
    if not type(event).__name__ == "ProgressEvent":
        finished.set()
worker = TrainingWorker(on_event)
assert not worker.simulation
worker.submit(TrainJob("r1", "digits", {"hidden": 8},
    TrainingConfig(epochs=1, batch_size=64, learning_rate=0.1), Partition(index=0, count=2),
    None, out / "w.safetensors", out / "w.ckpt", 1))
assert finished.wait(60), "no result"
worker.shutdown(10)
assert isinstance(seen[-1], Done), seen[-1]
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.slow
def test_the_parent_process_never_imports_torch(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PARENT_SCRIPT, str(tmp_path)],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch imported: False" in done.stdout
    assert (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize(
    ("times", "sent", "flushed", "returned"),
    [
        # times: the job's start (the throttle is made), then one per report.
        ([0.0, 0.1, 0.2, 0.3], [], [], 2),  # a short job: nothing sent, the last returned
        ([0.0, 0.49], [], [], 0),
        ([0.0, 0.5, 0.6, 1.0, 1.1, 1.49, 1.5], [0, 2, 5], [], None),  # the last was sent
        ([0.0, 2.0, 2.1, 2.2], [0], [2], None),  # a long job: the held-back last is sent
        ([0.0, 0.5, 0.99, 1.0, 1.49], [0, 2], [3], None),
        ([1.0, 1.4, 1.6], [1], [], None),  # the first interval runs from the job's start
    ],
)
def test_progress_throttle(
    times: list[float], sent: list[int], flushed: list[int], returned: int | None
) -> None:
    clock = iter(times)
    out: list[dict[str, Any]] = []
    throttle: ProgressThrottle[dict[str, Any]] = ProgressThrottle(
        out.append, 0.5, clock=lambda: next(clock)
    )
    for i in range(len(times) - 1):
        throttle({"i": i})
    assert [p["i"] for p in out] == sent
    held = throttle.flush()
    assert [p["i"] for p in out] == [*sent, *flushed]
    assert (held and held["i"]) == returned
    assert throttle.flush() is None  # nothing more to send or return
    assert [p["i"] for p in out] == [*sent, *flushed]
