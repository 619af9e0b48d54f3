"""The training worker's files in the work dir: their names, which are stale, and their owner.

Contract:

* :func:`work_key` names one piece of training work and its files
  (``work-v<base_version>-<24 hex>``; the checkpoint is ``<stem>.ckpt``, the output
  ``<stem>.safetensors``). The hash covers exactly what decides the result of the work:
  the task, its model parameters, the training config (seed included), the data
  partition, the base weights (version and SHA-256) and, for a packaged task, the
  package's and the data share's SHA-256 (absent for an installed task, whose keys are
  unchanged). The round id, the deadline and
  the wire format of the update are NOT in it: they are the envelope the server puts
  around the work, not the work. Why that is safe: the trainer seeds every random stream
  from the config and the partition and starts from the base weights, so the trained
  update is a pure function of the hashed inputs; a checkpoint of one offer of the work
  is a valid prefix of any other offer of the same work (e.g. the server re-offering a
  round to a device that reconnects, or retrying an abandoned round under a new round id
  with the same partition). The key is computed once, where the job is built
  (:meth:`WorkDir.job`), and travels in the :class:`client.worker_messages.TrainJob`; the
  trainer trusts a checkpoint only when it records the same key, and refuses a base
  file whose SHA-256 is not the one in the job.
* :func:`stale_work_files` (pure) picks, from a directory listing, the files that can
  never be resumed: checkpoints, outputs and interrupted temporary writes
  (``.<stem>.<ext>.<random>.tmp``, left by a ``kill -9`` mid-write) of other work, and
  files of the old round-id naming (``round-<24 hex>``). It never picks a name it does
  not recognise, the files of a kept stem, nor anything of a busy stem (one being
  written right now, temporaries included).
* :func:`remove_stale` (the I/O edge) deletes what :func:`stale_work_files` picks;
  a file that cannot be deleted is logged and skipped. It never raises for file problems.
* :class:`WorkDir` is the ONE owner of the work directory: it builds jobs (key and file
  names), creates the directory and deletes stale files; :class:`JobFiles` is the only
  writer, deleter and mover of one job's checkpoint and output (the trainers and the
  session use it). A finished output leaves the work directory only through
  :meth:`JobFiles.handing_over_output` (e.g. to :class:`client.pending.PendingStore`).
  Nothing else creates, deletes or moves files there.
* Durability: checkpoints and outputs are written atomically but NOT fsynced (they can
  be recomputed, and survive a ``kill -9`` anyway: the OS holds the data); the handing
  over fsyncs the output before it appears at its target, so what the receiver keeps is
  durable (docs/architecture.md, "What is fsynced and why").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import JsonValue

from client.atomicfile import FileIdentity, move_into, write_atomic
from client.protocol import Partition, TrainingConfig
from client.worker_messages import DEFAULT_CHECKPOINT_INTERVAL, TrainJob

__all__ = [
    "CHECKPOINT_SUFFIX",
    "OUTPUT_SUFFIX",
    "JobFiles",
    "WorkDir",
    "remove_stale",
    "stale_work_files",
    "work_key",
]

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIX: Final = ".ckpt"
OUTPUT_SUFFIX: Final = ".safetensors"
_STEM = r"(?:work-v(?P<version>\d+)|round)-[0-9a-f]{24}"
_FINAL = re.compile(rf"(?P<stem>{_STEM})\.(?:ckpt|safetensors)")
_TEMP = re.compile(rf"\.(?P<stem>{_STEM})\.(?:ckpt|safetensors)\.[^/\\]+\.tmp")


def work_key(
    *,
    task: str,
    model_params: Mapping[str, JsonValue],
    config: TrainingConfig,
    partition: Partition,
    base_version: int,
    base_sha256: str,
    package_sha256: str | None = None,
    data_sha256: str | None = None,
) -> str:
    """The key (and file stem) of this training work (see the module docstring)."""
    identity: dict[str, JsonValue] = {
        "task": task,
        "params": dict(model_params),
        "config": config.model_dump(mode="json"),
        "partition": partition.model_dump(mode="json"),
        "base_version": base_version,
        "base_sha256": base_sha256,
    }
    if package_sha256 is not None:
        identity["package_sha256"] = package_sha256
    if data_sha256 is not None:
        identity["data_sha256"] = data_sha256
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()
    return f"work-v{base_version}-{digest[:24]}"


def stale_work_files(
    names: Iterable[str],
    *,
    keep: Collection[str] = (),
    busy: Collection[str] = (),
    below_version: int | None = None,
) -> list[str]:
    """The names among ``names`` to delete, sorted.

    ``keep``: stems whose checkpoint and output stay (their leftover temporaries go);
    ``busy``: stems none of whose files are touched. With ``below_version``, only work
    on an older base is stale (old-style names, whose base is unknown, count as older).
    """
    stale: list[str] = []
    for name in names:
        final = _FINAL.fullmatch(name)
        match = final or _TEMP.fullmatch(name)
        if match is None:
            continue
        stem = match["stem"]
        if stem in busy or (final is not None and stem in keep):
            continue
        version = match["version"]
        if below_version is not None and version is not None and int(version) >= below_version:
            continue
        stale.append(name)
    return sorted(stale)


def remove_stale(
    directory: Path,
    *,
    keep: Collection[str] = (),
    busy: Collection[str] = (),
    below_version: int | None = None,
) -> list[Path]:
    """Delete the stale files of ``directory`` (see :func:`stale_work_files`); the deleted."""
    try:
        names = [p.name for p in directory.iterdir()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot list the work folder %s: %s", directory, exc)
        return []
    removed: list[Path] = []
    for name in stale_work_files(names, keep=keep, busy=busy, below_version=below_version):
        path = directory / name
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot delete the stale work file %s: %s", path, exc)
            continue
        removed.append(path)
    if removed:
        names_removed = ", ".join(p.name for p in removed)
        log.info("deleted %d stale work file(s): %s", len(removed), names_removed)
    return removed


@dataclass(frozen=True)
class JobFiles:
    """The checkpoint and output file of one job; the only code that writes or deletes them.

    Writes are atomic (:func:`client.atomicfile.write_atomic`): a reader sees the old file
    or the whole new one; they are not fsynced (module docstring). ``OSError`` from the
    disk passes through.
    """

    checkpoint: Path
    output: Path

    @classmethod
    def of(cls, job: TrainJob) -> JobFiles:
        return cls(checkpoint=job.checkpoint_path, output=job.output_path)

    def write_checkpoint(self, data: bytes | bytearray) -> None:
        write_atomic(self.checkpoint, data, durable=False)

    def discard_checkpoint(self) -> None:
        """Delete the checkpoint (finished, cancelled or unusable work); none is fine."""
        self.checkpoint.unlink(missing_ok=True)

    def write_output(
        self, data: bytes | bytearray | Sequence[bytes | bytearray | memoryview]
    ) -> str:
        """Write the output (``data``, or its pieces in order); returns the SHA-256 (hex) of
        the bytes written, hashed as they are written."""
        pieces = [data] if isinstance(data, bytes | bytearray) else data
        hasher = hashlib.sha256()
        for piece in pieces:
            hasher.update(piece)
        write_atomic(self.output, pieces, durable=False)
        return hasher.hexdigest()

    @contextlib.contextmanager
    def handing_over_output(
        self, target: Path, *, sync_dir: bool = True, durable: bool = True
    ) -> Iterator[Path]:
        """Hand the finished output to its next owner: move it to ``target`` (outside the
        work directory) for the ``with`` block, which records it there.

        The output is fsynced before it appears at ``target`` (it was written without),
        and ``target``'s directory after; ``sync_dir=False`` leaves that directory fsync to
        the receiver (one fsync for the output's rename and its own, e.g.
        :meth:`client.pending.PendingStore.add`; a move to another filesystem still
        fsyncs it). When the block raises, the output is moved back (best effort: the work
        is not lost) and the error passes on; from a block that returns, ``target``
        belongs to the receiver. ``OSError`` from the first move passes through, the
        output left in place. ``durable=False`` fsyncs nothing: the receiver makes ``target``
        durable itself (e.g. while it sends the bytes).
        """
        if not durable:
            move_into(self.output, target, durable=False)
        elif sync_dir:
            move_into(self.output, target)
        else:
            _move_synced(self.output, target)
        try:
            yield target
        except BaseException:
            with contextlib.suppress(OSError):
                move_into(target, self.output, durable=False)
            raise


def _move_synced(source: Path, target: Path) -> None:
    """``source``'s bytes fsynced, then renamed to ``target`` (its directory NOT fsynced);
    across filesystems, :func:`client.atomicfile.move_into` (everything fsynced)."""
    fd = os.open(source, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except OSError:
        if not source.is_file():
            raise
        move_into(source, target)


class WorkDir:
    """The work directory and its one owner (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def files(self, key: str) -> JobFiles:
        """The files of the work ``key``: ``<key>.ckpt`` and ``<key>.safetensors``."""
        return JobFiles(
            checkpoint=self.directory / f"{key}{CHECKPOINT_SUFFIX}",
            output=self.directory / f"{key}{OUTPUT_SUFFIX}",
        )

    def job(
        self,
        *,
        round_id: str,
        task: str,
        model_params: Mapping[str, JsonValue],
        config: TrainingConfig,
        partition: Partition,
        base_weights_path: Path,
        base_version: int,
        base_sha256: str,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        torch_threads: int | None = None,
        package_path: Path | None = None,
        package_sha256: str | None = None,
        data_path: Path | None = None,
        data_sha256: str | None = None,
        base_identity: FileIdentity | None = None,
    ) -> TrainJob:
        """The job for this work: its key computed here, once, and its files named by it.

        A packaged task gives its package (and data share) with their SHA-256;
        ``base_identity``: the base file's identity when its SHA-256 was verified (the
        trainer then does not hash it again; see :class:`client.worker_messages.TrainJob`).
        """
        key = work_key(
            task=task,
            model_params=model_params,
            config=config,
            partition=partition,
            base_version=base_version,
            base_sha256=base_sha256,
            package_sha256=package_sha256,
            data_sha256=data_sha256,
        )
        files = self.files(key)
        return TrainJob(
            round_id=round_id,
            task=task,
            model_params=dict(model_params),
            config=config,
            partition=partition,
            base_weights_path=base_weights_path,
            output_path=files.output,
            checkpoint_path=files.checkpoint,
            torch_threads=torch_threads,
            checkpoint_interval=checkpoint_interval,
            work_key=key,
            base_sha256=base_sha256,
            package_path=package_path,
            package_sha256=package_sha256,
            data_path=data_path,
            data_sha256=data_sha256,
            base_identity=base_identity,
        )

    def prepare(self, job: TrainJob, *, busy: Collection[str] = ()) -> None:
        """Make the directory and delete every file no later run can use but ``job``'s.

        ``busy``: keys whose files are in use elsewhere (e.g. an output being kept).
        Raises ``OSError`` when the directory cannot be made.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        keep = job.work_key if job.work_key is not None else job.checkpoint_path.stem
        remove_stale(self.directory, keep={keep}, busy=busy)

    def drop_older_than(self, version: int, *, busy: Collection[str] = ()) -> list[Path]:
        """Delete the work built on a base older than ``version``; the deleted files."""
        return remove_stale(self.directory, busy=busy, below_version=version)
