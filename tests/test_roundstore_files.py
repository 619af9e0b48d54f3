"""The open round's folder on a real state dir: :meth:`RoundStore.incoming_path` makes
``round/`` when missing (and its parents), :meth:`RoundStore.clear` removes ``round.json``
and every file in ``round/`` (a leftover incoming file too), leaves what is not a file,
and is idempotent."""

from __future__ import annotations

from pathlib import Path

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
