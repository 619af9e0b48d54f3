"""Evaluation of new versions in cluster mode, and the records of the end, below the
processes: :class:`server.cluster.evaluation.ClusterEvaluation` over the in-memory contracts
(a scorer that stands in for torch, held until released, so no torch process starts here),
the PostgreSQL side of it in server/cluster/db.py against a real PostgreSQL, and
:func:`server.cluster.ending.finish_federation` / :func:`~server.cluster.ending.
federation_status`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from client.tasks import get_task
from client.weights import StateDict
from server.background import Background
from server.cluster import db as cdb
from server.cluster.contracts import ClusterError, VersionRow
from server.cluster.coordinator import ClusterCoordinator
from server.cluster.ending import federation_status, final_metrics, finish_federation
from server.cluster.evaluation import ClusterEvaluation
from server.evaluation import EVALUATION_CPU_SHARE
from tests.cluster_memory import MemoryDB
from tests.test_cluster_coordinator import INITIAL, LAYOUT, POLL, Cluster, Worker, _update
from tests.test_server_evaluation import FakeClock
from tests.waiting import scaled, wait_until_async

T = TypeVar("T")

TINY = {"features": 8, "classes": 3, "hidden": 8, "samples": 300}


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), scaled(60.0)))


def version(n: int, metrics: dict[str, float] | None = None) -> VersionRow:
    return VersionRow(
        n, f"k{n}", "a" * 64, 10, None if n == 0 else f"r{n}", time.time(), metrics or {}
    )


class HeldScorer:
    """Scores ``state["w"][0]`` as the loss; each call waits until released."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.release = threading.Semaphore(0)
        self.rows_seen: list[int] = []

    def __call__(self, state: StateDict, x: Any, y: Any) -> dict[str, float]:
        self.rows_seen.append(len(y))
        value = float(state["w"][0])
        self.calls.append(value)
        if not self.release.acquire(timeout=scaled(30)):
            raise TimeoutError("never released")
        if value < 0:
            raise RuntimeError("this version cannot be evaluated")
        return {"loss": value, "accuracy": value / 10}


def state(value: float) -> StateDict:
    return {"w": np.array([value], dtype=np.float32)}


def test_versions_are_evaluated_one_at_a_time_latest_first_and_recorded_in_their_rows() -> None:
    async def body() -> None:
        db = MemoryDB()
        db.versions += [version(0), *(version(n, {"trainLoss": 9.0}) for n in (1, 2, 3))]
        background = Background()
        scorer = HeldScorer()
        evaluation = ClusterEvaluation(
            task=get_task("synthetic", TINY), db=db, background=background, scorer=scorer
        )
        evaluation.submit(1, state(1.0))
        await wait_until_async(lambda: len(scorer.calls) == 1, 10, "v1 evaluating")
        evaluation.submit(2, state(2.0))  # waits
        evaluation.submit(3, state(3.0))  # replaces 2: stale
        drained = asyncio.create_task(evaluation.drained())
        await asyncio.sleep(0)
        assert not drained.done()
        scorer.release.release()
        scorer.release.release()
        await asyncio.wait_for(drained, scaled(10))
        assert scorer.calls == [1.0, 3.0]
        # The test split of the task (60 rows of 300), read once.
        assert scorer.rows_seen == [60, 60]
        metrics = {row.version: row.metrics for row in db.versions}
        assert metrics[1] == {"trainLoss": 9.0, "evalLoss": 1.0, "evalAccuracy": 0.1}
        assert metrics[2] == {"trainLoss": 9.0}  # skipped for a newer one
        assert metrics[3] == {"trainLoss": 9.0, "evalLoss": 3.0, "evalAccuracy": 0.3}

    run(body)


def test_the_coordinator_keeps_the_single_process_cpu_budget() -> None:
    async def body() -> None:
        db = MemoryDB()
        db.versions += [version(n) for n in range(6)]
        scorer, clock = HeldScorer(), FakeClock()
        evaluation = ClusterEvaluation(
            task=get_task("synthetic", TINY),
            db=db,
            background=Background(),
            scorer=scorer,
            clock=clock,
        )

        async def evaluated(n: int, cost: float) -> None:
            await wait_until_async(lambda: len(scorer.calls) == n, 10, f"evaluation #{n}")
            clock.advance(cost)
            scorer.release.release()
            await wait_until_async(lambda: "evalLoss" in db.versions[n].metrics, 10, f"v{n}")

        evaluation.submit(1, state(1.0))
        await evaluated(1, 3.0)  # the first is free
        evaluation.submit(2, state(2.0))
        await evaluated(2, 0.01)
        evaluation.submit(3, state(3.0))
        await wait_until_async(lambda: clock.sleeping, 10, "resting")
        rest = 0.01 * (1 / EVALUATION_CPU_SHARE - 1)
        assert clock.sleeps[-1][0] == pytest.approx(clock.wall + rest)
        evaluation.submit(4, state(4.0))  # replaces 3
        clock.advance(rest)  # rested: the next version is evaluated as it comes
        await wait_until_async(lambda: len(clock.sleeps) == 2, 10, "waiting for a version")
        evaluation.submit(5, state(5.0))
        await wait_until_async(lambda: len(scorer.calls) == 3, 10, "evaluation #3")
        assert scorer.calls == [1.0, 2.0, 5.0]
        scorer.release.release()
        await asyncio.wait_for(evaluation.drained(), scaled(10))
        assert "evalLoss" in db.versions[5].metrics
        assert not {"evalLoss"} & (db.versions[3].metrics.keys() | db.versions[4].metrics.keys())

    run(body)


def test_a_failed_evaluation_or_a_failing_database_records_nothing_and_goes_on() -> None:
    async def body() -> None:
        db = MemoryDB()
        db.versions += [version(0), version(1), version(2)]
        scorer = HeldScorer()
        evaluation = ClusterEvaluation(
            task=get_task("synthetic", TINY), db=db, background=Background(), scorer=scorer
        )
        evaluation.submit(1, state(-1.0))  # the scorer raises
        scorer.release.release()
        await asyncio.wait_for(evaluation.drained(), scaled(10))
        assert db.versions[1].metrics == {}
        db.fail_next("record_evaluation")
        evaluation.submit(2, state(2.0))
        scorer.release.release()
        await asyncio.wait_for(evaluation.drained(), scaled(10))
        assert db.versions[2].metrics == {}
        evaluation.submit(2, state(2.0))
        scorer.release.release()
        await asyncio.wait_for(evaluation.drained(), scaled(10))
        assert db.versions[2].metrics == {"evalLoss": 2.0, "evalAccuracy": 0.2}

    run(body)


def test_the_end_is_recorded_after_the_final_evaluation() -> None:
    async def body() -> None:
        db = MemoryDB()
        db.versions += [version(0), version(1, {"trainLoss": 0.5})]
        scorer = HeldScorer()
        evaluation = ClusterEvaluation(
            task=get_task("synthetic", TINY), db=db, background=Background(), scorer=scorer
        )
        evaluation.submit(1, state(4.0))
        finishing = asyncio.create_task(finish_federation(db, evaluation))
        await wait_until_async(lambda: len(scorer.calls) == 1, 10, "v1 evaluating")
        assert await db.finished_version() is None  # waits for the evaluation
        scorer.release.release()
        assert await asyncio.wait_for(finishing, scaled(10)) == 1
        assert await db.finished_version() == 1
        assert final_metrics(db.versions[1].metrics) == {"evalLoss": 4.0, "evalAccuracy": 0.4}
        status = await federation_status(db, None)
        assert status["versions"][0] == {
            "version": 1,
            "roundId": "r1",
            "createdAt": db.versions[1].created_at,
            "trainLoss": 0.5,
            "evalLoss": 4.0,
            "evalAccuracy": 0.4,
            "federatedEvalLoss": None,
            "federatedEvalAccuracy": None,
            "federatedEvalSamples": None,
            "federatedEvalDevices": None,
        }
        assert status["versions"][1]["evalLoss"] is None
        db.fail_next("recent_versions")
        assert await federation_status(db, None) == {"finished": False, "versions": None}
        assert await finish_federation(MemoryDB(), None) is None  # no version: nothing

    run(body)


@pytest.mark.parametrize(
    ("metrics", "final"),
    [
        ({}, {}),
        ({"trainLoss": 1.0}, {}),
        (
            {"trainLoss": 1.0, "evalLoss": 0.5, "evalAccuracy": 0.9},
            {"evalLoss": 0.5, "evalAccuracy": 0.9},
        ),
        ({"evalLoss": float("nan"), "evalAccuracy": 0.9}, {"evalAccuracy": 0.9}),
    ],
)
def test_final_metrics_are_the_finite_evaluation(
    metrics: dict[str, float], final: dict[str, float]
) -> None:
    assert final_metrics(metrics) == final


def test_postgres_records_evaluations_and_the_end(postgres_url: str) -> None:
    async def body() -> None:
        db = await cdb.connect(postgres_url, max_size=2)
        try:
            await db.create_version_zero(version(0))
            assert await db.record_evaluation(0, {"evalLoss": 2.0}) is True
            assert await db.record_evaluation(0, {"evalLoss": 1.5, "evalAccuracy": 0.5})
            assert await db.record_evaluation(7, {"evalLoss": 1.0}) is False
            latest = await db.latest_version()
            assert latest is not None
            assert latest.metrics == {"evalLoss": 1.5, "evalAccuracy": 0.5}
            assert [v.version for v in await db.recent_versions(5)] == [0]
            assert await db.finished_version() is None
            await db.mark_finished(0)
            await db.mark_finished(0)  # idempotent
            assert await db.finished_version() == 0
        finally:
            await db.close()
        # The end's table lives beside the cluster's (a new connect finds both).
        again = await cdb.connect(postgres_url, max_size=1)
        try:
            assert await again.finished_version() == 0
        finally:
            await again.close()

    run(body)


def test_postgres_down_is_a_cluster_error() -> None:
    async def body() -> None:
        with pytest.raises(ClusterError):
            await cdb.connect("postgresql://nobody@127.0.0.1:1/none", max_size=1)

    run(body)


def test_the_coordinator_hands_each_published_version_to_its_hook(tmp_path: Path) -> None:
    """The ``published`` hook gets the version number and exactly the published weights,
    only once the version's row exists."""

    async def body() -> None:
        c = Cluster(tmp_path, clients_per_round=2, min_clients=2, min_completion=1.0, rounds=2)
        w1 = Worker(c, "w1")
        w1.connect("a", "b")
        handed: list[tuple[int, StateDict, int]] = []

        async def published(v: int, s: StateDict) -> None:
            handed.append((v, s, len(c.db.versions)))

        coordinator = ClusterCoordinator(
            config=c.config,
            db=c.db,
            presence=c.presence,
            blobs=c.blobs,
            layout=LAYOUT,
            initial_weights=lambda: {k: v.copy() for k, v in INITIAL.items()},
            work_dir=tmp_path,
            poll_interval=POLL,
            partial_wait=scaled(5),
            published=published,
        )
        task = asyncio.create_task(coordinator.run())
        for attempt_round in (1, 2):
            await wait_until_async(
                lambda n=attempt_round: any(
                    r.number == n and r.state == "open" for r in c.db.rounds.values()
                ),
                what=f"round {attempt_round} open",
            )
            row = next(
                r for r in c.db.rounds.values() if r.number == attempt_round and r.state == "open"
            )
            for i, part in enumerate(c.assigned(row.round_id)):
                await w1.report(
                    row.round_id, part.device_id, _update(10 * attempt_round + i), 3, 1.0
                )
            await c.state_is(row.round_id, "closing")
            await w1.write_partial(row.round_id)
        await asyncio.wait_for(task, timeout=scaled(10))
        assert [v for v, _, _ in handed] == [1, 2]
        for version_number, weights, rows in handed:
            assert rows == version_number + 1  # the row existed when the hook was called
            published = c.version(version_number)
            assert set(weights) == set(published)
            for name, arr in published.items():
                np.testing.assert_array_equal(weights[name], arr)
                assert weights[name].dtype == arr.dtype

    run(body)
