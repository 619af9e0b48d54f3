"""Task files on the device: the packages and data shares a packaged round needs.

Contract (a loop-only object; disk work runs in worker threads, one at a time):

* ``task:file`` without ``blobId`` is answered from the cache (``held``); with
  ``blobId`` the blob the server just sent (through the session's one
  :class:`client.transfer.BlobStore`, fed by ``blob:chunk``) is taken, checked against
  the message's size and SHA-256 (``size_mismatch`` / ``checksum_mismatch``) and kept
  in the :class:`client.session.filecache.FileCache` under the data dir; a file that
  cannot fit the cache is refused ``blob_too_large``; a disk error ``internal_error``.
  A refusal is a :class:`client.errors.FedtrayError` (the guard answers an ErrorAck).
* :meth:`TaskFiles.locate` finds the files a ``training:start`` names: the paths, or a
  ``missing_package`` refusal in plain words. The files of the round being trained
  (``in_use()``) are never evicted.
* A package whose data stays on the device (manifest ``data.source == "local"``; the
  server sends no data share) trains on the folder the user chose for that task (the
  ``task_data`` setting, read through ``task_data()``): :meth:`TaskFiles.locate` checks
  the package and that data against the manifest (torch-free, in a worker thread) and
  refuses the round ``no_local_data`` in plain words when there is none or it does not
  fit, so the dashboard shows why.
* Torch-free: the package is only read as data here (manifest, arrays); the worker
  process is the only place its program is built
  (:func:`client.taskpkg.task.load_packaged_task`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from client.errors import FedtrayError
from client.protocol import (
    EvaluationStart,
    FileRef,
    TaskFile,
    TaskFileHeld,
    TaskFileKind,
    TrainingStart,
    TrainingStartAck,
    WeightsRef,
)
from client.session.filecache import FileCache
from client.taskpkg.archive import read_package
from client.taskpkg.localdata import data_folder, read_data
from client.transfer import BlobStore

__all__ = ["DEFAULT_PACKAGE_CACHE_BYTES", "SUFFIX", "LocatedFiles", "TaskFiles"]

log = logging.getLogger(__name__)

#: Bytes of task files a device keeps unless told otherwise (advertised at registration).
DEFAULT_PACKAGE_CACHE_BYTES: Final = 2 * 1024**3
#: The file name suffix of each kind of task file in the cache.
SUFFIX: Final[dict[TaskFileKind, str]] = {"package": ".fedtask", "data": ".safetensors"}
SERVER_PEER: Final = "server"


@dataclass(frozen=True)
class LocatedFiles:
    """Where a packaged round's files are (``data`` None: the device reads its own)."""

    package: Path
    package_sha256: str
    data: Path | None
    data_sha256: str | None


class TaskFiles:
    """Receives task files and finds them for rounds (see the module docstring)."""

    def __init__(
        self,
        blobs: BlobStore,
        cache: FileCache,
        *,
        in_use: Callable[[], set[str]],
        task_data: Callable[[], Mapping[str, str]] = dict,
    ) -> None:
        self._blobs = blobs
        self.cache = cache
        self._in_use = in_use
        self._task_data = task_data
        self._lock = asyncio.Lock()

    async def on_task_file(self, message: TaskFile) -> TaskFileHeld:
        suffix = SUFFIX[message.kind]
        if message.blob_id is None:
            async with self._lock:
                path = await asyncio.to_thread(self.cache.path, message.sha256, suffix)
            return TaskFileHeld(held=path is not None)
        ref = WeightsRef(
            format="safetensors",  # the transfer checks size and sha256 only
            size=message.size,
            sha256=message.sha256,
            blob_id=message.blob_id,
        )
        data = self._blobs.take(SERVER_PEER, ref)
        async with self._lock:
            try:
                await asyncio.to_thread(
                    self.cache.put,
                    message.sha256,
                    data,
                    suffix,
                    size=message.size,
                    keep=self._in_use(),
                )
            except OSError as exc:
                raise FedtrayError(
                    "internal_error", f"cannot keep the {message.kind} file: {exc}"
                ) from exc
        log.info("received %s file %s (%d bytes)", message.kind, message.sha256[:12], message.size)
        return TaskFileHeld(held=True)

    async def locate(
        self, start: TrainingStart | EvaluationStart
    ) -> LocatedFiles | TrainingStartAck:
        """The files ``start`` names, or its ``missing_package`` refusal."""
        assert start.package is not None
        async with self._lock:
            package = await self._find(start.package, "package")
            data = await self._find(start.data, "data") if start.data is not None else None
        missing = [
            kind
            for kind, ref, path in (("package", start.package, package), ("data", start.data, data))
            if ref is not None and path is None
        ]
        if missing:
            return TrainingStartAck(
                accepted=False,
                reason="missing_package",
                detail=f"this device does not hold the round's {' and '.join(missing)} file",
            )
        assert package is not None
        if start.data is None:
            try:
                data = await asyncio.to_thread(local_data_of, package, self._task_data())
            except FedtrayError as exc:
                return TrainingStartAck(
                    accepted=False,
                    reason="no_local_data" if exc.code == "no_local_data" else "missing_package",
                    detail=exc.message,
                )
        return LocatedFiles(
            package=package,
            package_sha256=start.package.sha256,
            data=data,
            data_sha256=start.data.sha256 if start.data is not None else None,
        )

    async def _find(self, ref: FileRef, kind: TaskFileKind) -> Path | None:
        path = await asyncio.to_thread(self.cache.path, ref.sha256, SUFFIX[kind])
        if path is None:
            return None
        try:
            size = path.stat().st_size
        except OSError:
            return None
        return path if size == ref.size else None


def local_data_of(package: Path, folders: Mapping[str, str]) -> Path | None:
    """The device's own data folder for ``package`` when its data stays local (checked
    against the manifest), None when the server sends the data; FedtrayError when the
    package or the data cannot be used (blocking: run it in a thread)."""
    contents = read_package(package, require_data=False)
    manifest = contents.manifest
    if manifest.data.source != "local":
        return None
    folder = data_folder(manifest.name, folders)
    try:
        read_data(folder, manifest)
    except FedtrayError as exc:
        raise FedtrayError("no_local_data", exc.message) from None
    return folder
