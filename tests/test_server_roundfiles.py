"""When the open round's files are written and removed (server.roundfiles) on real files."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from server.restore import saved_round_of
from server.roundfiles import RoundFiles
from server.rounds import Round
from server.roundstore import ROUND_DIR, ROUND_FILE, RoundStore, SavedRound, SavedSlot
from tests.waiting import scaled, wait_until_async


class CountingStore(RoundStore):
    """A real round store that counts its removals."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.clears = 0

    def clear(self) -> None:
        self.clears += 1
        super().clear()


def _round(number: int) -> Round:
    return Round.open(
        round_id=f"r{number}-1-x",
        number=number,
        attempt=1,
        base_version=number - 1,
        selected=["a", "b"],
        now=time.monotonic(),
        timeout=60.0,
        required=1,
        deadline_unix=time.time() + 60.0,
    )


def _leave_update(store: RoundStore, device_id: str) -> Path:
    """An update file of the closed round, as its commit left it."""
    path = store.update_path(store.update_file_name(device_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"update")
    return path


async def _opened_round(store: RoundStore, tmp_path: Path) -> tuple[RoundFiles, Round]:
    """Round 1 opened and saved."""
    files = RoundFiles(store, "synthetic", tmp_path)
    rnd = _round(1)
    files.open(rnd)
    await files.opened(rnd)
    return files, rnd


async def _closed_round(store: RoundStore, tmp_path: Path) -> tuple[RoundFiles, Path]:
    """Round 1 saved, then closed with an update file of device ``a`` left behind."""
    files, _ = await _opened_round(store, tmp_path)
    return files, _leave_update(store, "a")


def test_a_removal_not_begun_when_the_next_round_opens_is_done_by_its_first_save(
    tmp_path: Path,
) -> None:
    store = CountingStore(tmp_path)

    async def main() -> None:
        files, old = await _closed_round(store, tmp_path)
        store.clears = 0
        files.forget_later()
        second = _round(2)
        files.open(second)  # before the removal could begin (no await in between)
        await files.opened(second)
        assert not old.exists()
        saved = store.load()
        assert saved is not None and saved.round_id == second.round_id
        assert store.clears == 1  # one removal (in the save's thread hop), not two

    asyncio.run(main())


def test_a_removal_asked_after_publishing_happens_when_no_round_opens(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)

    async def main() -> None:
        files, old = await _closed_round(store, tmp_path)
        files.forget_later()
        await wait_until_async(
            lambda: not (tmp_path / ROUND_FILE).exists() and not old.exists(),
            what="the closed round's files removed",
        )
        assert not (tmp_path / ROUND_FILE).exists()
        assert not any((tmp_path / ROUND_DIR).iterdir())

    asyncio.run(main())


def test_a_removal_begun_before_the_next_round_opens_is_awaited_by_its_first_save(
    tmp_path: Path,
) -> None:
    store = CountingStore(tmp_path)

    async def main() -> None:
        files, old = await _closed_round(store, tmp_path)
        files.forget_later()
        await asyncio.sleep(0)  # the removal begins
        second = _round(2)
        files.open(second)
        await files.opened(second)
        assert not old.exists()
        saved = store.load()
        assert saved is not None and saved.round_id == second.round_id

    asyncio.run(main())


class HeldCommitStore(CountingStore):
    """A real round store whose commits wait in their thread hop until ``go`` is set (by
    a removal, or by whatever the test says), recording installs and removals in order."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.staging = threading.Event()
        self.go = threading.Event()
        self.events: list[str] = []

    def stage(self, saved: SavedRound | bytes) -> Path:
        self.staging.set()
        self.go.wait(scaled(10.0))
        return super().stage(saved)

    def install(self, staged: Path) -> None:
        super().install(staged)
        self.events.append("install")

    def clear(self) -> None:
        super().clear()
        self.events.append("clear")
        self.go.set()


async def _late_commit(files: RoundFiles, store: HeldCommitStore, rnd: Round) -> asyncio.Task[None]:
    """An update of ``rnd`` whose commit is in its thread hop as the round closes."""
    store.go.clear()  # set by the first save's removal
    store.events.clear()
    incoming = store.incoming_path("a")
    store.write_incoming(incoming, b"update")
    files.commits.place(
        "a",
        incoming,
        SavedSlot(index=0, num_samples=3),
        lambda: saved_round_of(rnd, "synthetic", store, time.time()),
        round_id=rnd.round_id,
    )
    committing = asyncio.create_task(files.commits.commit("a"))
    await wait_until_async(store.staging.is_set, what="the late commit in its thread hop")
    return committing


def _release_when_waited_for(
    files: RoundFiles, store: HeldCommitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Let a held commit go on as soon as anything waits for the commits to be idle."""
    real_idle = files.commits.idle

    async def idle() -> None:
        store.go.set()
        await real_idle()

    monkeypatch.setattr(files.commits, "idle", idle)


def test_an_abandoned_round_s_files_are_removed_after_its_late_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit still in flight as the round is abandoned never writes round.json after
    the removal (a restart would bring the abandoned attempt back, with an update its
    device was told was refused)."""
    store = HeldCommitStore(tmp_path)

    async def main() -> None:
        files, rnd = await _opened_round(store, tmp_path)
        committing = await _late_commit(files, store, rnd)
        _release_when_waited_for(files, store, monkeypatch)
        await files.forget()
        await committing
        files.commits.settle("a")
        await files.commits.idle()

    asyncio.run(main())
    assert store.events == ["install", "clear"]
    assert not (tmp_path / ROUND_FILE).exists()
    assert not any((tmp_path / ROUND_DIR).iterdir())


def test_after_the_last_round_its_late_commit_lands_before_the_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No round opens after the last one: the removal asked after publishing is the only
    one, so a commit of that round still in flight must not write round.json after it."""
    store = HeldCommitStore(tmp_path)

    async def main() -> None:
        files, rnd = await _opened_round(store, tmp_path)
        committing = await _late_commit(files, store, rnd)
        _release_when_waited_for(files, store, monkeypatch)
        files.forget_later()
        await committing
        files.commits.settle("a")
        await wait_until_async(
            lambda: "clear" in store.events and "install" in store.events,
            what="the late commit and the removal",
        )
        await files.commits.idle()

    asyncio.run(main())
    assert store.events == ["install", "clear"]
    assert not (tmp_path / ROUND_FILE).exists()
    assert not any((tmp_path / ROUND_DIR).iterdir())
