"""The cluster flags of ``fedtray-server`` and the supervisor's argument handling (pure)."""

from __future__ import annotations

import pytest

from server.cli import build_parser, main
from server.cluster.supervisor import cluster_problem, strip_workers


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        ([], None),
        (["--workers", "2"], "cluster mode (--workers) needs both --redis and --database"),
        (["--redis", "redis://x"], "cluster mode (--workers) needs both --redis and --database"),
        (["--redis", "redis://x", "--database", "postgresql://y"], None),
        (
            ["--workers", "0", "--redis", "redis://x", "--database", "postgresql://y"],
            "--workers must be at least 1",
        ),
    ],
)
def test_cluster_flags_go_together(argv: list[str], problem: str | None) -> None:
    assert cluster_problem(build_parser().parse_args(argv)) == problem


@pytest.mark.parametrize(
    ("argv", "kept"),
    [
        (["--workers", "2", "--port", "0"], ["--port", "0"]),
        (["--workers=3", "--redis", "r"], ["--redis", "r"]),
        (["--task", "digits"], ["--task", "digits"]),
    ],
)
def test_workers_get_every_flag_but_workers(argv: list[str], kept: list[str]) -> None:
    assert strip_workers(argv) == kept


def test_workers_without_engines_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "fedtray-server: error: cluster mode (--workers) needs both --redis and --database\n"
    )
