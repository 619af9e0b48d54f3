"""Shared storage for weights, updates and partial sums: a directory or PostgreSQL.

Two implementations of :class:`server.cluster.contracts.SharedBlobs`:

* :class:`DirectoryBlobs` (``--shared-dir DIR``, one machine, or a shared file system) --
  a blob is the file ``DIR/<key>``; a key is a relative name ``<sha[:2]>/<sha>-<random>``.
  Written to ``DIR/.incoming/`` while hashed, fsync'ed, then renamed into place (and the
  folder fsync'ed): a reader sees a whole blob or none.
* :class:`PostgresBlobs` (several machines) -- a blob is a PostgreSQL large object; table
  ``fedtray_blobs`` (schema component ``blobs``) maps ``key`` to its ``oid``, ``sha256``,
  ``size`` and ``created_at``. The object is written with ``lo_put`` and read with
  ``lo_get`` in chunks of ``chunk_bytes`` (1 MiB), so memory stays bounded whatever the
  size; object and row are created in one transaction (a refused put leaves nothing).
  :func:`connect_postgres` opens it (pool, schema) or raises ClusterError.

Promises (both):

* ``put_file``/``put_bytes`` hash the bytes as they store them and return the key only
  when they match ``sha256``; otherwise BlobIntegrityError and nothing is stored.
* ``get_file`` writes ``dest`` atomically (a temp file beside it, fsync, rename) and only
  when the stored bytes hash to ``sha256``; otherwise BlobIntegrityError and ``dest`` is
  untouched. An unknown key raises ClusterError.
* ``delete`` of an unknown key is no error. Keys are never reused (a random part), so
  deleting one blob never removes another's bytes, even with equal contents.
* File I/O runs in worker threads; the event loop never blocks on a disk.

Raises: BlobIntegrityError, ClusterError (unknown or malformed key, engine failures).
Never: holds a whole blob in memory (``put_bytes`` is given one), or accepts a key that
leaves the directory (``..``, absolute paths).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import asyncpg

from server.cluster.contracts import BlobIntegrityError, ClusterError, SharedBlobs
from server.cluster.pg import create_pool, engine_errors, ensure_schema

__all__ = ["CHUNK_BYTES", "DirectoryBlobs", "PostgresBlobs", "connect_postgres", "new_key"]

#: Bytes read, written or sent to PostgreSQL at a time.
CHUNK_BYTES = 1 << 20
_SHA = re.compile(r"^[0-9a-f]{64}$")
_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}-[0-9a-f]{32}$")
_INCOMING = ".incoming"

SCHEMA_VERSION = 1
SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS fedtray_blobs (
        key text PRIMARY KEY,
        oid oid NOT NULL,
        sha256 text NOT NULL,
        size bigint NOT NULL,
        created_at double precision NOT NULL)""",
)


def _check_sha(sha256: str) -> str:
    sha = sha256.lower()
    if not _SHA.match(sha):
        raise BlobIntegrityError(f"not a SHA-256: {sha256[:80]!r}")
    return sha


def _check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ClusterError(f"not a blob key: {key[:120]!r}")
    return key


def new_key(sha256: str) -> str:
    """A fresh key for bytes hashing to ``sha256``."""
    sha = _check_sha(sha256)
    return f"{sha[:2]}/{sha}-{uuid.uuid4().hex}"


def _mismatch(what: str, want: str, got: str) -> BlobIntegrityError:
    return BlobIntegrityError(f"{what}: bytes hash to {got[:16]}..., expected {want[:16]}...")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_verified(src: BinaryIO, dest: Path, sha: str, what: str) -> None:
    """Copy ``src`` to ``dest`` through a temp file beside it, verified, atomically."""
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha:
            raise _mismatch(what, sha, digest.hexdigest())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


# ------------------------------------------------------------------ directory


class DirectoryBlobs:
    """Blobs as files under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / _INCOMING).mkdir(parents=True, exist_ok=True)

    def path_of(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _store(self, src: BinaryIO, sha: str) -> str:
        key = new_key(sha)
        incoming = self.root / _INCOMING / key.replace("/", "_")
        _copy_verified(src, incoming, sha, "blob to store")
        final = self.path_of(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(incoming, final)
        _fsync_dir(final.parent)
        return key

    async def put_file(self, path: Path, sha256: str) -> str:
        sha = _check_sha(sha256)

        def store() -> str:
            with Path(path).open("rb") as src:
                return self._store(src, sha)

        try:
            return await asyncio.to_thread(store)
        except OSError as exc:
            raise ClusterError(f"shared directory {self.root}: {exc}") from exc

    async def put_bytes(self, data: bytes, sha256: str) -> str:
        sha = _check_sha(sha256)

        def store() -> str:
            return self._store(io.BytesIO(data), sha)

        try:
            return await asyncio.to_thread(store)
        except OSError as exc:
            raise ClusterError(f"shared directory {self.root}: {exc}") from exc

    async def get_file(self, key: str, sha256: str, dest: Path) -> None:
        sha = _check_sha(sha256)
        source = self.path_of(key)

        def fetch() -> None:
            try:
                src = source.open("rb")
            except FileNotFoundError as exc:
                raise ClusterError(f"blob {key} is not in {self.root}") from exc
            with src:
                _copy_verified(src, Path(dest), sha, f"blob {key}")

        try:
            await asyncio.to_thread(fetch)
        except OSError as exc:
            raise ClusterError(f"shared directory {self.root}: {exc}") from exc

    async def delete(self, key: str) -> None:
        target = self.path_of(key)
        try:
            await asyncio.to_thread(target.unlink, missing_ok=True)
        except OSError as exc:
            raise ClusterError(f"shared directory {self.root}: {exc}") from exc


# ------------------------------------------------------------------ PostgreSQL


class PostgresBlobs:
    """Blobs as PostgreSQL large objects (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._pool = pool
        self._chunk = chunk_bytes

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pool.close(), timeout=5.0)
        self._pool.terminate()

    async def _store(self, src: BinaryIO, sha: str) -> str:
        key = new_key(sha)
        digest = hashlib.sha256()
        size = 0
        with engine_errors("blob store"):
            async with self._pool.acquire() as conn, conn.transaction():
                oid = await conn.fetchval("SELECT lo_create(0)")
                while chunk := await asyncio.to_thread(src.read, self._chunk):
                    digest.update(chunk)
                    await conn.execute("SELECT lo_put($1, $2, $3)", oid, size, chunk)
                    size += len(chunk)
                if digest.hexdigest() != sha:
                    raise _mismatch("blob to store", sha, digest.hexdigest())
                await conn.execute(
                    "INSERT INTO fedtray_blobs (key, oid, sha256, size, created_at)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    key,
                    oid,
                    sha,
                    size,
                    time.time(),
                )
        return key

    async def put_file(self, path: Path, sha256: str) -> str:
        sha = _check_sha(sha256)
        try:
            src = await asyncio.to_thread(Path(path).open, "rb")
        except OSError as exc:
            raise ClusterError(f"blob to store: {exc}") from exc
        try:
            return await self._store(src, sha)
        finally:
            src.close()

    async def put_bytes(self, data: bytes, sha256: str) -> str:
        return await self._store(io.BytesIO(data), _check_sha(sha256))

    async def get_file(self, key: str, sha256: str, dest: Path) -> None:
        sha = _check_sha(sha256)
        _check_key(key)
        dest = Path(dest)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        try:
            with engine_errors(f"blob {key}"):
                async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                    row = await conn.fetchrow(
                        "SELECT oid, sha256, size FROM fedtray_blobs WHERE key = $1", key
                    )
                    if row is None:
                        raise ClusterError(f"blob {key} is not in PostgreSQL")
                    if row["sha256"] != sha:
                        raise _mismatch(f"blob {key}", sha, row["sha256"])
                    out = await asyncio.to_thread(tmp.open, "wb")
                    try:
                        offset = 0
                        while offset < row["size"]:
                            chunk = await conn.fetchval(
                                "SELECT lo_get($1, $2, $3)", row["oid"], offset, self._chunk
                            )
                            if not chunk:
                                break
                            digest.update(chunk)
                            await asyncio.to_thread(out.write, chunk)
                            offset += len(chunk)
                        await asyncio.to_thread(out.flush)
                        await asyncio.to_thread(os.fsync, out.fileno())
                    finally:
                        out.close()
            if digest.hexdigest() != sha:
                raise _mismatch(f"blob {key}", sha, digest.hexdigest())
            await asyncio.to_thread(os.replace, tmp, dest)
        except OSError as exc:
            raise ClusterError(f"blob {key} to {dest}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    async def delete(self, key: str) -> None:
        _check_key(key)
        with engine_errors(f"blob {key}"):
            async with self._pool.acquire() as conn, conn.transaction():
                oid = await conn.fetchval(
                    "DELETE FROM fedtray_blobs WHERE key = $1 RETURNING oid", key
                )
                if oid is not None:
                    await conn.execute("SELECT lo_unlink($1)", oid)


async def connect_postgres(
    url: str, *, max_size: int = 4, chunk_bytes: int = CHUNK_BYTES
) -> PostgresBlobs:
    """Blobs in the PostgreSQL at ``url`` (table created if missing); ClusterError when it
    is unreachable."""
    pool = await create_pool(url, max_size=max_size)
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn, "blobs", SCHEMA_VERSION, SCHEMA)
    except BaseException:
        pool.terminate()
        raise
    return PostgresBlobs(pool, chunk_bytes=chunk_bytes)


if TYPE_CHECKING:  # mypy proves the implementations satisfy their contract

    def _conforms(directory: DirectoryBlobs, postgres: PostgresBlobs) -> list[SharedBlobs]:
        return [directory, postgres]
