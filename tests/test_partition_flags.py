"""``--partition`` / ``--partition-alpha`` of ``fedtray-server`` and its ``demo``.

The flags reach the config and the partition each device is sent; a bad combination is
refused with one line and status 2 (before any process starts, in the demo); the choices
are the protocol's :data:`client.protocol.PARTITION_SCHEMES`. No server is started.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.protocol import DEFAULT_PARTITION_ALPHA, PARTITION_SCHEMES
from server import demo
from server.cli import build_parser, config_from_args, main
from server.config import ConfigError, ServerConfig


@pytest.mark.parametrize(
    ("argv", "scheme", "alpha"),
    [
        ([], "label_skew", DEFAULT_PARTITION_ALPHA),
        (["--partition", "iid"], "iid", DEFAULT_PARTITION_ALPHA),
        (["--partition", "dirichlet"], "dirichlet", DEFAULT_PARTITION_ALPHA),
        (["--partition", "dirichlet", "--partition-alpha", "0.1"], "dirichlet", 0.1),
    ],
)
def test_flags_reach_the_partition_each_device_is_sent(
    argv: list[str], scheme: str, alpha: float
) -> None:
    config = config_from_args(build_parser().parse_args(argv))
    partition = config.partition_of(2, 5)
    assert (partition.index, partition.count, partition.seed) == (2, 5, config.seed)
    assert (partition.scheme, partition.alpha) == (scheme, alpha)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--partition", "iid", "--partition-alpha", "0.5"], "dirichlet only, not iid"),
        (["--partition-alpha", "0.5"], "dirichlet only, not label_skew"),
        (["--partition", "dirichlet", "--partition-alpha", "0"], "--partition-alpha must be"),
        (["--partition", "dirichlet", "--partition-alpha", "nan"], "--partition-alpha must be"),
        (["--partition", "dirichlet", "--partition-alpha", "1e7"], "--partition-alpha must be"),
    ],
)
def test_bad_partition_flags_give_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    for run, prog in ((main, "fedtray-server"), (demo.main, "fedtray-server demo")):
        assert run([*argv, "--port", "0"] if run is main else argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith(prog) and message in err[-1], err


def test_an_unknown_scheme_is_refused_by_both_parsers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--partition", "shards", "--port", "0"]) == 2
    with pytest.raises(SystemExit) as info:  # the demo's plain argparse parser
        demo.main(["--partition", "shards"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("argument --partition: invalid choice: 'shards'") == 2, err


def test_config_refuses_alpha_without_dirichlet(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--partition-alpha"):
        ServerConfig(state_dir=tmp_path, partition="iid", partition_alpha=0.5)
    cfg = ServerConfig(state_dir=tmp_path, partition="dirichlet", partition_alpha=3.0)
    assert cfg.partition_of(0, 1).alpha == 3.0


def test_choices_are_the_protocols_schemes() -> None:
    for parser in (build_parser(), demo.build_parser()):
        action = next(a for a in parser._actions if a.dest == "partition")
        assert tuple(action.choices or ()) == PARTITION_SCHEMES
