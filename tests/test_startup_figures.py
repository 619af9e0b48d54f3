"""The pure figures of ``benchmarks.startup --first-update`` (a tree may not report a mark)."""

from __future__ import annotations

import math

import pytest

from benchmarks.startup import _median, _s, _worst

NAN = math.nan


@pytest.mark.parametrize(
    ("values", "worst", "median"),
    [
        ([1.0, 3.0, 2.0], 3.0, 2.0),
        ([NAN, 2.0, 1.0], 2.0, 1.5),
        ([2.0, NAN], 2.0, 2.0),
        ([NAN, NAN], NAN, NAN),
    ],
)
def test_worst_and_median_skip_unknown_values(
    values: list[float], worst: float, median: float
) -> None:
    for got, want in ((_worst(values), worst), (_median(values), median)):
        assert (math.isnan(got) and math.isnan(want)) or got == want


@pytest.mark.parametrize(("seconds", "text"), [(1.234, "1.23 s"), (NAN, "n/a")])
def test_seconds_text(seconds: float, text: str) -> None:
    assert _s(seconds) == text
