"""The networked session against the real reference server, with the real worker.

No mocks: each test runs :class:`server.app.FedServer` (in a thread or as a subprocess)
and a :class:`client.session.DistributedClient` whose worker trains in a real child
process. Every wait is on a condition with a timeout.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from client.backoff import Backoff
from client.config import Settings, load_settings
from client.global_store import GlobalStore
from client.pending import PendingStore
from client.protocol import Limits
from client.session import DistributedClient
from client.snapshot import ClientSnapshot
from client.trainer import TrainJob, TrainResult
from client.weights import encode
from tests.device_info import quick_device_info
from tests.server_harness import (
    REPO_ROOT,
    HolderDevice,
    running_server,
    server_process,
    subprocess_env,
)
from tests.waiting import holds_for, scaled, wait_until

pytestmark = pytest.mark.slow

#: The session's reconnect backoff in these tests (seconds, not scaled: a client setting).
BACKOFF_CAP = 0.5
#: Round timeout (reference seconds) for rounds trained by the real worker: the first one
#: includes starting the worker process and importing torch there, many seconds on a busy
#: machine. With the harness's 10 s default such a round timed out under load; the retry
#: found the session still cancelling it ("busy"), and every retry 0.2 s later was refused
#: the same way until the worker was free: dozens of rounds abandoned in one wait.
WORKER_ROUND_TIMEOUT = 90.0


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., DistributedClient]]:
    made: list[DistributedClient] = []

    def make(url: str, **kwargs: Any) -> DistributedClient:
        settings_kwargs = {
            k: kwargs.pop(k) for k in ("auth_token", "paused", "device_id") if k in kwargs
        }
        settings = Settings(server_url=url, device_name=f"t{len(made)}", **settings_kwargs)
        client = DistributedClient(
            settings,
            device_info=quick_device_info(),
            data_dir=kwargs.pop("data_dir", tmp_path / f"client{len(made)}"),
            backoff=Backoff(base=0.1, cap=BACKOFF_CAP),
            settings_file=kwargs.pop("settings_file", None),
            **kwargs,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        assert client.stop(scaled(30)), "the session did not stop in time"


def _wait(client: DistributedClient, pred: Callable[[ClientSnapshot], bool], t: float = 60) -> Any:
    return client.wait_for(pred, scaled(t))


def test_register_round_submit_and_global(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    with running_server(
        tmp_path, min_clients=1, clients_per_round=1, rounds=2, round_timeout=WORKER_ROUND_TIMEOUT
    ) as server:
        client = make_client(server.url)
        seen: list[ClientSnapshot] = []
        client.subscribe(seen.append)
        client.start()
        snap = _wait(client, lambda s: s.rounds_completed >= 2 and s.weights_version == 2)
        assert snap.connection == "connected"
        assert snap.task == "synthetic"
        # The server records the version when the device's ack arrives, just after the
        # client has stored it: wait for that rather than read the status once.
        status = server.wait_for(
            lambda st: [d.get("weightsVersion") for d in st["devices"]] == [2], timeout=10
        )
        [device] = status["devices"]
        assert device["id"] == snap.device_id
        assert [r["outcome"] for r in status["history"]] == ["completed", "completed"]
        # The device went through training and uploading, reporting progress.
        states = {s.device_state for s in seen}
        assert {"idle", "training", "uploading"} <= states
        assert any(s.progress.fraction == 1.0 for s in seen)
        # Nothing is left pending; the stored global is the server's version 2.
        data_dir = tmp_path / "client0"
        assert PendingStore(data_dir / "pending").entries() == []
        held = GlobalStore(data_dir / "global").current()
        assert held is not None and held.version == 2
        # The end of the federation is a state: the final global came first, and the
        # device stays connected to a server that keeps serving.
        end = _wait(client, lambda s: s.finished is not None)
        assert end.finished is not None
        assert (end.finished.task, end.finished.rounds) == ("synthetic", 2)
        assert (end.connection, end.weights_version, end.device_state) == ("connected", 2, "idle")
        holds_for(
            lambda: client.snapshot().connection == "connected",
            3 * server.server.config.heartbeat_interval,
            "the device stays connected after the end",
        )


def test_user_pause_refuses_rounds_persists_and_resumes(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    settings_file = tmp_path / "settings.toml"  # missing: the session writes its own
    with running_server(
        tmp_path, min_clients=1, clients_per_round=1, rounds=1, round_timeout=WORKER_ROUND_TIMEOUT
    ) as server:
        client = make_client(server.url, paused=True, settings_file=settings_file)
        client.start()
        _wait(client, lambda s: s.connection == "connected")
        # The server sees the pause in heartbeats and does not get a round accepted.
        server.wait_for(
            lambda st: any(d["pauseReason"] == "user_paused" for d in st["devices"]),
            what="the device reported as paused",
        )
        assert client.snapshot().device_state == "paused"
        assert client.snapshot().rounds_completed == 0
        client.resume()
        _wait(client, lambda s: s.rounds_completed == 1)
        saved = load_settings(settings_file)
        assert saved.paused is False, "resume persisted"
        assert saved.device_id == client.settings.device_id
        client.pause()
        snap = _wait(client, lambda s: s.device_state == "paused")
        assert snap.pause_reason == "user_paused"
        assert snap.pause_detail == "Paused by you"
        assert load_settings(settings_file).paused is True, "the pause persisted"


def test_pending_upload_resumes_from_the_servers_offset(
    tmp_path: Path,
    make_client: Callable[..., DistributedClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = Limits(max_chunk_bytes=64, max_inflight_chunks=1)
    with running_server(
        tmp_path, min_clients=2, clients_per_round=2, rounds=1, limits=limits, round_timeout=60
    ) as server:
        holder = HolderDevice(server.url)
        try:
            client = make_client(server.url)
            interrupted = threading.Event()

            def interrupt_mid_upload(snap: ClientSnapshot) -> None:
                fraction = snap.upload_fraction
                if not interrupted.is_set() and fraction is not None and 0 < fraction < 0.5:
                    interrupted.set()
                    client.disconnect()

            client.subscribe(interrupt_mid_upload)
            with caplog.at_level(logging.INFO, logger="client.session"):
                client.start()
                _wait(client, lambda s: interrupted.is_set() and s.connection == "disconnected")
                pending = PendingStore(tmp_path / "client0" / "pending").entries()
                assert len(pending) == 1, "the interrupted update must stay on disk"
                client.connect()
                _wait(client, lambda s: s.rounds_completed == 1)
            match = re.search(
                r"resuming the upload of round \S+ at byte (\d+) of (\d+)", caplog.text
            )
            assert match is not None, caplog.text
            assert 0 < int(match.group(1)) < int(match.group(2))
            assert PendingStore(tmp_path / "client0" / "pending").entries() == []
            current = server.status()["currentRound"]
            assert (
                current is None
                or client.snapshot().device_id in current["reported"]
                or (server.status()["history"])
            )
        finally:
            holder.close()


def test_reconnects_after_a_server_restart_with_the_same_device_id(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    with server_process(tmp_path, "--min-clients", "5") as first:
        port = first.port
        client = make_client(first.url)
        client.start()
        snap = _wait(client, lambda s: s.connection == "connected")
        device_id = snap.device_id
        first.wait_for(lambda st: [d["id"] for d in st["devices"]] == [device_id])
        first.kill()
        _wait(client, lambda s: s.connection != "connected" and s.next_retry_at is not None)
        assert client.snapshot().last_error
    with server_process(tmp_path, "--min-clients", "5", "--port", str(port)) as second:
        _wait(client, lambda s: s.connection == "connected", 90)
        status = second.wait_for(lambda st: len(st["devices"]) == 1)
        assert status["devices"][0]["id"] == device_id
        assert status["devices"][0]["connected"] is True


def _worker_children() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())
    ]


def test_worker_crash_is_reported_and_the_next_round_works(
    tmp_path: Path,
    make_client: Callable[..., DistributedClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    params = {"features": 8, "classes": 3, "hidden": 8, "samples": 3000}
    with running_server(
        tmp_path,
        min_clients=1,
        clients_per_round=1,
        rounds=1,
        # Seconds of training even on a fast, quiet machine: the kill must find it training
        # (a job that ends within the first progress report shows no progress).
        epochs=400,
        model_params=params,
        round_timeout=60,
    ) as server:
        client = make_client(server.url)
        with caplog.at_level(logging.INFO):
            client.start()
            _wait(client, lambda s: s.device_state == "training" and s.progress.fraction > 0)
            [child] = _worker_children()
            child.kill()
            _wait(client, lambda s: s.device_state == "idle" and s.round_id is None)
            server.wait_for(
                lambda st: any(r["outcome"] == "abandoned" for r in st["history"]),
                timeout=30,
                what="the failed round abandoned",
            )
            assert "training_failed" in caplog.text
            assert any(
                r.name.startswith("server") and "training_failed" in r.getMessage()
                for r in caplog.records
            ), "the server must have received training:error with the code"
            _wait(client, lambda s: s.rounds_completed == 1, 120)
        server.wait_for(
            lambda st: st["history"][-1]["outcome"] == "completed", what="the retried round"
        )


class _FakeWorker:
    """Stands in for the training worker: the first job "dies" leaving a checkpoint (as a
    ``kill -9`` after a periodic checkpoint would), the next one finishes with the base
    weights as its update but dies before deleting its checkpoint."""

    def __init__(self, on_event: Callable[[object], None]) -> None:
        self.on_event = on_event
        self.jobs: list[TrainJob] = []
        self.checkpoint_found: list[bool] = []

    @property
    def is_busy(self) -> bool:
        return False

    def submit(self, job: TrainJob) -> None:
        from client import worker as w

        self.jobs.append(job)
        self.checkpoint_found.append(job.checkpoint_path.exists())
        job.checkpoint_path.write_bytes(b"a periodic checkpoint")
        if len(self.jobs) == 1:
            self.on_event(w.Failed("training_failed", "killed", job.round_id))
            return
        assert job.base_weights_path is not None
        job.output_path.write_bytes(job.base_weights_path.read_bytes())
        result = TrainResult(job.round_id, job.output_path, 10, {"trainLoss": 1.0}, 1)
        self.on_event(w.Done(result))

    def warm(self) -> None: ...
    def set_budget(self, budget: Any) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def cancel(self) -> None: ...
    def shutdown(self) -> None: ...


def test_a_retried_round_resumes_the_same_checkpoint_and_stale_work_is_deleted(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    work = tmp_path / "client0" / "work"
    work.mkdir(parents=True)
    stale = [
        f"work-v0-{'e' * 24}.ckpt",  # other work on the same base
        f"round-{'d' * 24}.safetensors",  # the old round-id naming
        f".work-v0-{'e' * 24}.ckpt.k9.tmp",  # a write cut by kill -9
    ]
    for name in [*stale, "notes.txt"]:
        (work / name).write_bytes(b"x")
    workers: list[_FakeWorker] = []

    def factory(on_event: Callable[[object], None]) -> _FakeWorker:
        workers.append(_FakeWorker(on_event))
        return workers[-1]

    with running_server(tmp_path, min_clients=1, clients_per_round=1, rounds=1) as server:
        client = make_client(server.url, worker_factory=factory, checkpoint_interval=7.5)
        client.start()
        _wait(client, lambda s: s.rounds_completed == 1 and s.weights_version == 1)
        [worker] = workers
        first, second = worker.jobs
        # The server retried the abandoned round under a new id, with the same work.
        assert first.round_id != second.round_id
        assert first.checkpoint_path == second.checkpoint_path
        assert first.checkpoint_path.name.startswith("work-v0-")
        assert worker.checkpoint_found == [False, True], "the retry must find the checkpoint"
        assert first.checkpoint_interval == 7.5
        assert sorted(p.name for p in work.iterdir() if p.name in stale) == []
        # Global v1 arrived: the checkpoint built on v0 can never be resumed; it goes.
        wait_until(lambda: not second.checkpoint_path.exists(), what="the v0 checkpoint deleted")
        assert (work / "notes.txt").exists(), "unknown files are never deleted"
        assert server.status()["history"][-1]["outcome"] == "completed"


def test_layout_mismatch_is_reported_with_its_code(
    tmp_path: Path,
    make_client: Callable[..., DistributedClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    data_dir = tmp_path / "client0"
    # A valid weights document of the wrong model, held as the server's version 0.
    wrong = encode({"weight": np.zeros((2, 2), dtype=np.float32)})
    GlobalStore(data_dir / "global").save(version=0, task="synthetic", data=wrong)
    with running_server(
        tmp_path, min_clients=1, clients_per_round=1, rounds=1, round_timeout=WORKER_ROUND_TIMEOUT
    ) as server:
        client = make_client(server.url, data_dir=data_dir)
        with caplog.at_level(logging.INFO):
            client.start()
            server.wait_for(
                lambda st: any(r["outcome"] == "abandoned" for r in st["history"]),
                timeout=30,
                what="the round abandoned after the device's error",
            )
        client_lines = [
            r.getMessage() for r in caplog.records if r.name.startswith("client.session")
        ]
        assert any("layout_mismatch" in line for line in client_lines), client_lines
        assert any(
            r.name.startswith("server") and "layout_mismatch" in r.getMessage()
            for r in caplog.records
        ), "the server must have received training:error with code layout_mismatch"
        assert client.snapshot().connection == "connected", "the session keeps running"


def test_refused_token_gives_auth_failed_without_a_tight_loop(
    tmp_path: Path,
    make_client: Callable[..., DistributedClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with running_server(tmp_path, tokens=("right-token",), min_clients=5) as server:
        client = make_client(server.url, auth_token="wrong-token")
        with caplog.at_level(logging.WARNING, logger="server"):
            client.start()
            snap = _wait(client, lambda s: s.connection == "auth_failed" and s.next_retry_at)
            assert "refused this device's token" in (snap.last_error or "")
            retry_in = snap.retry_in()
            assert retry_in is not None and retry_in > 50, "must wait the maximum backoff"
            # No new attempt is made meanwhile: wait well past what backoff would allow.
            holds_for(
                lambda: client.snapshot().connection == "auth_failed",
                3 * BACKOFF_CAP,
                "no new connection attempt",
                interval=0.1,
            )
        refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(refusals) == 1
        client.update_settings(auth_token="right-token").result(10)
        _wait(client, lambda s: s.connection == "connected", 20)


def test_simulation_mode_without_torch(tmp_path: Path) -> None:
    script = r"""
import json, sys
sys.modules["torch"] = None  # torch cannot be imported in this process
from client.config import Settings
from client.session import DistributedClient
from client.device import detect_device
from pathlib import Path
from tests.waiting import scaled

def main():
    c = DistributedClient(Settings(server_url=sys.argv[1], device_name="sim"),
                          device_info=detect_device(probe_gpu=False),
                          data_dir=Path(sys.argv[2]))
    c.start()
    try:
        s = c.wait_for(lambda s: s.rounds_completed >= 1 and s.weights_version == 1, scaled(90))
        print(json.dumps({"simulation": s.simulation, "version": s.weights_version,
                          "torch_loaded": sys.modules.get("torch") is not None}))
    finally:
        c.stop(scaled(30))

if __name__ == "__main__":
    main()
"""
    path = tmp_path / "sim_client.py"
    path.write_text(script)
    with running_server(
        tmp_path, min_clients=1, clients_per_round=1, rounds=1, round_timeout=WORKER_ROUND_TIMEOUT
    ) as server:
        proc = subprocess.run(
            [sys.executable, str(path), server.url, str(tmp_path / "sim-data")],
            cwd=REPO_ROOT,
            env=subprocess_env(tmp_path),
            check=False,
            capture_output=True,
            text=True,
            timeout=scaled(150),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result == {"simulation": True, "version": 1, "torch_loaded": False}
        [device] = server.status()["devices"]
        assert (
            device["rounds_completed" if "rounds_completed" in device else "roundsCompleted"] == 1
        )


def test_disk_error_keeping_the_update_is_reported_and_the_session_goes_on(
    tmp_path: Path,
    make_client: Callable[..., DistributedClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    data_dir = tmp_path / "client0"
    data_dir.mkdir()
    (data_dir / "pending").write_text("a file where the pending folder should be")
    with running_server(
        tmp_path, min_clients=1, clients_per_round=1, rounds=1, round_timeout=WORKER_ROUND_TIMEOUT
    ) as server:
        client = make_client(server.url, data_dir=data_dir)
        with caplog.at_level(logging.INFO):
            client.start()
            server.wait_for(
                lambda st: any(r["outcome"] == "abandoned" for r in st["history"]),
                timeout=30,
                what="the round abandoned after the device's error",
            )
        assert any(
            r.name.startswith("server") and "cannot keep the trained update" in r.getMessage()
            for r in caplog.records
        ), "the server must have received the training:error"
        snap = client.snapshot()
        assert snap.connection == "connected"
        assert snap.device_state == "idle"
        # The trained update was not lost: it is still where the worker wrote it.
        assert list((data_dir / "work").glob("*.safetensors"))
