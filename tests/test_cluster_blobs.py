"""server/cluster/blobs.py: both shared stores (a directory; PostgreSQL large objects on a
real server) store and return bytes verified by SHA-256, refuse bytes that do not match,
and write their destination atomically."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from server.cluster import blobs as cb
from server.cluster.contracts import BlobIntegrityError, ClusterError, SharedBlobs
from tests.engines import PostgresServer
from tests.waiting import scaled

T = TypeVar("T")
#: A small chunk so a few hundred KiB already span many chunks.
CHUNK = 64 * 1024
KINDS = ["directory", "postgres"]


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), scaled(60.0)))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def store(kind: str, tmp_path: Path, url: str) -> AsyncIterator[SharedBlobs]:
    if kind == "directory":
        yield cb.DirectoryBlobs(tmp_path / "shared")
        return
    blobs = await cb.connect_postgres(url, chunk_bytes=CHUNK)
    try:
        yield blobs
    finally:
        await blobs.close()


@pytest.fixture
def db_url(request: pytest.FixtureRequest) -> str:
    """A database for the postgres kind only (the directory kind starts no server)."""
    if request.node.callspec.params["kind"] == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return ""


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_of_a_multi_chunk_file_and_bytes(kind: str, tmp_path: Path, db_url: str) -> None:
    data = os.urandom(5 * CHUNK + 123)
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    async def body() -> None:
        async with store(kind, tmp_path, db_url) as blobs:
            key = await blobs.put_file(src, sha(data))
            key2 = await blobs.put_bytes(b"small", sha(b"small"))
            same = await blobs.put_file(src, sha(data).upper())  # equal bytes, own key
            assert len({key, key2, same}) == 3
            await blobs.get_file(key, sha(data), tmp_path / "out.bin")
            assert (tmp_path / "out.bin").read_bytes() == data
            await blobs.get_file(key2, sha(b"small"), tmp_path / "small")
            assert (tmp_path / "small").read_bytes() == b"small"
            await blobs.delete(same)
            await blobs.delete(same)  # gone already: no error
            with pytest.raises(ClusterError, match="is not in"):
                await blobs.get_file(same, sha(data), tmp_path / "never")
            await blobs.get_file(key, sha(data), tmp_path / "again.bin")  # still there
            assert not (tmp_path / "never").exists()
            leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
            assert leftovers == []

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_that_do_not_match_their_sha_are_refused_on_put(
    kind: str, tmp_path: Path, db_url: str, postgres_server: PostgresServer
) -> None:
    data = os.urandom(3 * CHUNK)
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    async def body() -> None:
        async with store(kind, tmp_path, db_url) as blobs:
            with pytest.raises(BlobIntegrityError, match="expected"):
                await blobs.put_file(src, sha(b"other"))
            with pytest.raises(BlobIntegrityError):
                await blobs.put_bytes(b"x", sha(b"y"))
            with pytest.raises(BlobIntegrityError, match="not a SHA-256"):
                await blobs.put_bytes(b"x", "../../etc/passwd")

    run(body)
    if kind == "directory":
        stored = [p for p in (tmp_path / "shared").rglob("*") if p.is_file()]
        assert stored == []
    else:
        dbname = db_url.rsplit("/", 1)[1]
        counts = postgres_server.sql(
            dbname,
            "SELECT (SELECT count(*) FROM fedtray_blobs) || ',' ||"
            " (SELECT count(*) FROM pg_largeobject_metadata)",
        )
        assert counts.strip() == "0,0"


@pytest.mark.parametrize("kind", KINDS)
def test_tampered_stored_bytes_are_refused_on_get(
    kind: str, tmp_path: Path, db_url: str, postgres_server: PostgresServer
) -> None:
    data = os.urandom(2 * CHUNK + 7)
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"previous")

    async def body() -> None:
        async with store(kind, tmp_path, db_url) as blobs:
            key = await blobs.put_bytes(data, sha(data))
            if isinstance(blobs, cb.DirectoryBlobs):
                path = blobs.path_of(key)
                path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # always another byte
            else:
                dbname = db_url.rsplit("/", 1)[1]
                await asyncio.to_thread(
                    postgres_server.sql,
                    dbname,
                    f"SELECT lo_put(oid, {CHUNK + 5}, '\\x{data[CHUNK + 5] ^ 0xFF:02x}') "
                    "FROM fedtray_blobs "
                    f"WHERE key = '{key}'",
                )
            with pytest.raises(BlobIntegrityError, match=f"blob {key}"):
                await blobs.get_file(key, sha(data), dest)
            # Asking for other bytes than were stored is refused too.
            with pytest.raises(BlobIntegrityError):
                await blobs.get_file(key, sha(b"other"), dest)

    run(body)
    assert dest.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_keys_that_leave_the_directory_are_refused(tmp_path: Path) -> None:
    blobs = cb.DirectoryBlobs(tmp_path / "shared")
    for key in ("../x", "/etc/passwd", "ab/../../x", ""):
        with pytest.raises(ClusterError, match="not a blob key"):
            run(lambda key=key: blobs.get_file(key, "a" * 64, tmp_path / "d"))  # type: ignore[misc]
