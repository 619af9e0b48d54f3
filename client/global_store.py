"""The global weights this device holds: the base of its next round.

Contract:

* The current version lives in ``<dir>/current.json`` (version, task, size, SHA-256 and
  the weights file's name) and the weights file it names, ``<dir>/global-v<version>-
  <first 16 hex digits of the SHA-256>.safetensors`` (a ``current.json`` written before
  files were named so, without a name, names ``<dir>/current.safetensors``); the default
  dir is ``<user data dir>/global``.
* :meth:`GlobalStore.save` writes the weights file under its own new name, then the
  JSON, each atomically (:mod:`client.atomicfile`); the JSON is the commit point. A new
  version's file never replaces an existing file (a rename over a file costs the
  filesystem a flush of the new data, milliseconds per round on ext4); the file of the
  version held before stays (a round or evaluation that started from it can still read
  it), every older weights file in the directory is deleted after the JSON is written
  (the directory is listed at the first save of a store; later saves delete the files
  this store knows of, as its one writer: those it listed or wrote, and those it could
  not delete before). That first listing also removes the temporary files an earlier
  run left when it was killed mid-write (never this process's own).
  Neither is fsynced: the global can be fetched from the server again, and
  :meth:`GlobalStore.current` verifies it, so a version torn by a power cut is detected
  and fetched again (a ``kill -9`` loses nothing: the OS holds the data). For the same
  reason the old JSON is deleted just before the new one is renamed in (a rename over a
  file costs ext4 a flush of the new data): a crash between the two leaves no JSON, so
  the device registers as holding nothing and is sent the global again. Raises
  :class:`OSError` when the disk refuses, leaving the previous version readable or (after
  a crash between the two writes) detectably inconsistent.
* A :class:`GlobalWeights` carries the weights file's
  :class:`client.atomicfile.FileIdentity` as it was when its SHA-256 was known to hold
  (just written from verified bytes, or just verified), so the trainer can trust the
  file without hashing it again while the identity is unchanged.
* :meth:`GlobalStore.current` returns the held version only when the JSON validates and
  the weights file it names has the recorded size and SHA-256; anything else (missing,
  torn, corrupt) is ``None`` with a log line, so the device re-registers as holding
  nothing and the server sends the global again. It never raises for file problems.
* It stores bytes it is given; checking that they are a valid weights document is the
  caller's job (:func:`client.weights.decode`). Weights are never unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from client.atomicfile import FileIdentity, file_identity, leftover_temp_target, write_atomic
from client.config import data_dir
from client.protocol import Identifier, NonNegInt, Sha256Hex

log = logging.getLogger(__name__)

#: The weights file a ``current.json`` without a ``file`` names (the older layout).
WEIGHTS_NAME: Final = "current.safetensors"
META_NAME: Final = "current.json"
WEIGHTS_SUFFIX: Final = ".safetensors"


def weights_name(version: int, sha256: str) -> str:
    """The weights file's name for ``version`` with SHA-256 ``sha256``."""
    return f"global-v{version}-{sha256[:16]}{WEIGHTS_SUFFIX}"


def default_global_dir() -> Path:
    """``<user data dir>/global`` (honours ``XDG_DATA_HOME``; computed per call)."""
    return data_dir() / "global"


_FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")]


class _Meta(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    version: NonNegInt
    task: Identifier
    size: NonNegInt
    sha256: Sha256Hex
    # A plain file name in the directory (no separators); None: WEIGHTS_NAME.
    file: _FileName | None = None


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


def _leftover_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file for one of this store's files (a weights file
    or the JSON) that another process (a crashed earlier run) left mid-write."""
    target = leftover_temp_target(name)
    return target is not None and (
        target in (WEIGHTS_NAME, META_NAME)
        or (target.startswith("global-v") and target.endswith(WEIGHTS_SUFFIX))
    )


class GlobalStore:
    """The directory holding the current global weights."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else default_global_dir()
        # The name of the weights file this store last wrote or verified (saves are
        # serialised by the one writer, the session's BaseWeights).
        self._held_name: str | None = None
        # The weights files in the directory (None: not listed yet; see _delete_older).
        self._files: set[str] | None = None

    @property
    def weights_path(self) -> Path:
        """The weights file ``current.json`` names (reads it; :data:`WEIGHTS_NAME` when
        it names none or cannot be read)."""
        try:
            meta = _Meta.model_validate_json((self.directory / META_NAME).read_bytes())
        except (OSError, ValidationError):
            return self.directory / WEIGHTS_NAME
        return self._path_of(meta)

    def _path_of(self, meta: _Meta) -> Path:
        return self.directory / (meta.file or WEIGHTS_NAME)

    def save(
        self, *, version: int, task: str, data: bytes | bytearray, sha256: str | None = None
    ) -> GlobalWeights:
        """Store ``data`` (a safetensors document) as the current version.

        ``sha256`` is the document's digest when the caller has already verified it (the
        transfer did), which saves hashing it a second time.
        """
        digest = sha256 if sha256 is not None else hashlib.sha256(data).hexdigest()
        name = weights_name(version, digest)
        # Built from checked values (the message was validated, the digest verified or
        # computed here): not validated again; current() validates what it reads.
        meta = _Meta.model_construct(
            version=version, task=task, size=len(data), sha256=digest, file=name
        )
        # Kept: a round may have started from it.
        previous = self._held_name or self.weights_path.name
        path = self.directory / name
        write_atomic(path, data, durable=False)
        if self._files is not None:
            self._files.add(name)
        # Saves are serialised by the caller: nothing replaced the file since the write.
        identity = file_identity(path)
        write_atomic(
            self.directory / META_NAME,
            meta.model_dump_json().encode("utf-8"),
            durable=False,
            fresh=True,  # the old JSON deleted first: no flush for a rename over it
        )
        self._held_name = name
        self._delete_older(keep={name, previous})
        return GlobalWeights(version, task, path, len(data), digest, identity)

    def _delete_older(self, keep: set[str]) -> None:
        """Delete the weights files of versions before the previous one (module docstring);
        a file that cannot be deleted now is tried again at the next save.

        The directory is listed once per store (its first save); after that this store,
        the directory's one writer, knows every weights file in it (those listed, those
        it wrote since), so a save lists nothing."""
        files = self._files
        if files is None:
            files, leftovers = set(), []
            with os.scandir(self.directory) as entries:
                for e in entries:
                    if e.name.endswith(WEIGHTS_SUFFIX) and e.is_file():
                        files.add(e.name)
                    elif _leftover_temp(e.name) and e.is_file():
                        leftovers.append(e.name)
            self._files = files
            for name in leftovers:
                log.info("removing an unfinished temporary file %s", self.directory / name)
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))
        for name in sorted(files - keep):
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning(
                    "cannot delete an old global weights file %s: %s", self.directory / name, exc
                )
                continue
            files.discard(name)

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
        path = self._path_of(meta)
        try:
            # Taken before reading: a file replaced meanwhile shows another identity.
            identity = file_identity(path)
            data = path.read_bytes()
        except OSError as exc:
            log.warning("ignoring the stored global weights: %s", exc)
            return None
        if len(data) != meta.size or hashlib.sha256(data).hexdigest() != meta.sha256:
            log.warning(
                "ignoring the stored global weights v%d: the file does not match its record",
                meta.version,
            )
            return None
        self._held_name = path.name
        return GlobalWeights(meta.version, meta.task, path, meta.size, meta.sha256, identity)
