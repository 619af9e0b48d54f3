"""The ``python -m server`` process: flags, restart from saved state, clean stops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from server_harness import (
    REPO_ROOT,
    ScriptedDevice,
    run_devices,
    server_args,
    server_process,
    subprocess_env,
)

from server.cli import build_parser, config_from_args
from tests.waiting import scaled

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-completion", "2"], "--min-completion must be a fraction in (0, 1]"),
        (["--port", "abc"], "argument --port: invalid int value"),
        (["--partition", "random"], "argument --partition: invalid choice"),
        (["--log-level", "LOUD"], "LOUD"),
        (["--tokens-file", "/nonexistent/tokens"], "cannot read tokens file"),
        (["--min-clients", "3", "--clients-per-round", "2"], "--clients-per-round (2)"),
    ],
)
def test_bad_flags_give_one_line_and_status_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server", *args],
        check=False,
        cwd=REPO_ROOT,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("fedtray-server: error:") and message in lines[-1], proc.stderr


def test_unknown_task_fails_to_start_with_status_1(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server", *server_args(tmp_path, "--task", "nope")],
        check=False,
        cwd=REPO_ROOT,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode == 1
    assert "fedtray-server: error: task 'nope'" in proc.stderr


def test_tokens_file_and_repeated_tokens(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# devices\nalpha\n\nbeta  # laptop\n")
    args = build_parser().parse_args(["--token", "gamma", "--tokens-file", str(tokens)])
    assert config_from_args(args).tokens == ("gamma", "alpha", "beta")


async def _one_round(url: str, version: int) -> None:
    dev = ScriptedDevice(url, name="solo")
    await dev.join(weights_version=None)
    await dev.until(lambda: version in dev.weights and len(dev.starts) == 1, 30, "start")
    start = dev.starts[0]
    assert start["baseVersion"] == version
    update = {k: v + np.float32(1.0) for k, v in dev.weights[version].items()}
    ack = await dev.submit(
        start["roundId"], version, update, num_samples=10, metrics={"trainLoss": 0.5}
    )
    assert ack["ok"] is True, ack


def test_restart_continues_from_saved_version_and_round(tmp_path: Path) -> None:
    flags = ("--min-clients", "1")
    with server_process(tmp_path, *flags) as proc:
        run_devices(_one_round(proc.url, 0))
        proc.wait_for(lambda s: s["globalVersion"] == 1, 30, "version 1")
        proc.kill()  # no clean shutdown: what was published must already be on disk
    with server_process(tmp_path, *flags, "--rounds", "2", "--exit-when-done") as proc:
        status = proc.wait_for(lambda s: s["currentRound"] is not None, 10, "round 2 waiting")
        assert status["globalVersion"] == 1
        assert status["currentRound"]["number"] == 2
        assert [r["outcome"] for r in status["history"]] == ["completed"]
        run_devices(_one_round(proc.url, 1))
        # --rounds 2 counts rounds in total; with --exit-when-done the process stops by
        # itself after round 2.
        assert proc.wait(scaled(60)) == 0
        output = proc.output()
    assert "resuming task synthetic" in output and "version 1 after 1 completed rounds" in output
    assert "all 2 rounds are complete" in output


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    with server_process(tmp_path) as proc:
        proc.wait_for(lambda s: s["currentRound"] is not None, 10, "serving")
        assert proc.terminate() == 0
    assert "server stopped" in proc.output()


def test_main_returns_its_status_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    assert main(["--min-completion", "0"]) == 2
    assert "--min-completion" in capsys.readouterr().err
