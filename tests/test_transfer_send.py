"""send_file_blob against a BlobStore peer (in-process): a file read and hashed once while it
is sent, resumed from the peer's offset, and never completed when it is not the file that
was described (another size or SHA-256, or unreadable)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from client.atomicfile import file_identity
from client.errors import FedtrayError
from client.protocol import WeightsRef
from client.transfer import BlobSourceError, blob_ref, send_file_blob
from client.weights import sha256_hex
from tests.test_transfer import DATA, DIGEST, Peer, store


def _file(tmp_path: Path, data: bytes = DATA) -> Path:
    path = tmp_path / "update.safetensors"
    path.write_bytes(data)
    return path


def _send(peer: Peer, path: Path, *, size: int = len(DATA), sha256: str = DIGEST) -> None:
    asyncio.run(
        send_file_blob(
            peer.call, path, size=size, sha256=sha256, blob_id="b1", chunk_bytes=1000, window=3
        )
    )


@pytest.mark.parametrize("window", [1, 3])
def test_a_file_is_sent_in_chunks_and_the_peer_takes_it(tmp_path: Path, window: int) -> None:
    s = store(max_chunk_bytes=1000)
    peer = Peer(s)
    seen: list[int] = []
    asyncio.run(
        send_file_blob(
            peer.call,
            _file(tmp_path),
            size=len(DATA),
            sha256=DIGEST,
            blob_id="b1",
            chunk_bytes=1000,
            window=window,
            on_progress=lambda received, total: seen.append(received),
        )
    )
    assert peer.chunks_seen == list(range(0, len(DATA), 1000))
    assert seen[0] == 0 and seen[-1] == len(DATA)
    ref = blob_ref("safetensors", size=len(DATA), sha256=DIGEST)
    assert ref.blob_id == DIGEST  # the content names the blob
    assert s.take("dev", ref.model_copy(update={"blob_id": "b1"})) == DATA


def test_a_resumed_file_hashes_what_the_peer_held_and_sends_the_rest(tmp_path: Path) -> None:
    s = store(max_chunk_bytes=1000)
    path = _file(tmp_path)
    with pytest.raises(ConnectionError):
        _send(Peer(s, fail_after=4), path)
    assert s.status("dev", "b1", now=0).received == 4000
    healthy = Peer(s)
    _send(healthy, path)
    assert healthy.chunks_seen[0] == 4000  # resumed, not restarted
    ref = WeightsRef(format="safetensors", size=len(DATA), sha256=DIGEST, blob_id="b1")
    assert s.take("dev", ref) == DATA


def test_a_file_already_held_whole_sends_nothing(tmp_path: Path) -> None:
    s = store(max_chunk_bytes=1000)
    path = _file(tmp_path)
    _send(Peer(s), path)
    again = Peer(s)
    _send(again, path)
    assert again.chunks_seen == []


CHANGED = bytearray(DATA)
CHANGED[5000] ^= 0xFF  # the same size, another byte in the middle


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (bytes(CHANGED), "no longer hashes"),  # changed on disk after its digest was recorded
        (DATA[:-1], "ended at byte"),  # cut short
        (DATA + b"x", "longer than"),  # grown
    ],
)
def test_a_file_that_is_not_the_one_described_is_never_completed(
    tmp_path: Path, content: bytes, message: str
) -> None:
    s = store(max_chunk_bytes=1000)
    peer = Peer(s)
    with pytest.raises(BlobSourceError, match=message):
        _send(peer, _file(tmp_path, content))
    # The last chunk never left: the peer holds an incomplete blob, nothing to take.
    assert 10_000 not in peer.chunks_seen
    assert not s.status("dev", "b1", now=0).complete
    with pytest.raises(FedtrayError) as info:
        s.take("dev", WeightsRef(format="safetensors", size=len(DATA), sha256=DIGEST, blob_id="b1"))
    assert info.value.code == "blob_incomplete"


def test_a_changed_prefix_is_caught_on_resume_too(tmp_path: Path) -> None:
    s = store(max_chunk_bytes=1000)
    path = _file(tmp_path)
    with pytest.raises(ConnectionError):
        _send(Peer(s, fail_after=6), path)
    path.write_bytes(bytes(CHANGED))  # byte 5000: in the part the peer holds already
    peer = Peer(s)
    with pytest.raises(BlobSourceError, match="no longer hashes"):
        _send(peer, path)
    assert peer.chunks_seen[0] == 6000 and 10_000 not in peer.chunks_seen
    assert not s.status("dev", "b1", now=0).complete


def test_a_missing_file_is_the_sources_fault_not_the_links(tmp_path: Path) -> None:
    with pytest.raises(BlobSourceError, match="cannot open") as info:
        _send(Peer(store(max_chunk_bytes=1000)), tmp_path / "gone.safetensors")
    assert isinstance(info.value.__cause__, OSError)


def test_the_peers_refusal_keeps_its_code(tmp_path: Path) -> None:
    peer = Peer(store(max_chunk_bytes=100))
    with pytest.raises(FedtrayError) as info:
        _send(peer, _file(tmp_path))
    assert info.value.code == "chunk_too_large"


def test_a_wrong_recorded_digest_is_refused_before_the_peer_sees_the_last_chunk(
    tmp_path: Path,
) -> None:
    s = store(max_chunk_bytes=1000)
    peer = Peer(s)
    wrong = sha256_hex(b"another document")
    with pytest.raises(BlobSourceError):
        _send(peer, _file(tmp_path), sha256=wrong)
    assert peer.chunks_seen == list(range(0, 10_000, 1000))  # all but the last


def test_a_file_vouched_for_by_its_identity_is_not_hashed_but_a_change_is_still_caught(
    tmp_path: Path,
) -> None:
    # Its identity (as recorded when its digest was known) stands for the hash; the file
    # changed while it is sent (a new mtime) is caught before its last byte, and the
    # ``ready`` wait comes before that last piece.
    path = _file(tmp_path)
    identity = file_identity(path)
    s = store(max_chunk_bytes=1000)
    peer = Peer(s)
    order: list[str] = []

    async def change_it() -> None:
        order.append(f"ready after {len(peer.chunks_seen)} chunks")
        path.write_bytes(bytes(CHANGED))
        os.utime(path, ns=(identity.mtime_ns + 10**9, identity.mtime_ns + 10**9))

    async def send(ready: Any) -> None:
        await send_file_blob(
            peer.call,
            path,
            size=len(DATA),
            sha256=DIGEST,
            blob_id="b1",
            chunk_bytes=1000,
            window=1,
            ready=ready,
            identity=identity,
        )

    with pytest.raises(BlobSourceError, match="changed on disk"):
        asyncio.run(send(change_it))
    last = len(DATA) - len(DATA) % 1000
    assert order == [f"ready after {last // 1000} chunks"] and last not in peer.chunks_seen
    assert s.status("dev", "b1", now=0).received < len(DATA)


def test_a_file_whose_identity_is_not_the_one_given_is_hashed(tmp_path: Path) -> None:
    path = _file(tmp_path, bytes(CHANGED))
    stale = file_identity(path)
    path.write_bytes(bytes(CHANGED))  # another file now: hashed, and refused
    os.utime(path, ns=(stale.mtime_ns + 10**9, stale.mtime_ns + 10**9))
    s = store(max_chunk_bytes=1000)
    with pytest.raises(BlobSourceError, match="no longer hashes"):
        asyncio.run(
            send_file_blob(
                Peer(s).call,
                path,
                size=len(DATA),
                sha256=DIGEST,
                blob_id="b1",
                chunk_bytes=1000,
                identity=stale,
            )
        )
