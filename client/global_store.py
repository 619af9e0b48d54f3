"""The global weights this device holds: the base of its next round.

Contract:

* The current version lives in ``<dir>/current.safetensors`` with ``<dir>/current.json``
  (version, task, size, SHA-256); the default dir is ``<user data dir>/global``.
* :meth:`GlobalStore.save` writes the weights file and then the JSON, each atomically
  (:mod:`client.atomicfile`); the JSON is the commit point. Neither is fsynced: the
  global can be fetched from the server again, and :meth:`GlobalStore.current` verifies
  it, so a version torn by a power cut is detected and fetched again (a ``kill -9``
  loses nothing: the OS holds the data). Raises :class:`OSError` when the disk refuses,
  leaving the previous version readable or (after a crash between the two writes)
  detectably inconsistent.
* A :class:`GlobalWeights` carries the weights file's
  :class:`client.atomicfile.FileIdentity` as it was when its SHA-256 was known to hold
  (just written from verified bytes, or just verified), so the trainer can trust the
  file without hashing it again while the identity is unchanged.
* :meth:`GlobalStore.current` returns the held version only when the JSON validates and
  the weights file has the recorded size and SHA-256; anything else (missing, torn,
  corrupt) is ``None`` with a log line, so the device re-registers as holding nothing
  and the server sends the global again. It never raises for file problems.
* It stores bytes it is given; checking that they are a valid weights document is the
  caller's job (:func:`client.weights.decode`). Weights are never unpickled.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, ValidationError

from client.atomicfile import FileIdentity, file_identity, write_atomic
from client.config import data_dir
from client.protocol import Identifier, NonNegInt, Sha256Hex

log = logging.getLogger(__name__)

WEIGHTS_NAME: Final = "current.safetensors"
META_NAME: Final = "current.json"


def default_global_dir() -> Path:
    """``<user data dir>/global`` (honours ``XDG_DATA_HOME``; computed per call)."""
    return data_dir() / "global"


class _Meta(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    version: NonNegInt
    task: Identifier
    size: NonNegInt
    sha256: Sha256Hex


@dataclass(frozen=True)
class GlobalWeights:
    """A held global version (safetensors file on disk); ``identity``: see the module
    docstring (``None`` when unknown)."""

    version: int
    task: str
    path: Path
    size: int
    sha256: str
    identity: FileIdentity | None = None


class GlobalStore:
    """The directory holding the current global weights."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else default_global_dir()

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_NAME

    def save(
        self, *, version: int, task: str, data: bytes | bytearray, sha256: str | None = None
    ) -> GlobalWeights:
        """Store ``data`` (a safetensors document) as the current version.

        ``sha256`` is the document's digest when the caller has already verified it (the
        transfer did), which saves hashing it a second time.
        """
        digest = sha256 if sha256 is not None else hashlib.sha256(data).hexdigest()
        meta = _Meta(version=version, task=task, size=len(data), sha256=digest)
        write_atomic(self.weights_path, data, durable=False)
        # Saves are serialised by the caller: nothing replaced the file since the write.
        identity = file_identity(self.weights_path)
        write_atomic(
            self.directory / META_NAME, meta.model_dump_json().encode("utf-8"), durable=False
        )
        return GlobalWeights(version, task, self.weights_path, len(data), digest, identity)

    def current(self) -> GlobalWeights | None:
        """The held version, verified against its JSON; ``None`` when there is none usable."""
        meta_path = self.directory / META_NAME
        try:
            meta = _Meta.model_validate_json(meta_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning(
                "ignoring the stored global weights: %s is unreadable (%s)",
                meta_path,
                str(exc).splitlines()[0],
            )
            return None
        try:
            # Taken before reading: a file replaced meanwhile shows another identity.
            identity = file_identity(self.weights_path)
            data = self.weights_path.read_bytes()
        except OSError as exc:
            log.warning("ignoring the stored global weights: %s", exc)
            return None
        if len(data) != meta.size or hashlib.sha256(data).hexdigest() != meta.sha256:
            log.warning(
                "ignoring the stored global weights v%d: the file does not match its record",
                meta.version,
            )
            return None
        return GlobalWeights(
            meta.version, meta.task, self.weights_path, meta.size, meta.sha256, identity
        )
