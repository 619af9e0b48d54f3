"""Group commit of accepted updates (server.roundcommit) on real files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from server.roundcommit import RoundCommits
from server.roundstore import ROUND_DIR, RoundStore, SavedRound, SavedSlot
from tests.waiting import wait_until_async

DEVICES = ("a", "b", "c")


class CountingStore(RoundStore):
    """A real round store that counts its round.json installs and can refuse stages."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.installs: list[SavedRound] = []
        self.refuse_stages = 0
        self.stages = 0

    def stage(self, saved: SavedRound) -> Path:
        self.stages += 1
        if self.refuse_stages:
            self.refuse_stages -= 1
            raise OSError("disk full")
        return super().stage(saved)

    def install(self, staged: Path) -> None:
        self.installs.append(SavedRound.model_validate_json(staged.read_bytes()))
        super().install(staged)


def _round() -> SavedRound:
    return SavedRound(
        task="synthetic",
        round_id="r1-1-x",
        number=1,
        attempt=1,
        base_version=0,
        started_unix=time.time(),
        deadline_unix=time.time() + 60,
        required=2,
        slots={d: SavedSlot(index=i) for i, d in enumerate(DEVICES)},
    )


def _incoming(store: RoundStore, device_id: str) -> Path:
    path = store.incoming_path(device_id)
    store.write_incoming(path, f"update of {device_id}".encode())
    return path


def _slot(i: int) -> SavedSlot:
    return SavedSlot(index=i, num_samples=10 + i, metrics={"trainLoss": 0.5})


def test_updates_ready_together_share_one_commit(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)

    async def main() -> None:
        commits = RoundCommits(store)
        for i, d in enumerate(DEVICES[:2]):
            commits.place(d, _incoming(store, d), _slot(i), _round)
        await asyncio.gather(commits.commit("a"), commits.commit("b"))
        await commits.idle()

    asyncio.run(main())
    assert len(store.installs) == 1
    saved = store.load()
    assert saved is not None and saved == store.installs[0]
    for i, d in enumerate(DEVICES[:2]):
        slot = saved.slots[d]
        assert slot.reported and slot.num_samples == 10 + i
        assert slot.update_file == store.update_file_name(d)
        path = tmp_path / ROUND_DIR / slot.update_file
        assert path.read_bytes() == f"update of {d}".encode()
    assert not saved.slots["c"].reported
    assert not list((tmp_path / ROUND_DIR).glob("*.incoming"))
    assert not list(tmp_path.glob(".round.json.*"))


def test_an_update_placed_during_a_commit_waits_for_the_next(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)

    async def main() -> None:
        commits = RoundCommits(store)
        commits.place("a", _incoming(store, "a"), _slot(0), _round)
        first = asyncio.create_task(commits.commit("a"))
        await wait_until_async(lambda: store.stages == 1, what="the first commit")
        commits.place("b", _incoming(store, "b"), _slot(1), _round)
        await commits.commit("b")
        assert first.done()
        commits.settle("a")
        commits.settle("b")

    asyncio.run(main())
    assert [sorted(d for d, s in r.slots.items() if s.reported) for r in store.installs] == [
        ["a"],
        ["a", "b"],
    ]


def test_a_failed_commit_fails_its_updates_and_forgets_them(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    store.refuse_stages = 1

    async def main() -> None:
        commits = RoundCommits(store)
        commits.place("a", _incoming(store, "a"), _slot(0), _round)
        with pytest.raises(OSError, match="disk full"):
            await commits.commit("a")
        assert commits.placed("a") is None  # forgotten: the device sends it again
        commits.place("b", _incoming(store, "b"), _slot(1), _round)
        await commits.commit("b")

    asyncio.run(main())
    saved = store.load()
    assert saved is not None and not saved.slots["a"].reported and saved.slots["b"].reported
    assert not list(tmp_path.glob(".round.json.*"))


class FailingDirSync(CountingStore):
    """``round/``'s fsync fails once: the update's name is not durable."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.refuse_dir_syncs = 1

    def sync_round_dir(self) -> None:
        if self.refuse_dir_syncs:
            self.refuse_dir_syncs -= 1
            raise OSError("I/O error on round/")
        super().sync_round_dir()


def test_a_failed_fsync_installs_nothing_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = FailingDirSync(tmp_path)

    async def main() -> None:
        commits = RoundCommits(store)
        commits.place("a", _incoming(store, "a"), _slot(0), _round)
        with pytest.raises(OSError, match="I/O error on round/"):
            await commits.commit("a")
        assert commits.placed("a") is None
        assert store.stages == 1 and store.installs == []  # staged, never installed
        assert store.load() is None and not list(tmp_path.glob(".round.json.*"))
        commits.place("b", _incoming(store, "b"), _slot(1), _round)
        await commits.commit("b")

    asyncio.run(main())
    saved = store.load()
    assert saved is not None and not saved.slots["a"].reported and saved.slots["b"].reported


def test_one_placed_update_per_device_until_it_is_settled(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)

    async def main() -> None:
        commits = RoundCommits(store)
        commits.place("a", _incoming(store, "a"), _slot(0), _round)
        done = commits.placed("a")
        assert done is not None and not done.done()
        with pytest.raises(RuntimeError):
            commits.place("a", _incoming(store, "a"), _slot(0), _round)
        await commits.commit("a")
        commits.settle("a")
        assert done.done() and commits.placed("a") is None
        # Settled: the round's own snapshot names it from now on (here: it does not).
        commits.place("b", _incoming(store, "b"), _slot(1), _round)
        await commits.commit("b")

    asyncio.run(main())
    assert sorted(d for d, s in store.installs[-1].slots.items() if s.reported) == ["b"]


def test_idle_returns_once_no_commit_runs(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)

    async def main() -> None:
        commits = RoundCommits(store)
        await commits.idle()  # nothing runs
        commits.place("a", _incoming(store, "a"), _slot(0), _round)
        task = asyncio.create_task(commits.commit("a"))
        await wait_until_async(lambda: store.stages == 1, what="the commit")
        await commits.idle()
        assert len(store.installs) == 1
        await task

    asyncio.run(main())
