"""When the open round's files are written and removed (server.roundfiles) on real files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from server.roundfiles import RoundFiles
from server.rounds import Round
from server.roundstore import ROUND_DIR, ROUND_FILE, RoundStore
from tests.waiting import wait_until_async


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


def test_a_removal_not_begun_when_the_next_round_opens_is_done_by_its_first_save(
    tmp_path: Path,
) -> None:
    store = CountingStore(tmp_path)

    async def main() -> None:
        files = RoundFiles(store, "synthetic", tmp_path)
        first = _round(1)
        files.open(first)
        await files.opened(first)
        old = _leave_update(store, "a")
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
        files = RoundFiles(store, "synthetic", tmp_path)
        first = _round(1)
        files.open(first)
        await files.opened(first)
        old = _leave_update(store, "a")
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
        files = RoundFiles(store, "synthetic", tmp_path)
        first = _round(1)
        files.open(first)
        await files.opened(first)
        old = _leave_update(store, "a")
        files.forget_later()
        await asyncio.sleep(0)  # the removal begins
        second = _round(2)
        files.open(second)
        await files.opened(second)
        assert not old.exists()
        saved = store.load()
        assert saved is not None and saved.round_id == second.round_id

    asyncio.run(main())
