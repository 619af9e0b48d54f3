"""GlobalStore: the held global, verified on load, not fsynced, carrying its file identity."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from client.atomicfile import file_identity
from client.global_store import GlobalStore


def test_save_records_the_identity_without_fsync_and_current_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsynced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        fsynced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = GlobalStore(tmp_path / "global")
    held = store.save(version=2, task="digits", data=b"weights v2")
    assert fsynced == [], "the global can be fetched again: it is not fsynced"
    assert held.identity == file_identity(store.weights_path)
    assert held.sha256 == hashlib.sha256(b"weights v2").hexdigest()
    again = store.current()
    assert again is not None and again.identity == held.identity
    newer = store.save(version=3, task="digits", data=b"weights v3")
    assert newer.identity != held.identity
    # A torn or changed file (e.g. after a power cut) is not held: the server resends it.
    store.weights_path.write_bytes(b"weights v?")
    assert store.current() is None


def _weights_files(store: GlobalStore) -> set[str]:
    # os.listdir: not os.scandir, which a test counts as the store's listings.
    return {name for name in os.listdir(store.directory) if name.endswith(".safetensors")}


def test_a_new_version_never_replaces_a_file_and_the_previous_one_is_kept(
    tmp_path: Path,
) -> None:
    store = GlobalStore(tmp_path / "global")
    v1 = store.save(version=1, task="digits", data=b"weights v1")
    v2 = store.save(version=2, task="digits", data=b"weights v2")
    assert v1.path != v2.path and store.weights_path == v2.path
    # A round that started from v1 still reads the very file it was given.
    assert file_identity(v1.path) == v1.identity and v1.path.read_bytes() == b"weights v1"
    assert _weights_files(store) == {v1.path.name, v2.path.name}
    v3 = store.save(version=3, task="digits", data=b"weights v3")
    # Older than the previous one: deleted once the new version is committed.
    assert _weights_files(store) == {v2.path.name, v3.path.name}
    assert file_identity(v2.path) == v2.identity
    # A new store (a restart) holds what the JSON names, and keeps the rule.
    restarted = GlobalStore(tmp_path / "global")
    held = restarted.current()
    assert held is not None and (held.version, held.path, held.sha256) == (
        3,
        v3.path,
        hashlib.sha256(b"weights v3").hexdigest(),
    )
    v4 = restarted.save(version=4, task="digits", data=b"weights v4")
    assert _weights_files(restarted) == {v3.path.name, v4.path.name}


def test_the_older_layout_is_read_and_replaced_by_named_files(tmp_path: Path) -> None:
    directory = tmp_path / "global"
    directory.mkdir()
    data = b"weights v5"
    (directory / "current.safetensors").write_bytes(data)
    meta = {"version": 5, "task": "digits", "size": len(data)}
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    (directory / "current.json").write_text(json.dumps(meta))
    store = GlobalStore(directory)
    held = store.current()
    assert held is not None and held.version == 5
    assert held.path == directory / "current.safetensors" == store.weights_path
    v6 = store.save(version=6, task="digits", data=b"weights v6")
    assert _weights_files(store) == {"current.safetensors", v6.path.name}  # previous: kept
    v7 = store.save(version=7, task="digits", data=b"weights v7")
    assert _weights_files(store) == {v6.path.name, v7.path.name}


@pytest.mark.parametrize(
    "name",
    ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors", ".hidden", ""],
)
def test_a_record_naming_a_file_outside_the_directory_is_not_held(
    tmp_path: Path, name: str
) -> None:
    store = GlobalStore(tmp_path / "global")
    held = store.save(version=1, task="digits", data=b"weights v1")
    record = json.loads((store.directory / "current.json").read_text())
    assert record["file"] == held.path.name
    (store.directory / "current.json").write_text(json.dumps({**record, "file": name}))
    assert store.current() is None


def test_the_directory_is_listed_once_and_an_undeletable_file_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "global"
    directory.mkdir()
    (directory / "global-v0-leftover.safetensors").write_bytes(b"from an earlier run")
    listed: list[object] = []
    real_scandir, real_unlink = os.scandir, os.unlink

    def scandir(path: object) -> object:
        listed.append(path)
        return real_scandir(path)  # type: ignore[call-overload]

    refuse = {"global-v1-"}

    def unlink(path: str | os.PathLike[str]) -> None:
        if any(Path(path).name.startswith(prefix) for prefix in refuse):
            raise PermissionError(13, "refused", str(path))
        real_unlink(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "unlink", unlink)
    store = GlobalStore(directory)
    v1 = store.save(version=1, task="digits", data=b"weights v1")
    # The first save lists the directory: the leftover of an earlier run goes.
    assert _weights_files(store) == {v1.path.name}
    v2 = store.save(version=2, task="digits", data=b"weights v2")
    v3 = store.save(version=3, task="digits", data=b"weights v3")
    assert len(listed) == 1, "later saves know the directory's weights files"
    # v1 could not be deleted: kept, and deleted by the next save that can.
    assert _weights_files(store) == {v1.path.name, v2.path.name, v3.path.name}
    refuse.clear()
    v4 = store.save(version=4, task="digits", data=b"weights v4")
    assert _weights_files(store) == {v3.path.name, v4.path.name}
    assert len(listed) == 1


def test_the_first_save_removes_temporary_files_an_earlier_run_left_mid_write(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "global"
    directory.mkdir()
    crashed = os.getpid() + 1
    leftovers = [
        f".global-v3-{'a' * 16}.safetensors.{crashed}-0.tmp",  # killed writing weights
        f".current.json.{crashed}-1.tmp",  # killed writing the record
    ]
    kept = [
        f".global-v3-{'b' * 16}.safetensors.{os.getpid()}-7.tmp",  # this process's own
        "notes.tmp",
        ".other.json.1-0.tmp",
    ]
    for name in leftovers + kept:
        (directory / name).write_bytes(b"x" * 10)
    store = GlobalStore(directory)
    v1 = store.save(version=1, task="digits", data=b"weights v1")
    assert sorted(os.listdir(directory)) == sorted([*kept, v1.path.name, "current.json"])
