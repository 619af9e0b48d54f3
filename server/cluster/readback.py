"""Reading a closing round back from shared storage: every recorded update counted once.

Contract: :func:`gather_round` turns a round's update rows and partial rows into one
:class:`server.cluster.partial.PartialSum` covering each readable update exactly once. A
partial row is merged when it stands (:func:`partial_problem`: it covers at least one
device, only devices with an update row, none covered already, its total samples equal to
its updates') and its blob reads back (:class:`SharedBlobs` verifies the SHA-256;
:meth:`PartialSum.from_bytes` checks the layout, and its devices and total must equal the
row's); otherwise it is skipped with a warning naming the worker and why, and its devices'
updates are folded from their own blobs. Every update no merged partial covers is folded
from its blob (read-only views over the mapped file, checked against the model's layout
and ``max_update_bytes``; its values were checked at intake and its SHA-256 is verified on
get). An update whose blob cannot be read back is left out with an error naming the
device. Returns None when nothing could be read. Blobs are fetched into ``tmp`` (one at a
time; each file removed after use). Raises nothing for bad blobs; memory is the running
sum plus the blob being read. Blocking work runs in threads.

For strategies that need every update at once (:mod:`server.cluster.aggregate`),
:func:`fetch_updates` fetches each readable update's blob into ``tmp`` (SHA-256 verified,
size bounded; the files stay until ``tmp`` is removed), :func:`mapped_update` maps one
read-only as views checked against the layout, and :class:`MappedFiles` is the
:class:`server.strategies.UpdateSource` over those files (one open map each while open,
never a copy in memory), as the single-process server's round store is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from client.weights import Layout, StateDict, WeightsError, decode_views
from server.cluster.contracts import ClusterError, PartialRow, SharedBlobs, UpdateRow
from server.cluster.partial import PartialSum

__all__ = ["MappedFiles", "fetch_updates", "gather_round", "mapped_update", "partial_problem"]

log = logging.getLogger(__name__)


async def gather_round(
    blobs: SharedBlobs,
    layout: Layout,
    max_update_bytes: int,
    round_id: str,
    updates: list[UpdateRow],
    partials: list[PartialRow],
    tmp: Path,
) -> PartialSum | None:
    """The round's sum over every readable update (see the module docstring)."""
    by_device = {u.device_id: u for u in updates}
    total = PartialSum(layout)
    for prow in sorted(partials, key=lambda p: p.worker_id):
        problem = partial_problem(prow, by_device, total)
        if problem is None:
            try:
                part = await _read_partial(blobs, layout, prow, tmp)
                if part.device_ids != prow.device_ids:
                    raise ValueError("its devices differ from its row's")
                if part.total_samples != prow.total_samples:
                    raise ValueError("its total samples differ from its row's")
                await asyncio.to_thread(total.merge, part)
                continue
            except (ClusterError, ValueError) as exc:
                problem = str(exc)
        log.warning(
            "round %s: partial sum of %s not used (%s); folding its updates here",
            round_id,
            prow.worker_id,
            problem,
        )
    for device_id, update in sorted(by_device.items()):
        if device_id in total:
            continue
        try:
            await _fold_update(blobs, layout, max_update_bytes, total, update, tmp)
        except (ClusterError, ValueError) as exc:
            log.error(
                "round %s: the update of %s cannot be read back (%s); left out",
                round_id,
                device_id,
                exc,
            )
    return total if total.count else None


def partial_problem(
    prow: PartialRow, by_device: dict[str, UpdateRow], total: PartialSum
) -> str | None:
    """Why a partial row cannot be merged into ``total`` as it stands (None: it can)."""
    if not prow.device_ids:
        return "it covers no device"
    unknown = [d for d in prow.device_ids if d not in by_device]
    if unknown:
        return f"{unknown[0]} has no update row"
    if any(d in total for d in prow.device_ids) or len(set(prow.device_ids)) != len(
        prow.device_ids
    ):
        return "a device is covered twice"
    expected = sum(by_device[d].num_samples for d in prow.device_ids)
    if prow.total_samples != expected:
        return f"{prow.total_samples} samples, the updates say {expected}"
    return None


async def _read_partial(
    blobs: SharedBlobs, layout: Layout, prow: PartialRow, tmp: Path
) -> PartialSum:
    dest = tmp / f"partial-{secrets.token_hex(6)}"
    try:
        await blobs.get_file(prow.blob_key, prow.sha256, dest)
        return await asyncio.to_thread(_load_partial, dest, layout)
    finally:
        dest.unlink(missing_ok=True)


async def _fold_update(
    blobs: SharedBlobs,
    layout: Layout,
    max_bytes: int,
    total: PartialSum,
    update: UpdateRow,
    tmp: Path,
) -> None:
    dest = tmp / f"update-{secrets.token_hex(6)}"
    try:
        await blobs.get_file(update.blob_key, update.sha256, dest)
        await asyncio.to_thread(_fold_file, dest, layout, max_bytes, total, update)
    finally:
        dest.unlink(missing_ok=True)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    """A file's bytes as a read-only memory map (an empty file as ``b""``)."""
    with path.open("rb") as fh:
        if path.stat().st_size == 0:
            mapped: bytes | mmap.mmap = b""
        else:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield mapped
    finally:
        if isinstance(mapped, mmap.mmap):
            # A view still alive keeps the map exported; it is then freed with the view.
            with contextlib.suppress(BufferError):
                mapped.close()


def _load_partial(path: Path, layout: Layout) -> PartialSum:
    with _mapped(path) as data:
        return PartialSum.from_bytes(memoryview(data), layout)


def _fold_file(
    path: Path, layout: Layout, max_bytes: int, total: PartialSum, update: UpdateRow
) -> None:
    """Fold one stored update (read-only views over its mapped file) into ``total``."""
    with mapped_update(path, layout, max_bytes) as views:
        total.add(update.device_id, views, update.num_samples)


@contextlib.contextmanager
def mapped_update(path: Path, layout: Layout, max_bytes: int) -> Iterator[StateDict]:
    """A stored update as read-only views over its mapped file, checked against
    ``layout`` and ``max_bytes`` (ValueError naming the codec's reason otherwise)."""
    with _mapped(path) as data:
        try:
            views = decode_views(data, expected=layout, max_bytes=max_bytes, finite=False)
        except WeightsError as exc:
            raise ValueError(f"{exc.code}: {exc.message}") from None
        try:
            yield views
        finally:
            del views


async def fetch_updates(
    blobs: SharedBlobs,
    round_id: str,
    updates: Sequence[UpdateRow],
    tmp: Path,
) -> list[tuple[UpdateRow, Path]]:
    """Each update's blob fetched (verified) into ``tmp``, in the order given; an update
    whose blob cannot be fetched is left out with an error naming the device."""
    fetched: list[tuple[UpdateRow, Path]] = []
    for update in updates:
        dest = tmp / f"update-{secrets.token_hex(6)}"
        try:
            await blobs.get_file(update.blob_key, update.sha256, dest)
        except ClusterError as exc:
            dest.unlink(missing_ok=True)
            log.error(
                "round %s: the update of %s cannot be read back (%s); left out",
                round_id,
                update.device_id,
                exc,
            )
            continue
        fetched.append((update, dest))
    return fetched


@dataclass(frozen=True)
class MappedFiles:
    """Fetched update files as a :class:`server.strategies.UpdateSource`: each mapped
    read-only (one open map per file while open), never copied whole."""

    layout: Layout
    max_bytes: int
    files: Sequence[tuple[Path, int]]  # (fetched update file, num_samples)

    @contextlib.contextmanager
    def open_all(self) -> Iterator[list[tuple[StateDict, int]]]:
        with contextlib.ExitStack() as stack:
            yield [
                (stack.enter_context(mapped_update(path, self.layout, self.max_bytes)), samples)
                for path, samples in self.files
            ]
