"""Interop: a Node.js device written only from ``docs/protocol.md`` trains against the real
server.

The client (``tests/interop/fedtray-node-client.mjs``, socket.io-client 4.x) registers with
``weightFormats: ["json"]``, heartbeats, receives ``weights:global`` (inline or as a blob),
"trains" by adding a fixed delta to every float, reports progress and submits (inline or as
a blob). It prints one JSON line per event; these tests check those lines and the server's
``/api/status``. Node and npm are required: the tests fail (never skip) without them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.server_harness import REPO_ROOT, running_server
from tests.waiting import scaled

INTEROP_DIR = REPO_ROOT / "tests" / "interop"
CLIENT = INTEROP_DIR / "fedtray-node-client.mjs"
ROUNDS = 2
DELTA = 0.01
NUM_SAMPLES = 100
#: The real HOME, read at import (before conftest points HOME at a temp dir), so npm can
#: reuse its cache.
_REAL_HOME = os.environ.get("HOME")

Event = dict[str, Any]


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is required for the Node interop test but is not on PATH"
    return path


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the client's dependencies installed (npm ci once)."""
    node_bin = _tool("node")
    if not (INTEROP_DIR / "node_modules" / "socket.io-client" / "package.json").exists():
        npm = _tool("npm")
        env = dict(os.environ)
        if _REAL_HOME:
            env["HOME"] = _REAL_HOME
        lock = (INTEROP_DIR / "package-lock.json").exists()
        cmd = [npm, "ci"] if lock else [npm, "install"]
        proc = subprocess.run(
            [*cmd, "--no-audit", "--no-fund"],
            cwd=INTEROP_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=scaled(300),
            check=False,
        )
        assert proc.returncode == 0, f"npm failed:\n{proc.stdout}\n{proc.stderr}"
    return node_bin


def run_client(node: str, url: str, *extra: str, timeout: float = 90.0) -> list[Event]:
    """Run the Node client to completion; its events, one per printed line."""
    proc = subprocess.run(
        [node, str(CLIENT), url, str(ROUNDS), "--timeout", str(timeout - 15), *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"node client exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    events: list[Event] = [json.loads(line) for line in proc.stdout.splitlines() if line]
    assert events and events[-1]["event"] in {"done", "disconnect"}, proc.stdout
    return events


def of(events: list[Event], name: str) -> list[Event]:
    return [e for e in events if e["event"] == name]


def f32(x: float) -> float:
    """Round to float32, as the server stores float32 tensors."""
    value: float = struct.unpack("<f", struct.pack("<f", x))[0]
    return value


def assert_close(actual: list[float], expected: list[float], what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert abs(a - e) <= 1e-6 * max(1.0, abs(e)), f"{what}[{i}]: {a} != {e}"


def check_session(events: list[Event], status: dict[str, Any], *, blobs: bool) -> None:
    """What every run must show, on the client's side and in /api/status."""
    assert of(events, "fatal") == []
    assert of(events, "weights:global_refused") == []
    assert of(events, "blob:chunk_refused") == []
    assert of(events, "heartbeat_refused") == []
    (register,) = of(events, "register_ack")
    assert register["ack"]["ok"] is True
    device_id = register["ack"]["deviceId"]
    assert of(events, "device:registered")[0]["payload"]["deviceId"] == device_id

    # Global models: the initial one, then one per round, all in the JSON format we asked for.
    globals_ = of(events, "weights:global")
    by_version = {g["version"]: g for g in globals_}
    assert sorted(by_version) == list(range(ROUNDS + 1)), [g["version"] for g in globals_]
    assert all(g["format"] == "json" for g in globals_)
    assert all(g["inline"] is (not blobs) for g in globals_)

    starts = [s for s in of(events, "training:start") if s["accepted"]]
    submits = of(events, "weights:submit")
    assert len(starts) == len(submits) == ROUNDS
    assert len(of(events, "training:progress")) >= ROUNDS
    for start, submit in zip(starts, submits, strict=True):
        assert start["weightFormat"] == "json"
        assert submit["roundId"] == start["roundId"]
        assert submit["ack"] == {"ok": True, "roundId": start["roundId"], "received": 1}
        assert submit["inline"] is (not blobs)
        base = by_version[start["baseVersion"]]["values"]
        sent = submit["values"]
        after = by_version[start["baseVersion"] + 1]
        assert after["roundId"] == start["roundId"]
        assert set(sent) == set(base) == set(after["values"])
        for name, tensor in base.items():
            assert sent[name]["dtype"] == tensor["dtype"] == "float32"
            assert sent[name]["shape"] == tensor["shape"]
            # The "training" added DELTA to every value (rounded to float32) ...
            expected = [f32(v + DELTA) for v in tensor["data"]]
            assert_close(sent[name]["data"], expected, f"update {name}")
            # ... and FedAvg of a single update is that update.
            assert_close(after["values"][name]["data"], sent[name]["data"], f"global {name}")

    if blobs:
        received = of(events, "blob:chunk")
        assert received and any(c["complete"] for c in received)
        assert len(of(events, "blob:sent")) == ROUNDS
    (done,) = of(events, "done")
    assert (done["rounds"], done["globalVersion"]) == (ROUNDS, ROUNDS)

    # The server's view.
    assert status["globalVersion"] == ROUNDS
    assert status["roundsTarget"] == ROUNDS
    history = status["history"]
    assert [r["outcome"] for r in history] == ["completed"] * ROUNDS
    assert [r["roundId"] for r in history] == [s["roundId"] for s in starts]
    assert all(r["clientsSelected"] == r["clientsReported"] == 1 for r in history)
    assert all(r["trainLoss"] == pytest.approx(0.5) for r in history)
    (device,) = [d for d in status["devices"] if d["id"] == device_id]
    assert device["name"] == "node-interop"
    assert device["clientVersion"] == "node-interop/0.0.0"
    assert device["roundsCompleted"] == ROUNDS
    assert device["weightsVersion"] == ROUNDS


def finished(status: dict[str, Any]) -> bool:
    return len(status["history"]) >= ROUNDS and status["currentRound"] is None


def test_node_client_inline_and_error_codes(tmp_path: Path, node: str) -> None:
    """Small documents travel inline; malformed payloads get the documented error codes."""
    with running_server(tmp_path, min_clients=1, rounds=ROUNDS) as srv:
        events = run_client(
            node,
            srv.url,
            "--probe-errors",
            "--delta",
            str(DELTA),
            "--num-samples",
            str(NUM_SAMPLES),
        )
        status = srv.wait_for(finished, timeout=15, what="both rounds to finish")
    check_session(events, status, blobs=False)

    probes = {p["probe"]: p.get("ack") for p in of(events, "probe")}

    def code(name: str) -> Any:
        ack = probes[name]
        assert ack is not None, f"probe {name} got no ack: {probes}"
        assert ack["ok"] is False, f"probe {name}: {ack}"
        assert isinstance(ack["message"], str) and ack["message"]
        return ack["code"]

    assert code("heartbeat_before_register") == "not_registered"
    assert code("blob_status_before_register") == "not_registered"
    assert code("register_protocol_2") == "unsupported_protocol"
    assert code("register_protocol_string") == "unsupported_protocol"
    # Wrong JSON types and out-of-range values are `bad_request` (no coercion).
    assert code("cpuPercent_string") == "bad_request"
    assert code("state_missing") == "bad_request"
    assert code("cpuPercent_out_of_range") == "bad_request"
    assert code("payload_not_object") == "bad_request"
    assert code("blob_data_base64_string") == "bad_request"
    assert code("blob_offset_gap") == "offset_gap"
    assert code("blob_chunk_too_large") == "chunk_too_large"
    assert code("submit_unknown_round") == "round_closed"
    # A chunk past the total is size_mismatch; a completing chunk that fails the checksum
    # is checksum_mismatch and the blob is dropped.
    assert code("blob_past_total") == "size_mismatch"
    assert code("blob_bad_checksum") == "checksum_mismatch"
    assert probes["blob_status_after_bad_checksum"] == {
        "ok": True,
        "received": 0,
        "complete": False,
    }
    # Unknown fields are ignored; an unknown blob is 0 bytes held.
    assert probes["unknown_field_ignored"] == {"ok": True}
    assert probes["blob_status_unknown"] == {"ok": True, "received": 0, "complete": False}
    # Bad input never cost the connection.
    assert len(of(events, "connect")) == 1
    assert [e["reason"] for e in of(events, "disconnect")] == ["io client disconnect"]


def test_node_client_blob_transfers(tmp_path: Path, node: str) -> None:
    """A small maxChunkBytes forces the blob sub-protocol in both directions."""
    with running_server(tmp_path, min_clients=1, rounds=ROUNDS) as srv:
        events = run_client(
            node,
            srv.url,
            "--chunk-bytes",
            "256",
            "--delta",
            str(DELTA),
            "--num-samples",
            str(NUM_SAMPLES),
        )
        status = srv.wait_for(finished, timeout=15, what="both rounds to finish")
    check_session(events, status, blobs=True)
    # The server sent each blob in order, in chunks within the maxChunkBytes we announced.
    chunks = of(events, "blob:chunk")
    for blob_id in {c["blobId"] for c in chunks}:
        mine = [c for c in chunks if c["blobId"] == blob_id]
        assert [c["offset"] for c in mine] == sorted(c["offset"] for c in mine)
        assert mine[0]["offset"] == 0 and mine[-1]["complete"]
        assert all(0 < c["received"] - c["offset"] <= 256 for c in mine)
