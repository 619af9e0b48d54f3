"""The single-process status document of a cluster, built from the shared engines' rows.

Contract: pure functions, no I/O and no clock (callers pass ``now``). They map what
PostgreSQL and the workers' device snapshots hold onto the SAME models the single-process
server answers ``GET /api/status`` with (:class:`server.status.ServerStatus` and its parts),
so the dashboard and any script read one schema in both modes:

* :func:`history_from` -- one :class:`server.status.RoundRecord` per finished round attempt
  (:class:`FinishedRound`, oldest first). A completed round's version, ``trainLoss`` and
  any evaluation figures come from its version row's metrics; ``finishedAt`` is when the
  version was published and ``timing.collectedAt`` when its last update arrived (the
  database keeps no closing time). An abandoned round keeps its base version, has no
  train loss and says why (``detail``); its ``finishedAt`` is its deadline, or ``now`` if
  earlier (the database keeps no time of abandonment).
* :func:`round_view` -- the federation's ``phase`` and ``currentRound``: ``training`` while
  the round row is ``open``, ``aggregating`` while ``closing``, ``waiting`` (with
  :func:`waiting_reason`, the coordinator's wording) between rounds, ``finished`` once
  ``rounds_target`` versions after 0 exist.
* :func:`merge_devices` -- every worker's devices in one list: a device known to several
  workers (it moved) is shown once (connected before disconnected, then the latest
  ``lastSeen``), with ``roundsCompleted`` from the database's counts; sorted by name, id.
* :func:`cluster_document` -- the whole :class:`~server.status.ServerStatus`.

Raises: pydantic's ValidationError only for rows that break the models (a bug). Never:
reads an engine, or puts a token or anything else than these rows into the document.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydantic.alias_generators import to_camel

from server.cluster.contracts import Assignment, RoundRow, VersionRow
from server.status import (
    CurrentRound,
    DeviceStatus,
    FederationPhase,
    RoundRecord,
    RoundTiming,
    ServerStatus,
    StrategyStatus,
)

__all__ = [
    "FinishedRound",
    "cluster_document",
    "history_from",
    "merge_devices",
    "round_view",
    "waiting_reason",
]

#: RoundRecord fields read from a version's metrics (by their camelCase name) when present.
_FLOAT_METRICS = ("eval_loss", "eval_accuracy", "federated_eval_loss", "federated_eval_accuracy")
_INT_METRICS = ("federated_eval_samples", "federated_eval_devices")


@dataclass(frozen=True)
class FinishedRound:
    """A completed or abandoned round attempt, with what the history shows of it
    (:meth:`server.cluster.db.PgClusterDB.round_history`)."""

    round: RoundRow
    #: Assignments (devices selected) and update rows (reports) of the round.
    selected: int
    reported: int
    #: When its last update arrived (Unix s; None: no update).
    last_update_at: float | None
    #: The version it made (None: abandoned).
    version: VersionRow | None


def history_from(rounds: Sequence[FinishedRound], now: float) -> list[RoundRecord]:
    """The status history of ``rounds`` (in their order)."""
    return [_record(one, now) for one in rounds]


def _record(one: FinishedRound, now: float) -> RoundRecord:
    row, version = one.round, one.version
    if row.state == "completed" and version is not None:
        metrics = version.metrics
        published = version.created_at
        collected = one.last_update_at if one.last_update_at is not None else row.opened_at
        collected = min(max(collected, row.opened_at), published)
        extra: dict[str, float | int] = {}
        for name in _FLOAT_METRICS:
            if to_camel(name) in metrics:
                extra[name] = float(metrics[to_camel(name)])
        for name in _INT_METRICS:
            if to_camel(name) in metrics:
                extra[name] = int(metrics[to_camel(name)])
        return RoundRecord(
            round_id=row.round_id,
            number=row.number,
            outcome="completed",
            version=version.version,
            clients_selected=one.selected,
            clients_reported=one.reported,
            train_loss=metrics.get("trainLoss"),
            seconds=round(max(0.0, published - row.opened_at), 3),
            finished_at=published,
            timing=RoundTiming(
                opened_at=row.opened_at,
                collected_at=collected,
                aggregated_at=published,
                published_at=published,
            ),
            **extra,
        )
    finished = max(row.opened_at, min(row.deadline, now))
    return RoundRecord(
        round_id=row.round_id,
        number=row.number,
        outcome="abandoned",
        version=row.base_version,
        clients_selected=one.selected,
        clients_reported=one.reported,
        train_loss=None,
        seconds=round(finished - row.opened_at, 3),
        finished_at=finished,
        detail=f"{one.reported} of {one.selected} reported, {row.required} needed",
    )


def waiting_reason(eligible: int | None, needed: int, workers: int | None) -> str:
    """Why the next round has not opened (the coordinator's wording); None counts: Redis
    did not answer."""
    if eligible is None or workers is None:
        return "presence unavailable"
    plural = "s" if workers != 1 else ""
    return f"{eligible} of {needed} eligible devices ({workers} live worker{plural})"


def round_view(
    current: RoundRow | None,
    assignments: Sequence[Assignment],
    latest_version: int,
    rounds_target: int,
    reason: str,
) -> tuple[FederationPhase, CurrentRound | None]:
    """``(phase, currentRound)``: ``current`` is the open or closing round (with its
    ``assignments``), None between rounds."""
    if current is None:
        if rounds_target and latest_version >= rounds_target:
            return "finished", None
        return "waiting", CurrentRound(
            number=latest_version + 1, phase="waiting", waiting_reason=reason
        )
    phase: FederationPhase = "training" if current.state == "open" else "aggregating"
    return phase, CurrentRound(
        number=current.number,
        phase="training" if phase == "training" else "aggregating",
        round_id=current.round_id,
        selected=[a.device_id for a in assignments],
        reported=[a.device_id for a in assignments if a.state == "reported"],
        required=current.required,
        deadline=current.deadline,
    )


def merge_devices(
    lists: Iterable[Sequence[DeviceStatus]], rounds_done: Mapping[str, int]
) -> list[DeviceStatus]:
    """One entry per device id (see the module docstring), sorted by name then id."""
    best: dict[str, DeviceStatus] = {}
    for devices in lists:
        for device in devices:
            have = best.get(device.id)
            if have is None or (device.connected, device.last_seen) > (
                have.connected,
                have.last_seen,
            ):
                best[device.id] = device
    merged = [
        d.model_copy(update={"rounds_completed": rounds_done.get(d.id, 0)}) for d in best.values()
    ]
    merged.sort(key=lambda d: (d.name, d.id))
    return merged


def cluster_document(
    *,
    server_version: str,
    protocol: int,
    task: str,
    latest_version: int,
    rounds_target: int,
    current: RoundRow | None,
    assignments: Sequence[Assignment],
    reason: str,
    history: Sequence[FinishedRound],
    devices: list[DeviceStatus],
    strategy: StrategyStatus,
    now: float,
) -> ServerStatus:
    """The status document of the cluster (``GET /api/status`` on any worker)."""
    phase, current_round = round_view(current, assignments, latest_version, rounds_target, reason)
    return ServerStatus(
        server_version=server_version,
        protocol=protocol,
        task=task,
        global_version=latest_version,
        rounds_target=rounds_target,
        phase=phase,
        current_round=current_round,
        history=history_from(history, now),
        devices=devices,
        strategy=strategy,
    )
