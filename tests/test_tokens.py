"""Token hygiene: a device token never shows up in logs, status output, argv or listings.

End to end: ``python -m server --tokens-file ... --log-level DEBUG`` and
``python -m client --log-level DEBUG`` (token in its settings file) as real processes
run a round; then every byte they wrote (stdout, stderr, every file under their
XDG dirs except the settings file that must hold it) is searched for the token.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import socketio

from client.cli import main as client_main
from client.config import config_path
from tests.server_harness import REPO_ROOT, ScriptedDevice, server_process, subprocess_env
from tests.waiting import scaled

pytestmark = pytest.mark.slow

TOKEN = "tok-3f9a7c1e5b2d8a4f6e0c9b1d"
WRONG = "wrong-8d1c2b3a4f5e6d7c8b9a"


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same XDG layout as the subprocesses get (tests.server_harness.subprocess_env).
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "xdg" / var.lower()))


def test_config_set_token_keeps_the_file_private_and_show_hides_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert client_main(["config", "set", "auth_token", TOKEN]) == 0
    path = config_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert TOKEN in path.read_text()  # saved, so the next test of "nowhere else" means something
    assert client_main(["config", "show"]) == 0
    assert client_main(["config", "show", "--json"]) == 0
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    shown = json.loads(out.out[out.out.index("{") :])
    assert shown["auth_token"] == "***"
    # Changing another setting rewrites the file: still 0600.
    assert client_main(["config", "set", "device_name", "laptop"]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _files_holding(root: Path, needle: str) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            found.append(path)
    return found


def test_token_never_leaks_from_a_real_server_and_client(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text(f"# devices\n{TOKEN}\n")
    env = subprocess_env(tmp_path)
    xdg = tmp_path / "xdg"
    set_token = subprocess.run(
        [sys.executable, "-m", "client", "config", "set", "auth_token", TOKEN],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    assert set_token.returncode == 0, set_token.stderr
    assert TOKEN not in set_token.stdout + set_token.stderr
    with server_process(
        tmp_path,
        "--tokens-file",
        str(tokens_file),
        "--log-level",
        "DEBUG",
        "--min-clients",
        "1",
        "--clients-per-round",
        "1",
    ) as server:
        # Not on the server's command line (that is what --tokens-file is for).
        assert all(TOKEN not in arg for arg in psutil.Process(server.proc.pid).cmdline())
        client = subprocess.Popen(
            [sys.executable, "-m", "client", "--server", server.url, "--log-level", "DEBUG"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            status = server.wait_for(
                lambda st: any(r["outcome"] == "completed" for r in st["history"]),
                timeout=120,
                what="a completed round",
            )
            raw_status = json.dumps(status)
            assert TOKEN not in raw_status
            # A device with a wrong token is refused, and that token is not logged either.
            wrong = ScriptedDevice(server.url, token=WRONG)

            async def try_wrong() -> None:
                with pytest.raises(socketio.exceptions.ConnectionError):
                    await wrong.connect()

            asyncio.run(try_wrong())
        finally:
            client.send_signal(signal.SIGINT)
            try:
                client_out, client_err = client.communicate(timeout=scaled(60))
            except subprocess.TimeoutExpired:
                client.kill()
                client_out, client_err = client.communicate(timeout=scaled(30))
        assert server.terminate() == 0
        server_out = server.output()
    # The logs were written at DEBUG, so there was plenty of text to leak into.
    assert "DEBUG" in client_err and "DEBUG" in server_out
    assert "registered" in server_out and "refused a connection" in server_out
    for text in (client_out, client_err, server_out):
        assert TOKEN not in text
        assert WRONG not in text
    # Only the client's settings file holds the token; it is private to the user.
    [settings] = _files_holding(xdg, TOKEN)
    assert settings.name == "config.toml"
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600
    assert _files_holding(xdg, WRONG) == []
    logs = [p for p in xdg.rglob("*.log*") if p.is_file()]
    assert logs, "the client and server wrote log files"
    assert os.path.getsize(max(logs, key=os.path.getsize)) > 0
