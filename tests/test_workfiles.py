"""client.workfiles: work names keyed by the training work, and stale-file cleanup."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from client.atomicfile import file_identity, write_atomic
from client.protocol import Partition, TrainingConfig
from client.worker_messages import TrainJob
from client.workfiles import WorkDir, remove_stale, stale_work_files, work_key

WORK: dict[str, Any] = {
    "task": "digits",
    "model_params": {"hidden": 16},
    "config": TrainingConfig(epochs=2, batch_size=32, learning_rate=0.05, seed=3),
    "partition": Partition(index=1, count=3),
    "base_version": 4,
    "base_sha256": "ab" * 32,
}
A = "work-v4-" + "a" * 24
B = "work-v3-" + "b" * 24
C = "work-v5-" + "c" * 24
OLD = "round-" + "d" * 24


def test_the_stem_is_stable_and_names_the_base_version() -> None:
    stem = work_key(**WORK)
    assert stem == work_key(**{**WORK, "model_params": {"hidden": 16}})
    assert stem.startswith("work-v4-") and len(stem) == len("work-v4-") + 24
    assert stale_work_files([f"{stem}.ckpt"], keep={stem}) == []  # its own names parse


@pytest.mark.parametrize(
    "change",
    [
        {"task": "synthetic"},
        {"model_params": {"hidden": 17}},
        {"config": TrainingConfig(epochs=2, batch_size=32, learning_rate=0.05, seed=4)},
        {"config": TrainingConfig(epochs=3, batch_size=32, learning_rate=0.05, seed=3)},
        {"partition": Partition(index=2, count=3)},
        {"partition": Partition(index=1, count=3, seed=1)},
        {"partition": Partition(index=1, count=3, scheme="label_skew")},
        {"base_version": 5},
        {"base_sha256": "cd" * 32},
    ],
)
def test_any_change_of_the_work_changes_the_stem(change: dict[str, Any]) -> None:
    assert work_key(**{**WORK, **change}) != work_key(**WORK)


@pytest.mark.parametrize(
    ("names", "kwargs", "stale"),
    [
        # A new job: everything of other work goes, its own checkpoint and output stay.
        (
            [f"{A}.ckpt", f"{A}.safetensors", f"{B}.ckpt", f"{C}.safetensors", f"{OLD}.ckpt"],
            {"keep": {A}},
            [f"{OLD}.ckpt", f"{B}.ckpt", f"{C}.safetensors"],
        ),
        # Interrupted writes (kill -9 mid-write) go, even the kept job's own.
        (
            [f".{A}.ckpt.x1y2.tmp", f".{B}.safetensors.zz.tmp", f"{A}.ckpt"],
            {"keep": {A}},
            [f".{B}.safetensors.zz.tmp", f".{A}.ckpt.x1y2.tmp"],
        ),
        # Busy stems (an output being moved to pending) are never touched.
        (
            [f"{B}.safetensors", f".{B}.safetensors.q.tmp", f"{C}.ckpt"],
            {"keep": {A}, "busy": {B}},
            [f"{C}.ckpt"],
        ),
        # A newer global: work on older bases goes, newer or equal stays.
        (
            [f"{A}.ckpt", f"{B}.ckpt", f"{C}.ckpt", f"{OLD}.safetensors", f".{B}.ckpt.r.tmp"],
            {"below_version": 4},
            [f".{B}.ckpt.r.tmp", f"{OLD}.safetensors", f"{B}.ckpt"],
        ),
        ([f"{B}.ckpt"], {"below_version": 4, "busy": {B}}, []),
        # Names it does not recognise are never deleted.
        (
            ["notes.txt", f"{A}.ckpt.bak", f"{A}.pt", "work-v1-short.ckpt", f"x{A}.ckpt", ".tmp"],
            {},
            [],
        ),
        ([], {"keep": {A}}, []),
    ],
)
def test_stale_work_files(names: list[str], kwargs: dict[str, Any], stale: list[str]) -> None:
    assert stale_work_files(names, **kwargs) == stale


def test_remove_stale_deletes_only_the_stale_files(tmp_path: Path) -> None:
    for name in (f"{A}.ckpt", f"{B}.ckpt", f".{A}.ckpt.abc.tmp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale(tmp_path, keep={A})
    assert sorted(p.name for p in removed) == [f".{A}.ckpt.abc.tmp", f"{B}.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", f"{A}.ckpt"]
    assert remove_stale(tmp_path / "missing", keep={A}) == []


def _job_in(work: WorkDir, base: Path, **changes: Any) -> TrainJob:
    spec: dict[str, Any] = {
        "round_id": "r1",
        "task": WORK["task"],
        "model_params": WORK["model_params"],
        "config": WORK["config"],
        "partition": WORK["partition"],
        "base_weights_path": base,
        "base_version": WORK["base_version"],
        "base_sha256": WORK["base_sha256"],
        **changes,
    }
    return work.job(**spec)


def test_the_work_dir_computes_the_key_once_and_names_the_files_by_it(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    job = _job_in(work, tmp_path / "base.safetensors", checkpoint_interval=7.5)
    assert job.work_key == work_key(**WORK)
    assert job.checkpoint_path == work.directory / f"{job.work_key}.ckpt"
    assert job.output_path == work.directory / f"{job.work_key}.safetensors"
    assert job.base_sha256 == WORK["base_sha256"] and job.checkpoint_interval == 7.5
    # The round id is the envelope, not the work: same key.
    assert _job_in(work, tmp_path / "b", round_id="r2").work_key == job.work_key


def test_the_work_dir_prepares_a_job_and_drops_older_work(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    job = _job_in(work, tmp_path / "base.safetensors")
    work.prepare(job)  # creates the directory
    files = work.files(job.work_key or "")
    files.write_checkpoint(b"ckpt")
    for name in (f"{B}.ckpt", f"{C}.safetensors", f"{OLD}.ckpt", "notes.txt"):
        (work.directory / name).write_bytes(b"x")
    work.prepare(job, busy={C})
    assert sorted(p.name for p in work.directory.iterdir()) == sorted(
        [f"{job.work_key}.ckpt", f"{C}.safetensors", "notes.txt"]
    )
    assert [p.name for p in work.drop_older_than(5)] == [f"{job.work_key}.ckpt"]
    files.write_output(b"out")
    assert files.output.read_bytes() == b"out"
    files.discard_checkpoint()
    files.discard_checkpoint()  # none is fine
    assert sorted(p.name for p in work.directory.iterdir()) == sorted(
        [f"{C}.safetensors", f"{job.work_key}.safetensors", "notes.txt"]
    )


def test_handing_over_the_output_moves_it_out_and_back_on_failure(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    job = _job_in(work, tmp_path / "base.safetensors")
    work.prepare(job)
    files = work.files(job.work_key or "")
    files.write_output(b"trained")
    target = tmp_path / "pending" / "x.update"
    with pytest.raises(RuntimeError), files.handing_over_output(target) as moved:
        assert moved == target and target.read_bytes() == b"trained"
        assert not files.output.exists()
        raise RuntimeError("the receiver could not record it")
    assert files.output.read_bytes() == b"trained" and not target.exists()
    with files.handing_over_output(target):
        pass
    assert target.read_bytes() == b"trained" and not files.output.exists()
    assert list(work.directory.iterdir()) == []


# -- what is fsynced (docs/architecture.md, "What is fsynced and why") -----------------------


class _Fsyncs:
    """Records the inode of every file (not directory) fsynced."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inodes: list[int] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                self.inodes.append(st.st_ino)
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


def test_an_output_written_in_pieces_is_their_bytes_in_order(tmp_path: Path) -> None:
    files = WorkDir(tmp_path / "work").files(f"work-v1-{'a' * 24}")
    pieces = [b"head", memoryview(b"-body-"), bytearray(b"tail")]
    digest = files.write_output(pieces)
    assert files.output.read_bytes() == b"head-body-tail"
    assert digest == hashlib.sha256(b"head-body-tail").hexdigest()


def test_work_files_are_not_fsynced_but_the_handed_over_output_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = _Fsyncs(monkeypatch)
    files = WorkDir(tmp_path / "work").files(f"work-v1-{'a' * 24}")
    digest = files.write_output(b"update")
    files.write_checkpoint(b"checkpoint")
    assert digest == hashlib.sha256(b"update").hexdigest()
    assert fsyncs.inodes == [], "work files can be recomputed: no fsync"
    target = tmp_path / "pending" / "x.update"
    with files.handing_over_output(target):
        assert fsyncs.inodes == [target.stat().st_ino], "durable before it is handed over"
    assert target.read_bytes() == b"update" and not files.output.exists()


def test_file_identity_changes_when_the_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"one", durable=False)
    first = file_identity(path)
    assert file_identity(path) == first
    with path.open("rb") as fh:
        assert file_identity(fh.fileno()) == first
    write_atomic(path, b"two", durable=False)
    assert file_identity(path) != first
