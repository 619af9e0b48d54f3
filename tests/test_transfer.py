"""BlobStore bookkeeping (in memory and spilled to disk) and send_blob against a BlobStore
peer (in-process). The rule tests run in both modes (the ``spill`` fixture)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from client.errors import FedtrayError
from client.protocol import (
    EV_BLOB_CHUNK,
    EV_BLOB_STATUS,
    BlobChunk,
    BlobStatus,
    Capabilities,
    Limits,
    WeightsRef,
    error_ack,
    parse,
)
from client.transfer import BlobStore, limits_towards, send_blob, weights_ref_for
from client.transfer_spill import start_writeback
from client.weights import sha256_hex

DATA = bytes(range(256)) * 40  # 10,240 bytes
DIGEST = sha256_hex(DATA)


def chunk(offset: int, size: int, *, total: int = len(DATA), digest: str = DIGEST) -> BlobChunk:
    return BlobChunk(
        blob_id="b1", offset=offset, total=total, sha256=digest, data=DATA[offset : offset + size]
    )


def store(spill: Path | None = None, **kw: Any) -> BlobStore:
    args: dict[str, Any] = {"max_chunk_bytes": 4096, "max_blob_bytes": 1 << 20}
    args.update(kw)
    return BlobStore(spill_dir=spill, **args)


@pytest.fixture(params=["memory", "disk"])
def spill(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    """The spill dir of the store under test: None (in memory) or a folder."""
    return tmp_path / "blobs" if request.param == "disk" else None


def files_in(spill: Path | None) -> list[Path]:
    return sorted(p for p in spill.rglob("*") if p.is_file()) if spill is not None else []


def test_chunks_in_order_complete_and_take_verifies(spill: Path | None) -> None:
    s = store(spill)
    p = s.accept_chunk("dev", chunk(0, 4096), now=0)
    assert (p.received, p.complete) == (4096, False)
    s.accept_chunk("dev", chunk(4096, 4096), now=1)
    p = s.accept_chunk("dev", chunk(8192, 4096), now=2)
    assert (p.received, p.complete) == (len(DATA), True)
    ref = WeightsRef(format="safetensors", size=len(DATA), sha256=DIGEST, blob_id="b1")
    assert s.take("dev", ref) == DATA
    assert s.status("dev", "b1", now=3).received == 0  # forgotten once taken
    assert files_in(spill) == []


def test_repeated_chunk_is_idempotent(spill: Path | None) -> None:
    s = store(spill)
    s.accept_chunk("dev", chunk(0, 4096), now=0)
    again = s.accept_chunk("dev", chunk(0, 4096), now=0)
    assert again.received == 4096
    assert s.bytes_held("dev") == 4096


@pytest.mark.parametrize(
    ("setup", "bad", "code"),
    [
        ([], chunk(4096, 10), "offset_gap"),  # unknown blob must start at 0
        ([chunk(0, 100)], chunk(200, 100), "offset_gap"),
        ([chunk(0, 100)], chunk(100, 100, total=len(DATA) + 1), "blob_mismatch"),
        ([chunk(0, 100)], chunk(100, 100, digest="0" * 64), "blob_mismatch"),
        ([], chunk(0, 4097), "chunk_too_large"),
        ([], chunk(0, 10, total=(1 << 20) + 1), "blob_too_large"),
        ([], chunk(0, 20, total=10), "size_mismatch"),
        # A chunk that runs past the total changes nothing; a correct one may follow.
        ([chunk(0, 100, total=150)], chunk(100, 100, total=150), "size_mismatch"),
    ],
)
def test_refusals_have_codes_and_buffer_nothing(
    setup: list[BlobChunk], bad: BlobChunk, code: str, spill: Path | None
) -> None:
    s = store(spill)
    for c in setup:
        s.accept_chunk("dev", c, now=0)
    held, files = s.bytes_held(), files_in(spill)
    sizes = [f.stat().st_size for f in files]
    with pytest.raises(FedtrayError) as info:
        s.accept_chunk("dev", bad, now=0)
    assert info.value.code == code
    assert s.bytes_held() == held
    assert files_in(spill) == files and [f.stat().st_size for f in files] == sizes


def test_peer_budget_is_checked_before_buffering(spill: Path | None) -> None:
    s = store(
        spill,
        max_blob_bytes=len(DATA),
        max_peer_bytes=len(DATA) + 10,
        max_total_bytes=3 * len(DATA),
    )
    s.accept_chunk("dev", chunk(0, 4096), now=0)
    other = BlobChunk(blob_id="b2", offset=0, total=len(DATA), sha256=DIGEST, data=DATA[:10])
    with pytest.raises(FedtrayError) as info:
        s.accept_chunk("dev", other, now=0)
    assert info.value.code == "transfers_full"  # a retry after the first completes fits
    s.accept_chunk("other-dev", other, now=0)  # budgets are per peer


def test_partial_blobs_are_per_peer_and_expire(spill: Path | None) -> None:
    s = store(spill, ttl_sec=10)
    s.accept_chunk("a", chunk(0, 100), now=0)
    assert s.status("b", "b1", now=0).received == 0
    assert s.status("a", "b1", now=5).received == 100  # status refreshes expiry
    assert s.expire(now=14) == 0
    assert s.expire(now=16) == 1
    assert s.status("a", "b1", now=16).received == 0
    assert files_in(spill) == []  # expiry deletes the files too


def test_after_a_too_long_chunk_the_right_one_completes_the_blob(spill: Path | None) -> None:
    s = store(spill)
    short = sha256_hex(DATA[:6000])
    s.accept_chunk("dev", chunk(0, 4096, total=6000, digest=short), now=0)
    with pytest.raises(FedtrayError, match="past its announced"):
        s.accept_chunk("dev", chunk(4096, 4096, total=6000, digest=short), now=0)
    assert s.status("dev", "b1", now=0).received == 4096
    assert s.accept_chunk("dev", chunk(4096, 1904, total=6000, digest=short), now=0).complete


@pytest.mark.parametrize("sizes", [[len(DATA)], [4096, 4096, 2048]], ids=["one", "three"])
def test_a_completing_chunk_that_fails_the_checksum_drops_the_blob(
    sizes: list[int], spill: Path | None
) -> None:
    s = store(spill, max_chunk_bytes=len(DATA))
    wrong = sha256_hex(b"something else")
    offset = 0
    for size in sizes[:-1]:
        s.accept_chunk("dev", chunk(offset, size, digest=wrong), now=0)
        offset += size
    with pytest.raises(FedtrayError) as info:
        s.accept_chunk("dev", chunk(offset, sizes[-1], digest=wrong), now=0)
    assert info.value.code == "checksum_mismatch"
    assert "send it again from offset 0" in info.value.message
    # Dropped: nothing held, nothing on disk, the sender starts again from 0.
    assert s.bytes_held() == 0 and files_in(spill) == []
    assert s.status("dev", "b1", now=0).received == 0
    assert s.accept_chunk("dev", chunk(0, 4096), now=0).received == 4096


def test_a_restored_blob_is_hashed_from_disk_when_it_completes(tmp_path: Path) -> None:
    spill = tmp_path / "blobs"
    wrong = sha256_hex(b"something else")

    def part(blob_id: str, offset: int, digest: str) -> BlobChunk:
        data = DATA[offset : offset + 4096]
        return BlobChunk(blob_id=blob_id, offset=offset, total=len(DATA), sha256=digest, data=data)

    first = store(spill)
    first.accept_chunk("dev", part("good", 0, DIGEST), now=0)
    first.accept_chunk("dev", part("bad", 0, wrong), now=0)
    second = store(spill)  # a restart: the hash of the first chunk is not in memory
    assert second.restore(now=0) == 2
    for blob_id, digest in (("good", DIGEST), ("bad", wrong)):
        second.accept_chunk("dev", part(blob_id, 4096, digest), now=0)
    assert second.accept_chunk("dev", part("good", 8192, DIGEST), now=0).complete
    with pytest.raises(FedtrayError) as info:
        second.accept_chunk("dev", part("bad", 8192, wrong), now=0)
    assert info.value.code == "checksum_mismatch"
    assert second.status("dev", "bad", now=0).received == 0
    ref = WeightsRef(format="safetensors", size=len(DATA), sha256=DIGEST, blob_id="good")
    assert second.take("dev", ref) == DATA
    assert files_in(spill) == []


@pytest.mark.parametrize(
    ("ref_kw", "code"),
    [
        ({"sha256": sha256_hex(b"other")}, "checksum_mismatch"),
        ({"size": len(DATA) - 1}, "size_mismatch"),
    ],
)
def test_a_complete_blob_is_checked_against_the_reference_too(
    ref_kw: dict[str, Any], code: str, spill: Path | None
) -> None:
    s = store(spill)
    for offset in (0, 4096, 8192):
        s.accept_chunk("dev", chunk(offset, 4096), now=0)
    fields: dict[str, Any] = {
        "format": "safetensors",
        "size": len(DATA),
        "sha256": DIGEST,
        "blob_id": "b1",
    }
    fields.update(ref_kw)
    with pytest.raises(FedtrayError) as info:
        s.take("dev", WeightsRef(**fields))
    assert info.value.code == code


@pytest.mark.parametrize(
    ("own", "device", "expected"),
    [
        # (chunk, blob, in flight) of the server, the device, and what the server uses.
        ((4096, 1 << 20, 4), (1024, 1 << 30, 8), (1024, 1 << 20, 4)),
        ((1024, 1 << 30, 8), (4096, 1 << 20, 2), (1024, 1 << 20, 2)),
        ((512, 512, 1), (512, 512, 1), (512, 512, 1)),
    ],
)
def test_limits_towards_a_device_are_the_smaller_of_both(
    own: tuple[int, int, int], device: tuple[int, int, int], expected: tuple[int, int, int]
) -> None:
    caps = Capabilities(
        torch_version=None,
        simulation=True,
        tasks=[],
        weight_formats=["json"],
        max_chunk_bytes=device[0],
        max_blob_bytes=device[1],
        max_inflight_chunks=device[2],
    )
    mine = Limits(max_chunk_bytes=own[0], max_blob_bytes=own[1], max_inflight_chunks=own[2])
    got = limits_towards(caps, mine)
    assert (got.max_chunk_bytes, got.max_blob_bytes, got.max_inflight_chunks) == expected


@pytest.mark.parametrize(
    ("ref_kw", "code"),
    [
        ({"blob_id": "nope"}, "blob_unknown"),
        ({"blob_id": "b1"}, "blob_incomplete"),
        ({"data": DATA[:10], "size": 10, "sha256": "0" * 64}, "checksum_mismatch"),
    ],
)
def test_take_refusals(ref_kw: dict[str, Any], code: str, spill: Path | None) -> None:
    s = store(spill)
    s.accept_chunk("dev", chunk(0, 100), now=0)
    fields: dict[str, Any] = {"format": "safetensors", "size": len(DATA), "sha256": DIGEST}
    fields.update(ref_kw)
    with pytest.raises(FedtrayError) as info:
        s.take("dev", WeightsRef(**fields))
    assert info.value.code == code


def test_weights_ref_inline_or_blob() -> None:
    small = weights_ref_for(b"abc", "json", inline_limit=3)
    assert small.data == b"abc" and small.blob_id is None
    big = weights_ref_for(DATA, "safetensors", inline_limit=100)
    assert big.data is None and big.blob_id == DIGEST and big.size == len(DATA)


class Peer:
    """A receiving peer in-process: routes events to a BlobStore like a server would."""

    def __init__(self, s: BlobStore, *, fail_after: int | None = None) -> None:
        self.store = s
        self.fail_after = fail_after
        self.chunks_seen: list[int] = []

    async def call(self, event: str, payload: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        try:
            if event == EV_BLOB_STATUS:
                st = parse(BlobStatus, payload)
                return self.store.status("dev", st.blob_id, now=0).to_wire()
            assert event == EV_BLOB_CHUNK
            c = parse(BlobChunk, payload)
            if self.fail_after is not None and len(self.chunks_seen) >= self.fail_after:
                raise ConnectionError("connection lost")
            self.chunks_seen.append(c.offset)
            return self.store.accept_chunk("dev", c, now=0).to_wire()
        except FedtrayError as exc:
            return error_ack(exc.code, exc.message)


@pytest.mark.parametrize("window", [1, 3])
def test_send_blob_resumes_from_peer_offset(window: int) -> None:
    s = store(max_chunk_bytes=1000)
    flaky = Peer(s, fail_after=4)
    with pytest.raises(ConnectionError):
        asyncio.run(send_blob(flaky.call, DATA, blob_id="b1", chunk_bytes=1000, window=window))
    held = s.status("dev", "b1", now=0).received
    assert held == 4000
    healthy = Peer(s)
    asyncio.run(send_blob(healthy.call, DATA, blob_id="b1", chunk_bytes=1000, window=window))
    assert healthy.chunks_seen[0] == held  # resumed, not restarted
    ref = WeightsRef(format="safetensors", size=len(DATA), sha256=DIGEST, blob_id="b1")
    assert s.take("dev", ref) == DATA


def test_send_blob_with_a_wrong_checksum_is_refused_at_the_last_chunk() -> None:
    s = store(max_chunk_bytes=1000)
    peer = Peer(s)
    with pytest.raises(FedtrayError) as info:
        asyncio.run(send_blob(peer.call, DATA, blob_id="b1", chunk_bytes=1000, sha256="0" * 64))
    assert info.value.code == "checksum_mismatch"
    assert s.bytes_held() == 0
    # Sent again with the right checksum, it starts from 0 and completes.
    again = Peer(s)
    asyncio.run(send_blob(again.call, DATA, blob_id="b1", chunk_bytes=1000))
    assert again.chunks_seen[0] == 0
    assert s.status("dev", "b1", now=0).complete


def test_send_blob_raises_peer_refusal_code() -> None:
    peer = Peer(store(max_chunk_bytes=100))
    with pytest.raises(FedtrayError) as info:
        asyncio.run(send_blob(peer.call, DATA, blob_id="b1", chunk_bytes=1000))
    assert info.value.code == "chunk_too_large"


# ------------------------------------------------------------------ disk mode across restarts


def test_a_restarted_disk_store_reports_what_it_held_and_the_sender_resumes(
    tmp_path: Path,
) -> None:
    spill = tmp_path / "blobs"
    before = store(spill, max_chunk_bytes=1000)
    flaky = Peer(before, fail_after=4)
    with pytest.raises(ConnectionError):
        asyncio.run(send_blob(flaky.call, DATA, blob_id="b1", chunk_bytes=1000))
    # A new process on the same folder: nothing in memory until restored.
    after = store(spill, max_chunk_bytes=1000)
    assert after.status("dev", "b1", now=0).received == 0
    assert after.restore(now=100.0) == 1
    assert after.status("dev", "b1", now=100).received == 4000
    assert after.bytes_held("dev") == 4000  # counts against the peer's budget
    healthy = Peer(after)
    asyncio.run(send_blob(healthy.call, DATA, blob_id="b1", chunk_bytes=1000))
    assert healthy.chunks_seen[0] == 4000  # resumed, not restarted
    ref = WeightsRef(format="safetensors", size=len(DATA), sha256=DIGEST, blob_id="b1")
    assert after.take("dev", ref) == DATA
    assert files_in(spill) == []


def test_restore_starts_expiry_at_now_and_drops_unreadable_leftovers(tmp_path: Path) -> None:
    spill = tmp_path / "blobs"
    first = store(spill, ttl_sec=10)
    first.accept_chunk("dev", chunk(0, 100), now=0)
    first.accept_chunk(
        "dev", BlobChunk(blob_id="b2", offset=0, total=80, sha256=DIGEST, data=b"x" * 50), now=0
    )
    [meta2] = [m for m in spill.glob("*/*.json") if '"b2"' in m.read_text()]
    meta2.write_text("{not json")  # a torn sidecar
    (spill / "x").mkdir()
    orphan = spill / "x" / "orphan.part"
    orphan.write_bytes(b"abc")  # a part file without a sidecar
    second = store(spill, ttl_sec=10)
    assert second.restore(now=1000.0) == 1
    assert second.expire(now=1005.0) == 0  # not expired by the time spent down
    assert second.status("dev", "b1", now=1005).received == 100
    assert second.status("dev", "b2", now=1005).received == 0
    assert not orphan.exists() and not meta2.exists()
    assert second.expire(now=1020.0) == 1
    assert files_in(spill) == []


def test_memory_mode_restores_nothing_and_writes_nothing(tmp_path: Path) -> None:
    s = store()
    s.accept_chunk("dev", chunk(0, 100), now=0)
    assert s.restore(now=0) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_refuses_answers_internal_error_and_counts_nothing(tmp_path: Path) -> None:
    spill = tmp_path / "blobs"
    spill.write_text("a file where the folder should be")
    s = store(spill)
    with pytest.raises(FedtrayError) as info:
        s.accept_chunk("dev", chunk(0, 100), now=0)
    assert info.value.code == "internal_error"
    assert s.bytes_held() == 0
    assert s.status("dev", "b1", now=0).received == 0


def test_a_spilled_chunks_write_out_is_started_at_once(tmp_path: Path) -> None:
    path = tmp_path / "part"
    path.write_bytes(DATA)
    with path.open("r+b") as fh:
        assert start_writeback(fh.fileno(), 0, len(DATA)) is True  # Linux: started
    assert start_writeback(-1, 0, 1) is False  # a bad descriptor: nothing, and no raise
