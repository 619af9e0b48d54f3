"""client.transfer_memory: the malloc thresholds (a table) and their effect on page faults
(each in a fresh interpreter, so this test process's allocator is left alone)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.transfer_memory import MAX_MMAP_THRESHOLD, thresholds

KIB, MIB = 1024, 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("chunk", "mmap", "trim"),
    [
        (4 * MIB, 16 * MIB, 32 * MIB),  # the reference chunk
        (512 * KIB, 2 * MIB, 4 * MIB),  # the protocol's default chunk
        (1, 128 * KIB, 256 * KIB),  # never under glibc's own default
        (16 * MIB, MAX_MMAP_THRESHOLD, 2 * MAX_MMAP_THRESHOLD),  # capped at glibc's maximum
    ],
)
def test_thresholds(chunk: int, mmap: int, trim: int) -> None:
    assert thresholds(chunk) == (mmap, trim)


def test_thresholds_refuse_a_chunk_under_one_byte() -> None:
    with pytest.raises(ValueError):
        thresholds(0)


# Four 4 MiB buffers made and freed together, 40 times (a window of chunks in flight): with
# glibc's defaults the freed top of the heap is trimmed and faulted in again each time.
_PROBE = """
import resource, sys
from client.transfer_memory import keep_transfer_buffers
applied = keep_transfer_buffers() if sys.argv[1] == "keep" else None
again = keep_transfer_buffers() if sys.argv[1] == "keep" else None
def window():
    bufs = [bytearray(4 << 20) for _ in range(4)]
    for b in bufs:
        b[::4096] = b"x" * len(range(0, len(b), 4096))  # touch every page
    del bufs
window()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    window()
print(applied, again, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[str, str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return out[0], out[1], int(out[2])


def test_kept_buffers_are_not_faulted_in_again() -> None:
    # This machine's C library is glibc (the suite runs on Linux with glibc).
    applied, again, kept = _faults("keep")
    assert (applied, again) == ("True", "True")
    _, _, default = _faults("default")
    pages_per_window = 4 * (4 << 20) // 4096
    assert default >= 10 * pages_per_window  # the defaults fault the buffers in again...
    assert kept < pages_per_window  # ...the kept ones stay mapped


def test_the_operators_environment_wins() -> None:
    applied, again, _ = _faults("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert (applied, again) == ("False", "False")
