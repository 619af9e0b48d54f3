"""The pending-update store: an update survives until the server acknowledged it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from client.errors import FedtrayError
from client.pending import PendingStore, PendingUpdate, _stem, default_pending_dir
from client.workfiles import JobFiles, WorkDir


def _update_file(tmp_path: Path, content: bytes = b"weights-bytes") -> JobFiles:
    """A finished job's output in the work folder, as the trainer leaves it."""
    work = WorkDir(tmp_path / "work")
    work.directory.mkdir(parents=True, exist_ok=True)
    files = work.files(f"work-v3-{'a' * 24}")
    files.write_output(content)
    return files


def _add(
    store: PendingStore,
    src: JobFiles,
    round_id: str = "r-1",
    created: float = 1.0,
    *,
    num_samples: int = 120,
    metrics: dict[str, float] | None = None,
    **options: Any,
) -> PendingUpdate:
    """``src`` kept as an update of ``round_id`` (``options``: add's own, e.g. durable)."""
    return store.add(
        src,
        round_id=round_id,
        task="digits",
        base_version=3,
        num_samples=num_samples,
        metrics={"trainLoss": 0.5} if metrics is None else metrics,
        fmt="safetensors",
        created=created,
        **options,
    )


def _kept(store: PendingStore, tmp_path: Path, *, durable: bool) -> PendingUpdate:
    """A fresh job output kept as round r-1's update."""
    return _add(store, _update_file(tmp_path), num_samples=1, metrics={}, durable=durable)


def test_default_dir_follows_xdg_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_pending_dir() == tmp_path / "data" / "fedtray" / "pending"


@pytest.mark.parametrize("durable", [True, False])
def test_lifecycle_add_list_read_remove(tmp_path: Path, durable: bool) -> None:
    store = PendingStore(tmp_path / "pending")  # made by the first add
    src = _update_file(tmp_path)
    _add(store, src, durable=durable)
    store.wait_durable(store.entries()[0])
    assert not src.output.exists(), "the update must be moved, not copied"
    [entry] = store.entries()
    assert entry.round_id == "r-1"
    assert entry.base_version == 3
    assert entry.num_samples == 120
    assert entry.metrics == {"trainLoss": 0.5}
    assert entry.sha256 == hashlib.sha256(b"weights-bytes").hexdigest()
    assert entry.size == len(b"weights-bytes")
    assert store.read(entry) == b"weights-bytes"
    # A new store over the same directory (a restarted client) sees the same entry.
    assert PendingStore(tmp_path / "pending").get("r-1") == entry
    store.remove(entry)
    assert store.entries() == []
    assert list((tmp_path / "pending").iterdir()) == []
    store.remove(entry)  # idempotent


@pytest.mark.parametrize("case", ["present", "unknown", "data_lost", "sidecar_torn", "other_round"])
def test_get_looks_at_the_rounds_own_files_only(tmp_path: Path, case: str) -> None:
    store = PendingStore(tmp_path / "pending")
    _add(store, _update_file(tmp_path), round_id="r-1")
    [entry] = store.entries()
    leftover = tmp_path / "pending" / ".x.update.tmp"
    leftover.write_bytes(b"crash leftover")  # get() cleans nothing up; entries() does
    asked = "r-1"
    if case == "unknown":
        asked = "r-2"
    elif case == "data_lost":
        entry.path.unlink()
    elif case == "sidecar_torn":
        entry.sidecar.write_text('{"roundId": "r-1", ')
    elif case == "other_round":  # a sidecar under r-1's name that names another round
        data = json.loads(entry.sidecar.read_text())
        key = "roundId" if "roundId" in data else "round_id"
        data[key] = "r-9"
        entry.sidecar.write_text(json.dumps(data))
    got = store.get(asked)
    assert got == (entry if case == "present" else None)
    assert leftover.exists()


def test_entries_are_oldest_first_and_round_ids_need_not_be_file_names(tmp_path: Path) -> None:
    store = PendingStore(tmp_path / "pending")
    _add(store, _update_file(tmp_path, b"b"), round_id="round:2..", created=5.0)
    _add(store, _update_file(tmp_path, b"a"), round_id="..", created=2.0)
    assert [e.round_id for e in store.entries()] == ["..", "round:2.."]


def test_tampered_data_is_refused_on_read(tmp_path: Path) -> None:
    store = PendingStore(tmp_path / "pending")
    _add(store, _update_file(tmp_path))
    [entry] = store.entries()
    entry.path.write_bytes(b"weights-bytez")
    with pytest.raises(FedtrayError) as exc:
        store.read(entry)
    assert exc.value.code == "checksum_mismatch"
    entry.path.write_bytes(b"short")
    with pytest.raises(FedtrayError) as exc:
        store.read(entry)
    assert exc.value.code == "size_mismatch"


def test_crash_leftovers_are_cleaned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "pending"
    store = PendingStore(directory)
    _add(store, _update_file(tmp_path))
    [entry] = store.entries()
    orphan = directory / "abc.update"  # data moved in, then a crash before the sidecar
    orphan.write_bytes(b"x")
    temp = directory / ".abc.json.123.tmp"
    temp.write_bytes(b"{")
    lonely = directory / "def.json"  # sidecar whose data vanished
    lonely.write_text(entry.sidecar.read_text())
    with caplog.at_level(logging.INFO, logger="client.pending"):
        assert [e.round_id for e in store.entries()] == ["r-1"]
    assert not orphan.exists()
    assert not temp.exists()
    assert not lonely.exists()
    assert "never written" in caplog.text
    assert "lost its data file" in caplog.text


def test_corrupt_sidecar_is_set_aside_not_submitted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PendingStore(tmp_path / "pending")
    _add(store, _update_file(tmp_path))
    [entry] = store.entries()
    data = json.loads(entry.sidecar.read_text())
    data["numSamples" if "numSamples" in data else "num_samples"] = -4
    entry.sidecar.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="client.pending"):
        assert store.entries() == []
    assert "unreadable description" in caplog.text
    assert (entry.path.parent / (entry.path.name + ".corrupt")).read_bytes() == b"weights-bytes"


def test_disk_error_raises_and_keeps_the_update(tmp_path: Path) -> None:
    blocker = tmp_path / "pending"
    blocker.write_text("a file where the directory should be")
    store = PendingStore(blocker)
    src = _update_file(tmp_path)
    with pytest.raises(OSError):
        _add(store, src)
    assert src.output.read_bytes() == b"weights-bytes", "nothing may be lost on a disk error"


def test_a_sidecar_that_cannot_be_written_hands_the_update_back(tmp_path: Path) -> None:
    directory = tmp_path / "pending"
    # A directory where the sidecar goes: the data moves in, then the sidecar write fails.
    (directory / f"{_stem('r-1')}.json").mkdir(parents=True)
    store = PendingStore(directory)
    src = _update_file(tmp_path)
    with pytest.raises(OSError):
        _add(store, src)
    assert src.output.read_bytes() == b"weights-bytes", "the update must be back in the work folder"
    assert not (directory / f"{_stem('r-1')}.update").exists()
    assert not list(directory.glob(".*.tmp")), "the staged sidecar is removed"
    assert store.entries() == []


def test_an_output_digest_from_the_trainer_is_recorded_without_reading_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.pending as pending_module

    def no_hashing(path: Path) -> tuple[int, str]:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(pending_module, "_file_sha256", no_hashing)
    store = PendingStore(tmp_path / "pending")
    src = _update_file(tmp_path, b"weights")
    digest = src.write_output(b"weights")
    entry = _add(
        store,
        src,
        "r-9",
        1.0,
        num_samples=5,
        metrics={},
        digest=(7, digest),
    )
    assert (entry.size, entry.sha256) == (7, hashlib.sha256(b"weights").hexdigest())
    assert store.read(entry) == b"weights"
    # A wrong digest is not sent: reading checks the bytes against it.
    wrong = _add(
        store,
        _update_file(tmp_path, b"other"),
        "r-10",
        2.0,
        num_samples=5,
        metrics={},
        digest=(5, "0" * 64),
    )
    # Bytes this process kept are trusted by their file's identity, as when streamed:
    # the receiver's check catches them, and once distrusted they are hashed.
    assert wrong.identity is not None and store.read(wrong) == b"other"
    store.distrust(wrong)
    [_, again] = store.entries()
    with pytest.raises(FedtrayError) as info:
        store.read(again)
    assert info.value.code == "checksum_mismatch"
    # A file changed since it was kept (another identity) is hashed too.
    _add(
        store,
        _update_file(tmp_path, b"third"),
        "r-11",
        3.0,
        num_samples=5,
        metrics={},
        digest=(5, hashlib.sha256(b"third").hexdigest()),
    )
    [*_, third] = store.entries()
    assert third.identity is not None and store.read(third) == b"third"
    before = third.path.stat().st_mtime_ns
    third.path.write_bytes(b"THIRD")
    # The same size; a coarse clock could leave the same mtime: make it move as it would.
    os.utime(third.path, ns=(before + 10**9, before + 10**9))
    with pytest.raises(FedtrayError) as info:
        store.read(third)
    assert info.value.code == "checksum_mismatch"


class _Fsyncs:
    """Records the inode of every regular file fsynced (directories aside)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inodes: list[int] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                self.inodes.append(os.fstat(fd).st_ino)
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("durable", [True, False])
def test_an_entry_is_durable_once_wait_durable_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    fsyncs = _Fsyncs(monkeypatch)
    store = PendingStore(tmp_path / "pending")
    entry = _kept(store, tmp_path, durable=durable)
    inodes = {entry.path.stat().st_ino, entry.sidecar.stat().st_ino}
    if durable:  # fsynced before add returned
        assert store.is_durable(entry) and inodes <= set(fsyncs.inodes)
    store.wait_durable(entry)
    assert store.is_durable(entry) and inodes <= set(fsyncs.inodes)
    assert store.read(entry) == b"weights-bytes"
    # Another store (a restarted client) did not make it durable: it fsyncs it again.
    again = PendingStore(tmp_path / "pending")
    [found] = again.entries()
    assert not again.is_durable(found)
    fsyncs.inodes.clear()
    again.wait_durable(found)
    assert again.is_durable(found) and inodes <= set(fsyncs.inodes)
    again.remove(found)
    assert not again.is_durable(found) and again.entries() == []


def test_a_failed_fsync_is_tried_again_by_wait_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.pending as pending_module

    real = pending_module._make_durable
    calls: list[Path] = []

    def flaky(data_path: Path, sidecar_path: Path) -> None:
        calls.append(data_path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real(data_path, sidecar_path)

    monkeypatch.setattr(pending_module, "_make_durable", flaky)
    store = PendingStore(tmp_path / "pending")
    entry = _kept(store, tmp_path, durable=False)
    store.wait_durable(entry)  # the background attempt failed; this one does it
    assert len(calls) == 2 and store.is_durable(entry)


def test_record_durable_takes_only_the_entrys_own_fsyncs_ended_well(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concurrent.futures

    import client.pending as pending_module

    real = pending_module._make_durable
    failing = [True]

    def flaky(data_path: Path, sidecar_path: Path) -> None:
        if failing[0]:
            raise OSError(5, "Input/output error")
        real(data_path, sidecar_path)

    monkeypatch.setattr(pending_module, "_make_durable", flaky)
    store = PendingStore(tmp_path / "pending")
    entry = _kept(store, tmp_path, durable=False)
    syncing = store.syncing(entry)
    assert syncing is not None
    concurrent.futures.wait([syncing])
    # Failed fsyncs: not recorded (wait_durable tries again).
    assert not store.record_durable(entry, syncing) and not store.is_durable(entry)
    failing[0] = False
    again = _kept(store, tmp_path, durable=False)  # the same round kept again
    newer = store.syncing(again)
    assert newer is not None and newer is not syncing
    pending_fut: concurrent.futures.Future[None] = concurrent.futures.Future()
    done_elsewhere: concurrent.futures.Future[None] = concurrent.futures.Future()
    done_elsewhere.set_result(None)
    # Not ended yet, or ended well but not this entry's fsyncs: not recorded.
    assert not store.record_durable(again, pending_fut)
    assert not store.record_durable(again, done_elsewhere) and not store.is_durable(again)
    concurrent.futures.wait([newer])
    assert store.record_durable(again, newer) and store.is_durable(again)
    assert store.syncing(again) is None


@pytest.mark.parametrize("durable", [True, False])
def test_the_output_enters_the_directory_only_under_the_store_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    # entries() (the uploader's thread) removes a data file without a sidecar as a crash
    # leftover, under the store's lock: an output moved in before the lock is taken could
    # be removed before its sidecar is written -- the trained update lost.
    from client import workfiles

    store = PendingStore(tmp_path / "pending")
    locked_at_move: list[bool] = []
    for name in ("move_into", "_move_synced"):
        real = getattr(workfiles, name)

        def watched(source: Path, target: Path, *args: object, _real=real, **kw: object) -> None:
            if target.parent == store.directory:
                locked_at_move.append(store._lock.locked())
            _real(source, target, *args, **kw)

        monkeypatch.setattr(workfiles, name, watched)
    entry = _kept(store, tmp_path, durable=durable)
    assert locked_at_move == [True]
    store.wait_durable(entry)
    assert [e.round_id for e in store.entries()] == ["r-1"]


def test_a_failed_background_fsync_is_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import client.pending as pending_module

    real = pending_module._make_durable
    calls: list[Path] = []

    def failing_twice(data_path: Path, sidecar_path: Path) -> None:
        calls.append(data_path)
        if len(calls) <= 2:
            raise OSError(5, "Input/output error")
        real(data_path, sidecar_path)

    monkeypatch.setattr(pending_module, "_make_durable", failing_twice)
    store = PendingStore(tmp_path / "pending")
    entry = _kept(store, tmp_path, durable=False)
    with caplog.at_level(logging.WARNING, logger="client.pending"):
        with pytest.raises(OSError, match="Input/output"):
            store.wait_durable(entry)  # the background's failure, then its own
        store.wait_durable(entry)  # tries again; the old failure is not news
    assert len(calls) == 3 and store.is_durable(entry)
    assert caplog.text.count("durable failed") == 1
