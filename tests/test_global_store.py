"""GlobalStore: the held global, verified on load, not fsynced, carrying its file identity."""

from __future__ import annotations

import hashlib
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
