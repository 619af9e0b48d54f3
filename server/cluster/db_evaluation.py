"""The cluster database's evaluation and end-of-federation tables (asyncpg): the part of
:class:`server.cluster.db.PgClusterDB` that records how versions score and when the
federation ends (tables ``fedtray_finished`` and ``fedtray_fedeval``, described in
:mod:`server.cluster.db`).

Promises:

* :meth:`EvaluationTables.record_evaluation` merges a version's evaluation (``evalLoss``,
  ``evalAccuracy``) into its ``metrics``; the keys it names replace older values, the
  others (``trainLoss``) stay.
* :meth:`EvaluationTables.mark_finished` is idempotent and notifies ``finished:<n>``;
  :meth:`EvaluationTables.finished_version` is the newest such mark.
* :meth:`EvaluationTables.ask_evaluation` records each ask once (by version and device)
  and notifies ``fedeval:<n>``; :meth:`EvaluationTables.set_ask_state` only moves an ask
  forward (asked, accepted, done); :meth:`EvaluationTables.record_federated_result` counts
  a device's result once, locking the version's row first, so the means it merges into
  the version's metrics cover every result counted.

Raises: ClusterError (one line) for every engine failure. Never: stores weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import asyncpg

from server.cluster.contracts import ClusterError, EvalAsk, EvalAskState, VersionRow
from server.cluster.db_schema import CHANNEL, eval_ask_from, version_from
from server.cluster.pg import engine_errors, notify

__all__ = ["EvaluationTables"]


class EvaluationTables:
    """Versions' evaluation, the federation's end and federated evaluation (a part of
    :class:`server.cluster.db.PgClusterDB`, over its pool)."""

    _pool: asyncpg.Pool

    async def recent_versions(self, limit: int) -> list[VersionRow]:
        """The newest ``limit`` versions, newest first."""
        with engine_errors("versions"):
            rows = await self._pool.fetch(
                "SELECT * FROM fedtray_versions ORDER BY version DESC LIMIT $1", limit
            )
        return [version_from(r) for r in rows]

    async def record_evaluation(self, version: int, metrics: dict[str, float]) -> bool:
        """Merge ``metrics`` into version ``version``'s metrics; False when it is unknown."""
        with engine_errors(f"evaluation of version {version}"):
            done = await self._pool.fetchval(
                "UPDATE fedtray_versions SET metrics = metrics || $2::jsonb"
                " WHERE version = $1 RETURNING version",
                version,
                json.dumps(metrics),
            )
        return done is not None

    async def mark_finished(self, version: int) -> None:
        """The federation is finished with ``version`` (idempotent); notifies workers."""
        with engine_errors(f"the end at version {version}"):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO fedtray_finished (version, finished_at) VALUES ($1, $2)"
                    " ON CONFLICT (version) DO NOTHING",
                    version,
                    time.time(),
                )
                await notify(conn, CHANNEL, f"finished:{version}")

    async def finished_version(self) -> int | None:
        """The newest version the federation finished with (None: not finished)."""
        with engine_errors("the end"):
            value = await self._pool.fetchval("SELECT max(version) FROM fedtray_finished")
        return None if value is None else int(value)

    # -------------------------------------------------------------- federated evaluation

    async def ask_evaluation(self, asks: Sequence[EvalAsk]) -> None:
        if not asks:
            return
        with engine_errors(f"evaluation asks of version {asks[0].version}"):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    "INSERT INTO fedtray_fedeval (version, device_id, idx, count, deadline,"
                    " state) VALUES ($1, $2, $3, $4, $5, 'asked')"
                    " ON CONFLICT (version, device_id) DO NOTHING",
                    [(a.version, a.device_id, a.index, a.count, a.deadline) for a in asks],
                )
                await notify(conn, CHANNEL, f"fedeval:{asks[0].version}")

    async def evaluation_asks(self, version: int) -> list[EvalAsk]:
        with engine_errors(f"evaluation asks of version {version}"):
            rows = await self._pool.fetch(
                "SELECT * FROM fedtray_fedeval WHERE version = $1 ORDER BY idx, device_id",
                version,
            )
        return [eval_ask_from(r) for r in rows]

    async def set_ask_state(self, version: int, device_id: str, state: EvalAskState) -> None:
        before = ("asked",) if state == "accepted" else ("asked", "accepted")
        if state not in ("accepted", "done"):
            raise ClusterError(f"an evaluation ask cannot be set {state!r}")
        with engine_errors(f"evaluation ask of {device_id}"):
            await self._pool.execute(
                "UPDATE fedtray_fedeval SET state = $3"
                " WHERE version = $1 AND device_id = $2 AND state = ANY($4::text[])",
                version,
                device_id,
                state,
                list(before),
            )

    async def record_federated_result(
        self, version: int, device_id: str, loss: float, accuracy: float, num_samples: int
    ) -> bool:
        with engine_errors(f"evaluation result of {device_id}"):
            async with self._pool.acquire() as conn, conn.transaction():
                # Serialises the results of one version: the means below see them all.
                await conn.execute(
                    "SELECT 1 FROM fedtray_versions WHERE version = $1 FOR UPDATE", version
                )
                counted = await conn.fetchval(
                    "UPDATE fedtray_fedeval SET state = 'reported', loss = $3, accuracy = $4,"
                    " num_samples = $5 WHERE version = $1 AND device_id = $2"
                    " AND state IN ('asked', 'accepted') RETURNING 1",
                    version,
                    device_id,
                    loss,
                    accuracy,
                    num_samples,
                )
                if counted is None:
                    return False
                means = await conn.fetchrow(
                    "SELECT sum(loss * num_samples) / sum(num_samples) AS loss,"
                    " sum(accuracy * num_samples) / sum(num_samples) AS accuracy,"
                    " sum(num_samples) AS samples, count(*) AS devices"
                    " FROM fedtray_fedeval WHERE version = $1 AND state = 'reported'"
                    " AND num_samples > 0",
                    version,
                )
                if means is not None and means["samples"]:
                    metrics = {
                        "federatedEvalLoss": float(means["loss"]),
                        "federatedEvalAccuracy": float(means["accuracy"]),
                        "federatedEvalSamples": float(means["samples"]),
                        "federatedEvalDevices": float(means["devices"]),
                    }
                    await conn.execute(
                        "UPDATE fedtray_versions SET metrics = metrics || $2::jsonb"
                        " WHERE version = $1",
                        version,
                        json.dumps(metrics),
                    )
                return True
