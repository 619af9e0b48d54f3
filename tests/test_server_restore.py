"""The open round across a server restart: restored under its id, or discarded with a reason.

An in-process server is stopped while a round is open (one update accepted, one device
still training), then a new server starts on the same state dir. What it finds in
``round.json`` decides: the same round goes on (its accepted update counted once), or the
saved round is discarded with a log line and a fresh round is opened. The ``kill -9``
version of this, with a real subprocess, is in ``tests/test_faults.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.protocol import events as ev
from client.weights import StateDict
from server.handlers import DeviceNamespace
from tests.server_harness import ScriptedDevice, run_devices, running_server
from tests.waiting import scaled

CONFIG: dict[str, Any] = {"min_clients": 2, "clients_per_round": 2, "round_timeout": 60}


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "xdg" / var.lower()))


def _filled(like: StateDict, value: float) -> StateDict:
    return {name: np.full_like(arr, value) for name, arr in like.items()}


def _stop_with_one_update_accepted(tmp_path: Path) -> tuple[str, StateDict]:
    """Round 1 open, a's update (all 1.0, 1 sample) accepted, b training; then stop."""
    with running_server(tmp_path, **CONFIG) as srv:
        a, b = ScriptedDevice(srv.url, name="a"), ScriptedDevice(srv.url, name="b")

        async def scenario() -> tuple[str, StateDict]:
            await a.join()
            await b.join()
            await a.until(lambda: bool(a.starts) and bool(b.starts), 20, "both started")
            round_id = str(a.starts[0]["roundId"])
            base = a.weights[0]
            ack = await a.submit(round_id, 0, _filled(base, 1.0), num_samples=1)
            assert ack["ok"] is True, ack
            await asyncio.to_thread(srv.stop)  # devices still connected: the round is open
            return round_id, base

        return run_devices(scenario())


def _round_file(tmp_path: Path) -> Path:
    return tmp_path / "server-state" / "round.json"


def test_a_restarted_server_goes_on_with_the_same_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    round_id, base = _stop_with_one_update_accepted(tmp_path)
    assert json.loads(_round_file(tmp_path).read_text())["roundId"] == round_id
    with caplog.at_level(logging.INFO), running_server(tmp_path, **CONFIG) as srv:
        assert f"restored round 1 ({round_id}) after a restart: 1 of 2 reported" in caplog.text
        b = ScriptedDevice(srv.url, name="b")
        b.device_id = _device_ids(tmp_path, round_id)[1]

        async def scenario() -> StateDict:
            await b.join(weights_version=0)
            await b.until(lambda: bool(b.starts), 20, "b offered its part again")
            assert b.starts[0]["roundId"] == round_id
            ack = await b.submit(round_id, 0, _filled(base, 4.0), num_samples=3)
            assert ack["ok"] is True and ack["received"] == 2, ack
            await b.until(lambda: 1 in b.weights, 20, "the new global version")
            return b.weights[1]

        new_global = run_devices(scenario())
        status = srv.wait_for(lambda st: bool(st["history"]), 20, "the round's record")
    for name, arr in new_global.items():
        np.testing.assert_allclose(arr, np.full_like(base[name], 3.25), rtol=1e-6)
    [record] = status["history"]
    assert (record["roundId"], record["clientsReported"]) == (round_id, 2)
    assert not _round_file(tmp_path).exists(), "a closed round leaves no round file"
    assert list((tmp_path / "server-state" / "round").iterdir()) == []


def test_a_device_back_but_not_yet_welcomed_keeps_the_restored_round_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A device is in the registry from its registration on, but gets its slot back only
    # when it is welcomed, after its device:registered is sent. The round loop is made to
    # look at the round in between (device:registered is held until the loop has run one
    # turn after the registration); the restored round must go on waiting, not be given
    # up for a device that is already back (test_restart_race saw that under load).
    round_id, base = _stop_with_one_update_accepted(tmp_path)
    original_emit = DeviceNamespace.emit
    looked: list[bool] = []

    async def emit_after_a_loop_turn(
        self: DeviceNamespace, event: str, *args: Any, **kw: Any
    ) -> Any:
        if event == ev.REGISTERED.name:
            changed = srv.server.coordinator._round_changed  # the loop clears it each turn
            changed.set()
            deadline = time.monotonic() + scaled(20)
            while changed.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            looked.append(not changed.is_set())
        return await original_emit(self, event, *args, **kw)

    monkeypatch.setattr(DeviceNamespace, "emit", emit_after_a_loop_turn)
    with caplog.at_level(logging.INFO), running_server(tmp_path, **CONFIG) as srv:
        b = ScriptedDevice(srv.url, name="b")
        b.device_id = _device_ids(tmp_path, round_id)[1]

        async def scenario() -> None:
            await b.join(weights_version=0)
            await b.until(lambda: bool(b.starts), 20, "b offered its part again")
            assert b.starts[0]["roundId"] == round_id
            ack = await b.submit(round_id, 0, _filled(base, 4.0), num_samples=3)
            assert ack["ok"] is True and ack["received"] == 2, ack

        run_devices(scenario())
        status = srv.wait_for(lambda st: bool(st["history"]), 20, "the round's record")
    assert looked == [True], "the round loop did not run between registration and welcome"
    [record] = status["history"]
    assert (record["roundId"], record["outcome"]) == (round_id, "completed")
    assert "abandoned" not in caplog.text


def _device_ids(tmp_path: Path, round_id: str) -> list[str]:
    """The saved slots' device ids: the reported one first."""
    doc = json.loads(_round_file(tmp_path).read_text())
    assert doc["roundId"] == round_id
    slots: dict[str, Any] = doc["slots"]
    return sorted(slots, key=lambda d: not slots[d]["reported"])


def _set(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.update(fields)


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_set(deadlineUnix=time.time() - 1), "its deadline has passed"),
        (_set(baseVersion=3), "but the saved global is version 0"),
        (_set(task="digits"), "it trains task digits"),
        (_set(slots="nope"), "cannot read"),
    ],
)
def test_a_saved_round_that_cannot_go_on_is_discarded_with_the_reason(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    spoil: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    _stop_with_one_update_accepted(tmp_path)
    path = _round_file(tmp_path)
    doc = json.loads(path.read_text())
    spoil(doc)
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.INFO), running_server(tmp_path, **CONFIG) as srv:
        assert srv.server.round is None  # no device yet: nothing restored, nothing opened
        assert not path.exists()
        assert list((tmp_path / "server-state" / "round").iterdir()) == []
    assert "discarding the saved open round" in caplog.text
    assert reason in caplog.text
    assert "restored round" not in caplog.text
