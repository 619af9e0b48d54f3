"""``python -m client`` starts its training process before the session, at low priority,
and that one process trains the first round.

Real parts: the reference server in-process (tests/server_harness.py), the client CLI as
a real subprocess, its training process importing torch (hence slow).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from client.worker_child import low_priority_nice
from tests.server_harness import REPO_ROOT, running_server, subprocess_env
from tests.waiting import poll, scaled


@pytest.mark.slow
def test_the_cli_starts_the_training_process_early_and_the_session_trains_in_it(
    tmp_path: Path,
) -> None:
    env = subprocess_env(tmp_path / "client")
    env["FEDTRAY_SIMULATE_OTHER_CPU"] = "0"  # other tests' load must not pause the round
    with running_server(tmp_path, min_clients=1, clients_per_round=1, evaluate_every=0) as server:
        client = subprocess.Popen(
            [sys.executable, "-m", "client", "--server", server.url, "--name", "early-dev"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        assert client.stdout is not None
        out = client.stdout
        reader = threading.Thread(target=lambda: lines.extend(out), daemon=True)
        reader.start()
        try:
            session = psutil.Process(client.pid)
            early = poll(
                lambda: re.search(r"started training process (\d+) early", "".join(lines)),
                bool,
                60,
                "the training process started early",
            )
            assert early is not None
            pid = int(early.group(1))
            # At the training priority already (the parent lowered it at once).
            assert psutil.Process(pid).nice() == low_priority_nice(session.nice())
            poll(
                lambda: "update accepted" in "".join(lines),
                bool,
                120,
                "the first round's update accepted",
            )
            assert psutil.Process(pid).is_running()
        finally:
            client.terminate()
            client.wait(scaled(30))
            reader.join(scaled(10))
    text = "".join(lines)
    assert f"training process {pid} (started early) adopted" in text, text
    assert "training process ready" in text, text
    # The one training process of the session: no other was started.
    assert re.findall(r"started training process (\d+)", text) == [str(pid)], text
