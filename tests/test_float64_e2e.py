"""A float64 task trains end to end through the real parts: the reference server on a free
loopback port, a real client session and a real (spawned, torch) training worker.

The task (:class:`tests.float64_task.Float64Task`) reaches every process the way a plugin
does: through a ``fedtray.tasks`` entry point. The test writes a minimal ``.dist-info``
naming it into a temporary directory on ``sys.path``; the spawned worker inherits
``sys.path`` (multiprocessing's spawn passes it on), so it resolves ``float64`` too.

What breaks if the one ``model -> numpy`` rule is wrong anywhere: the server's initial
weights would not be float64, the trainer would reject them (``dtype_mismatch``) or the
server would reject the update, and the round would be abandoned instead of completed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from client.backoff import Backoff
from client.config import Settings
from client.global_store import GlobalStore
from client.session import DistributedClient, Worker
from client.tasks import available_tasks
from client.weights import decode, layout_of
from server.model import initial_state
from server.store import Store
from tests.device_info import quick_device_info
from tests.float64_task import Float64Task
from tests.server_harness import running_server

pytestmark = [pytest.mark.slow, pytest.mark.torch]

FLOAT64 = np.dtype(np.float64)
#: The server's round timeout; the device's wait for the round is the same test setting.
ROUND_TIMEOUT = 120.0


@pytest.fixture
def float64_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``float64`` registered as a ``fedtray.tasks`` entry point on ``sys.path``."""
    site = tmp_path / "plugin-site"
    info = site / "fedtray_float64_test_task-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fedtray-float64-test-task\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[fedtray.tasks]\nfloat64 = tests.float64_task:Float64Task\n"
    )
    monkeypatch.syspath_prepend(str(site))
    assert "float64" in available_tasks()
    yield site


def _torch_worker(on_event: Callable[[object], None]) -> Worker:
    from client.worker import TrainingWorker

    worker: Worker = TrainingWorker(on_event=on_event, simulation=False)
    return worker


def test_a_float64_task_trains_a_round_through_server_session_and_worker(
    tmp_path: Path, float64_plugin: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = Float64Task().configure(None)
    initial = initial_state(task, task.params, seed=0)  # what the server starts from
    layout = layout_of(initial)
    assert {spec.dtype for spec in layout.values()} == {"float64"}

    data_dir = tmp_path / "client"
    with (
        caplog.at_level(logging.INFO),
        running_server(
            tmp_path,
            task="float64",
            model_params={},
            min_clients=1,
            clients_per_round=1,
            rounds=1,
            epochs=2,
            round_timeout=ROUND_TIMEOUT,
        ) as server,
    ):
        client = DistributedClient(
            Settings(server_url=server.url, device_name="f64"),
            device_info=quick_device_info(),
            data_dir=data_dir,
            backoff=Backoff(base=0.1, cap=0.5),
            settings_file=None,
            worker_factory=_torch_worker,
        )
        try:
            versions: list[int | None] = []
            client.subscribe(lambda s: versions.append(s.weights_version))
            client.start()
            snap = client.wait_for(
                lambda s: s.rounds_completed >= 1 and s.weights_version == 1, ROUND_TIMEOUT
            )
            assert snap.task == "float64"
            assert not snap.simulation  # a real torch worker trained it
            assert snap.last_error is None
            # The device started from the server's initial global (version 0).
            assert 0 in versions
            status = server.wait_for(
                lambda st: len(st["history"]) == 1, timeout=30, what="the round recorded"
            )
        finally:
            assert client.stop(30), "the session did not stop in time"

    [record] = status["history"]
    assert record["outcome"] == "completed", record
    assert record["clientsReported"] == 1
    assert "dtype_mismatch" not in caplog.text

    # The server's new global (as saved) and the device's copy are float64 and trained.
    saved = Store(tmp_path / "server-state").load("float64", layout)
    assert saved is not None and saved.version == 1
    assert {a.dtype for a in saved.state.values()} == {FLOAT64}
    assert any(not np.array_equal(saved.state[k], initial[k]) for k in initial)
    held = GlobalStore(data_dir / "global").current()
    assert held is not None and held.version == 1
    received = decode(GlobalStore(data_dir / "global").weights_path.read_bytes(), expected=layout)
    assert {a.dtype for a in received.values()} == {FLOAT64}
    for name, array in saved.state.items():
        np.testing.assert_array_equal(received[name], array)
