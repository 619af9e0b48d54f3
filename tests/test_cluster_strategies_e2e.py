"""``fedtray-server --workers 2`` with a robust strategy and clipping, and with a server
optimizer, on real Redis and PostgreSQL with real ``python -m client`` devices spread over
both workers: every version it publishes equals the single-process strategy code
(server.strategies) run over the updates the database recorded for its round, read from
shared storage -- so nothing is refused at start, every update counts once, and FedAdam's
state goes from one round to the next.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from client.weights import StateDict, decode
from server.cluster.blobs import DirectoryBlobs
from server.strategies import MemoryUpdates, StrategySettings, build_strategy
from tests.cluster_harness import cluster, cluster_flags, fetch, latest_version
from tests.engines import RedisServer
from tests.waiting import poll

pytestmark = pytest.mark.slow


def _blob(shared: Path, key: str, sha256: str, dest: Path) -> bytes:
    asyncio.run(DirectoryBlobs(shared).get_file(key, sha256, dest))
    try:
        return dest.read_bytes()
    finally:
        dest.unlink()


@pytest.mark.parametrize(
    ("flags", "settings"),
    [
        (
            ("--strategy", "median", "--clip-norm", "0.05"),
            StrategySettings(name="median", clip_norm=0.05),
        ),
        (("--strategy", "fedadam"), StrategySettings(name="fedadam")),
    ],
    ids=["median-clipped", "fedadam"],
)
def test_versions_equal_the_strategy_over_the_recorded_updates(
    tmp_path: Path,
    private_redis: RedisServer,
    postgres_url: str,
    flags: tuple[str, ...],
    settings: StrategySettings,
) -> None:
    redis = private_redis.url(0)
    args = cluster_flags(tmp_path, redis, postgres_url, "--rounds", "2", *flags)
    with cluster(tmp_path, redis, postgres_url, *args) as fed:
        where = fed.spread(3)
        assert len(set(where.values())) == 2, where
        poll(
            lambda: latest_version(postgres_url),
            lambda v: v is not None and v["version"] >= 2,
            180,
            "2 rounds",
        )
    shared = tmp_path / "shared"
    versions = fetch(postgres_url, "SELECT * FROM fedtray_versions ORDER BY version")
    assert [v["version"] for v in versions] == [0, 1, 2]

    def weights(row: dict[str, object]) -> StateDict:
        data = _blob(shared, str(row["blob_key"]), str(row["sha256"]), tmp_path / "v")
        return decode(data, "safetensors", max_bytes=len(data) + 1)

    strategy = build_strategy(settings)
    current = weights(versions[0])
    for row in versions[1:]:
        updates = fetch(
            postgres_url,
            "SELECT device_id, worker_id, num_samples, blob_key, sha256 FROM fedtray_updates"
            " WHERE round_id = $1 ORDER BY device_id",
            row["round_id"],
        )
        assert len(updates) == 3 and len({u["worker_id"] for u in updates}) == 2, updates
        kept = [(weights(u), int(u["num_samples"])) for u in updates]
        strategy.begin(current)
        added = [strategy.add(state, samples) for state, samples in kept]
        aggregate = strategy.result(MemoryUpdates(kept))
        strategy.commit(aggregate)
        got = weights(row)
        for name, want in aggregate.weights.items():
            assert got[name].dtype == want.dtype
            if settings.name == "median":  # read back: the same arithmetic, bit for bit
                np.testing.assert_array_equal(got[name], want, err_msg=name)
            else:  # partial sums of two workers: float64 sums in another order
                np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-7, err_msg=name)
        if settings.clip_norm is not None:
            assert any(a.clipped for a in added), "no update was clipped: the test is weak"
        if settings.name == "fedadam":
            assert row["optimizer_key"] is not None
        current = got
