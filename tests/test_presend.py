"""A new version's document goes to the devices while it is saved, but never completes early.

* :class:`server.presend.SharedChunks` (table): a range of one document is cut once
  and the same bytes object handed to every reader; at most ``keep`` chunks are held, the
  oldest dropped first.
* :meth:`server.distribution.Distributor.presend` over the real server (real Socket.IO on
  loopback, a scripted device with a small chunk limit): the device receives every chunk
  but the last at once; the last one only after :meth:`~server.presend.Presend.
  durable`, and no ``weights:global`` names the version meanwhile. After
  :meth:`~server.presend.Presend.abandon` the last chunk never goes, and the device's
  sends go on (a later presend to it completes).
* In rounds (two devices with a small chunk limit): each device is sent a round's new
  version once, chunk by chunk (ahead, then its last chunk; nothing sent again), and its
  last chunk arrives only once ``history.json`` names that version; computed into its
  document in place or encoded as usual, it is the mean of the updates.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

import server.coordinator
from client.protocol import BlobProgress, Limits
from client.weights import encode, sha256_hex
from server.presend import Presend, SharedChunks
from server.store import HISTORY_FILE
from tests.server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

T = TypeVar("T")

pytestmark = pytest.mark.timeout(60)

CHUNK = 1024
DOC = 5 * CHUNK + 100  # six chunks, the last one 100 bytes
LIMITS = Limits(max_chunk_bytes=CHUNK, max_blob_bytes=1 << 20)
SMALL = {
    "model_params": {"features": 8, "classes": 3, "hidden": 512, "samples": 300},
    "limits": Limits(max_chunk_bytes=4096, max_blob_bytes=1 << 20),
}


@pytest.mark.parametrize(
    ("reads", "same_object", "held"),
    [
        ([("a", 0, 4), ("a", 0, 4)], [False, True], 1),
        ([("a", 0, 4), ("b", 0, 4)], [False, False], 2),  # another document
        ([("a", 0, 4), ("a", 4, 8), ("a", 8, 12), ("a", 0, 4)], [False, False, False, False], 2),
        ([("a", 0, 4), ("a", 4, 8), ("a", 4, 8)], [False, False, True], 2),
    ],
)
def test_shared_chunks(
    reads: list[tuple[str, int, int]], same_object: list[bool], held: int
) -> None:
    docs = {"a": bytes(range(16)), "b": bytes(range(16, 32))}
    chunks = SharedChunks(keep=2)
    seen: dict[tuple[str, int, int], bytes] = {}
    for (digest, start, end), same in zip(reads, same_object, strict=True):
        piece = chunks.cut(digest, docs[digest], start, end)
        assert piece == docs[digest][start:end]
        earlier = seen.get((digest, start, end))
        assert (earlier is not None and piece is earlier) == same
        seen[(digest, start, end)] = piece
    assert len(chunks._held) == held


async def _held(dev: ScriptedDevice, digest: str) -> tuple[int, bool]:
    progress = await dev._on_blob_status({"blobId": digest})
    return int(progress["received"]), bool(progress.get("complete", False))


async def _on_server(srv: ServerHandle, fn: Callable[[], T]) -> T:
    """``fn()`` called on the server's loop (from the devices' loop)."""

    async def call() -> T:
        return fn()

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), srv.loop))


def _presend(srv: ServerHandle, version: int, data: bytes) -> Callable[[], Presend]:
    return lambda: srv.server.distributor.presend(version, data, sha256_hex(data))


async def _joined(srv: ServerHandle) -> ScriptedDevice:
    dev = ScriptedDevice(srv.url, name="a", max_chunk_bytes=CHUNK)
    await dev.join()
    await dev.until(lambda: 0 in dev.weights, what="version 0")
    return dev


def test_presend_sends_all_but_the_last_chunk_until_durable(tmp_path: Path) -> None:
    data = secrets.token_bytes(DOC)
    digest = sha256_hex(data)

    async def scenario(srv: ServerHandle) -> None:
        dev = await _joined(srv)
        before = len(dev.chunk_sizes)
        presend = await _on_server(srv, _presend(srv, 7, data))
        await dev.until(lambda: sum(dev.chunk_sizes[before:]) >= DOC - 100, what="chunks")
        for _ in range(3):  # round trips: whatever else the server sent has arrived
            await dev.heartbeat()
        assert await _held(dev, digest) == (DOC - 100, False)
        assert dev.chunk_sizes[before:] == [CHUNK] * 5
        await _on_server(srv, presend.durable)
        await dev.until(lambda: len(dev.chunk_sizes) == before + 6, what="the last chunk")
        assert await _held(dev, digest) == (DOC, True)
        assert dev.chunk_sizes[-1] == 100
        assert [m["version"] for m in dev.globals_meta] == [0]  # nothing named version 7

    with running_server(tmp_path, min_clients=5, evaluate_every=0, limits=LIMITS) as srv:
        run_devices(scenario(srv))


def test_an_abandoned_presend_never_completes_and_frees_the_device(tmp_path: Path) -> None:
    first, second = secrets.token_bytes(DOC), secrets.token_bytes(DOC)

    async def scenario(srv: ServerHandle) -> None:
        dev = await _joined(srv)
        before = len(dev.chunk_sizes)
        abandoned = await _on_server(srv, _presend(srv, 7, first))
        await dev.until(lambda: len(dev.chunk_sizes) >= before + 5, what="chunks")
        await _on_server(srv, abandoned.abandon)
        later = await _on_server(srv, _presend(srv, 8, second))
        await _on_server(srv, later.durable)
        await dev.until(lambda: len(dev.chunk_sizes) >= before + 11, what="the second")
        for _ in range(3):
            await dev.heartbeat()
        assert await _held(dev, sha256_hex(first)) == (DOC - 100, False)
        assert await _held(dev, sha256_hex(second)) == (DOC, True)
        assert len(dev.chunk_sizes) == before + 11

    with running_server(tmp_path, min_clients=5, evaluate_every=0, limits=LIMITS) as srv:
        run_devices(scenario(srv))


@dataclass(eq=False)
class _NotesSaved(ScriptedDevice):
    """Notes, as each blob completes, the version the server's ``history.json`` names."""

    state_dir: Path = Path()
    saved_when_complete: list[int] = field(default_factory=list)

    def _accept_chunk(self, payload: Any) -> BlobProgress | dict[str, Any]:
        ack = super()._accept_chunk(payload)
        if isinstance(ack, BlobProgress) and ack.complete:
            meta = json.loads((self.state_dir / HISTORY_FILE).read_text(encoding="utf-8"))
            self.saved_when_complete.append(int(meta["version"]))
        return ack


@pytest.mark.parametrize("in_place", [False, True])
def test_a_rounds_new_global_goes_ahead_once_and_completes_only_once_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool
) -> None:
    # in_place: the aggregate computed into its document (server.document), as for a
    # large model; else encoded as usual. The devices get the same version either way.
    if in_place:
        monkeypatch.setattr(server.coordinator, "IN_PLACE_MIN_BYTES", 0)
    state_dir = tmp_path / "server-state"

    async def scenario(srv: ServerHandle) -> None:
        devs = [
            _NotesSaved(srv.url, name=n, max_chunk_bytes=4096, state_dir=state_dir)
            for n in ("a", "b")
        ]
        for dev in devs:
            await dev.join()
        await devs[0].until(lambda: all(len(d.starts) == 1 for d in devs), what="round 1")
        sent_before = [len(d.chunk_sizes) for d in devs]
        for dev in devs:
            update = {k: v * np.float32(0.5) for k, v in dev.weights[0].items()}
            ack = await dev.submit(
                dev.starts[0]["roundId"], 0, update, num_samples=4, inline_limit=4096
            )
            assert ack["ok"] is True
        await devs[0].until(lambda: all(len(d.starts) == 2 for d in devs), what="round 2")
        for dev, before in zip(devs, sent_before, strict=True):
            assert 1 in dev.weights
            for name, arr in dev.weights[1].items():  # the mean of two halves of version 0
                assert np.array_equal(arr, dev.weights[0][name] * np.float32(0.5))
            size = len(encode(dev.weights[1]))
            assert size > 5 * 4096
            # Version 1 came once, chunk by chunk (ahead, then its last chunk): none again.
            assert sum(dev.chunk_sizes[before:]) == size
            # Its last chunk came only once history.json named it (version 0 before it).
            assert dev.saved_when_complete == [0, 1]

    with running_server(
        tmp_path, min_clients=2, clients_per_round=2, rounds=2, evaluate_every=0, **SMALL
    ) as srv:
        run_devices(scenario(srv))
