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

from server.cli import build_parser, config_from_args, main
from server.config import ConfigError
from server.task_params import parse_task_params
from tests.waiting import scaled

# Tests that start a server (which builds its model with torch) are marked slow one by one;
# the flag checks run in the fast tier.
pytestmark = [pytest.mark.timeout(120)]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    with server_process(tmp_path) as proc:
        proc.wait_for(lambda s: s["currentRound"] is not None, 10, "serving")
        assert proc.terminate() == 0
    assert "server stopped" in proc.output()


@pytest.mark.slow
def test_main_returns_its_status_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--min-completion", "0"]) == 2
    assert "--min-completion" in capsys.readouterr().err


# -- --task-param ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([], {}),
        (["hidden=24000"], {"hidden": 24000}),
        (["features=1024", "hidden=8"], {"features": 1024, "hidden": 8}),
        (["lr=0.5", "flag=true", "none=null"], {"lr": 0.5, "flag": True, "none": None}),
        (["name=iid", 'quoted="12"', "empty="], {"name": "iid", "quoted": "12", "empty": ""}),
        (["sizes=[1, 2]", "eq=a=b"], {"sizes": [1, 2], "eq": "a=b"}),
    ],
)
def test_parse_task_params(items: list[str], expected: dict[str, object]) -> None:
    assert parse_task_params(items) == expected


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["hidden"], "--task-param takes KEY=VALUE, got 'hidden'"),
        (["=3"], "--task-param needs a key without spaces"),
        (["hid den=3"], "--task-param needs a key without spaces"),
        (["hidden=3", "hidden=4"], "--task-param hidden is given twice"),
    ],
)
def test_parse_task_params_refuses_malformed_items(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_task_params(items)
    assert message in str(info.value)


def test_task_params_reach_the_config() -> None:
    argv = ["--task", "synthetic", "--task-param", "features=1024", "--task-param", "hidden=7"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config.model_params == {"features": 1024, "hidden": 7}
    assert config_from_args(build_parser().parse_args(["--task", "synthetic"])).model_params == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--task", "synthetic", "--task-param", "depth=3"],
            "--task-param: task 'synthetic' has no parameter 'depth' "
            "(known: classes, features, hidden, samples)",
        ),
        (
            ["--task", "synthetic", "--task-param", "hidden=wide"],
            "--task-param: parameter 'hidden' must be an integer, got 'wide'",
        ),
        (
            ["--task", "synthetic", "--task-param", "classes=1"],
            "--task-param: parameter 'classes' must be between 2 and 1000, got 1",
        ),
        (
            [
                "--task",
                "synthetic",
                "--task-param",
                "samples=10000000",
                "--task-param",
                "features=64",
            ],
            "is over the limit",
        ),
        (["--task", "synthetic", "--task-param", "hidden"], "--task-param takes KEY=VALUE"),
        (
            ["--task-file", "model.fedtask", "--task-param", "hidden=3"],
            "a --task-file package carries its own parameters",
        ),
    ],
)
def test_bad_task_params_give_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main([*args, "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedtray-server: error: "), err
    assert message in err[0], err


def test_demo_checks_task_params_before_starting_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from server import demo

    assert demo.main(["--task", "synthetic", "--task-param", "hidden=0"]) == 2
    err = capsys.readouterr().err
    assert "fedtray-server demo: error: --task-param: parameter 'hidden'" in err, err
    parsed = demo.build_parser().parse_args(["--task-param", "a=1", "--task-param", "b=2"])
    assert parsed.task_param == ["a=1", "b=2"]


@pytest.mark.slow
def test_task_params_size_the_served_model(tmp_path: Path) -> None:
    params = ("--task-param", "features=5", "--task-param", "hidden=3", "--task-param", "classes=2")

    async def layout(url: str) -> dict[str, tuple[int, ...]]:
        dev = ScriptedDevice(url, name="shape")
        await dev.join(weights_version=None)
        await dev.until(lambda: 0 in dev.weights, 30, "the global weights")
        shapes = {name: tuple(array.shape) for name, array in dev.weights[0].items()}
        return shapes

    with server_process(tmp_path, "--min-clients", "2", *params) as proc:
        shapes = run_devices(layout(proc.url))
        assert proc.terminate() == 0
    assert shapes == {"0.weight": (3, 5), "0.bias": (3,), "2.weight": (2, 3), "2.bias": (2,)}
