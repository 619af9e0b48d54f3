"""The one-machine demo: pure helpers by table, and the whole run (slow)."""

from __future__ import annotations

import psutil
import pytest

from server.demo import main, parse_listening, round_line, summary

DONE = {
    "roundId": "r1",
    "number": 1,
    "outcome": "completed",
    "clientsSelected": 3,
    "clientsReported": 3,
    "trainLoss": 0.5,
    "evalAccuracy": 0.912,
    "seconds": 1.25,
}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("fedtray-server listening on http://127.0.0.1:4321\n", "http://127.0.0.1:4321"),
        ("INFO something else", None),
        ("fedtray-server listening on ", None),
    ],
)
def test_parse_listening(line: str, expected: str | None) -> None:
    assert parse_listening(line) == expected


@pytest.mark.parametrize(
    ("record", "rounds", "expected"),
    [
        (
            DONE,
            10,
            "round  1/10  clients 3/3  train loss 0.5000  eval accuracy  91.2 %  1.2 s",
        ),
        (
            {"number": 2, "outcome": "abandoned", "detail": "timed out"},
            3,
            "round 2/3  abandoned: timed out",
        ),
        (
            {**DONE, "evalAccuracy": None, "trainLoss": None},
            1,
            "round 1/1  clients 3/3  train loss -  eval accuracy    -   1.2 s",
        ),
    ],
)
def test_round_line(record: dict[str, object], rounds: int, expected: str) -> None:
    assert round_line(record, rounds) == expected


@pytest.mark.parametrize(
    ("records", "target", "met", "words"),
    [
        ([DONE], 0.9, True, "final eval accuracy 91.2 % after 1 of 10 rounds — target 90 % met"),
        ([DONE], 0.95, False, "target 95 % NOT met"),
        ([], 0.9, False, "no round completed"),
        ([{**DONE, "outcome": "abandoned"}], 0.9, False, "no round completed"),
    ],
)
def test_summary(records: list[dict[str, object]], target: float, met: bool, words: str) -> None:
    text, ok = summary(records, 10, target)
    assert ok is met
    assert words in text


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--clients", "0"]) == 2
    assert "--clients must be 1-64" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_reaches_the_target_with_three_clients(capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code = main(["--clients", "3", "--rounds", "10", "--require-target", "--timeout", "200"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    lines = out.out.splitlines()
    assert sum(1 for line in lines if line.startswith("round ")) == 10
    assert "target 90 % met" in lines[-1]
    leftovers = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.is_running()
    ]
    assert [p for p in leftovers if p.status() != psutil.STATUS_ZOMBIE] == []
