"""Fault injection against the REAL processes: no update is lost or double-counted.

Each test runs the real reference server (in a thread, or as a ``python -m server``
subprocess when it must be killed with SIGKILL), real :class:`client.session.
DistributedClient` sessions (or a ``python -m client`` subprocess) whose worker trains in
a real child process, and cuts the TCP links with :class:`tests.tcpproxy.TcpProxy`.
Nothing is mocked; the server's aggregation strategy and blob store are only *wrapped* to
count what reached them. Every wait is on a condition with a timeout.

What the server promises across its own ``kill -9`` (``server/store.py``,
``server/roundstore.py``): the global weights and round history of the last completed
version, the open round (its id, selection and every update it acknowledged) and the
partial uploads it holds all survive. Restarted on the same state dir, it restores the
round under the SAME id, a client resumes its upload from the server's offset, and the
round's aggregate counts each update exactly once -- including those acknowledged before
the kill.

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

import json
import logging
import random
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
from client.config import Settings
from client.pending import PendingStore
from client.protocol import BlobChunk, BlobProgress, Limits
from client.session import DistributedClient
from client.snapshot import ClientSnapshot
from client.weights import StateDict
from server.strategies import Added
from tests.device_info import quick_device_info
from tests.server_harness import (
    REPO_ROOT,
    HolderDevice,
    ProcessHandle,
    ScriptedDevice,
    ServerHandle,
    run_devices,
    running_server,
    server_process,
    subprocess_env,
)
from tests.tcpproxy import TcpProxy
from tests.waiting import scale_waits, scaled, wait_until

pytestmark = pytest.mark.slow

DISCARDED = "closed before the update arrived; discarded it"


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
            device_info=quick_device_info(),
            data_dir=kwargs.pop("data_dir", tmp_path / f"client{len(made)}"),
            backoff=Backoff(base=0.05, cap=0.3),
            settings_file=None,
            **kwargs,
        )
        made.append(client)
        return scale_waits(client)

    yield make
    for client in made:
        assert client.stop(scaled(30)), "the session did not stop in time"


class _Counting:
    """Wraps the live server's strategy and blob store to count what reached them."""

    def __init__(self, srv: ServerHandle) -> None:
        self.server = srv.server
        self.adds: dict[str, int] = {}
        self.chunk_bytes = 0
        self._lock = threading.Lock()
        strategy_add = self.server.strategy.add
        accept_chunk = self.server.blobs.accept_chunk

        def add(state: StateDict, num_samples: int) -> Added:
            rnd = self.server.round  # set, and stable under the server's aggregation lock
            assert rnd is not None
            with self._lock:
                self.adds[rnd.round_id] = self.adds.get(rnd.round_id, 0) + 1
            return strategy_add(state, num_samples)

        def counted_chunk(peer: str, chunk: BlobChunk, now: float) -> BlobProgress:
            self.chunk_bytes += len(chunk.data)
            return accept_chunk(peer, chunk, now)

        self.server.strategy.add = add  # type: ignore[method-assign]
        self.server.blobs.accept_chunk = counted_chunk  # type: ignore[method-assign]


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
        holder = HolderDevice(srv.url)
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


def test_a_device_cut_mid_training_accepts_the_same_round_offered_again(
    tmp_path: Path,
    make_client: Callable[..., DistributedClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A holder keeps the round open while the device is away, so it is offered again.
    with running_server(
        tmp_path,
        min_clients=2,
        clients_per_round=2,
        rounds=1,
        round_timeout=90,
        epochs=60,
        model_params={"features": 8, "classes": 3, "hidden": 8, "samples": 3000},
    ) as srv:
        holder = HolderDevice(srv.url)
        try:
            with TcpProxy(srv.port) as proxy, caplog.at_level(logging.INFO):
                client = make_client(proxy.url)
                client.start()
                snap = client.wait_for(lambda s: s.device_state == "training", 60)
                round_id = snap.round_id
                assert round_id is not None
                assert proxy.cut() >= 1
                client.wait_for(lambda s: s.rounds_completed == 1, 90)
        finally:
            holder.close()
        status = srv.wait_for(lambda st: bool(st["history"]), 30, "the round to close")
    # Accepted again (still training it, or sending the finished update), never refused
    # busy: a refusal would have freed its slot and lost the update as not_selected.
    assert f"round {round_id} offered again" in caplog.text
    assert "not_selected" not in caplog.text
    [record] = status["history"]
    assert (record["roundId"], record["outcome"], record["clientsReported"]) == (
        round_id,
        "completed",
        1,
    )


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
        # Rounds long enough (a few seconds each) for the chaos to cut them several times.
        epochs=150,
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
                wait_until(
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

# The real server CLI with 1 KiB chunks, one in flight: the synthetic model's ~10 KB update
# takes about ten chunks, so the upload can be caught halfway.
SMALL_CHUNKS = """
import dataclasses
import sys
from client.protocol import Limits
from server import app
from server.cli import main

plain_init = app.FedServer.__init__


def init(self, config, **kwargs):
    limits = Limits(max_chunk_bytes=1024, max_inflight_chunks=1)
    plain_init(self, dataclasses.replace(config, limits=limits), **kwargs)


app.FedServer.__init__ = init
sys.exit(main(sys.argv[1:]))
"""


def _partial_blobs(state_dir: Path) -> list[int]:
    return [part.stat().st_size for part in (state_dir / "blobs").glob("*/*.part")]


def test_server_killed_during_an_upload_resumes_it_in_the_same_round(
    tmp_path: Path,
    make_client: Callable[..., DistributedClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Rounds forever: the server stays up to be asked; only the first round is examined.
    args = ("--min-clients", "1", "--clients-per-round", "1", "--round-timeout", "60")
    state_dir = tmp_path / "server-state"
    with server_process(tmp_path, *args, code=SMALL_CHUNKS) as first:
        port = first.port
        client = make_client(first.url)
        killed: list[tuple[str, float]] = []

        def kill_mid_upload(snap: ClientSnapshot) -> None:
            # On the session thread: the upload cannot go on while this runs, so the
            # server dies holding part of the update (each acked chunk is on its disk).
            fraction = snap.upload_fraction
            if not killed and snap.round_id and fraction is not None and 0.2 < fraction < 0.7:
                killed.append((snap.round_id, fraction))
                first.kill()

        client.subscribe(kill_mid_upload)
        with caplog.at_level(logging.INFO):
            client.start()
            client.wait_for(lambda s: bool(killed) and s.connection != "connected", 120)
            [(round_id, _fraction)] = killed
            [kept] = PendingStore(tmp_path / "client0" / "pending").entries()
            assert kept.round_id == round_id
            [held] = _partial_blobs(state_dir)
            assert 0 < held < kept.size, "the server must die holding part of the upload"
            assert (state_dir / "round.json").is_file()
            with server_process(tmp_path, *args, "--port", str(port), code=SMALL_CHUNKS) as second:
                client.wait_for(lambda s: s.rounds_completed >= 1, 60)
                status = second.wait_for(
                    lambda st: bool(st["history"]), timeout=60, what="the restored round"
                )
                output = second.output()
    # Resumed from the server's offset, not from zero...
    match = re.search(
        rf"resuming the upload of round {re.escape(round_id)} at byte (\d+) of (\d+)",
        caplog.text,
    )
    assert match is not None, "the upload restarted instead of resuming"
    assert (int(match.group(1)), int(match.group(2))) == (held, kept.size)
    assert DISCARDED not in caplog.text
    # Offered its part of the restored round again, it sends the update instead of
    # refusing (busy) or training again.
    assert f"round {round_id} offered again; its update is trained, sending it" in caplog.text
    assert f"round {round_id}: training" not in caplog.text.split("offered again", 1)[1]
    assert PendingStore(tmp_path / "client0" / "pending").get(round_id) is None
    # ...in the same round, restored under its id, which counted the update exactly once.
    assert f"restored round 1 ({round_id})" in output, output
    record = status["history"][0]
    assert record["outcome"] == "completed" and record["number"] == 1
    assert record["roundId"] == round_id
    assert record["clientsReported"] == 1
    assert output.count(f"round {round_id}: update from") == 1, output
    assert not (state_dir / "round.json").exists() or round_id not in (
        state_dir / "round.json"
    ).read_text(encoding="utf-8")


def _filled(like: StateDict, value: float) -> StateDict:
    return {name: np.full_like(arr, value) for name, arr in like.items()}


def test_an_update_accepted_before_a_server_kill_still_counts_after_the_restart(
    tmp_path: Path,
) -> None:
    args = ("--min-clients", "2", "--clients-per-round", "2", "--round-timeout", "60")
    a = ScriptedDevice("", name="a")
    b = ScriptedDevice("", name="b")

    async def first_half(server: ProcessHandle) -> tuple[str, StateDict]:
        for device in (a, b):
            device.url = server.url
            await device.join()
        await a.until(lambda: bool(a.starts) and bool(b.starts), 30, "both devices started")
        start = a.starts[0]
        base = a.weights[0]
        ack = await a.submit(start["roundId"], 0, _filled(base, 1.0), num_samples=1)
        assert ack["ok"] is True and ack["received"] == 1, ack
        # Killed while both are connected: b's slot is never freed by a disconnect, so the
        # round (1 report needed) cannot complete before the kill.
        server.kill()
        return str(start["roundId"]), base

    async def second_half(url: str, round_id: str, base: StateDict) -> dict[str, Any]:
        for device in (a, b):
            await device.disconnect()  # the old connections died with the server
            device.url = url
            await device.join(weights_version=0)
        await b.until(lambda: len(b.starts) == 2, 30, "b offered its part again")
        assert b.starts[1]["roundId"] == round_id
        again = await a.submit(round_id, 0, _filled(base, 1.0), num_samples=1)
        assert again["ok"] is False and again["code"] == "duplicate", again
        ack = await b.submit(round_id, 0, _filled(base, 4.0), num_samples=3)
        assert ack["ok"] is True and ack["received"] == 2, ack
        await b.until(lambda: 1 in b.weights, 30, "the new global version")
        return b.weights[1]

    with server_process(tmp_path, *args) as first:
        port = first.port
        round_id, base = run_devices(first_half(first))
    with server_process(tmp_path, *args, "--port", str(port)) as second:
        new_global = run_devices(second_half(second.url, round_id, base))
        status = second.wait_for(lambda st: bool(st["history"]), 30, "the round's record")
        output = second.output()
    # FedAvg of a (1.0 on 1 sample) and b (4.0 on 3 samples): a counted once, after the kill.
    for name, arr in new_global.items():
        np.testing.assert_allclose(arr, np.full_like(base[name], 3.25), rtol=1e-6)
    [record] = [r for r in status["history"] if r["number"] == 1]
    assert record["roundId"] == round_id and record["outcome"] == "completed"
    assert record["clientsReported"] == 2
    assert f"restored round 1 ({round_id}) after a restart: 1 of 2 reported" in output, output


# ------------------------------------------------------------- client killed mid-training

# The real CLI, with periodic checkpoints every 0.3 s instead of every 30 s (so the test
# need not train for half a minute before the kill).
VICTIM = """
import sys
from client import session
from client.cli import main
from server.strategies import Added

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
        # Seconds of training even on a fast, quiet machine (60 epochs once ended within
        # the first progress report): the kill must find it training, past a checkpoint.
        epochs=400,
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
            wait_until(lambda: bool(list(work.glob("*.ckpt"))), 30, "a periodic checkpoint")
            children = psutil.Process(proc.pid).children(recursive=True)
            assert children, "the worker child must exist while training"
            proc.kill()
            proc.wait(scaled(30))
            # The worker notices its parent's pipe closing and leaves (no orphan trains on).
            _gone, alive = psutil.wait_procs(children, timeout=scaled(20))
            assert not alive, f"orphaned worker processes: {alive}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(scaled(30))
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
            out, _ = restarted.communicate(timeout=scaled(60))
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
