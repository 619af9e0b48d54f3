"""The seams of the multi-process server: what each shared engine promises.

Contract: this module declares records and interfaces only (no I/O). Each interface has
one real implementation on an existing engine and is used by the worker processes
(:mod:`server.cluster.worker`) and the one elected coordinator
(:mod:`server.cluster.coordinator`):

* :class:`SharedBlobs` -- weights, updates and partial sums by key; a shared directory
  (one machine) or PostgreSQL large objects (several machines). A blob is verified by
  SHA-256 before ``put`` returns its key, and again on every ``get``; a key is only ever
  written into a database row after ``put`` returned it.
* :class:`Presence` -- where each connected device is and whether it is eligible, in
  Redis with expiring keys (a worker that dies stops refreshing its keys and its devices
  vanish within ``ttl``); every call is O(1) in the fleet size except
  :meth:`Presence.eligible_devices` (called once per round).
* :class:`ClusterDB` -- rounds, assignments, updates, partial sums, versions (with their
  evaluation) and the end of the federation in PostgreSQL. An update is recorded exactly
  once per (round, device) (:meth:`ClusterDB.record_update` is idempotent); what must
  not be lost goes through it,
  never through Redis pub/sub (python-socketio #1411).
* :class:`CoordinatorLock` -- a PostgreSQL advisory lock on its own connection: at most
  one process holds it; it is released when that connection ends (a killed process).

Errors: implementations raise :class:`ClusterError` (one line, says which engine) for an
engine that is unreachable or answers unexpectedly, and :class:`BlobIntegrityError`
when bytes do not match their SHA-256.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

__all__ = [
    "Assignment",
    "AssignmentState",
    "BlobIntegrityError",
    "ClusterDB",
    "ClusterError",
    "CoordinatorLock",
    "DeviceSeen",
    "EvalAsk",
    "EvalAskState",
    "PartialRow",
    "Presence",
    "RoundRow",
    "RoundState",
    "SharedBlobs",
    "UpdateRow",
    "VersionRow",
]


class ClusterError(Exception):
    """A shared engine (Redis, PostgreSQL, the shared storage) failed; one line."""


class BlobIntegrityError(ClusterError):
    """Bytes in shared storage do not match their SHA-256."""


# ------------------------------------------------------------------ shared storage


class SharedBlobs(Protocol):
    async def put_file(self, path: Path, sha256: str) -> str:
        """Store the file's bytes; return its key once stored and verified (raises
        BlobIntegrityError when the file does not hash to ``sha256``)."""
        ...

    async def put_bytes(self, data: bytes, sha256: str) -> str:
        """As :meth:`put_file`, for bytes in memory."""
        ...

    async def get_file(self, key: str, sha256: str, dest: Path) -> None:
        """Write the blob to ``dest`` (atomically), verified against ``sha256``."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the blob (no error when it is gone)."""
        ...


# ------------------------------------------------------------------ presence (Redis)


@dataclass(frozen=True)
class DeviceSeen:
    """What a worker says about one of its connected devices."""

    device_id: str
    eligible: bool
    #: The global version the device holds (None: none yet).
    version: int | None


class Presence(Protocol):
    async def device_seen(self, seen: DeviceSeen) -> None:
        """The device is connected to this worker (refreshes its expiry); O(1)."""
        ...

    async def device_gone(self, device_id: str) -> None:
        """The device disconnected from this worker; O(1)."""
        ...

    async def devices_changed(self, seen: Sequence[DeviceSeen], gone: Sequence[str]) -> None:
        """:meth:`device_seen` for each of ``seen`` and :meth:`device_gone` for each of
        ``gone``, in one round trip; O(1) per device."""
        ...

    async def worker_alive(self) -> bool:
        """Refresh this worker's liveness key (called every few seconds); False when the
        key was not there any more (first call, Redis restarted empty, or the key expired:
        the caller writes its devices again)."""
        ...

    async def live_workers(self) -> set[str]:
        """Ids of the workers whose liveness key has not expired."""
        ...

    async def eligible_count(self) -> int:
        """Eligible devices on live workers; O(workers)."""
        ...

    async def eligible_devices(self) -> list[tuple[str, str]]:
        """``(device_id, worker_id)`` of every eligible device on a live worker, sorted by
        device id (selection is then reproducible with the server's seed)."""
        ...

    async def worker_of(self, device_id: str) -> str | None:
        """The live worker holding the device, or None."""
        ...


# ------------------------------------------------------------------ rounds (PostgreSQL)

RoundState = Literal["open", "closing", "completed", "abandoned"]
AssignmentState = Literal["assigned", "started", "refused", "failed", "reported", "dropped"]


@dataclass(frozen=True)
class RoundRow:
    round_id: str
    number: int
    attempt: int
    base_version: int
    state: RoundState
    #: Reports needed for the round to succeed.
    required: int
    #: Wall-clock deadline (Unix seconds).
    deadline: float
    opened_at: float


@dataclass(frozen=True)
class Assignment:
    round_id: str
    device_id: str
    #: The device's part of the data: ``index`` of ``count``.
    index: int
    count: int
    state: AssignmentState = "assigned"
    detail: str | None = None


@dataclass(frozen=True)
class UpdateRow:
    round_id: str
    device_id: str
    num_samples: int
    #: The worker that received the update and folded it into its partial sum.
    worker_id: str
    blob_key: str
    sha256: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PartialRow:
    """A worker's partial FedAvg sum for a round: the sum over ``device_ids`` of
    ``num_samples * weights`` (float64 safetensors) and the total samples."""

    round_id: str
    worker_id: str
    device_ids: tuple[str, ...]
    total_samples: int
    blob_key: str
    sha256: str


@dataclass(frozen=True)
class VersionRow:
    version: int
    blob_key: str
    sha256: str
    size: int
    round_id: str | None
    created_at: float
    metrics: dict[str, float] = field(default_factory=dict)
    #: The server optimizer's state saved with this version (float64 safetensors in
    #: shared storage; None: no state, e.g. FedAvg or version 0).
    optimizer_key: str | None = None
    optimizer_sha256: str | None = None


EvalAskState = Literal["asked", "accepted", "reported", "done"]


@dataclass(frozen=True)
class EvalAsk:
    """One device asked to evaluate one version on its test split (federated evaluation):
    ``asked`` -> ``accepted`` (it said yes) -> ``reported`` (its result is counted), or
    ``done`` (refused, failed, gone or silent: nothing will be counted from it)."""

    version: int
    device_id: str
    index: int
    count: int
    deadline: float
    state: EvalAskState = "asked"
    loss: float | None = None
    accuracy: float | None = None
    num_samples: int | None = None


class ClusterDB(Protocol):
    async def latest_version(self) -> VersionRow | None: ...

    async def create_version_zero(self, row: VersionRow) -> VersionRow:
        """Record version 0 unless one exists; the version 0 that is recorded."""
        ...

    async def open_round(self, row: RoundRow, parts: list[Assignment]) -> None:
        """The round and its assignments, in one transaction; then notifies workers."""
        ...

    async def current_round(self) -> RoundRow | None:
        """The round that is ``open`` or ``closing``, if any."""
        ...

    async def assignments(self, round_id: str) -> list[Assignment]: ...

    async def assignment_of(self, round_id: str, device_id: str) -> Assignment | None: ...

    async def set_assignment(
        self, round_id: str, device_id: str, state: AssignmentState, detail: str | None = None
    ) -> None: ...

    async def record_update(self, row: UpdateRow) -> bool:
        """True when recorded now; False when this (round, device) was recorded before
        (nothing changes). Raises ClusterError when the round is not ``open``."""
        ...

    async def updates(self, round_id: str) -> list[UpdateRow]: ...

    async def count_updates(self, round_id: str) -> int:
        """How many updates are recorded for the round (``len(updates(round_id))``
        without reading the rows; 0 for an unknown round)."""
        ...

    async def set_round_state(self, round_id: str, state: RoundState) -> None:
        """Then notifies workers."""
        ...

    async def record_partial(self, row: PartialRow) -> None:
        """Idempotent by (round, worker)."""
        ...

    async def partials(self, round_id: str) -> list[PartialRow]: ...

    async def publish_version(self, row: VersionRow) -> None:
        """The new version, and its round ``completed``, in one transaction; then
        notifies workers."""
        ...

    async def recent_versions(self, limit: int) -> list[VersionRow]:
        """The newest ``limit`` versions, newest first."""
        ...

    async def record_evaluation(self, version: int, metrics: dict[str, float]) -> bool:
        """Merge ``metrics`` (the version's evaluation) into its metrics; False when the
        version is unknown."""
        ...

    async def mark_finished(self, version: int) -> None:
        """The federation finished with ``version`` (idempotent); then notifies workers
        (``finished:<n>``)."""
        ...

    async def finished_version(self) -> int | None:
        """The newest version the federation finished with; None when not finished."""
        ...

    async def ask_evaluation(self, asks: Sequence[EvalAsk]) -> None:
        """Record the asks of one version (idempotent per device); then notifies workers
        (``fedeval:<n>``)."""
        ...

    async def evaluation_asks(self, version: int) -> list[EvalAsk]:
        """Every ask of ``version``, by index."""
        ...

    async def set_ask_state(self, version: int, device_id: str, state: EvalAskState) -> None:
        """``accepted`` (from ``asked``) or ``done`` (from ``asked``/``accepted``); a
        reported or done ask stays as it is."""
        ...

    async def record_federated_result(
        self, version: int, device_id: str, loss: float, accuracy: float, num_samples: int
    ) -> bool:
        """Count an ask's result once (``reported``; from ``asked`` too: the result can
        come before the acceptance is recorded) and merge the version's
        sample-weighted means over its reported asks into its metrics
        (``federatedEvalLoss``, ``federatedEvalAccuracy``, ``federatedEvalSamples``,
        ``federatedEvalDevices``), in one transaction serialised per version; False (nothing
        changes) when there is no such ask, or it is ``reported`` or ``done``."""
        ...

    def notifications(self) -> AsyncIterator[str]:
        """Payloads of the workers' notification channel (``round:<id>``,
        ``version:<n>``), for as long as it is iterated; a dropped connection is
        re-established (callers also poll, so a lost notification only delays)."""
        ...


class CoordinatorLock(Protocol):
    async def try_acquire(self) -> bool:
        """Take the lock if free (never waits); True when this process holds it."""
        ...

    @property
    def held(self) -> bool: ...

    async def release(self) -> None: ...
