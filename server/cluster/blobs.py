"""Shared storage for weights, updates and partial sums (interim: a shared directory).

:class:`DirectoryBlobs` implements :class:`server.cluster.contracts.SharedBlobs` on a
directory every process of one machine can read and write.

Promises: a blob's key is its SHA-256 (content addressed: storing the same bytes twice is
one file); ``put_*`` writes to a temporary file in the directory, verifies the SHA-256 and
renames it into place, so a key returned names complete, verified bytes; ``get_file``
verifies again and writes ``dest`` atomically. Raises BlobIntegrityError when bytes do not
match, ClusterError (one line) when the directory cannot be used. Never: returns a key
before the bytes are in place, or overwrites a blob with different bytes.

(Interim until helper cinfra's module lands: PostgreSQL large objects are not here yet.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from server.cluster.contracts import BlobIntegrityError, ClusterError

__all__ = ["DirectoryBlobs"]

_KEY = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class DirectoryBlobs:
    """Blobs in a shared directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ClusterError(f"shared dir: not a blob key: {key[:80]!r}")
        return self.root / key[:2] / key

    def _tmp(self, where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=where, prefix=".tmp-")
        os.close(fd)
        return Path(name)

    def _put_file(self, src: Path, sha256: str) -> str:
        dest = self._path(sha256)
        try:
            tmp = self._tmp(dest.parent)
            try:
                shutil.copyfile(src, tmp)
                if _hash_file(tmp) != sha256:
                    raise BlobIntegrityError(f"shared dir: {src.name} does not hash to {sha256}")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise ClusterError(f"shared dir {self.root}: {exc}") from exc
        return sha256

    def _put_bytes(self, data: bytes, sha256: str) -> str:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BlobIntegrityError(f"shared dir: bytes do not hash to {sha256}")
        dest = self._path(sha256)
        try:
            tmp = self._tmp(dest.parent)
            try:
                tmp.write_bytes(data)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise ClusterError(f"shared dir {self.root}: {exc}") from exc
        return sha256

    def _get_file(self, key: str, sha256: str, dest: Path) -> None:
        src = self._path(key)
        try:
            tmp = self._tmp(dest.parent)
            try:
                shutil.copyfile(src, tmp)
                if _hash_file(tmp) != sha256:
                    raise BlobIntegrityError(f"shared dir: blob {key} does not hash to {sha256}")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        except FileNotFoundError as exc:
            raise ClusterError(f"shared dir: no blob {key}") from exc
        except OSError as exc:
            raise ClusterError(f"shared dir {self.root}: {exc}") from exc

    async def put_file(self, path: Path, sha256: str) -> str:
        return await asyncio.to_thread(self._put_file, path, sha256)

    async def put_bytes(self, data: bytes, sha256: str) -> str:
        return await asyncio.to_thread(self._put_bytes, data, sha256)

    async def get_file(self, key: str, sha256: str, dest: Path) -> None:
        await asyncio.to_thread(self._get_file, key, sha256, dest)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(OSError, ClusterError):
            self._path(key).unlink(missing_ok=True)
