"""The headless client's benchmarks still run: each ``main`` with the tiniest sizes.

No figure is asserted (timings belong to the benchmark runs, not to tests); each run must
exit 0 and print its ratio line, and the facts a benchmark checks along the way (same
weights on both training sides, no torch in the idle client) must hold.
"""

from __future__ import annotations

import re

import pytest

from benchmarks import idle, training_overhead, transfer, worker_rounds


# Slow: the benchmarks start servers and clients that import torch.
@pytest.mark.slow
def test_transfer_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert transfer.main(["--size-mb", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ratio upload / raw TCP\s+\d+\.\d+x", out, re.M), out
    assert re.search(r"^ratio download / raw TCP\s+\d+\.\d+x", out, re.M), out


# Slow: the benchmarks start servers and clients that import torch.
@pytest.mark.slow
def test_training_overhead_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--samples", "2000", "--epochs", "1", "--hidden", "32", "--repeats", "1"]
    assert training_overhead.main([*argv, "--progress-interval", "0.01"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ratio worker / bare \(steady, ms/step\)\s+\d+\.\d+x", out, re.M), out
    assert "trained weights bit-identical: yes" in out, out


# Slow: the benchmarks start servers and clients that import torch.
@pytest.mark.slow
def test_idle_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert idle.main(["--seconds", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ratio client / bare RSS \(peak\)\s+\d+\.\d+x", out, re.M), out
    assert "torch loaded in the client: no" in out, out


@pytest.mark.slow
def test_worker_rounds_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_rounds.main(["--size", "small", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "small     cold" in out and "small     warm" in out
