"""Fault injection against the REAL processes: no update is lost or double-counted.

Each test runs the real reference server (in a thread, or as a ``python -m server``
subprocess when it must be killed with SIGKILL), real :class:`client.session.
DistributedClient` sessions (or a ``python -m client`` subprocess) whose worker trains in
a real child process, and cuts the TCP links with :class:`tests.tcpproxy.TcpProxy`.
Nothing is mocked; the server's aggregation strategy and blob store are only *wrapped* to
count what reached them. Every wait is on a condition with a timeout.

What the server promises across its own restart (``server/store.py``): only completed
rounds survive -- the global weights of the last completed version and the round history
are written atomically before a version is published. An open round (its selection, the
reports received so far, partial blobs) lives in memory and dies with the process. A
restarted server reopens the same round number under a NEW round id; an update trained
for the lost round is answered ``round_closed`` and the client discards it with a log
line, then trains again in the new round, which counts it exactly once.

A client killed with SIGKILL mid-training loses at most one checkpoint interval: after a
restart it resumes the round (re-offered, or retried with the same work) from its last
periodic checkpoint and completes it.

Covered elsewhere (not repeated here): a ``kill -9`` of the training worker is reported as
``training:error`` and the next round works (``tests/test_session.py::
test_worker_crash_is_reported_and_the_next_round_works``); a pending dir that cannot be
written gives a clear ``training:error`` and the session goes on (``tests/test_session.py::
test_disk_error_keeping_the_update_is_reported_and_the_session_goes_on``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from client.backoff import Backoff
from client.config import Settings
from client.device import DeviceInfo, detect_device
from client.pending import PendingStore
from client.protocol import BlobChunk, BlobProgress, Limits
from client.session import DistributedClient
from client.snapshot import ClientSnapshot
from client.weights import StateDict
from tests.server_harness import (
    REPO_ROOT,
    ScriptedDevice,
    ServerHandle,
    running_server,
    server_process,
    subprocess_env,
)
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.slow

_DEVICE: list[DeviceInfo] = []
DISCARDED = "closed before the update arrived; discarded it"


def _device_info() -> DeviceInfo:
    if not _DEVICE:
        _DEVICE.append(detect_device(probe_gpu=False))
    return _DEVICE[0]


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "xdg" / var.lower()))


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., DistributedClient]]:
    made: list[DistributedClient] = []

    def make(url: str, **kwargs: Any) -> DistributedClient:
        settings = Settings(server_url=url, device_name=f"f{len(made)}")
        client = DistributedClient(
            settings,
            device_info=_device_info(),
            data_dir=kwargs.pop("data_dir", tmp_path / f"client{len(made)}"),
            backoff=Backoff(base=0.05, cap=0.3),
            save=lambda _s: None,
            settings_file=tmp_path / "no-settings-file.toml",
            **kwargs,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        assert client.stop(30), "the session did not stop in time"


def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class _Counting:
    """Wraps the live server's strategy and blob store to count what reached them."""

    def __init__(self, srv: ServerHandle) -> None:
        self.server = srv.server
        self.adds: dict[str, int] = {}
        self.chunk_bytes = 0
        self._lock = threading.Lock()
        strategy_add = self.server.strategy.add
        accept_chunk = self.server.blobs.accept_chunk

        def add(state: StateDict, num_samples: int) -> None:
            rnd = self.server.round  # set, and stable under the server's aggregation lock
            assert rnd is not None
            with self._lock:
                self.adds[rnd.round_id] = self.adds.get(rnd.round_id, 0) + 1
            strategy_add(state, num_samples)

        def counted_chunk(peer: str, chunk: BlobChunk, now: float) -> BlobProgress:
            self.chunk_bytes += len(chunk.data)
            return accept_chunk(peer, chunk, now)

        self.server.strategy.add = add  # type: ignore[method-assign]
        self.server.blobs.accept_chunk = counted_chunk  # type: ignore[method-assign]


class _Holder:
    """A scripted device that accepts rounds and reports nothing: it keeps a round open."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.device = ScriptedDevice(url, name="holder")
        self._run(self.device.join())
        self.beats = asyncio.run_coroutine_threadsafe(
            self.device.heartbeat_forever("training"), self.loop
        )

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        self.beats.cancel()
        self._run(self.device.sio.disconnect())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# ------------------------------------------------------------------------ connection cut

BIG = {"features": 1000, "classes": 3, "hidden": 1250, "samples": 300}  # ~5 MB of weights
CHUNK = 256 * 1024


def test_cut_during_a_large_upload_resumes_from_the_servers_offset(
    tmp_path: Path,
    make_client: Callable[..., DistributedClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = Limits(max_chunk_bytes=CHUNK, max_inflight_chunks=2)
    with running_server(
        tmp_path,
        min_clients=2,
        clients_per_round=2,
        rounds=1,
        limits=limits,
        round_timeout=90,
        model_params=BIG,
    ) as srv:
        counting = _Counting(srv)
        holder = _Holder(srv.url)
        try:
            with TcpProxy(srv.port) as proxy:
                client = make_client(proxy.url)
                cut_at: list[float] = []

                def cut_mid_upload(snap: ClientSnapshot) -> None:
                    fraction = snap.upload_fraction
                    if not cut_at and fraction is not None and 0.2 < fraction < 0.7:
                        cut_at.append(fraction)
                        assert proxy.cut() >= 1

                client.subscribe(cut_mid_upload)
                with caplog.at_level(logging.INFO):
                    client.start()
                    snap = client.wait_for(lambda s: s.rounds_completed == 1, 120)
            assert cut_at, "the upload was never cut"
            match = re.search(
                r"resuming the upload of round \S+ at byte (\d+) of (\d+)", caplog.text
            )
            assert match is not None, "the upload restarted instead of resuming"
            resumed_at, total = int(match.group(1)), int(match.group(2))
            assert 0 < resumed_at < total
            assert total > 10 * CHUNK, "the update must span many chunks"
            # Resumed, not restarted: at most the chunks in flight at the cut are re-sent.
            assert counting.chunk_bytes <= total + 4 * CHUNK, (counting.chunk_bytes, total)
            assert snap.rounds_completed == 1
            assert PendingStore(tmp_path / "client0" / "pending").entries() == []
        finally:
            holder.close()
        status = srv.wait_for(
            lambda st: bool(st["history"]), timeout=30, what="the round to complete"
        )
    [record] = status["history"]
    assert record["outcome"] == "completed"
    assert record["clientsReported"] == 1
    assert counting.adds == {record["roundId"]: 1}, "the update must be aggregated exactly once"


# ----------------------------------------------------------------- cuts at random intervals


def test_random_cuts_over_several_rounds_lose_and_double_count_nothing(
    tmp_path: Path,
    make_client: Callable[..., DistributedClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds = 4
    with running_server(
        tmp_path,
        min_clients=2,
        clients_per_round=3,
        rounds=rounds,
        round_timeout=45,
        retry_delay=0.1,
        epochs=25,
        model_params={"features": 8, "classes": 3, "hidden": 8, "samples": 3000},
    ) as srv:
        counting = _Counting(srv)
        with TcpProxy(srv.port) as proxy, caplog.at_level(logging.INFO):
            clients = [make_client(proxy.url) for _ in range(3)]
            for client in clients:
                client.start()
            # Warm-up: the first round starts every worker child (torch import) unhurried.
            srv.wait_for(
                lambda st: any(r["outcome"] == "completed" for r in st["history"]),
                timeout=90,
                what="the warm-up round",
            )
            proxy.chaos(random.Random(1234), 0.3, 1.5, max_cuts=200)
            try:
                status = srv.wait_for(
                    lambda st: sum(r["outcome"] == "completed" for r in st["history"]) >= rounds,
                    timeout=120,
                    what=f"{rounds} completed rounds under random cuts",
                )
            finally:
                proxy.calm()
            cuts = proxy.cuts
            # Let every client settle: connected, nothing pending or uploading.
            for i, client in enumerate(clients):
                client.wait_for(
                    lambda s: s.connection == "connected" and s.device_state == "idle", 60
                )
                _until(
                    lambda i=i: not PendingStore(tmp_path / f"client{i}" / "pending").entries(),
                    30,
                    "pending updates resolved",
                )
        assert cuts >= 2, "the chaos must actually have cut connections"
        assert all(c.running for c in clients), "no client session may end"
        history = status["history"]
        completed = [r for r in history if r["outcome"] == "completed"]
        assert len(completed) == rounds
        for record in history:
            # The aggregate counts each reporting device exactly once.
            assert counting.adds.get(record["roundId"], 0) == record["clientsReported"], record
            assert record["clientsReported"] <= record["clientsSelected"]
        server_counted = sum(counting.adds.values())
        client_counted = sum(c.snapshot().rounds_completed for c in clients)
        discarded = caplog.text.count(DISCARDED)
        # A client counts an update when the server acknowledges it (or says it is already
        # counted). The only gap allowed: an acknowledgement lost in a cut, after which the
        # round closed and the resend was answered round_closed (logged as discarded).
        assert client_counted <= server_counted <= client_counted + discarded, (
            client_counted,
            server_counted,
            discarded,
        )


# ------------------------------------------------------------------ server killed mid-upload


def test_server_killed_during_an_upload_and_restarted(
    tmp_path: Path,
    make_client: Callable[..., DistributedClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Rounds forever: the server stays up to be asked; only the first round is examined.
    args = ("--min-clients", "1", "--clients-per-round", "1")
    with server_process(tmp_path, *args) as first:
        port = first.port
        client = make_client(first.url)
        killed: list[str] = []

        def kill_when_uploading(snap: ClientSnapshot) -> None:
            # On the session thread: the upload cannot go on while this runs, so the
            # server dies after the update is on disk and before the server has it.
            if not killed and snap.device_state == "uploading" and snap.round_id:
                killed.append(snap.round_id)
                first.kill()

        client.subscribe(kill_when_uploading)
        with caplog.at_level(logging.INFO):
            client.start()
            client.wait_for(lambda s: bool(killed) and s.connection != "connected", 120)
            [lost_round] = killed
            [kept] = PendingStore(tmp_path / "client0" / "pending").entries()
            assert kept.round_id == lost_round, "the update must be kept on disk"
            assert client.snapshot().rounds_completed == 0
            with server_process(tmp_path, *args, "--port", str(port)) as second:
                client.wait_for(
                    lambda s: s.rounds_completed >= 1 and (s.weights_version or 0) >= 1, 120
                )
                status = second.wait_for(
                    lambda st: bool(st["history"]), timeout=60, what="the new round"
                )
                output = second.output()
    # The open round died with the server: its update was refused and discarded cleanly...
    assert f"round {lost_round} {DISCARDED}" in caplog.text
    assert PendingStore(tmp_path / "client0" / "pending").get(lost_round) is None
    # ...and the device trained again in the reopened round, counted exactly once.
    record = status["history"][0]
    assert record["outcome"] == "completed" and record["number"] == 1
    assert record["roundId"] != lost_round
    assert record["clientsReported"] == 1
    assert output.count(f"round {record['roundId']}: update from") == 1, output
    assert f"round {lost_round}: update from" not in output


# ------------------------------------------------------------- client killed mid-training

# The real CLI, with periodic checkpoints every 0.3 s instead of every 30 s (so the test
# need not train for half a minute before the kill).
VICTIM = """
import sys
from client import session
from client.cli import main

plain_init = session.DistributedClient.__init__


def init(self, *args, **kwargs):
    kwargs.setdefault("checkpoint_interval", 0.3)
    plain_init(self, *args, **kwargs)


session.DistributedClient.__init__ = init
sys.exit(main(sys.argv[1:]))
"""


def _client_cmd(url: str) -> list[str]:
    return [sys.executable, "-c", VICTIM, "--server", url, "--name", "victim"]


def _checkpoint_position(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        position: dict[str, Any] = json.loads((fh.metadata() or {})["fedtray.checkpoint"])[
            "position"
        ]
    return position


def test_client_process_killed_mid_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    params = {"features": 8, "classes": 3, "hidden": 8, "samples": 3000}
    env = subprocess_env(tmp_path)
    work = tmp_path / "xdg" / "xdg_data_home" / "fedtray" / "work"
    with running_server(
        tmp_path,
        min_clients=1,
        clients_per_round=1,
        rounds=1,
        epochs=30,
        model_params=params,
        round_timeout=60,
    ) as srv:
        proc = subprocess.Popen(
            _client_cmd(srv.url),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            srv.wait_for(
                lambda st: any((d.get("progress") or 0) > 0 for d in st["devices"]),
                timeout=90,
                what="the client training",
            )
            [device] = srv.status()["devices"]
            _until(lambda: bool(list(work.glob("*.ckpt"))), 30, "a periodic checkpoint")
            children = psutil.Process(proc.pid).children(recursive=True)
            assert children, "the worker child must exist while training"
            proc.kill()
            proc.wait(30)
            # The worker notices its parent's pipe closing and leaves (no orphan trains on).
            _gone, alive = psutil.wait_procs(children, timeout=20)
            assert not alive, f"orphaned worker processes: {alive}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        # Nothing writes it any more: this is where the restarted client must go on from.
        [checkpoint] = work.glob("*.ckpt")
        position = _checkpoint_position(checkpoint)
        assert position["epoch"] > 0 or position["pos"] > 0
        # The server either offers the same round again to the device that comes back, or
        # abandons it and retries the same work (partition, base) under a new round id;
        # the checkpoint is named by the work, so both resume it.
        restarted = subprocess.Popen(
            _client_cmd(srv.url),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            status = srv.wait_for(
                lambda st: any(r["outcome"] == "completed" for r in st["history"]),
                timeout=120,
                what="the round completed by the restarted client",
            )
        finally:
            restarted.terminate()
            out, _ = restarted.communicate(timeout=60)
    # Same identity after the restart (the settings file kept the device id).
    assert [d["id"] for d in status["devices"]] == [device["id"]]
    [completed] = [r for r in status["history"] if r["outcome"] == "completed"]
    assert completed["clientsReported"] == 1
    assert "update accepted" in out, out[-3000:]
    # It resumed from the checkpoint (not from zero), in the round it completed.
    resumed = re.findall(r"resuming round (\S+) from epoch (\d+) step (\d+)", out)
    step = -(-position["pos"] // position["batch_size"])
    assert resumed == [(completed["roundId"], str(position["epoch"] + 1), str(step))], out[-3000:]
    assert list(work.glob("*.ckpt")) == [], "a finished round leaves no checkpoint"
