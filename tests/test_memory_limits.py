"""What a peer can make the other hold in partial blobs is bounded, and the refusals say so.

The budgets of :class:`client.transfer.BlobStore` count the totals *announced* by open
blobs (per peer, all peers together, and how many are open per peer), so no number of
barely started blobs can grow past them. Tables check the rules; a hostile server on
loopback tries to make a real device hoard (the 1,020 partial 1 MiB blobs of issue 16),
and a hostile scripted device tries the same on the real server.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import psutil
import pytest

from client.errors import FedtrayError
from client.protocol import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_BLOB_BYTES, EV_BLOB_CHUNK, BlobChunk
from client.transfer import BlobStore
from server.config import (
    OPEN_UPLOADS_PER_DEVICE,
    UPDATE_MARGIN_BYTES,
    UPDATE_SIZE_FACTOR,
    ServerConfig,
)
from tests.hostile_server import hostile_client
from tests.server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

pytestmark = pytest.mark.timeout(120)

SHA = "ab" * 32
MiB = 1024 * 1024


def _chunk(blob: str, total: int, data: bytes = b"x" * 10) -> BlobChunk:
    return BlobChunk(blob_id=blob, offset=0, total=total, sha256=SHA, data=data)


def _code(store: BlobStore, peer: str, chunk: BlobChunk) -> str:
    try:
        store.accept_chunk(peer, chunk, now=0)
    except FedtrayError as exc:
        return exc.code
    return "ok"


# (budget kwargs, [(peer, blob, announced total)], expected codes)
BUDGET_CASES: list[tuple[str, dict[str, int], list[tuple[str, str, int]], list[str]]] = [
    (
        "announced totals count, not bytes received",
        {"max_peer_bytes": 1000},
        [("a", "b1", 600), ("a", "b2", 600)],
        ["ok", "transfers_full"],
    ),
    (
        "a blob that fits next to the open ones",
        {"max_peer_bytes": 1000},
        [("a", "b1", 600), ("a", "b2", 400)],
        ["ok", "ok"],
    ),
    (
        "open blobs per peer",
        {"max_peer_bytes": 10_000, "max_open_per_peer": 2},
        [("a", "b1", 100), ("a", "b2", 100), ("a", "b3", 100), ("b", "b3", 100)],
        ["ok", "ok", "transfers_full", "ok"],
    ),
    (
        "all peers together",
        {"max_peer_bytes": 1000, "max_total_bytes": 1500},
        [("a", "b1", 1000), ("b", "b1", 400), ("c", "b1", 200)],
        ["ok", "ok", "transfers_full"],
    ),
    (
        "a blob that could never fit is final",
        {"max_peer_bytes": 1000, "max_total_bytes": 5000},
        [("a", "b1", 1001)],
        ["blob_too_large"],
    ),
    (
        "over the total budget is final too",
        {"max_peer_bytes": 1000, "max_total_bytes": 500},
        [("a", "b1", 501)],
        ["blob_too_large"],
    ),
    (
        "the device's default: one largest blob, a total as large",
        {},
        [("server", "b1", 4000), ("server", "b2", 4000), ("server", "b3", 2001)],
        ["ok", "ok", "transfers_full"],
    ),
]


@pytest.mark.parametrize(
    ("label", "budget", "blobs", "codes"), BUDGET_CASES, ids=[c[0] for c in BUDGET_CASES]
)
def test_budgets_refuse_new_blobs_with_their_code(
    label: str, budget: dict[str, int], blobs: list[tuple[str, str, int]], codes: list[str]
) -> None:
    store = BlobStore(max_chunk_bytes=100, max_blob_bytes=10_000, **budget)
    assert [_code(store, peer, _chunk(blob, total)) for peer, blob, total in blobs] == codes
    # Refused blobs leave nothing; chunks of open blobs still go on.
    assert store.open_blobs() == codes.count("ok")
    assert store.bytes_committed() <= store.max_total_bytes


def test_a_completed_and_taken_blob_frees_its_budget() -> None:
    data = b"y" * 50
    digest = hashlib.sha256(data).hexdigest()
    store = BlobStore(max_chunk_bytes=100, max_blob_bytes=100, max_peer_bytes=60)
    store.accept_chunk(
        "a", BlobChunk(blob_id="b1", offset=0, total=50, sha256=digest, data=data), 0
    )
    assert _code(store, "a", _chunk("b2", 50)) == "transfers_full"
    store.discard("a", "b1")  # what take() does once the weights message used it
    assert _code(store, "a", _chunk("b2", 50)) == "ok"


@pytest.mark.parametrize(
    ("model_bytes", "max_transfer", "clients", "update", "per_device", "total"),
    [
        (1000, None, 10, UPDATE_SIZE_FACTOR * 1000 + UPDATE_MARGIN_BYTES, None, None),
        (10 * MiB, None, 3, UPDATE_SIZE_FACTOR * 10 * MiB + UPDATE_MARGIN_BYTES, None, None),
        # capped by maxBlobBytes (512 MiB)
        (100 * MiB, None, 2, DEFAULT_MAX_BLOB_BYTES, 2 * DEFAULT_MAX_BLOB_BYTES, None),
        # an explicit total, smaller than two updates, bounds each device too
        (1000, 50_000, 10, UPDATE_SIZE_FACTOR * 1000 + UPDATE_MARGIN_BYTES, 50_000, 50_000),
    ],
)
def test_server_transfer_budget_derives_from_the_model(
    model_bytes: int,
    max_transfer: int | None,
    clients: int,
    update: int,
    per_device: int | None,
    total: int | None,
) -> None:
    config = ServerConfig(max_transfer_bytes=max_transfer, min_clients=1, clients_per_round=clients)
    budget = config.transfer_budget(model_bytes)
    assert budget.update_bytes == update
    assert budget.per_device == (per_device if per_device is not None else 2 * update)
    assert budget.total == (total if total is not None else clients * budget.per_device)
    assert budget.open_per_device == OPEN_UPLOADS_PER_DEVICE


# --------------------------------------------------------------------------- the device


def test_a_hostile_server_cannot_make_the_device_hoard_partial_blobs(tmp_path: Path) -> None:
    """Issue 16: 1,020 partial 1 MiB blobs were held (~1.1 GB). Now the eighth is the last."""
    attempts = 200  # 100 MiB if each were kept: far over what the assertions allow
    proc = psutil.Process()
    with hostile_client(tmp_path) as (server, client):
        store = client._session.blobs  # read-only peek at the session's receive buffers
        rss_before = proc.memory_info().rss
        half = b"z" * DEFAULT_CHUNK_BYTES

        async def barrage() -> list[Any]:
            acks = []
            for i in range(attempts):
                chunk = _chunk(f"hoard{i}", MiB, half)
                acks.append(await server.acall(EV_BLOB_CHUNK, chunk.to_wire()))
            return acks

        acks = server.loop.run(barrage(), 120)
        codes = [a.get("code", "ok") if a.get("ok") is False else "ok" for a in acks]
        open_max = store.max_open_per_peer
        assert codes == ["ok"] * open_max + ["transfers_full"] * (attempts - open_max)
        assert "finish one or wait until one expires" in acks[-1]["message"]
        assert store.bytes_held() == open_max * DEFAULT_CHUNK_BYTES
        assert store.bytes_committed() == open_max * MiB <= store.max_peer_bytes
        growth = proc.memory_info().rss - rss_before
        assert growth < 48 * MiB, f"RSS grew {growth / MiB:.0f} MiB"
        # A blob the device could never hold is final; the session is alive and connected.
        huge = server.call(EV_BLOB_CHUNK, _chunk("huge", DEFAULT_MAX_BLOB_BYTES + 1).to_wire())
        assert huge["code"] == "blob_too_large"
        assert client.snapshot().connection == "connected" and server.connects == 1


# --------------------------------------------------------------------------- the server


def test_a_hostile_device_cannot_make_the_server_hoard(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        blobs = srv.server.blobs
        budget = srv.config.transfer_budget(
            sum(int(a.nbytes) for a in srv.server.model.state.values())
        )
        assert (blobs.max_peer_bytes, blobs.max_total_bytes) == (budget.per_device, budget.total)
        evil = ScriptedDevice(srv.url, name="evil")
        await evil.join()
        share = (budget.per_device - 1000) // 3  # three fit by bytes, a fourth does not
        codes = []
        for i in range(10):
            ack = await evil.call(EV_BLOB_CHUNK, _chunk(f"e{i}", share).to_wire())
            codes.append(ack.get("code", "ok") if ack.get("ok") is False else "ok")
        assert codes == ["ok"] * 3 + ["transfers_full"] * 7
        many = []
        for i in range(OPEN_UPLOADS_PER_DEVICE + 2):
            ack = await evil.call(EV_BLOB_CHUNK, _chunk(f"s{i}", 100).to_wire())
            many.append(ack.get("code", "ok") if ack.get("ok") is False else "ok")
        assert many == ["ok"] * (OPEN_UPLOADS_PER_DEVICE - 3) + ["transfers_full"] * 5
        assert blobs.open_blobs() == OPEN_UPLOADS_PER_DEVICE
        assert blobs.bytes_committed() <= budget.per_device
        on_disk = sum(f.stat().st_size for f in (srv.config.state_dir / "blobs").rglob("*.part"))
        assert on_disk == blobs.bytes_held() == 3 * 10 + (OPEN_UPLOADS_PER_DEVICE - 3) * 10
        # Another device is held to the total across devices: here 2 devices' worth.
        other = ScriptedDevice(srv.url, name="other")
        await other.join()
        big = await other.call(EV_BLOB_CHUNK, _chunk("o1", budget.per_device).to_wire())
        assert big.get("ok", True) is not False  # the total has room for one more device
        third = ScriptedDevice(srv.url, name="third")
        await third.join()
        full = await third.call(EV_BLOB_CHUNK, _chunk("t1", budget.per_device // 2).to_wire())
        assert full["code"] == "transfers_full" and "in all" in full["message"]
        assert blobs.bytes_committed() <= budget.total
        assert evil.sio.connected and third.sio.connected
        await asyncio.gather(*(d.disconnect() for d in (evil, other, third)))

    with running_server(tmp_path, min_clients=1, clients_per_round=2) as srv:
        run_devices(scenario(srv))
