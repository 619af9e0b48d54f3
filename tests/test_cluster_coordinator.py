"""server.cluster.coordinator: the round loop against in-memory engines (tests/cluster_memory).

Simulated workers do what server/cluster/worker.py does at the seams: store an update's
blob, record_update, fold it into their partial sum, and write that partial when the round
turns closing. The published version is checked against server.aggregation.FedAvg.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.weights import StateDict, decode, encode, layout_of
from server.aggregation import FedAvg
from server.cluster.contracts import (
    Assignment,
    ClusterError,
    PartialRow,
    RoundRow,
    UpdateRow,
)
from server.cluster.coordinator import ClusterCoordinator, progress_of
from server.cluster.partial import PartialSum
from server.config import ServerConfig
from server.rounds import select_devices
from tests.cluster_memory import MemoryBlobs, MemoryDB, MemoryPresence
from tests.waiting import scaled, wait_until_async

INITIAL: StateDict = {"w": np.zeros((3, 2), np.float32), "n": np.zeros(2, np.int64)}
LAYOUT = layout_of(INITIAL)
POLL = 0.02


def _update(seed: int) -> StateDict:
    # Integer-valued floats: every float64 sum is exact in any grouping.
    rng = np.random.default_rng(seed)
    return {
        "w": rng.integers(-20, 20, (3, 2)).astype(np.float32),
        "n": rng.integers(0, 9, 2).astype(np.int64),
    }


def _fedavg(updates: list[tuple[StateDict, int]]) -> StateDict:
    acc = FedAvg()
    acc.begin(INITIAL)
    for state, samples in updates:
        acc.add(state, samples)
    return acc.result()


def _config(tmp_path: Path, **kw: Any) -> ServerConfig:
    base: dict[str, Any] = {
        "min_clients": 2,
        "clients_per_round": 3,
        "round_timeout": scaled(20),
        "heartbeat_interval": scaled(2),
        "retry_delay": 0.05,
        "seed": 7,
        "rounds": 1,
        "state_dir": tmp_path,
    }
    base.update(kw)
    return ServerConfig(**base)


class Cluster:
    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.tmp_path = tmp_path
        self.config = _config(tmp_path, **config)
        self.db = MemoryDB()
        self.presence = MemoryPresence()
        self.blobs = MemoryBlobs()
        self.initial_calls = 0

    def _initial(self) -> StateDict:
        self.initial_calls += 1
        return {k: v.copy() for k, v in INITIAL.items()}

    def coordinator(self, partial_wait: float = 30.0) -> ClusterCoordinator:
        return ClusterCoordinator(
            config=self.config,
            db=self.db,
            presence=self.presence,
            blobs=self.blobs,
            layout=LAYOUT,
            initial_weights=self._initial,
            work_dir=self.tmp_path,
            poll_interval=POLL,
            partial_wait=scaled(partial_wait),
        )

    async def opened(self, attempt: int = 1) -> RoundRow:
        await wait_until_async(
            lambda: any(
                r.attempt == attempt and r.state == "open" for r in self.db.rounds.values()
            ),
            what=f"a round (attempt {attempt}) to open",
        )
        return next(r for r in self.db.rounds.values() if r.attempt == attempt)

    async def state_is(self, round_id: str, state: str) -> None:
        await wait_until_async(
            lambda: self.db.rounds[round_id].state == state, what=f"{round_id} {state}"
        )

    def assigned(self, round_id: str) -> list[Assignment]:
        return sorted(self.db.parts[round_id].values(), key=lambda a: a.index)

    def version(self, n: int) -> StateDict:
        row = self.db.versions[n]
        data = self.blobs.data[row.blob_key]
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.size
        return decode(data, "safetensors", expected=LAYOUT)


class Worker:
    """What a worker process does at the seams (intake, partial sum, closing)."""

    def __init__(self, cluster: Cluster, worker_id: str) -> None:
        self.c = cluster
        self.worker_id = worker_id
        self.partials: dict[str, PartialSum] = {}

    def connect(self, *device_ids: str, eligible: bool = True) -> None:
        for device_id in device_ids:
            self.c.presence.connect(device_id, self.worker_id, eligible)

    async def report(
        self, round_id: str, device_id: str, state: StateDict, samples: int, loss: float
    ) -> bool:
        data = encode(state)
        sha = hashlib.sha256(data).hexdigest()
        key = await self.c.blobs.put_bytes(data, sha)
        recorded = await self.c.db.record_update(
            UpdateRow(round_id, device_id, samples, self.worker_id, key, sha, {"trainLoss": loss})
        )
        if recorded:
            self.partials.setdefault(round_id, PartialSum(LAYOUT)).add(device_id, state, samples)
        return recorded

    async def write_partial(self, round_id: str) -> None:
        partial = self.partials[round_id]
        data = partial.to_bytes()
        sha = hashlib.sha256(data).hexdigest()
        key = await self.c.blobs.put_bytes(data, sha)
        await self.c.db.record_partial(
            PartialRow(
                round_id, self.worker_id, partial.device_ids, partial.total_samples, key, sha
            )
        )


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=scaled(60)))


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ============================================================ pure rules

PROGRESS = [
    # states of 3 assigned devices, updates from, required -> settled, succeeded, can_succeed
    (("assigned", "started", "started"), (), 2, False, False, True),
    (("reported", "reported", "started"), ("a", "b"), 2, False, True, True),
    (("reported", "refused", "failed"), ("a",), 2, True, False, False),
    (("started", "refused", "dropped"), (), 2, False, False, False),
    (("dropped", "refused", "started"), ("a",), 1, False, True, True),  # late report counts
    (("reported", "reported", "reported"), ("a", "b", "c"), 3, True, True, True),
]


@pytest.mark.parametrize(
    ("states", "updated", "required", "settled", "succeeded", "can_succeed"), PROGRESS
)
def test_progress_of(
    states: tuple[Any, ...],
    updated: tuple[str, ...],
    required: int,
    settled: bool,
    succeeded: bool,
    can_succeed: bool,
) -> None:
    row = RoundRow("r", 1, 1, 0, "open", required, 0.0, 0.0)
    parts = [
        Assignment("r", d, i, 3, s) for i, (d, s) in enumerate(zip("abc", states, strict=True))
    ]
    updates = [UpdateRow("r", d, 1, "w", "k", "s") for d in updated]
    progress = progress_of(row, parts, [*updates, UpdateRow("r", "zz", 1, "w", "k", "s")])
    assert (progress.settled, progress.succeeded, progress.can_still_succeed) == (
        settled,
        succeeded,
        can_succeed,
    )
    assert "zz" not in progress.reported  # an update of a device not assigned is ignored


# ============================================================ version 0


def test_version_zero_created_once(tmp_path: Path) -> None:
    async def body() -> None:
        c = Cluster(tmp_path)
        first = await c.coordinator().ensure_version_zero()
        again = await c.coordinator().ensure_version_zero()
        assert first == again == c.db.versions[0] and c.initial_calls == 1
        assert first.version == 0 and first.round_id is None
        for name, arr in c.version(0).items():
            np.testing.assert_array_equal(arr, INITIAL[name])

    _run(body)


# ============================================================ waiting and selection


def test_waits_for_enough_devices_then_selects_with_the_seed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "server.cluster.coordinator")

    async def selection() -> list[str]:
        c = Cluster(tmp_path)
        w1, w2, dead = Worker(c, "w1"), Worker(c, "w2"), Worker(c, "dead")
        w1.connect("d3")
        task = asyncio.create_task(c.coordinator().run())
        await wait_until_async(
            lambda: "round 1 waiting: 1 of 2 eligible devices (1 live worker)" in caplog.text,
            what="the waiting line",
        )
        assert not c.db.rounds
        dead.connect("d9")
        c.presence.kill("dead")
        w1.connect("d0", "d5")
        w2.connect("d1", "d4", "d7")
        w2.connect("d2", eligible=False)
        row = await c.opened()
        await _stop(task)
        eligible = ["d0", "d1", "d3", "d4", "d5", "d7"]
        expected = select_devices(eligible, 3, random.Random(7))
        parts = c.assigned(row.round_id)
        assert [a.device_id for a in parts] == expected
        assert [(a.index, a.count) for a in parts] == [(0, 3), (1, 3), (2, 3)]
        assert row.required == 2 and row.number == 1 and row.base_version == 0
        return expected

    first: list[str] = []

    async def body() -> None:
        first.extend(await selection())
        assert await selection() == first  # the same seed, the same choice

    _run(body)


# ============================================================ rounds


def test_round_completes_with_partials_equal_to_fedavg(tmp_path: Path) -> None:
    async def body() -> None:
        c = Cluster(tmp_path, clients_per_round=4, min_clients=4, rounds=2)
        workers = {"w1": Worker(c, "w1"), "w2": Worker(c, "w2")}
        workers["w1"].connect("a", "b")
        workers["w2"].connect("c", "d")
        task = asyncio.create_task(c.coordinator().run())
        for number in (1, 2):
            row = await c.opened() if number == 1 else await _next_open(c, number)
            sent: list[tuple[StateDict, int]] = []
            losses: list[tuple[float, int]] = []
            for i, part in enumerate(c.assigned(row.round_id)):
                worker = workers[c.presence.devices[part.device_id][0]]
                state, samples, loss = _update(10 * number + i), 5 + 7 * i, 0.5 + i
                assert await worker.report(row.round_id, part.device_id, state, samples, loss)
                # A resent update is acknowledged but counted once.
                assert not await worker.report(row.round_id, part.device_id, state, samples, 9)
                sent.append((state, samples))
                losses.append((loss, samples))
            await c.state_is(row.round_id, "closing")
            with pytest.raises(ClusterError):
                await workers["w1"].report(row.round_id, "late", _update(0), 1, 0.0)
            for worker in workers.values():
                await worker.write_partial(row.round_id)
            await c.state_is(row.round_id, "completed")
            version = c.db.versions[number]
            assert version.round_id == row.round_id and version.version == number
            for name, arr in _fedavg(sent).items():
                np.testing.assert_array_equal(c.version(number)[name], arr)
            want = sum(v * w for v, w in losses) / sum(w for _, w in losses)
            assert version.metrics["trainLoss"] == pytest.approx(want)
        await asyncio.wait_for(task, timeout=scaled(5))  # rounds=2: done
        assert len(c.db.versions) == 3

    _run(body)


async def _next_open(c: Cluster, number: int) -> RoundRow:
    await wait_until_async(
        lambda: any(r.number == number and r.state == "open" for r in c.db.rounds.values()),
        what=f"round {number} to open",
    )
    return next(r for r in c.db.rounds.values() if r.number == number and r.state == "open")


def test_a_partial_plus_direct_folds_give_the_exact_mean(tmp_path: Path) -> None:
    """w1 writes its partial; w2 is alive but never does (slow): after the bounded wait the
    coordinator folds w2's updates itself; w3 died: it is not waited for."""

    async def body() -> None:
        c = Cluster(tmp_path, clients_per_round=6, min_clients=6)
        w1, w2, w3 = Worker(c, "w1"), Worker(c, "w2"), Worker(c, "w3")
        w1.connect("a", "b")
        w2.connect("c", "d")
        w3.connect("e", "f")
        task = asyncio.create_task(c.coordinator(partial_wait=1.0).run())
        row = await c.opened()
        sent = []
        for i, part in enumerate(c.assigned(row.round_id)):
            worker = {"w1": w1, "w2": w2, "w3": w3}[c.presence.devices[part.device_id][0]]
            state, samples = _update(100 + i), 3 + i
            await worker.report(row.round_id, part.device_id, state, samples, 1.0)
            sent.append((state, samples))
        c.presence.kill("w3")
        await c.state_is(row.round_id, "closing")
        await w1.write_partial(row.round_id)
        await asyncio.wait_for(task, timeout=scaled(10))
        for name, arr in _fedavg(sent).items():
            np.testing.assert_array_equal(c.version(1)[name], arr)

    _run(body)


def test_a_dead_workers_updates_are_folded_from_storage_without_waiting(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        c = Cluster(tmp_path, clients_per_round=3, min_clients=3)
        w1, w2 = Worker(c, "w1"), Worker(c, "w2")
        w1.connect("a")
        w2.connect("b", "c")
        # partial_wait is long: finishing quickly proves the dead worker is not waited for.
        task = asyncio.create_task(c.coordinator(partial_wait=600).run())
        row = await c.opened()
        sent = []
        for i, part in enumerate(c.assigned(row.round_id)):
            worker = w1 if part.device_id == "a" else w2
            state, samples = _update(200 + i), 10 * (i + 1)
            await worker.report(row.round_id, part.device_id, state, samples, 1.0)
            sent.append((state, samples))
        c.presence.kill("w2")  # died before writing its partial
        await c.state_is(row.round_id, "closing")
        await w1.write_partial(row.round_id)
        await asyncio.wait_for(task, timeout=scaled(10))
        for name, arr in _fedavg(sent).items():
            np.testing.assert_array_equal(c.version(1)[name], arr)

    _run(body)


def test_an_abandoned_round_is_retried_under_a_new_id(tmp_path: Path) -> None:
    async def body() -> None:
        c = Cluster(tmp_path, clients_per_round=2, min_clients=2, min_completion=1.0)
        w1 = Worker(c, "w1")
        w1.connect("a", "b")
        task = asyncio.create_task(c.coordinator(partial_wait=1).run())
        first = await c.opened(attempt=1)
        refuser = c.assigned(first.round_id)[0].device_id
        await c.db.set_assignment(first.round_id, refuser, "refused", "busy")
        await c.state_is(first.round_id, "abandoned")
        second = await c.opened(attempt=2)
        assert second.round_id != first.round_id and second.number == 1
        sent = []
        for i, part in enumerate(c.assigned(second.round_id)):
            state = _update(300 + i)
            await w1.report(second.round_id, part.device_id, state, 4, 1.0)
            sent.append((state, 4))
        await c.state_is(second.round_id, "closing")
        await w1.write_partial(second.round_id)
        await asyncio.wait_for(task, timeout=scaled(10))
        assert c.db.versions[1].round_id == second.round_id
        for name, arr in _fedavg(sent).items():
            np.testing.assert_array_equal(c.version(1)[name], arr)

    _run(body)


def test_a_gone_device_is_dropped_and_the_round_ends_before_its_deadline(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        c = Cluster(tmp_path, heartbeat_interval=0.05, round_timeout=scaled(600))
        w1, w2 = Worker(c, "w1"), Worker(c, "w2")
        w1.connect("a", "b")
        w2.connect("c")
        task = asyncio.create_task(c.coordinator(partial_wait=1).run())
        row = await c.opened()
        for part in c.assigned(row.round_id):
            if part.device_id != "c":
                await w1.report(row.round_id, part.device_id, _update(1), 2, 1.0)
        c.presence.kill("w2")  # c never comes back
        await c.state_is(row.round_id, "closing")
        assert c.db.parts[row.round_id]["c"].state == "dropped"
        await w1.write_partial(row.round_id)
        await asyncio.wait_for(task, timeout=scaled(10))

    _run(body)


def test_a_new_coordinator_goes_on_with_the_open_round(tmp_path: Path) -> None:
    async def body() -> None:
        c = Cluster(tmp_path, clients_per_round=3, min_clients=3)
        w1 = Worker(c, "w1")
        w1.connect("a", "b", "c")
        first = asyncio.create_task(c.coordinator().run())
        row = await c.opened()
        parts = c.assigned(row.round_id)
        sent = [(_update(400), 6)]
        await w1.report(row.round_id, parts[0].device_id, *sent[0], 1.0)
        await _stop(first)  # the lock holder dies mid-round
        assert c.db.rounds[row.round_id].state == "open"
        second = asyncio.create_task(c.coordinator().run())
        for i, part in enumerate(parts[1:], start=1):
            sent.append((_update(400 + i), 6 + i))
            await w1.report(row.round_id, part.device_id, *sent[-1], 1.0)
        await c.state_is(row.round_id, "closing")
        await w1.write_partial(row.round_id)
        await asyncio.wait_for(second, timeout=scaled(10))
        assert [r.round_id for r in c.db.rounds.values()] == [row.round_id]
        assert c.db.versions[1].round_id == row.round_id
        for name, arr in _fedavg(sent).items():
            np.testing.assert_array_equal(c.version(1)[name], arr)

    _run(body)


def test_a_closing_round_left_by_a_dead_coordinator_is_published(tmp_path: Path) -> None:
    async def body() -> None:
        c = Cluster(tmp_path, clients_per_round=2, min_clients=2)
        await c.coordinator().ensure_version_zero()
        w1, w2 = Worker(c, "w1"), Worker(c, "w2")
        w1.connect("a")
        w2.connect("b")
        row = RoundRow("r1-1-old", 1, 1, 0, "open", 1, 1e12, 0.0)
        await c.db.open_round(
            row, [Assignment(row.round_id, "a", 0, 2), Assignment(row.round_id, "b", 1, 2)]
        )
        sent = [(_update(500), 3), (_update(501), 8)]
        await w1.report(row.round_id, "a", *sent[0], 1.0)
        await w2.report(row.round_id, "b", *sent[1], 3.0)
        await c.db.set_round_state(row.round_id, "closing")
        await w2.write_partial(row.round_id)  # w1's partial never comes: folded directly
        await asyncio.wait_for(c.coordinator(partial_wait=0.5).run(), timeout=scaled(10))
        assert c.db.versions[1].round_id == row.round_id
        assert c.db.versions[1].metrics["trainLoss"] == pytest.approx((3 + 24) / 11)
        for name, arr in _fedavg(sent).items():
            np.testing.assert_array_equal(c.version(1)[name], arr)

    _run(body)


# ============================================================ what goes wrong


@pytest.mark.parametrize("fault", ["corrupt-partial", "wrong-total", "missing-update"])
def test_bad_storage_is_worked_around(
    tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        c = Cluster(tmp_path, clients_per_round=3, min_clients=3)
        w1 = Worker(c, "w1")
        w1.connect("a", "b", "c")
        task = asyncio.create_task(c.coordinator(partial_wait=1).run())
        row = await c.opened()
        sent = []
        for i, part in enumerate(c.assigned(row.round_id)):
            sent.append((_update(600 + i), 2 + i))
            await w1.report(row.round_id, part.device_id, *sent[-1], 1.0)
        await c.state_is(row.round_id, "closing")
        await w1.write_partial(row.round_id)
        prow = c.db.partials_of[row.round_id]["w1"]
        if fault == "corrupt-partial":
            c.blobs.data[prow.blob_key] = b"x" + c.blobs.data[prow.blob_key][1:]
        elif fault == "wrong-total":
            c.db.partials_of[row.round_id]["w1"] = PartialRow(
                prow.round_id, "w1", prow.device_ids, prow.total_samples + 1, prow.blob_key,
                prow.sha256,
            )  # fmt: skip
        else:
            first = c.assigned(row.round_id)[0].device_id
            del c.blobs.data[c.db.updates_of[row.round_id][first].blob_key]
            c.blobs.data.pop(prow.blob_key)  # and no partial: the update is lost
            sent = sent[1:]
        await asyncio.wait_for(task, timeout=scaled(10))
        for name, arr in _fedavg(sent).items():
            np.testing.assert_array_equal(c.version(1)[name], arr)
        assert "not used" in caplog.text
        if fault == "missing-update":
            assert "cannot be read back" in caplog.text

    _run(body)


def test_engine_failures_are_retried(tmp_path: Path) -> None:
    async def body() -> None:
        c = Cluster(tmp_path, clients_per_round=2, min_clients=2)
        w1 = Worker(c, "w1")
        w1.connect("a", "b")
        for method in ("latest_version", "eligible_count", "open_round", "updates"):
            c.db.fail_next(method) if hasattr(c.db, method) else c.presence.fail_next(method)
        c.db.fail_next("set_round_state")
        c.db.fail_next("publish_version")
        task = asyncio.create_task(c.coordinator(partial_wait=1).run())
        row = await c.opened()
        for i, part in enumerate(c.assigned(row.round_id)):
            await w1.report(row.round_id, part.device_id, _update(i), 1, 1.0)
        await c.state_is(row.round_id, "closing")
        await w1.write_partial(row.round_id)
        await asyncio.wait_for(task, timeout=scaled(10))
        assert len(c.db.versions) == 2 and not any(c.db.failing.values())

    _run(body)
