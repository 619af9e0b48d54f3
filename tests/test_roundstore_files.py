"""The open round's folder on a real state dir: :meth:`RoundStore.incoming_path` makes
``round/`` when missing (and its parents), :meth:`RoundStore.clear` removes ``round.json``
and every file in ``round/`` (a leftover incoming file too), leaves what is not a file,
and is idempotent; :class:`server.roundfiles.RoundFiles` removes a published round's files
with the next round's first save, or when the server is to wait."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from server.roundfiles import RoundFiles
from server.rounds import Round
from server.roundstore import ROUND_DIR, ROUND_FILE, RoundStore


def test_incoming_paths_are_fresh_and_their_folder_is_made(tmp_path: Path) -> None:
    store = RoundStore(tmp_path / "new" / "state")  # not there yet: parents made too
    first = store.incoming_path("dev-a")
    second = store.incoming_path("dev-a")
    assert first.parent == second.parent == tmp_path / "new" / "state" / ROUND_DIR
    assert first.parent.is_dir() and first != second
    assert first.name.endswith(".incoming") and not first.exists()
    assert store.incoming_path("dev-b").parent == first.parent  # the folder exists: fine


def test_clear_removes_round_json_and_every_file_of_the_round(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.clear()  # nothing there: nothing to do
    incoming = store.incoming_path("dev")
    incoming.write_bytes(b"left over")
    name = store.save_update("dev2", b"update")
    (tmp_path / ROUND_FILE).write_text("{}")
    (tmp_path / ROUND_DIR / "sub").mkdir()
    (tmp_path / "history.json").write_text("{}")  # not the round's
    store.clear()
    assert not (tmp_path / ROUND_FILE).exists()
    assert not incoming.exists() and not store.update_path(name).exists()
    assert [p.name for p in (tmp_path / ROUND_DIR).iterdir()] == ["sub"]
    assert (tmp_path / "history.json").exists()
    store.clear()  # idempotent
    (tmp_path / ROUND_DIR / "sub").rmdir()
    (tmp_path / ROUND_DIR).rmdir()
    store.clear()  # no round/ at all
    (tmp_path / ROUND_DIR).write_text("not a folder")
    store.clear()
    assert (tmp_path / ROUND_DIR).read_text() == "not a folder"


class CountingClears(RoundStore):
    """A real round store that counts its removals of the round's files."""

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
        selected=["dev"],
        now=time.monotonic(),
        timeout=60.0,
        required=1,
        deadline_unix=time.time() + 60.0,
    )


def test_a_published_round_s_files_go_with_the_next_save_or_when_the_server_waits(
    tmp_path: Path,
) -> None:
    """:meth:`RoundFiles.forget_later` removes nothing by itself: the next round's first
    save replaces the round's files, or :meth:`RoundFiles.forget_pending` removes them."""
    store = CountingClears(tmp_path)
    files = RoundFiles(store, "synthetic", tmp_path)

    async def scenario() -> None:
        first = _round(1)
        files.open(first)
        await files.opened(first)  # as the coordinator does before a round's files go
        assert store.clears == 1  # the first save's
        name = store.save_update("dev", b"update of round 1")
        files.forget_later()
        second = _round(2)
        files.open(second)
        await files.opened(second)
        assert store.clears == 2  # only the second save's: it removed round 1's files
        saved = store.load()
        assert saved is not None and saved.round_id == "r2-1-x"
        assert not store.update_path(name).exists()
        name = store.save_update("dev", b"update of round 2")
        files.forget_later()
        files.forget_pending()  # the server waits instead: removed now
        files.forget_pending()  # once
        third = _round(3)
        files.open(third)  # waits for that removal first
        await files.opened(third)
        assert store.clears == 4  # the removal's and the third save's
        assert not store.update_path(name).exists()
        saved = store.load()
        assert saved is not None and saved.round_id == "r3-1-x"

    asyncio.run(scenario())
