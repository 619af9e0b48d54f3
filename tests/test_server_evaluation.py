"""Evaluation off the critical path: a new global is published before its evaluation,
which lands in its history record (and ``history.json``) later.

First the CPU budget's rule by table, then the queue alone with a controllable clock (one
at a time, stale versions skipped, failures recorded as nothing, the budget kept, the end
never waiting for it), then the global model's history update on a real state dir, then a
real server on loopback with a deliberately slow (gated) evaluator injected.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

from client.weights import StateDict, layout_of
from server.background import Background
from server.evaluation import EVALUATION_CPU_SHARE, EvaluationBudget, EvaluationQueue, Metrics
from server.globalmodel import GlobalModel
from server.model import Evaluator, ModelEvaluator
from server.status import RoundRecord
from server.store import HISTORY_FILE, Store
from tests.waiting import scaled, wait_until_async

pytestmark = pytest.mark.timeout(60)


def _state(value: float) -> StateDict:
    return {"w": np.full(4, value, np.float32)}


# ------------------------------------------------------------------ the budget's rule

# (cpu share, evaluations as (ended at, cost), now) -> seconds until the next may start.
BUDGET_TABLE: list[tuple[float, list[tuple[float, float]], float, float]] = [
    (0.1, [], 0.0, 0.0),  # nothing evaluated yet
    (0.1, [(1.0, 5.0)], 1.0, 0.0),  # the first evaluation (model build, torch) is free
    (0.1, [(1.0, 5.0), (2.0, 0.01)], 2.0, 0.09),  # 0.01 s at 10 %: 0.09 s of rest
    (0.1, [(1.0, 5.0), (2.0, 0.01)], 2.05, 0.04),
    (0.1, [(1.0, 5.0), (2.0, 0.01)], 2.09, 0.0),
    (0.1, [(1.0, 5.0), (2.0, 0.01)], 7.0, 0.0),  # a slow cadence never waits
    (0.25, [(0.0, 0.0), (2.0, 0.2)], 2.0, 0.6),
    (0.5, [(0.0, 0.0), (2.0, 0.2)], 2.1, 0.1),
    (1.0, [(0.0, 0.0), (2.0, 3.0)], 2.0, 0.0),  # a whole core: no rest
    (0.1, [(0.0, 0.0), (2.0, 0.01), (3.0, 0.02)], 3.0, 0.18),  # the last evaluation counts
    (0.1, [(0.0, 0.0), (2.0, -1.0)], 2.0, 0.0),  # a clock step back costs nothing
]


@pytest.mark.parametrize(("share", "spent", "now", "delay"), BUDGET_TABLE)
def test_the_budget_rests_the_evaluator_in_proportion_to_its_last_cost(
    share: float, spent: list[tuple[float, float]], now: float, delay: float
) -> None:
    budget = EvaluationBudget(share)
    for ended_at, cost in spent:
        budget.spent(ended_at, cost)
    assert budget.delay(now) == pytest.approx(delay)


@pytest.mark.parametrize("share", [0.0, -0.1, 1.01, float("nan"), float("inf")])
def test_a_budget_share_outside_0_to_1_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="CPU share"):
        EvaluationBudget(share)


def test_the_default_share_is_a_fraction_of_one_core() -> None:
    assert 0.0 < EVALUATION_CPU_SHARE < 1.0
    EvaluationBudget(EVALUATION_CPU_SHARE)


# ------------------------------------------------------------------ the queue alone


class FakeClock:
    """A clock the test moves: ``advance`` wakes the sleeps that are due."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu_used = 0.0
        self.sleeps: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.wall

    def cpu(self) -> float:
        return self.cpu_used

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleeps.append((self.wall + seconds, future))
        await future

    @property
    def sleeping(self) -> bool:
        return any(not f.done() for _, f in self.sleeps)

    def advance(self, wall: float, cpu: float | None = None) -> None:
        self.wall += wall
        self.cpu_used += wall if cpu is None else cpu
        for due, future in self.sleeps:
            if due <= self.wall and not future.done():
                future.set_result(None)


class _Gates:
    """An evaluate function whose calls each wait until the test releases them."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.release: dict[int, asyncio.Event] = {}
        self.recorded: list[tuple[int, Metrics]] = []
        self.running = 0
        self.most_running = 0

    async def evaluate(self, version: int, state: StateDict) -> Metrics:
        self.started.append(version)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.setdefault(version, asyncio.Event()).wait()
            if version < 0:
                raise RuntimeError("broken model")
            return {"evalLoss": float(state["w"][0]), "evalAccuracy": 0.5}
        finally:
            self.running -= 1

    async def record(self, version: int, metrics: Metrics) -> None:
        self.recorded.append((version, metrics))

    def open(self, version: int) -> None:
        self.release.setdefault(version, asyncio.Event()).set()


def _queue(
    gates: _Gates, background: Background, clock: FakeClock | None = None, share: float = 0.1
) -> EvaluationQueue:
    return EvaluationQueue(
        evaluate=gates.evaluate,
        record=gates.record,
        background=background,
        cpu_share=share,
        clock=FakeClock() if clock is None else clock,
    )


def _metrics(version: int) -> Metrics:
    return {"evalLoss": float(version), "evalAccuracy": 0.5}


async def _evaluated(
    gates: _Gates, clock: FakeClock, version: int, cost: float, cpu: float | None = None
) -> None:
    """Let ``version``'s evaluation (started) cost ``cost`` s of wall (``cpu`` s of CPU)."""
    await wait_until_async(lambda: version in gates.started, 5, f"version {version} started")
    clock.advance(cost, cpu)
    gates.open(version)
    await wait_until_async(
        lambda: any(v == version for v, _ in gates.recorded), 5, f"version {version} recorded"
    )


async def _rest_out(clock: FakeClock, rest: float) -> None:
    """Let the queue's rest pass, and then as long again without a new version."""
    sleeps = len(clock.sleeps)
    clock.advance(rest)
    await wait_until_async(lambda: len(clock.sleeps) > sleeps, 5, "waiting for a version")
    clock.advance(rest)


def test_the_queue_waits_for_its_budget_then_evaluates_the_newest_version() -> None:
    async def scenario() -> None:
        gates, background, clock = _Gates(), Background(), FakeClock()
        queue = _queue(gates, background, clock, share=0.1)
        queue.submit(1, _state(1.0))
        await _evaluated(gates, clock, 1, cost=2.0)  # the first one is free
        queue.submit(2, _state(2.0))
        await _evaluated(gates, clock, 2, cost=0.01)  # at once; 0.09 s of rest follow
        queue.submit(3, _state(3.0))
        await wait_until_async(lambda: clock.sleeping, 5, "the queue resting")
        assert clock.sleeps[-1][0] == pytest.approx(clock.wall + 0.09)
        queue.submit(4, _state(4.0))  # replaces 3 while the queue rests
        clock.advance(0.05)
        await asyncio.sleep(0)
        assert gates.started == [1, 2] and queue.busy
        sleeps = len(clock.sleeps)
        clock.advance(0.04)  # rested: now it waits for the next version, 0.09 s at most
        await wait_until_async(lambda: len(clock.sleeps) > sleeps, 5, "waiting for a version")
        assert clock.sleeps[-1][0] == pytest.approx(clock.wall + 0.09)
        await asyncio.sleep(0)
        assert gates.started == [1, 2]
        queue.submit(5, _state(5.0))  # just published: evaluated at once, 4 skipped
        await _evaluated(gates, clock, 5, cost=0.02)
        await asyncio.wait_for(queue.drained(), scaled(5))
        assert gates.recorded == [(1, _metrics(1)), (2, _metrics(2)), (5, _metrics(5))]
        assert gates.most_running == 1

    asyncio.run(scenario())


def test_the_cost_is_the_cpu_used_at_most_the_wall_time() -> None:
    async def scenario() -> None:
        gates, background, clock = _Gates(), Background(), FakeClock()
        queue = _queue(gates, background, clock, share=0.5)
        queue.submit(1, _state(1.0))
        await _evaluated(gates, clock, 1, cost=0.0)
        queue.submit(2, _state(2.0))
        await _evaluated(gates, clock, 2, cost=1.0, cpu=0.2)  # held, little CPU
        queue.submit(3, _state(3.0))
        await wait_until_async(lambda: clock.sleeping, 5, "the queue resting")
        assert clock.sleeps[-1][0] == pytest.approx(clock.wall + 0.2)
        await _rest_out(clock, 0.2)  # no new version: evaluated one rest later
        await _evaluated(gates, clock, 3, cost=0.1, cpu=0.3)  # other threads' CPU too
        queue.submit(4, _state(4.0))
        await wait_until_async(lambda: clock.sleeping, 5, "the queue resting")
        assert clock.sleeps[-1][0] == pytest.approx(clock.wall + 0.1)
        await _rest_out(clock, 0.1)
        await _evaluated(gates, clock, 4, cost=0.0)
        await asyncio.wait_for(queue.drained(), scaled(5))

    asyncio.run(scenario())


def test_at_a_slow_cadence_every_version_is_evaluated_without_waiting() -> None:
    async def scenario() -> None:
        gates, background, clock = _Gates(), Background(), FakeClock()
        queue = _queue(gates, background, clock, share=0.05)
        for version in range(1, 6):
            queue.submit(version, _state(float(version)))
            await _evaluated(gates, clock, version, cost=0.01)
            await asyncio.wait_for(queue.drained(), scaled(5))
            clock.advance(1.0)  # a round a second
        assert [v for v, _ in gates.recorded] == [1, 2, 3, 4, 5]
        assert clock.sleeps == [], "never rested"

    asyncio.run(scenario())


def test_drained_evaluates_what_waits_at_once_and_the_budget_applies_again_after() -> None:
    async def scenario() -> None:
        gates, background, clock = _Gates(), Background(), FakeClock()
        queue = _queue(gates, background, clock, share=0.1)
        queue.submit(1, _state(1.0))
        await _evaluated(gates, clock, 1, cost=0.0)
        queue.submit(2, _state(2.0))
        await _evaluated(gates, clock, 2, cost=1.0)  # 9 s of rest follow
        queue.submit(3, _state(3.0))
        await wait_until_async(lambda: clock.sleeping, 5, "the queue resting")
        # The end of a federation: the final version is evaluated now, not in 9 s.
        drained = asyncio.create_task(queue.drained())
        await _evaluated(gates, clock, 3, cost=0.5)
        await asyncio.wait_for(drained, scaled(5))
        assert gates.recorded[-1] == (3, _metrics(3)) and clock.wall == 1.5
        assert not queue.busy
        # Not hurried any more: the next version rests again (0.5 s cost: 4.5 s).
        queue.submit(4, _state(4.0))
        await wait_until_async(lambda: clock.sleeping, 5, "the queue resting again")
        assert clock.sleeps[-1][0] == pytest.approx(clock.wall + 4.5)
        assert 4 not in gates.started
        await _rest_out(clock, 4.5)
        await _evaluated(gates, clock, 4, cost=0.0)

    asyncio.run(scenario())


def test_the_queue_evaluates_one_at_a_time_and_skips_stale_versions() -> None:
    async def scenario() -> None:
        gates, background = _Gates(), Background()
        queue = _queue(gates, background)
        queue.submit(1, _state(1.0))
        await wait_until_async(lambda: gates.started == [1], 5, "version 1 started")
        assert queue.busy
        queue.submit(2, _state(2.0))  # waits
        queue.submit(3, _state(3.0))  # replaces 2: stale
        gates.open(1)
        await wait_until_async(lambda: gates.started == [1, 3], 5, "version 3 started")
        gates.open(3)
        await asyncio.wait_for(queue.drained(), scaled(5))
        assert not queue.busy
        assert gates.recorded == [
            (1, {"evalLoss": 1.0, "evalAccuracy": 0.5}),
            (3, {"evalLoss": 3.0, "evalAccuracy": 0.5}),
        ]
        assert gates.most_running == 1
        # Idle again: the next version starts at once.
        queue.submit(4, _state(4.0))
        gates.open(4)
        await asyncio.wait_for(queue.drained(), scaled(5))
        assert gates.recorded[-1] == (4, {"evalLoss": 4.0, "evalAccuracy": 0.5})

    asyncio.run(scenario())


def test_a_failed_evaluation_is_recorded_as_nothing_and_the_queue_goes_on() -> None:
    async def scenario() -> None:
        gates, background = _Gates(), Background()
        queue = _queue(gates, background)
        gates.open(-1)
        gates.open(5)
        queue.submit(-1, _state(0.0))
        await asyncio.wait_for(queue.drained(), scaled(5))
        queue.submit(5, _state(5.0))
        await asyncio.wait_for(queue.drained(), scaled(5))
        assert gates.recorded == [(-1, {}), (5, {"evalLoss": 5.0, "evalAccuracy": 0.5})]

    asyncio.run(scenario())


# ------------------------------------------------------------------ the history update


def _record(version: int) -> RoundRecord:
    return RoundRecord(
        round_id=f"r{version}",
        number=version,
        outcome="completed",
        version=version,
        clients_selected=1,
        clients_reported=1,
        train_loss=0.5,
        seconds=1.0,
        finished_at=1.0,
    )


def test_an_evaluation_recorded_late_is_saved_in_its_versions_record(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = Store(tmp_path)
        model = GlobalModel(store, "synthetic")
        model.adopt(_state(0.0), layout_of(_state(0.0)), None)
        for version in (1, 2):
            prepared = await model.prepare(_state(float(version)), version)
            assert await model.persist(prepared, _record(version))
            model.publish(prepared, _record(version), {"trainLoss": 0.5})
        assert model.metrics == {"trainLoss": 0.5}
        # Version 1's evaluation lands after version 2 is saved: it must not bring back
        # version 1 as the saved state, only fill its record.
        assert await model.record_evaluation(1, {"evalLoss": 0.3, "evalAccuracy": 0.7})
        assert model.metrics == {"trainLoss": 0.5}, "version 1's evaluation is not version 2's"
        assert await model.record_evaluation(2, {"evalLoss": 0.2, "evalAccuracy": float("nan")})
        assert model.metrics == {"trainLoss": 0.5, "evalLoss": 0.2}
        meta = json.loads((tmp_path / HISTORY_FILE).read_text())
        assert meta["version"] == 2 and meta["weightsFile"] == "global-v2.safetensors"
        assert [(r["evalLoss"], r["evalAccuracy"]) for r in meta["history"]] == [
            (0.3, 0.7),
            (0.2, None),
        ]
        saved = store.load("synthetic", layout_of(_state(0.0)))
        assert saved is not None and saved.version == 2
        assert [r.eval_accuracy for r in saved.history] == [0.7, None]
        # Nothing to record: an unknown version, or no finite value.
        assert not await model.record_evaluation(9, {"evalLoss": 0.1})
        assert not await model.record_evaluation(2, {"evalLoss": float("inf")})

    asyncio.run(scenario())


# ------------------------------------------------------------------ a real server


class _GatedEvaluator:
    """The real evaluator, held back until the test opens the gate."""

    def __init__(self, inner: ModelEvaluator) -> None:
        self._inner = inner
        self.started = threading.Event()
        self.gate = threading.Event()

    def evaluate(
        self, state: StateDict, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]
    ) -> dict[str, float]:
        self.started.set()
        if not self.gate.wait(scaled(30)):
            raise TimeoutError("the test never opened the gate")
        return self._inner.evaluate(state, x, y)


def _install_gated(srv: ServerHandle) -> _GatedEvaluator:
    coordinator = srv.server.coordinator
    gated = _GatedEvaluator(Evaluator(coordinator.task, coordinator.task.params))

    async def install() -> None:
        coordinator.use_evaluator(gated)

    srv.run(install())
    return gated


def test_a_new_global_is_published_while_its_evaluation_runs(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle, gated: _GatedEvaluator) -> None:
        dev = ScriptedDevice(srv.url, name="solo")
        assert (await dev.join())["ok"] is True
        await dev.until(lambda: len(dev.starts) >= 1, 10, "training:start #1")
        start = dev.starts[0]
        update = {k: v + np.float32(0.25) for k, v in dev.weights[0].items()}
        ack = await dev.submit(
            start["roundId"], 0, update, num_samples=4, metrics={"trainLoss": 0.75}
        )
        assert ack["ok"] is True
        # Published, broadcast and the next round started, all while the evaluation waits.
        status = await srv.await_status(lambda s: s["globalVersion"] == 1, what="version 1")
        await dev.until(lambda: 1 in dev.weights, 10, "version 1 broadcast")
        await dev.until(lambda: len(dev.starts) >= 2, 10, "training:start #2")
        assert gated.started.is_set() and not gated.gate.is_set()
        record = status["history"][-1]
        assert record["version"] == 1 and record["trainLoss"] == pytest.approx(0.75)
        assert record["evalAccuracy"] is None and record["evalLoss"] is None
        meta = next(m for m in dev.globals_meta if m["version"] == 1)
        assert meta["metrics"] == {"trainLoss": pytest.approx(0.75)}
        assert dev.starts[1]["baseVersion"] == 1
        saved = json.loads((srv.config.state_dir / HISTORY_FILE).read_text())
        assert saved["version"] == 1 and saved["history"][-1]["evalAccuracy"] is None
        # Released: the evaluation lands in version 1's record, and on disk.
        gated.gate.set()
        status = await srv.await_status(
            lambda s: s["history"][-1]["evalAccuracy"] is not None, what="version 1 evaluated"
        )
        assert status["history"][-1]["version"] == 1
        # history.json is written after the record in memory changes: wait for the write.
        history_file = srv.config.state_dir / HISTORY_FILE
        accuracy = status["history"][-1]["evalAccuracy"]
        await wait_until_async(
            lambda: json.loads(history_file.read_text())["history"][-1]["evalAccuracy"] == accuracy,
            10,
            "the evaluation saved in history.json",
        )
        # A device that gets version 1 now gets its evaluation with it.
        late = ScriptedDevice(srv.url, name="late")
        assert (await late.join())["ok"] is True
        await late.until(lambda: 1 in late.weights, 10, "version 1 to late")
        got = next(m for m in late.globals_meta if m["version"] == 1)["metrics"]
        assert set(got) == {"trainLoss", "evalLoss", "evalAccuracy"}
        await dev.disconnect()
        await late.disconnect()

    with running_server(tmp_path, min_clients=1, clients_per_round=1) as srv:
        gated = _install_gated(srv)
        try:
            run_devices(scenario(srv, gated))
        finally:
            gated.gate.set()
        evaluated = _completed(srv.status(), 1)
    assert evaluated["evalAccuracy"] is not None
    # It survives a restart.
    with running_server(tmp_path, min_clients=1, clients_per_round=1) as srv:
        after = srv.status()
    assert after["globalVersion"] == 1
    assert _completed(after, 1) == evaluated


def _completed(status: dict[str, Any], version: int) -> dict[str, Any]:
    [record] = [
        r for r in status["history"] if r["outcome"] == "completed" and r["version"] == version
    ]
    return record
