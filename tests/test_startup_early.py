"""``python -m client`` starts its training process before the session, at low priority,
and that one process trains the first round.

Real parts: the reference server in-process (tests/server_harness.py), the client CLI as
a real subprocess, its training process importing torch (hence slow).
"""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest

from client.worker_child import low_priority_nice
from tests.server_harness import client_process, running_server, subprocess_env
from tests.waiting import poll


@pytest.mark.slow
def test_the_cli_starts_the_training_process_early_and_the_session_trains_in_it(
    tmp_path: Path,
) -> None:
    env = subprocess_env(tmp_path / "client")
    env["FEDTRAY_SIMULATE_OTHER_CPU"] = "0"  # other tests' load must not pause the round
    with (
        running_server(tmp_path, min_clients=1, clients_per_round=1, evaluate_every=0) as server,
        client_process(server.url, "early-dev", env) as client,
    ):
        session = psutil.Process(client.proc.pid)
        early = poll(
            lambda: re.search(r"started training process (\d+) early", client.text()),
            bool,
            60,
            "the training process started early",
        )
        assert early is not None
        pid = int(early.group(1))
        # At the training priority already (the parent lowered it at once).
        assert psutil.Process(pid).nice() == low_priority_nice(session.nice())
        poll(
            lambda: "update accepted" in client.text(),
            bool,
            120,
            "the first round's update accepted",
        )
        assert psutil.Process(pid).is_running()
    text = client.text()
    assert f"training process {pid} (started early) adopted" in text, text
    assert "training process ready" in text, text
    # The one training process of the session: no other was started.
    assert re.findall(r"started training process (\d+)", text) == [str(pid)], text
