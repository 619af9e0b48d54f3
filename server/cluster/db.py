"""Rounds, assignments, updates, partial sums and versions in PostgreSQL (asyncpg).

:class:`PgClusterDB` implements :class:`server.cluster.contracts.ClusterDB`; :func:`connect`
opens it (a pool, the schema created idempotently) or raises
:class:`~server.cluster.contracts.ClusterError` naming the server when it is unreachable.

Tables (schema component ``cluster``, version :data:`SCHEMA_VERSION`, in ``fedtray_schema``):

* ``fedtray_versions`` -- one row per global version: ``version`` (key), ``blob_key`` and
  ``sha256`` of its weights in shared storage, ``size``, the ``round_id`` that made it
  (NULL for version 0), ``created_at`` (Unix s), ``metrics`` (jsonb), and
  ``optimizer_key`` / ``optimizer_sha256`` of the server optimizer's state saved with it
  (NULL: none; written in the same row, so a version never exists without its state).
* ``fedtray_rounds`` -- one row per round attempt: ``round_id`` (key), ``number``,
  ``attempt``, ``base_version``, ``state`` (open, closing, completed, abandoned),
  ``required``, ``deadline`` and ``opened_at`` (Unix s). A unique partial index keeps at
  most ONE round ``open`` or ``closing`` at a time (:meth:`open_round` raises otherwise).
* ``fedtray_assignments`` -- (``round_id``, ``device_id``) key: the device's part ``idx`` of
  ``count``, its ``state`` and ``detail``.
* ``fedtray_updates`` -- (``round_id``, ``device_id``) key: the update a worker received,
  ``num_samples``, ``worker_id``, ``blob_key``, ``sha256``, ``metrics``, ``received_at``.
  The key is what makes a report count exactly once.
* ``fedtray_partials`` -- (``round_id``, ``worker_id``) key: a worker's partial FedAvg sum,
  the ``device_ids`` it covers, ``total_samples``, ``blob_key``, ``sha256``.
* ``fedtray_finished`` (schema component ``end``) -- ``version`` (key): the federation
  finished with this final version (:meth:`PgClusterDB.mark_finished`), ``finished_at``.
* ``fedtray_fedeval`` (schema component ``fedeval``) -- (``version``, ``device_id``) key:
  a device asked to evaluate a version (federated evaluation), its part ``idx`` of
  ``count``, ``deadline``, ``state`` and, once reported, ``loss``, ``accuracy``,
  ``num_samples``. :meth:`PgClusterDB.record_federated_result` locks the version's row
  first, so the means it merges into the version's metrics cover every result counted.

Promises:

* :meth:`PgClusterDB.record_update` is idempotent by (round, device): a duplicate returns
  False and changes nothing (also once the round has closed, so a device whose ack was
  lost gets the same answer); a new update is recorded only while the round is ``open``
  and the device is assigned in it -- the round's row is locked (``FOR SHARE``) in the same
  transaction, so no update slips in after :meth:`set_round_state` moved it to
  ``closing``; otherwise ClusterError. Recording marks the assignment ``reported``.
* A ``reported`` assignment stays reported (:meth:`set_assignment` leaves it).
* The evaluation of versions, the end of the federation and federated evaluation's asks
  and results are :class:`server.cluster.db_evaluation.EvaluationTables`' (its promises).
* :meth:`PgClusterDB.count_updates` is one ``SELECT count(*)`` over the updates' key
  (``round_id`` leads it): one number back, not the round's update rows.
* Read-only views for the status document (:mod:`server.cluster.status_view`):
  :meth:`PgClusterDB.round_history` (one row per finished round attempt, with its counts,
  in one query) and :meth:`PgClusterDB.reports_by_device` (per device, its updates in the
  given rounds); they change nothing.
* Completed and abandoned rounds never change state again.
* Every state change that workers act on is followed, in the same transaction, by a
  notification on channel :data:`CHANNEL` (``round:<id>`` or ``version:<n>``); it is
  delivered at commit, so a listener that reads after it sees the change.
* :meth:`PgClusterDB.notifications` re-connects after a lost connection (backing off up to
  :data:`RECONNECT_MAX_S`); notifications sent while it was away are lost (callers poll).
  Its queue is bounded (:data:`NOTIFY_QUEUE`); when full the oldest payload is dropped.

Raises: ClusterError (one line) for every engine failure, and for the refusals above.
Never: stores weights itself (only keys of :mod:`server.cluster.blobs`), or writes a key
into a row before the caller's ``put`` returned it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

import asyncpg

from server.cluster.contracts import (
    Assignment,
    AssignmentState,
    ClusterDB,
    ClusterError,
    PartialRow,
    RoundRow,
    RoundState,
    UpdateRow,
    VersionRow,
)
from server.cluster.db_evaluation import EvaluationTables
from server.cluster.db_schema import (
    CHANNEL,
    END_SCHEMA,
    END_SCHEMA_VERSION,
    FEDEVAL_SCHEMA,
    FEDEVAL_SCHEMA_VERSION,
    SCHEMA,
    SCHEMA_VERSION,
    assignment_from,
    partial_from,
    round_from,
    update_from,
    version_from,
)
from server.cluster.pg import connect_one, create_pool, engine_errors, ensure_schema, notify
from server.cluster.status import FinishedRound

__all__ = ["CHANNEL", "SCHEMA_VERSION", "PgClusterDB", "connect"]

#: Longest pause between reconnect attempts of :meth:`PgClusterDB.notifications`.
RECONNECT_MAX_S = 2.0
#: Payloads held for a slow consumer of :meth:`PgClusterDB.notifications`.
NOTIFY_QUEUE = 1024
#: ``application_name`` of the notification stream's connection (pg_stat_activity).
NOTIFY_APPLICATION = "fedtray-notifications"
#: How often the notification connection is checked for loss while nothing arrives.
_LIVENESS_CHECK_S = 1.0

_OPEN_STATES = ("open", "closing")
_FINAL_STATES = ("completed", "abandoned")


async def _notify(conn: asyncpg.Connection, payload: str) -> None:
    await notify(conn, CHANNEL, payload)


class PgClusterDB(EvaluationTables):
    """The cluster's rounds in PostgreSQL (see the module docstring)."""

    def __init__(self, url: str, pool: asyncpg.Pool) -> None:
        self._url = url
        self._pool = pool

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pool.close(), timeout=5.0)
        self._pool.terminate()

    # -------------------------------------------------------------- versions

    async def latest_version(self) -> VersionRow | None:
        with engine_errors("latest version"):
            row = await self._pool.fetchrow(
                "SELECT * FROM fedtray_versions ORDER BY version DESC LIMIT 1"
            )
        return version_from(row) if row is not None else None

    async def create_version_zero(self, row: VersionRow) -> VersionRow:
        if row.version != 0:
            raise ClusterError(f"version zero must have version 0, not {row.version}")
        with engine_errors("version 0"):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO fedtray_versions"
                    " (version, blob_key, sha256, size, round_id, created_at, metrics)"
                    " VALUES (0, $1, $2, $3, NULL, $4, $5) ON CONFLICT (version) DO NOTHING",
                    row.blob_key,
                    row.sha256,
                    row.size,
                    row.created_at,
                    json.dumps(row.metrics),
                )
                stored = await conn.fetchrow("SELECT * FROM fedtray_versions WHERE version = 0")
        return version_from(stored)

    async def publish_version(self, row: VersionRow) -> None:
        with engine_errors(f"publish version {row.version}"):
            async with self._pool.acquire() as conn, conn.transaction():
                inserted = await conn.fetchval(
                    "INSERT INTO fedtray_versions (version, blob_key, sha256, size,"
                    " round_id, created_at, metrics, optimizer_key, optimizer_sha256)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                    " ON CONFLICT (version) DO NOTHING RETURNING version",
                    row.version,
                    row.blob_key,
                    row.sha256,
                    row.size,
                    row.round_id,
                    row.created_at,
                    json.dumps(row.metrics),
                    row.optimizer_key,
                    row.optimizer_sha256,
                )
                if inserted is None:
                    have = await conn.fetchrow(
                        "SELECT sha256, round_id FROM fedtray_versions WHERE version = $1",
                        row.version,
                    )
                    if have is None or (have["sha256"], have["round_id"]) != (
                        row.sha256,
                        row.round_id,
                    ):
                        raise ClusterError(
                            f"version {row.version} exists already with other weights"
                        )
                if row.round_id is not None:
                    state = await conn.fetchval(
                        "UPDATE fedtray_rounds SET state = 'completed' WHERE round_id = $1"
                        " AND state IN ('open', 'closing') RETURNING state",
                        row.round_id,
                    )
                    if state is None:
                        have_state = await conn.fetchval(
                            "SELECT state FROM fedtray_rounds WHERE round_id = $1", row.round_id
                        )
                        if have_state != "completed":
                            raise ClusterError(
                                f"round {row.round_id} is {have_state or 'unknown'}: "
                                f"version {row.version} not published"
                            )
                await _notify(conn, f"version:{row.version}")

    # -------------------------------------------------------------- rounds

    async def open_round(self, row: RoundRow, parts: list[Assignment]) -> None:
        if row.state != "open":
            raise ClusterError(f"a round opens as 'open', not {row.state!r}")
        if any(p.round_id != row.round_id for p in parts):
            raise ClusterError(f"assignments of round {row.round_id} name another round")
        with engine_errors(f"open round {row.round_id}"):
            async with self._pool.acquire() as conn, conn.transaction():
                try:
                    await conn.execute(
                        "INSERT INTO fedtray_rounds (round_id, number, attempt, base_version,"
                        " state, required, deadline, opened_at)"
                        " VALUES ($1, $2, $3, $4, 'open', $5, $6, $7)",
                        row.round_id,
                        row.number,
                        row.attempt,
                        row.base_version,
                        row.required,
                        row.deadline,
                        row.opened_at,
                    )
                except asyncpg.UniqueViolationError as exc:
                    raise ClusterError(
                        f"round {row.round_id} not opened: a round exists with that id or "
                        "another round is open"
                    ) from exc
                await conn.executemany(
                    "INSERT INTO fedtray_assignments"
                    " (round_id, device_id, idx, count, state, detail)"
                    " VALUES ($1, $2, $3, $4, $5, $6)",
                    [(p.round_id, p.device_id, p.index, p.count, p.state, p.detail) for p in parts],
                )
                await _notify(conn, f"round:{row.round_id}")

    async def current_round(self) -> RoundRow | None:
        with engine_errors("current round"):
            row = await self._pool.fetchrow(
                "SELECT * FROM fedtray_rounds WHERE state IN ('open', 'closing')"
            )
        return round_from(row) if row is not None else None

    async def set_round_state(self, round_id: str, state: RoundState) -> None:
        with engine_errors(f"state of round {round_id}"):
            async with self._pool.acquire() as conn, conn.transaction():
                have = await conn.fetchval(
                    "SELECT state FROM fedtray_rounds WHERE round_id = $1 FOR UPDATE", round_id
                )
                if have is None:
                    raise ClusterError(f"round {round_id} is unknown")
                if have == state:
                    return
                if have in _FINAL_STATES or state == "open":
                    raise ClusterError(f"round {round_id} is {have}: cannot become {state}")
                await conn.execute(
                    "UPDATE fedtray_rounds SET state = $2 WHERE round_id = $1", round_id, state
                )
                await _notify(conn, f"round:{round_id}")

    # -------------------------------------------------------------- assignments

    async def assignments(self, round_id: str) -> list[Assignment]:
        with engine_errors(f"assignments of round {round_id}"):
            rows = await self._pool.fetch(
                "SELECT * FROM fedtray_assignments WHERE round_id = $1 ORDER BY idx, device_id",
                round_id,
            )
        return [assignment_from(r) for r in rows]

    async def assignment_of(self, round_id: str, device_id: str) -> Assignment | None:
        with engine_errors(f"assignment of {device_id}"):
            row = await self._pool.fetchrow(
                "SELECT * FROM fedtray_assignments WHERE round_id = $1 AND device_id = $2",
                round_id,
                device_id,
            )
        return assignment_from(row) if row is not None else None

    async def set_assignment(
        self, round_id: str, device_id: str, state: AssignmentState, detail: str | None = None
    ) -> None:
        with engine_errors(f"assignment of {device_id}"):
            async with self._pool.acquire() as conn, conn.transaction():
                have = await conn.fetchval(
                    "SELECT state FROM fedtray_assignments"
                    " WHERE round_id = $1 AND device_id = $2 FOR UPDATE",
                    round_id,
                    device_id,
                )
                if have is None:
                    raise ClusterError(f"{device_id} has no assignment in round {round_id}")
                if have == "reported":
                    return
                await conn.execute(
                    "UPDATE fedtray_assignments SET state = $3, detail = $4"
                    " WHERE round_id = $1 AND device_id = $2",
                    round_id,
                    device_id,
                    state,
                    detail,
                )

    # -------------------------------------------------------------- updates

    async def record_update(self, row: UpdateRow) -> bool:
        with engine_errors(f"update of {row.device_id}"):
            async with self._pool.acquire() as conn, conn.transaction():
                seen = await conn.fetchval(
                    "SELECT 1 FROM fedtray_updates WHERE round_id = $1 AND device_id = $2",
                    row.round_id,
                    row.device_id,
                )
                if seen is not None:
                    return False
                state = await conn.fetchval(
                    "SELECT state FROM fedtray_rounds WHERE round_id = $1 FOR SHARE",
                    row.round_id,
                )
                if state != "open":
                    raise ClusterError(
                        f"round {row.round_id} is {state or 'unknown'}: update of "
                        f"{row.device_id} not recorded"
                    )
                assigned = await conn.fetchval(
                    "SELECT 1 FROM fedtray_assignments WHERE round_id = $1 AND device_id = $2",
                    row.round_id,
                    row.device_id,
                )
                if assigned is None:
                    raise ClusterError(
                        f"{row.device_id} is not assigned in round {row.round_id}: "
                        "update not recorded"
                    )
                inserted = await conn.fetchval(
                    "INSERT INTO fedtray_updates (round_id, device_id, num_samples, worker_id,"
                    " blob_key, sha256, metrics, received_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    " ON CONFLICT (round_id, device_id) DO NOTHING RETURNING 1",
                    row.round_id,
                    row.device_id,
                    row.num_samples,
                    row.worker_id,
                    row.blob_key,
                    row.sha256,
                    json.dumps(row.metrics),
                    time.time(),
                )
                if inserted is None:
                    return False
                await conn.execute(
                    "UPDATE fedtray_assignments SET state = 'reported', detail = NULL"
                    " WHERE round_id = $1 AND device_id = $2",
                    row.round_id,
                    row.device_id,
                )
                return True

    async def updates(self, round_id: str) -> list[UpdateRow]:
        with engine_errors(f"updates of round {round_id}"):
            rows = await self._pool.fetch(
                "SELECT * FROM fedtray_updates WHERE round_id = $1 ORDER BY device_id", round_id
            )
        return [update_from(r) for r in rows]

    async def count_updates(self, round_id: str) -> int:
        with engine_errors(f"updates of round {round_id}"):
            count = await self._pool.fetchval(
                "SELECT count(*) FROM fedtray_updates WHERE round_id = $1", round_id
            )
        return int(count)

    # -------------------------------------------------------------- status views

    async def round_history(self) -> list[FinishedRound]:
        """Every completed or abandoned round, oldest first, with its counts and version
        (one query)."""
        with engine_errors("round history"):
            rows = await self._pool.fetch(
                "SELECT r.*,"
                " (SELECT count(*) FROM fedtray_assignments a WHERE a.round_id = r.round_id)"
                " AS n_selected,"
                " (SELECT count(*) FROM fedtray_updates u WHERE u.round_id = r.round_id)"
                " AS n_reported,"
                " (SELECT max(u.received_at) FROM fedtray_updates u"
                " WHERE u.round_id = r.round_id) AS last_update_at,"
                " v.version AS v_version, v.blob_key AS v_blob_key, v.sha256 AS v_sha256,"
                " v.size AS v_size, v.created_at AS v_created_at, v.metrics AS v_metrics,"
                " v.optimizer_key AS v_optimizer_key, v.optimizer_sha256 AS v_optimizer_sha256"
                " FROM fedtray_rounds r LEFT JOIN fedtray_versions v ON v.round_id = r.round_id"
                " WHERE r.state IN ('completed', 'abandoned')"
                " ORDER BY r.opened_at, r.number, r.attempt"
            )
        return [_finished_from(row) for row in rows]

    async def reports_by_device(self, round_ids: Sequence[str]) -> dict[str, int]:
        """``device_id -> updates recorded`` in the rounds ``round_ids`` (devices with none
        are absent)."""
        if not round_ids:
            return {}
        with engine_errors("reports by device"):
            rows = await self._pool.fetch(
                "SELECT device_id, count(*) AS n FROM fedtray_updates"
                " WHERE round_id = ANY($1::text[]) GROUP BY device_id",
                list(round_ids),
            )
        return {row["device_id"]: int(row["n"]) for row in rows}

    # -------------------------------------------------------------- partial sums

    async def record_partial(self, row: PartialRow) -> None:
        with engine_errors(f"partial sum of {row.worker_id}"):
            await self._pool.execute(
                "INSERT INTO fedtray_partials"
                " (round_id, worker_id, device_ids, total_samples, blob_key, sha256)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (round_id, worker_id) DO NOTHING",
                row.round_id,
                row.worker_id,
                list(row.device_ids),
                row.total_samples,
                row.blob_key,
                row.sha256,
            )

    async def partials(self, round_id: str) -> list[PartialRow]:
        with engine_errors(f"partial sums of round {round_id}"):
            rows = await self._pool.fetch(
                "SELECT * FROM fedtray_partials WHERE round_id = $1 ORDER BY worker_id", round_id
            )
        return [partial_from(r) for r in rows]

    # -------------------------------------------------------------- notifications

    async def notifications(self) -> AsyncGenerator[str, None]:
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=NOTIFY_QUEUE)

        def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(payload)

        pause = 0.1
        while True:
            try:
                conn = await connect_one(self._url, NOTIFY_APPLICATION)
            except ClusterError:
                await asyncio.sleep(pause)
                pause = min(RECONNECT_MAX_S, pause * 2)
                continue
            try:
                try:
                    await conn.add_listener(CHANNEL, on_notify)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    continue
                pause = 0.1
                while not conn.is_closed():
                    try:
                        payload = await asyncio.wait_for(queue.get(), _LIVENESS_CHECK_S)
                    except TimeoutError:
                        await self._probe(conn)
                        continue
                    yield payload
                while not queue.empty():
                    yield queue.get_nowait()
            finally:
                conn.terminate()

    @staticmethod
    async def _probe(conn: asyncpg.Connection) -> None:
        """Close ``conn`` unless the server answers within a few seconds."""
        try:
            await conn.fetchval("SELECT 1", timeout=5.0)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            conn.terminate()


def _finished_from(row: asyncpg.Record) -> FinishedRound:
    version = None
    if row["v_version"] is not None:
        version = version_from(
            {
                "version": row["v_version"],
                "blob_key": row["v_blob_key"],
                "sha256": row["v_sha256"],
                "size": row["v_size"],
                "round_id": row["round_id"],
                "created_at": row["v_created_at"],
                "metrics": row["v_metrics"],
                "optimizer_key": row["v_optimizer_key"],
                "optimizer_sha256": row["v_optimizer_sha256"],
            }
        )
    last = row["last_update_at"]
    return FinishedRound(
        round=round_from(row),
        selected=int(row["n_selected"]),
        reported=int(row["n_reported"]),
        last_update_at=None if last is None else float(last),
        version=version,
    )


async def connect(url: str, *, max_size: int = 10) -> PgClusterDB:
    """The cluster database at ``url`` (schema created if missing); ClusterError when
    PostgreSQL is unreachable or holds a newer schema."""
    pool = await create_pool(url, max_size=max_size)
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn, "cluster", SCHEMA_VERSION, SCHEMA)
            await ensure_schema(conn, "end", END_SCHEMA_VERSION, END_SCHEMA)
            await ensure_schema(conn, "fedeval", FEDEVAL_SCHEMA_VERSION, FEDEVAL_SCHEMA)
    except BaseException:
        pool.terminate()
        raise
    return PgClusterDB(url, pool)


if TYPE_CHECKING:  # mypy proves the implementation satisfies its contract

    def _conforms(impl: PgClusterDB) -> ClusterDB:
        return impl
