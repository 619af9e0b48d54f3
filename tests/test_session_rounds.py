"""The session's local rounds (client/session/rounds.py) over a stand-in worker: no
sockets, no processes. What goes to the server and the snapshot for each worker event,
and who touches the work folder."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from client.atomicfile import file_identity
from client.config import Settings
from client.global_store import GlobalWeights
from client.pending import PendingStore
from client.protocol import (
    EV_TRAINING_PROGRESS,
    Partition,
    TrainingCancel,
    TrainingConfig,
    TrainingProgress,
    TrainingStart,
    parse,
)
from client.session.hub import SnapshotHub
from client.session.rounds import Rounds, wire_progress
from client.snapshot import ALLOW, ClientSnapshot, PauseDecision
from client.worker_messages import (
    Done,
    ProgressEvent,
    TrainJob,
    TrainProgress,
    TrainResult,
    WorkerEvent,
)
from client.workfiles import WorkDir, work_key

BATTERY = PauseDecision(allowed=False, reason="battery_low", detail="On battery at 12 %")
P = TrainProgress(
    round_id="r7",
    epoch=2,
    epochs=3,
    step=5,
    steps=9,
    fraction=0.6,
    loss=0.5,
    samples_per_sec=120.0,
    batch_size=8,
)


@pytest.mark.parametrize(
    ("pause", "state", "reason", "detail"),
    [
        (ALLOW, "training", None, None),
        (BATTERY, "paused", "battery_low", "On battery at 12 %"),
        (PauseDecision(allowed=False, reason="user_paused"), "paused", "user_paused", None),
    ],
)
def test_wire_progress_carries_the_position_and_the_pause(
    pause: PauseDecision, state: str, reason: str | None, detail: str | None
) -> None:
    wire = wire_progress(P, pause)
    assert (wire.round_id, wire.epoch, wire.epochs, wire.step, wire.steps) == ("r7", 2, 3, 5, 9)
    assert (wire.fraction, wire.loss, wire.samples_per_sec, wire.batch_size) == (
        0.6,
        0.5,
        120.0,
        8,
    )
    assert (wire.state, wire.pause_reason, wire.pause_detail) == (state, reason, detail)


def test_an_unreportable_progress() -> None:
    with pytest.raises(ValueError):
        wire_progress(TrainProgress("r7", 1, 0, 0, 1, 0.0), ALLOW)  # zero epochs


class _Worker:
    def __init__(self) -> None:
        self.jobs: list[TrainJob] = []
        self.calls: list[str] = []
        self.warmed = threading.Event()

    @property
    def is_busy(self) -> bool:
        return False

    def warm(self) -> None:  # called on a worker thread
        self.calls.append("warm")
        self.warmed.set()

    def set_budget(self, budget: Any) -> None:
        self.calls.append(f"budget {budget.cores}x{budget.cpu_percent}")

    def submit(self, job: TrainJob) -> None:
        self.jobs.append(job)

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def cancel(self) -> None:
        self.calls.append("cancel")

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def _held_global(tmp_path: Path) -> GlobalWeights:
    """A held global v3 of synthetic (its bytes are not weights: the worker is a stand-in)."""
    base = tmp_path / "global.safetensors"
    base.write_bytes(b"base")
    return GlobalWeights(
        version=3,
        task="synthetic",
        path=base,
        size=4,
        sha256="ab" * 32,
        identity=file_identity(base),
    )


def test_a_round_from_start_to_pending_update(tmp_path: Path) -> None:
    asyncio.run(_a_round(tmp_path))


async def _a_round(tmp_path: Path) -> None:
    hub = SnapshotHub(
        ClientSnapshot(settings=Settings(server_url="http://127.0.0.1:1", device_name="t"))
    )
    held = _held_global(tmp_path)
    base = held.path
    work = WorkDir(tmp_path / "work")
    pending = PendingStore(tmp_path / "pending")
    sent: list[tuple[str, dict[str, Any]]] = []
    pause = [ALLOW]
    kicked = asyncio.Event()
    worker = _Worker()
    events: list[WorkerEvent] = []
    rounds = Rounds(
        hub,
        worker_factory=lambda on_event: worker,
        work=work,
        checkpoint_interval=7.5,
        pending=pending,
        held=lambda: held,
        pause=lambda: pause[0],
        emit=lambda event, payload: sent.append((event, payload)),
        kick_uploads=kicked.set,
        state_changed=lambda: None,
    )
    await rounds.start_worker()
    # Registered: the worker warms up in the background (not while paused).
    pause[0] = BATTERY
    rounds.warm_worker()
    pause[0] = ALLOW
    rounds.warm_worker()
    assert await asyncio.to_thread(worker.warmed.wait, 30)
    assert worker.calls == ["warm"]
    worker.calls.clear()
    work.directory.mkdir()
    stale, other = work.directory / f"work-v2-{'e' * 24}.ckpt", work.directory / "notes.txt"
    stale.write_bytes(b"x")
    other.write_bytes(b"x")
    start = TrainingStart(
        round_id="r7",
        task="synthetic",
        config=TrainingConfig(epochs=3, batch_size=8, learning_rate=0.1, proximal_mu=0.25),
        partition=Partition(index=0, count=2),
        base_version=3,
        deadline=time.time() + 3600,
    )
    ack = await rounds.on_training_start(start)
    assert ack.accepted is True, ack

    # The job comes from the work folder's owner, keyed once; other work is gone.
    [job] = worker.jobs
    assert job.work_key == work_key(
        task="synthetic",
        model_params={},
        config=start.config,
        partition=start.partition,
        base_version=3,
        base_sha256=held.sha256,
    )
    assert job.checkpoint_interval == 7.5 and job.base_weights_path == base
    assert job.base_identity == held.identity  # the worker trusts the verified file
    assert job.proximal_mu == 0.25  # FedProx's mu reaches the trainer and the work key
    assert job.work_key != work_key(
        task="synthetic",
        model_params={},
        config=start.config.model_copy(update={"proximal_mu": 0.0}),
        partition=start.partition,
        base_version=3,
        base_sha256=held.sha256,
    )
    assert not stale.exists() and other.exists()
    assert rounds.busy_keys() == {job.work_key}
    assert hub.current.progress == TrainProgress("r7", 0, 3, 0, 1, 0.0)

    def progress_sent() -> list[TrainingProgress]:
        return [parse(TrainingProgress, p) for e, p in sent if e == EV_TRAINING_PROGRESS]

    # No throttle here: every progress the worker sends goes on (the child throttles).
    for step in (1, 2, 3):
        events.append(ProgressEvent(TrainProgress("r7", 1, 3, step, 9, step / 27)))
        rounds.on_worker_event(events[-1])
    assert [(m.step, m.state) for m in progress_sent()] == [(s, "training") for s in (1, 2, 3)]
    assert hub.current.progress == TrainProgress("r7", 1, 3, 3, 9, 3 / 27)  # the one shape
    rounds.on_worker_event(ProgressEvent(TrainProgress("old-round", 1, 3, 4, 9, 0.5)))
    assert len(progress_sent()) == 3, "progress of another round is not reported"

    # A pause: the worker checkpoints, the server hears "paused" at the latest position.
    pause[0] = BATTERY
    rounds.pause_changed(BATTERY, was_allowed=True)
    assert worker.calls == ["pause"]
    last = progress_sent()[-1]
    assert (last.state, last.pause_reason, last.epoch, last.step, last.steps) == (
        "paused",
        "battery_low",
        1,
        3,
        9,
    )
    # One still in the pipe when the pause arrived says "paused" too.
    rounds.on_worker_event(ProgressEvent(TrainProgress("r7", 1, 3, 4, 9, 4 / 27)))
    assert (progress_sent()[-1].state, progress_sent()[-1].step) == ("paused", 4)
    pause[0] = ALLOW
    rounds.pause_changed(ALLOW, was_allowed=False)
    assert worker.calls == ["pause", "resume"]

    # Done: the output is handed from the work folder to the pending store.
    # Its size and digest are the trainer's (hashed as written): recorded, not recomputed.
    files = work.files(job.work_key or "")
    digest = files.write_output(b"trained")
    assert digest == hashlib.sha256(b"trained").hexdigest()
    result = TrainResult("r7", job.output_path, 10, {"trainLoss": 1.0}, 8, digest, 7)
    reported = len(progress_sent())
    final = TrainProgress("r7", 3, 3, 9, 9, 1.0, loss=0.5)  # one the child held back
    rounds.on_worker_event(Done(result, final))
    assert rounds.current is None
    assert hub.current.progress == final  # the snapshot shows the round's end ...
    assert len(progress_sent()) == reported  # ... the server is sent the update, no progress
    await asyncio.wait_for(kicked.wait(), 30)
    entry = pending.get("r7")
    assert entry is not None and pending.read(entry) == b"trained"
    assert (entry.size, entry.sha256) == (7, digest)
    assert not files.output.exists()
    assert rounds.busy_keys() == set()
    await rounds.stop_worker()
    assert worker.calls[-1] == "shutdown"


def test_the_session_handles_exactly_the_events_the_protocol_sends_a_device(
    tmp_path: Path,
) -> None:
    from client.protocol import events
    from client.session import DistributedClient

    client = DistributedClient(
        Settings(device_name="t"), data_dir=tmp_path, settings_file=None
    )  # built, never started: no thread, no network
    handled = set(client._session.handlers())
    assert handled == {spec.name for spec in events.handled_by("device")}
    assert "federation:finished" in handled


def test_a_round_cancelled_while_its_start_is_handled_is_not_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server closes a round while the device is still preparing it (here: its work
    # folder, in a thread, as for a large model): the cancel arrives before the round is
    # current. The start is then refused, not trained -- a device that trained it would
    # refuse every later offer as busy (test_faults' random cuts saw the server retry a
    # round for minutes).
    from client.session import offload

    monkeypatch.setattr(offload, "SMALL_DISK_BYTES", 0)  # disk work in threads
    asyncio.run(_cancelled_while_starting(tmp_path))


async def _cancelled_while_starting(tmp_path: Path) -> None:
    held = _held_global(tmp_path)
    work = WorkDir(tmp_path / "work")
    preparing, release = threading.Event(), threading.Event()
    prepare = work.prepare

    def held_prepare(job: TrainJob, **kwargs: Any) -> None:
        preparing.set()
        release.wait(60)
        prepare(job, **kwargs)

    work.prepare = held_prepare  # type: ignore[method-assign]
    worker = _Worker()
    rounds = Rounds(
        SnapshotHub(
            ClientSnapshot(settings=Settings(server_url="http://127.0.0.1:1", device_name="t"))
        ),
        worker_factory=lambda on_event: worker,
        work=work,
        checkpoint_interval=7.5,
        pending=PendingStore(tmp_path / "pending"),
        held=lambda: held,
        pause=lambda: ALLOW,
        emit=lambda event, payload: None,
        kick_uploads=lambda: None,
        state_changed=lambda: None,
        warm_worker=False,
    )
    await rounds.start_worker()

    def start(round_id: str) -> TrainingStart:
        return TrainingStart(
            round_id=round_id,
            task="synthetic",
            config=TrainingConfig(epochs=3, batch_size=8, learning_rate=0.1),
            partition=Partition(index=0, count=2),
            base_version=3,
            deadline=time.time() + 3600,
        )

    starting = asyncio.create_task(rounds.on_training_start(start("r8")))
    assert await asyncio.to_thread(preparing.wait, 30)
    await rounds.on_training_cancel(TrainingCancel(round_id="r8", reason="the round is closed"))
    release.set()
    ack = await starting
    assert (ack.accepted, ack.reason) == (False, "busy"), ack
    assert worker.jobs == [] and rounds.current is None
    # The next round is trained as usual (the cancel was for that start only).
    preparing.clear()
    ack = await rounds.on_training_start(start("r9"))
    assert ack.accepted is True, ack
    assert [job.round_id for job in worker.jobs] == ["r9"]
    await rounds.stop_worker()
