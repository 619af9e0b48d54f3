"""The multi-process server end to end: ``fedtray-server --workers 2`` on real Redis and
PostgreSQL (tests/engines.py) with real ``python -m client`` devices.

What is asserted comes from the shared engines themselves (the update rows' worker ids in
PostgreSQL, presence in Redis), never from one process's memory: a federation of three
devices spread over both workers completes two rounds, each update recorded once, and the
updates arrived through both workers; the workers' acks counted the round's reports (the
last report of each round saw all three, none counted another round's).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests.cluster_harness import cluster, cluster_flags, latest_version, update_rows
from tests.engines import RedisServer
from tests.waiting import poll

pytestmark = pytest.mark.slow

_ACCEPTED = re.compile(
    r"round (\S+): update from \S+ accepted here \(\d+ samples; (\d+) reported\)"
)


def test_two_workers_complete_two_rounds_with_updates_through_both(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    redis = private_redis.url(0)
    flags = cluster_flags(tmp_path, redis, postgres_url, "--rounds", "2")
    with cluster(tmp_path, redis, postgres_url, *flags) as fed:
        where = fed.spread(3)
        assert len(set(where.values())) == 2, where
        latest = poll(
            lambda: latest_version(postgres_url),
            lambda v: v is not None and v["version"] >= 2,
            120,
            "2 rounds",
        )
        assert latest is not None and latest["version"] == 2
        updates = update_rows(postgres_url)
        per_round = Counter(row["round_id"] for row in updates)
        assert sorted(per_round.values()) == [3, 3], per_round
        pairs = Counter((row["round_id"], row["device_id"]) for row in updates)
        assert max(pairs.values()) == 1, f"an update counted twice: {pairs}"
        workers = {row["worker_id"] for row in updates}
        assert len(workers) == 2, f"updates came through {workers} only"
        # The last ack of each round counted all three reports (logged as the ack is sent).
        counted = poll(
            lambda: _acks_counted(fed.srv.output()),
            lambda c: {rid: max(n) for rid, n in c.items()} == dict.fromkeys(per_round, 3),
            30,
            "every round's last ack counting 3 reports",
        )
        assert all(1 <= n <= 3 for ns in counted.values() for n in ns), counted


def _acks_counted(output: str) -> dict[str, list[int]]:
    """``round_id -> [reports counted by each ack]`` from the workers' log lines."""
    counted: dict[str, list[int]] = {}
    for match in _ACCEPTED.finditer(output):
        counted.setdefault(match[1], []).append(int(match[2]))
    return counted
