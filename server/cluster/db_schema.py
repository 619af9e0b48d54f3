"""The cluster database's tables (DDL) and the mapping of their rows to the contract's
records: pure data and functions, no I/O (the tables are described in
:mod:`server.cluster.db`, which creates them with :func:`server.cluster.pg.ensure_schema`).

Raises: KeyError/ValueError for a row that lacks a column or holds a bad number (a schema
mismatch: callers wrap it). Never: talks to PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from server.cluster.contracts import (
    Assignment,
    EvalAsk,
    PartialRow,
    RoundRow,
    UpdateRow,
    VersionRow,
)

__all__ = [
    "CHANNEL",
    "END_SCHEMA",
    "END_SCHEMA_VERSION",
    "FEDEVAL_SCHEMA",
    "FEDEVAL_SCHEMA_VERSION",
    "SCHEMA",
    "SCHEMA_VERSION",
    "assignment_from",
    "eval_ask_from",
    "metrics_from",
    "partial_from",
    "round_from",
    "update_from",
    "version_from",
]

#: The LISTEN/NOTIFY channel workers follow.
CHANNEL = "fedtray_cluster"

SCHEMA_VERSION = 2

SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS fedtray_versions (
        version integer PRIMARY KEY CHECK (version >= 0),
        blob_key text NOT NULL,
        sha256 text NOT NULL,
        size bigint NOT NULL,
        round_id text,
        created_at double precision NOT NULL,
        metrics jsonb NOT NULL DEFAULT '{}')""",
    """CREATE TABLE IF NOT EXISTS fedtray_rounds (
        round_id text PRIMARY KEY,
        number integer NOT NULL,
        attempt integer NOT NULL,
        base_version integer NOT NULL,
        state text NOT NULL
            CHECK (state IN ('open', 'closing', 'completed', 'abandoned')),
        required integer NOT NULL,
        deadline double precision NOT NULL,
        opened_at double precision NOT NULL)""",
    """CREATE UNIQUE INDEX IF NOT EXISTS fedtray_one_current_round
        ON fedtray_rounds ((true)) WHERE state IN ('open', 'closing')""",
    """CREATE TABLE IF NOT EXISTS fedtray_assignments (
        round_id text NOT NULL REFERENCES fedtray_rounds ON DELETE CASCADE,
        device_id text NOT NULL,
        idx integer NOT NULL,
        count integer NOT NULL,
        state text NOT NULL CHECK (state IN
            ('assigned', 'started', 'refused', 'failed', 'reported', 'dropped')),
        detail text,
        PRIMARY KEY (round_id, device_id))""",
    """CREATE TABLE IF NOT EXISTS fedtray_updates (
        round_id text NOT NULL REFERENCES fedtray_rounds ON DELETE CASCADE,
        device_id text NOT NULL,
        num_samples bigint NOT NULL CHECK (num_samples > 0),
        worker_id text NOT NULL,
        blob_key text NOT NULL,
        sha256 text NOT NULL,
        metrics jsonb NOT NULL DEFAULT '{}',
        received_at double precision NOT NULL,
        PRIMARY KEY (round_id, device_id))""",
    """CREATE TABLE IF NOT EXISTS fedtray_partials (
        round_id text NOT NULL REFERENCES fedtray_rounds ON DELETE CASCADE,
        worker_id text NOT NULL,
        device_ids text[] NOT NULL,
        total_samples bigint NOT NULL,
        blob_key text NOT NULL,
        sha256 text NOT NULL,
        PRIMARY KEY (round_id, worker_id))""",
    # version 2: the server optimizer's state saved beside each version
    "ALTER TABLE fedtray_versions ADD COLUMN IF NOT EXISTS optimizer_key text",
    "ALTER TABLE fedtray_versions ADD COLUMN IF NOT EXISTS optimizer_sha256 text",
)


#: The end of a federation (schema component ``end``, created beside ``cluster``'s tables):
#: one row per final version once the coordinator finished the federation there.
END_SCHEMA_VERSION = 1

END_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS fedtray_finished (
        version integer PRIMARY KEY CHECK (version >= 0),
        finished_at double precision NOT NULL)""",
)


#: Federated evaluation's asks (schema component ``fedeval``).
FEDEVAL_SCHEMA_VERSION = 1

FEDEVAL_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS fedtray_fedeval (
        version integer NOT NULL,
        device_id text NOT NULL,
        idx integer NOT NULL,
        count integer NOT NULL,
        deadline double precision NOT NULL,
        state text NOT NULL CHECK (state IN ('asked', 'accepted', 'reported', 'done')),
        loss double precision,
        accuracy double precision,
        num_samples bigint,
        PRIMARY KEY (version, device_id))""",
)


def eval_ask_from(row: Mapping[str, Any]) -> EvalAsk:
    return EvalAsk(
        version=int(row["version"]),
        device_id=row["device_id"],
        index=int(row["idx"]),
        count=int(row["count"]),
        deadline=float(row["deadline"]),
        state=row["state"],
        loss=None if row["loss"] is None else float(row["loss"]),
        accuracy=None if row["accuracy"] is None else float(row["accuracy"]),
        num_samples=None if row["num_samples"] is None else int(row["num_samples"]),
    )


def metrics_from(value: Any) -> dict[str, float]:
    loaded = json.loads(value) if isinstance(value, str) else (value or {})
    return {str(k): float(v) for k, v in dict(loaded).items()}


def version_from(row: Mapping[str, Any]) -> VersionRow:
    return VersionRow(
        version=int(row["version"]),
        blob_key=row["blob_key"],
        sha256=row["sha256"],
        size=int(row["size"]),
        round_id=row["round_id"],
        created_at=float(row["created_at"]),
        metrics=metrics_from(row["metrics"]),
        optimizer_key=row["optimizer_key"],
        optimizer_sha256=row["optimizer_sha256"],
    )


def round_from(row: Mapping[str, Any]) -> RoundRow:
    return RoundRow(
        round_id=row["round_id"],
        number=int(row["number"]),
        attempt=int(row["attempt"]),
        base_version=int(row["base_version"]),
        state=row["state"],
        required=int(row["required"]),
        deadline=float(row["deadline"]),
        opened_at=float(row["opened_at"]),
    )


def assignment_from(row: Mapping[str, Any]) -> Assignment:
    return Assignment(
        round_id=row["round_id"],
        device_id=row["device_id"],
        index=int(row["idx"]),
        count=int(row["count"]),
        state=row["state"],
        detail=row["detail"],
    )


def update_from(row: Mapping[str, Any]) -> UpdateRow:
    return UpdateRow(
        round_id=row["round_id"],
        device_id=row["device_id"],
        num_samples=int(row["num_samples"]),
        worker_id=row["worker_id"],
        blob_key=row["blob_key"],
        sha256=row["sha256"],
        metrics=metrics_from(row["metrics"]),
    )


def partial_from(row: Mapping[str, Any]) -> PartialRow:
    return PartialRow(
        round_id=row["round_id"],
        worker_id=row["worker_id"],
        device_ids=tuple(row["device_ids"]),
        total_samples=int(row["total_samples"]),
        blob_key=row["blob_key"],
        sha256=row["sha256"],
    )
