"""A new version's document goes to the devices while it is saved, but never completes early.

* :class:`server.distribution.SharedChunks` (table): a range of one document is cut once
  and the same bytes object handed to every reader; at most ``keep`` chunks are held, the
  oldest dropped first.
* :meth:`server.distribution.Distributor.presend` over the real server (real Socket.IO on
  loopback, a scripted device with a small chunk limit): the device receives every chunk
  but the last at once; the last one only after :meth:`~server.distribution.Presend.
  durable`, and no ``weights:global`` names the version meanwhile. After
  :meth:`~server.distribution.Presend.abandon` the last chunk never goes, and the device's
  sends go on (a later presend to it completes).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from client.weights import sha256_hex
from server.distribution import Presend, SharedChunks
from tests.server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

T = TypeVar("T")

pytestmark = pytest.mark.timeout(60)

CHUNK = 1024
DOC = 5 * CHUNK + 100  # six chunks, the last one 100 bytes


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

    with running_server(tmp_path, min_clients=5, evaluate_every=0) as srv:
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

    with running_server(tmp_path, min_clients=5, evaluate_every=0) as srv:
        run_devices(scenario(srv))
