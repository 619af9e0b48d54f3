"""The uploader against an in-process server side (a real BlobStore that verifies what it
takes): a large update is streamed from its pending file, a small one inline, and one whose
file no longer matches what was recorded is discarded without the server ever completing
it."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from client.config import Settings
from client.errors import FedtrayError
from client.pending import PendingStore, PendingUpdate
from client.protocol import (
    EV_BLOB_CHUNK,
    EV_BLOB_STATUS,
    EV_WEIGHTS_SUBMIT,
    BlobChunk,
    BlobStatus,
    Limits,
    SubmitAccepted,
    WeightsSubmit,
    error_ack,
    parse,
)
from client.session.hub import SnapshotHub
from client.session.uploader import Uploader
from client.snapshot import ClientSnapshot
from client.transfer import BlobStore
from client.workfiles import WorkDir
from tests.waiting import scaled, wait_until_async

CHUNK = 1000
BIG = bytes(range(256)) * 40  # 10,240 bytes: 11 chunks
SMALL = b"small update"


class Server:
    """Routes the uploader's events to a BlobStore; takes (and verifies) submitted weights."""

    def __init__(self) -> None:
        self.blobs = BlobStore(max_chunk_bytes=CHUNK, max_blob_bytes=1 << 20)
        self.chunks: list[int] = []
        self.taken: list[bytes] = []

    async def call(self, event: str, payload: dict[str, Any], timeout: float) -> Any:
        await asyncio.sleep(0)
        try:
            if event == EV_BLOB_STATUS:
                return self.blobs.status("dev", parse(BlobStatus, payload).blob_id, 0).to_wire()
            if event == EV_BLOB_CHUNK:
                chunk = parse(BlobChunk, payload)
                self.chunks.append(chunk.offset)
                return self.blobs.accept_chunk("dev", chunk, 0).to_wire()
            assert event == EV_WEIGHTS_SUBMIT
            sub = parse(WeightsSubmit, payload)
            self.taken.append(bytes(self.blobs.take("dev", sub.weights)))
            return SubmitAccepted(round_id=sub.round_id, received=len(self.taken)).to_wire()
        except FedtrayError as exc:
            return error_ack(exc.code, exc.message)


def _keep(
    tmp_path: Path,
    pending: PendingStore,
    content: bytes,
    *,
    durable: bool = True,
    round_id: str = "r-1",
    created: float = 1.0,
) -> None:
    work = WorkDir(tmp_path / "work")
    work.directory.mkdir(parents=True, exist_ok=True)
    files = work.files(f"work-v3-{'a' * 24}")
    files.write_output(content)
    pending.add(
        files,
        round_id=round_id,
        task="synthetic",
        base_version=3,
        num_samples=10,
        metrics={},
        fmt="safetensors",
        created=created,
        durable=durable,
    )


def _kick(pending: PendingStore) -> tuple[Server, SnapshotHub, list[asyncio.Task[None]]]:
    """An uploader over ``pending`` talking to a new Server, kicked (call in a loop): the
    server, the snapshot hub and the tasks the uploader spawned."""
    uploader, server, hub, tasks = _uploader(pending)
    uploader.kick()
    return server, hub, tasks


def _uploader(
    pending: PendingStore,
) -> tuple[Uploader, Server, SnapshotHub, list[asyncio.Task[None]]]:
    """An uploader over ``pending`` talking to a new Server (call in a loop), not kicked;
    the tasks it spawns are collected in the list returned."""
    server = Server()
    hub = SnapshotHub(
        ClientSnapshot(settings=Settings(server_url="http://127.0.0.1:1", device_name="t"))
    )
    tasks: list[asyncio.Task[None]] = []

    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        tasks.append(asyncio.ensure_future(coro))
        return tasks[-1]

    uploader = Uploader(
        hub,
        pending,
        caller=lambda: server.call,
        spawn=spawn,
        limits=lambda: Limits(max_chunk_bytes=CHUNK, max_inflight_chunks=3),
        state_changed=lambda: None,
    )
    return uploader, server, hub, tasks


async def _upload(tmp_path: Path, pending: PendingStore) -> tuple[Server, SnapshotHub]:
    server, hub, tasks = _kick(pending)
    await asyncio.gather(*tasks)
    return server, hub


@pytest.mark.parametrize("content", [BIG, SMALL])
def test_an_update_is_sent_taken_verified_and_removed(tmp_path: Path, content: bytes) -> None:
    pending = PendingStore(tmp_path / "pending")
    _keep(tmp_path, pending, content)
    server, hub = asyncio.run(_upload(tmp_path, pending))
    assert server.taken == [content]
    # Large: streamed as chunks; small: inline, no blob at all.
    assert server.chunks == (list(range(0, len(BIG), CHUNK)) if content is BIG else [])
    assert pending.entries() == []
    assert hub.current.rounds_completed == 1


@pytest.mark.parametrize("content", [BIG, SMALL])
def test_an_update_is_sent_while_it_is_made_durable_and_completed_only_once_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    # The entry's fsyncs are held back; the uploader sends every chunk but the last, and
    # neither the last byte nor the weights:submit goes before the entry is durable.
    release = threading.Event()
    real_fsync = os.fsync
    synced: list[int] = []

    def held_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            assert release.wait(scaled(30)), "never released"
            synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    pending = PendingStore(tmp_path / "pending")
    _keep(tmp_path, pending, content, durable=False)  # returns with its fsyncs held
    [entry] = pending.entries()
    assert not pending.is_durable(entry) and synced == []
    inodes = {entry.path.stat().st_ino, entry.sidecar.stat().st_ino}
    waiting = threading.Event()
    real_wait = pending.wait_durable

    def wait_durable(update: PendingUpdate) -> None:
        waiting.set()
        real_wait(update)

    real_syncing = pending.syncing

    def syncing(update: PendingUpdate) -> Any:
        waiting.set()  # the uploader awaits the fsyncs under way
        return real_syncing(update)

    monkeypatch.setattr(pending, "wait_durable", wait_durable)
    monkeypatch.setattr(pending, "syncing", syncing)

    async def run() -> Server:
        server, _hub, tasks = _kick(pending)
        await wait_until_async(waiting.is_set, what="the uploader waiting for durability")
        if content is BIG:
            # Everything before the last piece is on its way or in; the last never left.
            await wait_until_async(
                lambda: len(server.chunks) == len(BIG) // CHUNK, what="the chunks before"
            )
            assert len(BIG) - len(BIG) % CHUNK not in server.chunks
        assert server.blobs.bytes_held() < len(BIG) and server.taken == []
        release.set()
        await asyncio.gather(*tasks)
        return server

    server = asyncio.run(run())
    assert server.taken == [content]
    assert inodes <= set(synced)  # the data and the sidecar were made durable
    assert pending.entries() == []


@pytest.mark.parametrize("content", [BIG, SMALL])
def test_an_update_that_cannot_be_made_durable_is_kept_not_completed_nor_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    import client.pending as pending_module
    import client.session.uploader as uploader_module

    monkeypatch.setattr(uploader_module, "upload_retry_delay", lambda failures: None)
    tries: list[Path] = []

    def refuse(data_path: Path, sidecar_path: Path) -> None:
        tries.append(data_path)
        raise OSError(5, "Input/output error")

    # Every fsync of the update fails: on the sync thread and when tried again.
    monkeypatch.setattr(pending_module, "_make_durable", refuse)
    pending = PendingStore(tmp_path / "pending")
    _keep(tmp_path, pending, content, durable=False)
    server, hub = asyncio.run(_upload(tmp_path, pending))
    assert tries and server.taken == [] and server.blobs.bytes_held() < len(BIG)
    assert [e.round_id for e in pending.entries()] == ["r-1"]  # kept for a later try
    assert hub.current.rounds_completed == 0


def test_an_entry_this_process_did_not_make_durable_is_fsynced_before_it_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left by an earlier run (here: another store) -- its fsyncs may never have run.
    _keep(tmp_path, PendingStore(tmp_path / "pending"), BIG, durable=False)
    real_fsync = os.fsync
    synced: list[int] = []

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    pending = PendingStore(tmp_path / "pending")
    [entry] = pending.entries()
    inodes = {entry.path.stat().st_ino, entry.sidecar.stat().st_ino}
    server = asyncio.run(_upload(tmp_path, pending))[0]
    assert server.taken == [BIG]
    assert inodes <= set(synced)


def test_a_streamed_update_changed_on_disk_is_discarded_and_never_completed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pending = PendingStore(tmp_path / "pending")
    _keep(tmp_path, pending, BIG)
    [entry] = pending.entries()
    changed = bytearray(BIG)
    changed[100] ^= 0xFF
    kept = entry.path.stat().st_mtime_ns
    entry.path.write_bytes(bytes(changed))  # after its digest was recorded
    # As any later write leaves it (a clock tick later): a new mtime.
    os.utime(entry.path, ns=(kept + 10**9, kept + 10**9))
    with caplog.at_level(logging.ERROR, logger="client.session.uploader"):
        server, hub = asyncio.run(_upload(tmp_path, pending))
    assert server.taken == []  # no weights:submit
    assert len(BIG) - len(BIG) % CHUNK not in server.chunks  # the last chunk never left
    assert server.blobs.bytes_held() < len(BIG)
    assert pending.entries() == []  # discarded, not retried
    assert hub.current.rounds_completed == 0
    assert "discarding the update of round r-1" in caplog.text


def test_an_unhashed_update_the_server_finds_rotten_is_hashed_before_the_next_try(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Bytes that rot in place keep the file's identity (size, mtime, inode): sent
    # unhashed, the server's check refuses them (checksum_mismatch: "retry"). The next
    # try must hash the file, find it does not match and discard it -- not send the
    # same rotten bytes on every reconnect.
    pending = PendingStore(tmp_path / "pending")
    _keep(tmp_path, pending, BIG)
    [entry] = pending.entries()
    kept = entry.path.stat().st_mtime_ns
    rotten = bytearray(BIG)
    rotten[100] ^= 0xFF
    entry.path.write_bytes(bytes(rotten))  # the same inode and size
    os.utime(entry.path, ns=(kept, kept))
    assert pending.entries()[0].identity == entry.identity is not None
    with caplog.at_level(logging.INFO, logger="client.session.uploader"):
        server, _hub = asyncio.run(_upload(tmp_path, pending))
    last = len(BIG) - len(BIG) % CHUNK
    assert server.chunks.count(last) == 1  # the server refused it once (checksum_mismatch)
    assert "could not take round r-1 yet (checksum_mismatch)" in caplog.text
    # ... and the retry hashed the file: discarded before its last byte, never taken.
    assert server.taken == [] and pending.entries() == []
    assert "discarding the update of round r-1: the file no longer hashes" in caplog.text


@pytest.mark.parametrize("restarted", [False, True])
def test_an_update_this_process_kept_is_streamed_without_hashing_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restarted: bool
) -> None:
    from client import transfer_send

    hashed: list[bool] = []  # per piece read: hashed or not
    real = transfer_send._read_piece

    def read_piece(fh: Any, hasher: Any, *args: Any) -> bytes:
        hashed.append(hasher is not None)
        return real(fh, hasher, *args)

    monkeypatch.setattr(transfer_send, "_read_piece", read_piece)
    pending = PendingStore(tmp_path / "pending")
    _keep(tmp_path, pending, BIG)
    if restarted:  # an entry found on disk: nothing vouches for it but its hash
        pending = PendingStore(tmp_path / "pending")
    server, _hub = asyncio.run(_upload(tmp_path, pending))
    assert server.taken == [BIG]
    assert len(hashed) == len(server.chunks) > 1
    assert set(hashed) == {restarted}


def test_an_accepted_update_is_counted_even_if_the_connection_ends_while_it_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's ack arrived; the connection ends (cancelling the sending task) while
    the update is being deleted in a worker thread: it is still counted, never deleted
    uncounted."""
    from client.session import offload

    monkeypatch.setattr(offload, "SMALL_DISK_BYTES", 0)  # every deletion in a thread
    pending = PendingStore(tmp_path / "pending")
    _keep(tmp_path, pending, SMALL)
    removing, release = threading.Event(), threading.Event()
    remove = pending.remove

    def slow_remove(update: Any) -> None:
        removing.set()
        release.wait()
        remove(update)

    monkeypatch.setattr(pending, "remove", slow_remove)

    async def run() -> tuple[Server, SnapshotHub]:
        server, hub, tasks = _kick(pending)
        await asyncio.to_thread(removing.wait)
        tasks[0].cancel()  # the connection ended (ServerLink cancels its tasks)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        # The shielded settling finishes on the loop.
        await wait_until_async(lambda: hub.current.rounds_completed == 1, 10, "counted")
        return server, hub

    server, hub = asyncio.run(run())
    assert server.taken == [SMALL]
    assert pending.entries() == []
    assert hub.current.rounds_completed == 1


def test_an_accepted_small_update_deleted_on_the_loop_is_counted_when_the_connection_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small update is deleted on the loop itself: the connection ending as it is
    deleted (the cancellation lands at the next await) still leaves it counted."""
    pending = PendingStore(tmp_path / "pending")
    _keep(tmp_path, pending, SMALL)
    remove = pending.remove
    tasks: list[asyncio.Task[None]] = []
    on_loop: list[bool] = []

    def cancelling_remove(update: Any) -> None:
        on_loop.append(threading.current_thread() is threading.main_thread())
        tasks[0].cancel()  # the connection ended (ServerLink cancels its tasks)
        remove(update)

    monkeypatch.setattr(pending, "remove", cancelling_remove)

    async def run() -> SnapshotHub:
        server, hub, spawned = _kick(pending)
        tasks.extend(spawned)
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        await wait_until_async(lambda: hub.current.rounds_completed == 1, 10, "counted")
        assert server.taken == [SMALL]
        return hub

    hub = asyncio.run(run())
    assert on_loop == [True]
    assert pending.entries() == []
    assert hub.current.rounds_completed == 1


def test_the_one_update_kept_since_the_store_was_seen_empty_is_sent_without_a_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = PendingStore(tmp_path / "pending")
    listings: list[int] = []
    entries = pending.entries

    def counted_entries() -> list[PendingUpdate]:
        listings.append(1)
        return entries()

    monkeypatch.setattr(pending, "entries", counted_entries)

    async def run() -> Server:
        uploader, server, hub, tasks = _uploader(pending)
        uploader.kick()  # nothing pending: seen empty by a listing
        await asyncio.gather(*tasks)
        assert len(listings) == 1
        _keep(tmp_path, pending, b"first", durable=False)
        uploader.kick()
        await asyncio.gather(*tasks)
        assert len(listings) == 1 and server.taken == [b"first"]  # no listing
        assert hub.current.rounds_completed == 1
        # Two kept since: the store is listed, and they go oldest first.
        _keep(tmp_path, pending, b"third", round_id="r-3", created=3.0)
        _keep(tmp_path, pending, b"second", round_id="r-2", created=2.0)
        uploader.kick()
        await asyncio.gather(*tasks)
        assert len(listings) >= 2
        return server

    server = asyncio.run(run())
    assert server.taken == [b"first", b"second", b"third"]
    assert entries() == []


@pytest.mark.parametrize("content", [BIG, SMALL], ids=["streamed", "inline"])
def test_an_accepted_update_the_disk_will_not_delete_is_counted_once_and_not_sent_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:
    """The server accepted the update but its deletion fails: the sending task goes on
    (no exception), the update is counted and its "update accepted" line logged once;
    the next try only deletes it (never sends it again, never counts it twice)."""
    from client.session import uploader as uploader_module

    monkeypatch.setattr(uploader_module, "upload_retry_delay", lambda failures: None)
    pending = PendingStore(tmp_path / "pending")
    _keep(tmp_path, pending, content)
    remove = pending.remove
    refusals = [PermissionError(13, "refused")]

    def refusing_remove(update: Any) -> None:
        if refusals:
            raise refusals.pop()
        remove(update)

    monkeypatch.setattr(pending, "remove", refusing_remove)

    async def run() -> tuple[Server, SnapshotHub]:
        uploader, server, hub, tasks = _uploader(pending)
        uploader.kick()
        await asyncio.gather(*tasks)  # raises what killed the task
        assert [e.round_id for e in pending.entries()] == ["r-1"], "kept: not deleted"
        assert hub.current.rounds_completed == 1
        uploader.kick()
        await asyncio.gather(*tasks)
        return server, hub

    with caplog.at_level(logging.INFO, logger="client.session.uploader"):
        server, hub = asyncio.run(run())
    assert server.taken == [content], "sent once"
    assert pending.entries() == []
    assert hub.current.rounds_completed == 1, "counted once"
    accepted = [r for r in caplog.records if "update accepted" in r.getMessage()]
    assert len(accepted) == 1
    assert any("cannot delete the update of round r-1" in r.getMessage() for r in caplog.records)
