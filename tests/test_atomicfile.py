"""client.atomicfile.write_atomic: whole files under their name, private, nothing left over."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client import atomicfile
from client.atomicfile import file_identity, leftover_temp_target, write_atomic


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"one piece", b"one piece"),
        (bytearray(b"a bytearray"), b"a bytearray"),
        (memoryview(b"a view"), b"a view"),
        ([b"pie", bytearray(b"c"), memoryview(b"es")], b"pieces"),
        (b"", b""),
        (os.urandom(3 << 20), None),  # larger than one write may take
    ],
)
@pytest.mark.parametrize("durable", [True, False])
@pytest.mark.parametrize("fresh", [True, False])
def test_the_file_holds_exactly_the_data_and_no_temporary_file_stays(
    tmp_path: Path, data: object, expected: bytes | None, durable: bool, fresh: bool
) -> None:
    target = tmp_path / "new" / "dir" / "file.bin"  # the directories are created
    write_atomic(target, b"old", durable=durable)
    write_atomic(target, data, durable=durable, fresh=fresh)  # type: ignore[arg-type]
    assert target.read_bytes() == (expected if expected is not None else bytes(data))  # type: ignore[arg-type]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _leftovers(target.parent) == []


def test_a_replaced_file_has_a_new_identity(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"same", durable=False)
    before = file_identity(target)
    write_atomic(target, b"same", durable=False, fresh=True)
    assert file_identity(target) != before


def test_the_mode_is_set_before_the_file_appears(tmp_path: Path) -> None:
    target = tmp_path / "shared.txt"
    write_atomic(target, b"x", mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_leftover_with_the_next_temporary_name_is_skipped_not_reused(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"first", durable=False)
    # What the next temporary name would be, left by a crash of a process with this id.
    number = next(atomicfile._temp_numbers)
    for n in range(number + 1, number + 4):
        (tmp_path / f".f.{os.getpid()}-{n}.tmp").write_bytes(b"leftover")
    write_atomic(target, b"second", durable=False)
    assert target.read_bytes() == b"second"
    assert all(p.read_bytes() == b"leftover" for p in tmp_path.glob(".f.*.tmp"))
    assert len(_leftovers(tmp_path)) == 3


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"old", durable=False)

    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new", durable=False)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("durable", [True, False])
def test_move_into_makes_a_missing_target_directory_and_refuses_a_missing_source(
    tmp_path: Path, durable: bool
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"moved")
    target = tmp_path / "new" / "dir" / "target.bin"
    atomicfile.move_into(source, target, durable=durable)
    assert target.read_bytes() == b"moved" and not source.exists()
    again = tmp_path / "other" / "target.bin"
    with pytest.raises(FileNotFoundError):
        atomicfile.move_into(source, again, durable=durable)
    assert not again.parent.exists(), "nothing is made for a source that is not there"
    # Into an existing directory: replaces the file there.
    source.write_bytes(b"second")
    atomicfile.move_into(source, target, durable=durable)
    assert target.read_bytes() == b"second"


@pytest.mark.parametrize(
    ("template", "target"),
    [
        (".current.json.{other}-0.tmp", "current.json"),
        (".global-v3-0123.safetensors.{other}-17.tmp", "global-v3-0123.safetensors"),
        ("current.json", None),  # not a temporary file
        (".current.json.tmp", None),  # no pid and number
        (".current.json.x-1.tmp", None),
        (".current.json.{own}-5.tmp", None),  # this process's own: being written
    ],
)
def test_leftover_temp_target_reads_back_the_temporary_names(
    template: str, target: str | None
) -> None:
    # Filled in here, not in the parameters: each xdist worker is its own process.
    name = template.format(own=os.getpid(), other=os.getpid() + 1)
    assert leftover_temp_target(name) == target


def test_a_temporary_file_write_atomic_leaves_is_named_as_leftover_temp_target_reads(
    tmp_path: Path,
) -> None:
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", spy)
        write_atomic(tmp_path / "a.json", b"{}")
    [temp] = seen
    # Another process's (a crashed run's) file of the same name is a leftover for a.json.
    other = temp.replace(f".{os.getpid()}-", f".{os.getpid() + 1}-")
    assert leftover_temp_target(other) == "a.json"
