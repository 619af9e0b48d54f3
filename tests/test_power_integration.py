"""Power-aware training end to end: the real server, a real session, a real worker.

The battery is the one stand-in (no battery exists on a test machine): a
:class:`FakeBattery` whose reading the test changes. Updates are captured on the server
by wrapping its FedAvg strategy's ``add`` (the decoded state dict the server received),
so "bit-identical" compares exactly what the server would aggregate.

The pure parts (:mod:`client.power_monitor`, :mod:`client.settings_watch`) are tested by
tables at the top.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.backoff import Backoff
from client.config import Settings, load_settings, save_settings
from client.power import PowerSettings
from client.power_monitor import PowerMonitor, power_settings, transition_words
from client.protocol import (
    EV_TRAINING_START,
    BatteryStatus,
    Partition,
    TrainingConfig,
    TrainingStart,
)
from client.session import DistributedClient, user_decision
from client.settings_watch import SettingsFileWatch, merge_live, parse_settings_bytes
from client.snapshot import ALLOW, ClientSnapshot, PauseDecision
from client.worker import DEFAULT_PROGRESS_INTERVAL
from server.strategies import Added
from tests.device_info import quick_device_info
from tests.server_harness import HolderDevice, ServerHandle, running_server
from tests.waiting import holds_for, scale_waits, scaled, wait_until

LOW = BatteryStatus(percent=20.0, plugged_in=False)
HIGH = BatteryStatus(percent=90.0, plugged_in=False)
POLL = 0.2
#: A round of several seconds with many batches, so pauses land mid-round.
LONG_PARAMS: dict[str, Any] = {"features": 8, "classes": 3, "hidden": 16, "samples": 3000}


# ------------------------------------------------------------------ pure parts (tables)


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        (ALLOW, ALLOW, None),
        (ALLOW, PauseDecision(False, "battery_low", "On battery at 20 %"), "battery_low"),
        (PauseDecision(False, "unplugged", "x"), ALLOW, "allowed again"),
        (
            PauseDecision(False, "battery_low", "On battery at 20 %"),
            PauseDecision(False, "battery_low", "On battery at 19 %"),
            "19 %",
        ),
    ],
)
def test_transition_words(old: PauseDecision, new: PauseDecision, words: str | None) -> None:
    text = transition_words(old, new)
    if words is None:
        assert text is None
    else:
        assert text is not None and words in text


@pytest.mark.parametrize(
    ("readings", "settings", "applied"),
    [
        ([None], PowerSettings(100, 5), []),  # no battery never pauses
        ([HIGH], PowerSettings(100, 5), ["unplugged"]),
        ([BatteryStatus(percent=90, plugged_in=True)], PowerSettings(100, 5), []),
        ([HIGH, LOW, HIGH], PowerSettings(50, 5), ["battery_low", "allowed"]),
        ([LOW, LOW, LOW], PowerSettings(50, 5), ["battery_low"]),  # only changes apply
        # hysteresis: 52 % after a low-battery pause stays paused (needs 55 %); the new
        # detail (52 %) is applied so the server shows the current charge
        (
            [LOW, BatteryStatus(percent=52, plugged_in=False)],
            PowerSettings(50, 5),
            ["battery_low", "battery_low"],
        ),
        (
            [LOW, BatteryStatus(percent=56, plugged_in=False)],
            PowerSettings(50, 5),
            ["battery_low", "allowed"],
        ),
    ],
)
def test_power_monitor_applies_changes_only(
    readings: list[BatteryStatus | None], settings: PowerSettings, applied: list[str]
) -> None:
    values = iter(readings)
    monitor = PowerMonitor(lambda: next(values), interval=1.0)
    got: list[PauseDecision] = []

    async def go() -> None:
        for _ in readings:
            await monitor.poll_once(lambda: settings, got.append)

    asyncio.run(go())
    assert [d.reason or "allowed" for d in got] == applied
    assert monitor.decision == (got[-1] if got else ALLOW)


def test_power_monitor_source_errors_count_as_no_battery() -> None:
    def broken() -> BatteryStatus | None:
        raise OSError("no ACPI")

    monitor = PowerMonitor(broken, interval=1.0)
    assert asyncio.run(monitor.read()) is None
    assert monitor.evaluate(PowerSettings(100, 5)) is None  # still ALLOW: nothing changed


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_power_monitor_rejects_bad_intervals(interval: float) -> None:
    with pytest.raises(ValueError, match="poll interval"):
        PowerMonitor(lambda: None, interval)


def test_power_settings_from_settings() -> None:
    s = Settings(battery_threshold=70, battery_hysteresis=10)
    assert power_settings(s) == PowerSettings(70, 10)


def test_merge_live_keeps_the_identity() -> None:
    current = Settings(device_name="a")
    other = Settings(device_name="b", paused=True, battery_threshold=80, autostart=True)
    merged = merge_live(current, other)
    assert merged.device_id == current.device_id  # never changes under a running session
    assert (merged.device_name, merged.paused, merged.battery_threshold) == ("b", True, 80)
    assert merged.autostart  # live: the tray's checkbox follows `fedtray autostart enable`
    assert merge_live(current, current) is current


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"paused = [", "TOML"),
        (b"\xff\xfe", "UTF-8"),
        (b"battery_threshold = 500", "battery_threshold"),
    ],
)
def test_parse_settings_bytes_refuses_bad_files(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_settings_bytes(raw)


def test_settings_file_watch_sees_changes_and_never_repairs(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    save_settings(Settings(), path)
    running = load_settings(path)
    watch = SettingsFileWatch(path)
    assert watch.poll(running) is None  # unchanged
    save_settings(running.model_copy(update={"paused": True}), path)
    seen = watch.poll(running)
    assert seen is not None and seen[0].paused is True and seen[1].ok
    assert watch.poll(running) is None
    path.write_bytes(b"this is = = not toml")
    damaged = watch.poll(running)
    assert damaged is not None
    assert damaged[0] == running  # nothing readable: everything stays as it runs
    assert damaged[1].file_problem is not None and "line 1" in damaged[1].file_problem
    assert path.read_bytes() == b"this is = = not toml"  # left alone, not moved aside
    path.unlink()
    assert watch.poll(running) is None


# ------------------------------------------------------------------ integration helpers


class FakeBattery:
    """A battery whose reading the test sets (thread-safe; read from the session's threads)."""

    def __init__(self, reading: BatteryStatus | None) -> None:
        self._lock = threading.Lock()
        self._reading = reading

    def set(self, reading: BatteryStatus | None) -> None:
        with self._lock:
            self._reading = reading

    def __call__(self) -> BatteryStatus | None:
        with self._lock:
            return self._reading


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., DistributedClient]]:
    made: list[DistributedClient] = []

    def make(url: str, **kwargs: Any) -> DistributedClient:
        settings = kwargs.pop("settings", None) or Settings(
            server_url=url,
            device_name=f"p{len(made)}",
            **{
                k: kwargs.pop(k)
                for k in ("paused", "device_id", "battery_threshold")
                if k in kwargs
            },
        )
        kwargs.setdefault("settings_file", None)
        kwargs.setdefault("power_poll_interval", POLL)
        client = DistributedClient(
            settings,
            device_info=quick_device_info(),
            data_dir=kwargs.pop("data_dir", tmp_path / f"client{len(made)}"),
            backoff=Backoff(base=0.1, cap=0.5),
            **kwargs,
        )
        made.append(client)
        return scale_waits(client)

    yield make
    for client in made:
        assert client.stop(scaled(30)), "the session did not stop in time"


def _device(status: dict[str, Any], device_id: str) -> dict[str, Any]:
    [found] = [d for d in status["devices"] if d["id"] == device_id]
    return found


def _checkpoints(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "work").glob("*.ckpt"))


def _capture_updates(server: ServerHandle) -> list[dict[str, np.ndarray]]:
    """Record every update the server accepts (decoded, as FedAvg receives it)."""
    got: list[dict[str, np.ndarray]] = []
    strategy = server.server.strategy
    original = strategy.add

    def spy(update: dict[str, np.ndarray], num_samples: int) -> Added:
        got.append({k: np.array(v, copy=True) for k, v in update.items()})
        return original(update, num_samples)

    strategy.add = spy  # type: ignore[method-assign]
    return got


def _assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name, value in a.items():
        assert value.dtype == b[name].dtype and value.shape == b[name].shape, name
        assert value.tobytes() == b[name].tobytes(), f"tensor {name} differs"


def _long_server(tmp: Path, **overrides: Any) -> Any:
    config: dict[str, Any] = {
        "min_clients": 1,
        "clients_per_round": 1,
        "rounds": 1,
        "epochs": 6,
        "batch_size": 2,  # thousands of batches: a round of seconds, pauses land mid-round
        "model_params": LONG_PARAMS,
        "round_timeout": 120,
        "heartbeat_interval": 0.3,
        **overrides,
    }
    return running_server(tmp, **config)


def _wait_training(client: DistributedClient, above: float = 0.0) -> ClientSnapshot:
    return client.wait_for(
        lambda s: s.device_state == "training" and above < s.progress.fraction < 0.9, 60
    )


# ------------------------------------------------------------------ integration tests


@pytest.mark.slow
def test_low_battery_pauses_within_the_bound_and_resumes(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    battery = FakeBattery(HIGH)
    with _long_server(tmp_path / "s") as server:
        client = make_client(server.url, battery_source=battery)
        data_dir = tmp_path / "client0"
        client.start()
        device_id = _wait_training(client).device_id
        assert _checkpoints(data_dir) == []
        t0 = time.monotonic()
        battery.set(LOW)
        status = server.wait_for(
            lambda st: _device(st, device_id)["state"] == "paused",
            timeout=5,
            what="the server seeing the pause",
        )
        server_latency = time.monotonic() - t0
        wait_until(lambda: bool(_checkpoints(data_dir)), 5, "the worker's checkpoint")
        checkpoint_latency = time.monotonic() - t0
        dev = _device(status, device_id)
        assert dev["pauseReason"] == "battery_low"
        assert "20 %" in dev["pauseDetail"] and "55 %" in dev["pauseDetail"]
        snap = client.wait_for(lambda s: s.device_state == "paused", 5)
        assert snap.pause_reason == "battery_low" and snap.round_id is not None
        # Bound: one poll interval + one batch (a batch here is milliseconds; the rest is
        # the heartbeat round trip and the checkpoint write).
        print(
            f"pause latency: server {server_latency:.3f} s, checkpoint {checkpoint_latency:.3f} s"
        )
        assert server_latency < POLL + scaled(2.5)
        assert checkpoint_latency < POLL + scaled(3.0)
        # While paused no training happens: progress stays where it stopped.
        frozen = client.snapshot().progress.fraction
        # A running worker reports progress every DEFAULT_PROGRESS_INTERVAL: two of them.
        holds_for(
            lambda: client.snapshot().progress.fraction == frozen,
            2 * DEFAULT_PROGRESS_INTERVAL,
            "the progress frozen",
        )
        t1 = time.monotonic()
        battery.set(HIGH)
        server.wait_for(
            lambda st: (
                _device(st, device_id)["state"] == "training"
                and _device(st, device_id)["pauseReason"] is None
            ),
            timeout=5,
            what="the server seeing training again",
        )
        print(f"resume latency: server {time.monotonic() - t1:.3f} s")
        client.wait_for(lambda s: s.rounds_completed == 1, 90)
        assert _checkpoints(data_dir) == [], "a finished round leaves no checkpoint"


@pytest.mark.slow
def test_paused_device_refuses_starts_and_is_never_selected(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    battery = FakeBattery(LOW)
    with running_server(tmp_path, min_clients=1, clients_per_round=1, rounds=1) as server:
        client = make_client(server.url, battery_source=battery)
        client.start()
        device_id = client.wait_for(lambda s: s.connection == "connected", 30).device_id
        status = server.wait_for(
            lambda st: st["devices"] and _device(st, device_id)["pauseReason"] == "battery_low",
            what="the pause in the status",
        )
        assert "20 %" in _device(status, device_id)["pauseDetail"]
        # A training:start sent over the server's own connection is refused with the
        # reason and the detail.
        record = server.server.registry.get(device_id)
        assert record is not None and record.sid is not None
        start = TrainingStart(
            round_id="probe-1",
            task="synthetic",
            model_params={},
            config=TrainingConfig(epochs=1, batch_size=8, learning_rate=0.1),
            partition=Partition(index=0, count=1, seed=0, scheme="iid"),
            base_version=0,
            deadline=time.time() + 60,
            weight_format="safetensors",
        )
        ack = server.run(
            server.server.sio.call(
                EV_TRAINING_START, start.to_wire(), to=record.sid, timeout=scaled(10)
            ),
            timeout=15,
        )
        assert ack["accepted"] is False
        assert ack["reason"] == "battery_low"
        assert "training resumes at 55 %" in ack["detail"]

        # The registration already says the device is paused: the server keeps waiting
        # over several heartbeats and starts nothing.
        def waiting(st: dict[str, Any]) -> bool:
            current = st["currentRound"]
            return (
                current is not None
                and current["phase"] == "waiting"
                and "paused: battery_low" in (current["waitingReason"] or "")
            )

        known = server.wait_for(waiting, what="the server waiting, the device paused")
        history = len(known["history"])

        def still_waiting() -> bool:
            status = server.status()
            return (
                waiting(status)
                and len(status["history"]) == history
                and client.snapshot().device_state == "paused"
            )

        holds_for(
            still_waiting,
            4 * server.config.heartbeat_interval,
            "the server waiting with no new round, the device paused",
            interval=0.1,
        )
        battery.set(HIGH)
        client.wait_for(lambda s: s.rounds_completed == 1, 60)


@pytest.mark.slow
def test_no_battery_never_pauses_and_threshold_100_needs_the_plug(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    battery = FakeBattery(None)
    with running_server(tmp_path, min_clients=1, clients_per_round=1, rounds=1) as server:
        client = make_client(server.url, battery_source=battery, battery_threshold=100)
        states: list[str] = []
        client.subscribe(lambda s: states.append(s.device_state))
        client.start()
        snap = client.wait_for(lambda s: s.rounds_completed == 1, 60)
        assert "paused" not in states
        battery.set(HIGH)  # 90 % but on battery, and only the plug counts
        status = server.wait_for(
            lambda st: _device(st, snap.device_id)["pauseReason"] == "unplugged",
            what="unplugged",
        )
        assert "plugged in" in _device(status, snap.device_id)["pauseDetail"]
        battery.set(BatteryStatus(percent=90.0, plugged_in=True))
        server.wait_for(lambda st: _device(st, snap.device_id)["state"] == "idle")


@pytest.mark.slow
def test_a_new_threshold_applies_at_once_without_waiting_for_a_poll(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    battery = FakeBattery(BatteryStatus(percent=40.0, plugged_in=False))
    with running_server(tmp_path, min_clients=5) as server:
        # An hour between readings: only the immediate re-decision can pause it.
        client = make_client(
            server.url, battery_source=battery, battery_threshold=30, power_poll_interval=3600
        )
        client.start()
        device_id = client.wait_for(lambda s: s.connection == "connected", 30).device_id
        server.wait_for(lambda st: _device(st, device_id)["state"] == "idle")
        t0 = time.monotonic()
        client.update_settings(battery_threshold=60)
        status = server.wait_for(
            lambda st: _device(st, device_id)["pauseReason"] == "battery_low", timeout=3
        )
        assert time.monotonic() - t0 < 3
        assert "65 %" in _device(status, device_id)["pauseDetail"]
        client.update_settings(battery_threshold=0)
        server.wait_for(lambda st: _device(st, device_id)["state"] == "idle", timeout=3)


def _run_round(
    tmp: Path,
    make_client: Callable[..., DistributedClient],
    pauses: int,
) -> dict[str, np.ndarray]:
    """One 1-client round, paused ``pauses`` times mid-round; the update the server got."""
    battery = FakeBattery(HIGH)
    with _long_server(tmp / "server") as server:
        updates = _capture_updates(server)
        data_dir = tmp / "client"
        client = make_client(server.url, battery_source=battery, data_dir=data_dir)
        client.start()
        last_mtime = 0
        fraction = 0.0
        for _ in range(pauses):
            fraction = _wait_training(client, above=fraction).progress.fraction
            battery.set(LOW)
            client.wait_for(lambda s: s.device_state == "paused", 10)

            def fresh_checkpoint(before: int = last_mtime) -> bool:
                found = _checkpoints(data_dir)
                return bool(found) and found[0].stat().st_mtime_ns != before

            wait_until(fresh_checkpoint, 10, "a new checkpoint")
            last_mtime = _checkpoints(data_dir)[0].stat().st_mtime_ns
            battery.set(HIGH)
            client.wait_for(lambda s: s.device_state == "training", 10)
        client.wait_for(lambda s: s.rounds_completed == 1, 120)
        assert len(updates) == 1
        return updates[0]


@pytest.mark.slow
def test_paused_rounds_give_bit_identical_updates(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    baseline = _run_round(tmp_path / "plain", make_client, pauses=0)
    _assert_identical(baseline, _run_round(tmp_path / "once", make_client, pauses=1))
    _assert_identical(baseline, _run_round(tmp_path / "thrice", make_client, pauses=3))


def _restart_round(
    tmp: Path, make_client: Callable[..., DistributedClient], restart: bool
) -> tuple[dict[str, np.ndarray], int]:
    """A 2-device round (a holder that never reports, and our client); with ``restart``
    our client is stopped mid-round and a new session with the same data dir is offered
    the same round again. Returns the update and our partition index."""
    with _long_server(
        tmp / "server", min_clients=2, clients_per_round=2, round_timeout=120
    ) as server:
        updates = _capture_updates(server)
        holder = HolderDevice(server.url)
        try:
            data_dir = tmp / "client"
            first = make_client(server.url, battery_source=FakeBattery(None), data_dir=data_dir)
            settings = first.settings
            first.start()
            device_id = settings.device_id
            stopped_at = _wait_training(first, above=0.2).progress.fraction
            rnd = server.server.round
            assert rnd is not None
            index = rnd.selected.index(device_id)
            if restart:
                assert first.stop(scaled(30))
                [checkpoint] = _checkpoints(data_dir)  # written, not deleted by stop()
                assert checkpoint.stat().st_size > 0
                assert updates == []
                second = make_client(
                    server.url,
                    settings=settings,
                    battery_source=FakeBattery(None),
                    data_dir=data_dir,
                )
                fractions: list[float] = []
                second.subscribe(lambda s: fractions.append(s.progress.fraction))
                second.start()
                second.wait_for(lambda s: s.connection == "connected", 30)
                server.wait_for(lambda st: _device(st, device_id)["connected"] is True)
                # The server offers the open round to the reconnecting device again.
                wait_until(lambda: bool(updates), 90, "the resumed round's update")
                started = [f for f in fractions if f > 0]
                assert started and started[0] >= stopped_at - 1e-9, (
                    "the restarted worker must resume from the checkpoint, not from zero"
                )
            else:
                wait_until(lambda: bool(updates), 90, "the update")
            assert _checkpoints(data_dir) == []
            return updates[0], index
        finally:
            holder.close()


@pytest.mark.slow
def test_stop_checkpoints_and_a_restarted_worker_gives_a_bit_identical_update(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    baseline, index = _restart_round(tmp_path / "plain", make_client, restart=False)
    resumed, resumed_index = _restart_round(tmp_path / "restart", make_client, restart=True)
    assert index == resumed_index, "both runs must train the same partition"
    _assert_identical(baseline, resumed)


@pytest.mark.slow
def test_deadline_while_paused_abandons_the_round_cleanly(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    battery = FakeBattery(HIGH)
    with _long_server(tmp_path / "s", epochs=100, round_timeout=4) as server:
        updates = _capture_updates(server)
        data_dir = tmp_path / "client0"
        client = make_client(server.url, battery_source=battery, data_dir=data_dir)
        client.start()
        _wait_training(client)
        battery.set(LOW)
        wait_until(lambda: bool(_checkpoints(data_dir)), 5, "the checkpoint")
        server.wait_for(
            lambda st: any(r["outcome"] == "abandoned" for r in st["history"]),
            timeout=15,
            what="the round abandoned at its deadline",
        )
        snap = client.wait_for(lambda s: s.round_id is None, 10)
        assert snap.device_state == "paused" and snap.pause_reason == "battery_low"
        wait_until(
            lambda: _checkpoints(data_dir) == [], 5, "the cancelled round's checkpoint removed"
        )
        assert updates == []
        pending = data_dir / "pending"
        assert not pending.exists() or list(pending.iterdir()) == [], "nothing to submit"


def _settings_file_client(
    make_client: Callable[..., DistributedClient], url: str, path: Path, **kwargs: Any
) -> DistributedClient:
    """A client that saves to, and watches, the settings file at ``path`` (no battery)."""
    return make_client(
        url,
        settings=load_settings(path),
        settings_file=path,
        battery_source=FakeBattery(None),
        **kwargs,
    )


@pytest.mark.slow
def test_user_pause_survives_a_restart(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    path = tmp_path / "settings.toml"
    with running_server(tmp_path, min_clients=5) as server:
        settings = Settings(server_url=server.url, device_name="u")
        save_settings(settings, path)
        client = _settings_file_client(make_client, server.url, path)
        client.start()
        client.wait_for(lambda s: s.connection == "connected", 30)
        client.pause()
        server.wait_for(lambda st: _device(st, settings.device_id)["pauseReason"] == "user_paused")
        wait_until(lambda: load_settings(path).paused, 5, "the pause saved")
        assert client.stop(scaled(30))
        again = _settings_file_client(make_client, server.url, path)
        assert again.snapshot().device_state == "paused"
        again.start()
        again.wait_for(lambda s: s.connection == "connected", 30)
        # The registration itself says the device is paused.
        server.wait_for(
            lambda st: (
                _device(st, settings.device_id)["connected"]
                and _device(st, settings.device_id)["pauseReason"] == "user_paused"
            )
        )
        # Resuming through the file (as `fedtray-client resume` does) reaches the session.
        save_settings(load_settings(path).model_copy(update={"paused": False}), path)
        server.wait_for(lambda st: _device(st, settings.device_id)["state"] == "idle", timeout=5)
        assert again.snapshot().pause_reason is None


@pytest.mark.slow
def test_pausing_keeps_what_another_process_just_wrote(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    path = tmp_path / "settings.toml"
    with running_server(tmp_path, min_clients=5) as server:
        settings = Settings(server_url=server.url, device_name="k")
        save_settings(settings, path)
        # With an hour between polls the session will not have read the change below.
        client = _settings_file_client(make_client, server.url, path, settings_poll_interval=3600.0)
        client.start()
        client.wait_for(lambda s: s.connection == "connected", 30)
        # `fedtray-client config set battery_threshold 80` from another terminal...
        save_settings(load_settings(path).model_copy(update={"battery_threshold": 80}), path)
        client.pause()  # ...then the tray's "Pause training" right after
        wait_until(lambda: load_settings(path).paused, 5, "the pause saved")
        assert load_settings(path).battery_threshold == 80


# ------------------------------------------------------------------ timed pause


def _cleared(path: Path) -> bool:
    settings = load_settings(path)
    return (settings.paused, settings.paused_until) == (False, None)


@pytest.mark.slow
def test_a_timed_pause_ends_by_itself_and_clears_the_file(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    path = tmp_path / "settings.toml"
    with running_server(tmp_path, min_clients=5) as server:
        settings = Settings(server_url=server.url, device_name="t")
        save_settings(settings, path)
        client = _settings_file_client(make_client, server.url, path)
        details: list[str] = []
        client.subscribe(lambda s: details.append(s.pause_detail))
        client.start()
        client.wait_for(lambda s: s.connection == "connected", 30)
        until = datetime.now(UTC) + timedelta(seconds=scaled(2))
        client.pause(until=until)
        expected = f"Paused by you until {until.astimezone():%H:%M}"
        status = server.wait_for(
            lambda st: _device(st, settings.device_id)["pauseReason"] == "user_paused",
            timeout=2,
            what="the timed pause reported",
        )
        assert _device(status, settings.device_id)["pauseDetail"] == expected
        wait_until(
            lambda: (load_settings(path).paused, load_settings(path).paused_until) == (True, until),
            1.5,
            "the timed pause saved",
        )
        # It ends by itself: the server sees the device idle again, the file is cleared.
        server.wait_for(
            lambda st: (
                _device(st, settings.device_id)["state"] == "idle"
                and _device(st, settings.device_id)["pauseReason"] is None
            ),
            timeout=5,
            what="the timed pause ended",
        )
        assert datetime.now(UTC) >= until
        wait_until(lambda: _cleared(path), 5, "paused and paused_until cleared in the file")
        assert expected in details and client.snapshot().pause_reason is None
        with pytest.raises(ValueError, match="timezone-aware"):
            client.pause(until=datetime.now() + timedelta(hours=1))  # naive: refused


@pytest.mark.slow
def test_a_timed_pause_survives_a_restart_within_its_window(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    path = tmp_path / "settings.toml"
    with running_server(tmp_path, min_clients=5) as server:
        settings = Settings(server_url=server.url, device_name="w")
        save_settings(settings, path)
        first = _settings_file_client(make_client, server.url, path)
        first.start()
        first.wait_for(lambda s: s.connection == "connected", 30)
        until = datetime.now(UTC) + timedelta(seconds=scaled(8))
        first.pause(until=until)
        wait_until(lambda: load_settings(path).paused_until == until, 5, "the deadline saved")
        assert first.stop(scaled(30))
        expected = f"Paused by you until {until.astimezone():%H:%M}"
        again = _settings_file_client(make_client, server.url, path)
        assert (again.snapshot().device_state, again.snapshot().pause_detail) == (
            "paused",
            expected,
        )
        again.start()
        # The registration itself says paused, with the deadline; then it ends on time.
        status = server.wait_for(
            lambda st: (
                _device(st, settings.device_id)["connected"]
                and _device(st, settings.device_id)["pauseReason"] == "user_paused"
            ),
            timeout=5,
            what="the restarted client registered paused",
        )
        assert datetime.now(UTC) < until, "too slow to prove the pause survived"
        assert _device(status, settings.device_id)["pauseDetail"] == expected
        server.wait_for(
            lambda st: _device(st, settings.device_id)["pauseReason"] is None,
            timeout=(until - datetime.now(UTC)).total_seconds() + 4,
            what="the timed pause ended after the restart",
        )
        assert datetime.now(UTC) >= until
        wait_until(lambda: _cleared(path), 5, "the file cleared")


@pytest.mark.slow
def test_a_restart_after_the_deadline_starts_unpaused_and_clears_it(
    tmp_path: Path, make_client: Callable[..., DistributedClient]
) -> None:
    path = tmp_path / "settings.toml"
    with running_server(tmp_path, min_clients=5) as server:
        past = datetime.now(UTC) - timedelta(minutes=5)
        settings = Settings(server_url=server.url, device_name="a", paused=True, paused_until=past)
        save_settings(settings, path)
        client = _settings_file_client(make_client, server.url, path)
        assert client.snapshot().device_state == "idle"
        assert client.snapshot().pause_reason is None
        client.start()
        wait_until(lambda: _cleared(path), 10, "the expired deadline cleared in the file")
        status = server.wait_for(
            lambda st: any(d["id"] == settings.device_id and d["connected"] for d in st["devices"]),
            timeout=30,
            what="the client registered",
        )
        device = _device(status, settings.device_id)
        assert (device["state"], device["pauseReason"]) == ("idle", None)


NOW = datetime(2026, 5, 4, 13, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("paused", "until", "allowed", "detail"),
    [
        (False, None, True, ""),
        (True, None, False, "Paused by you"),
        (True, NOW + timedelta(minutes=30), False, "until"),
        (True, NOW, True, ""),  # the deadline itself: over
        (True, NOW - timedelta(seconds=1), True, ""),
    ],
)
def test_user_decision(paused: bool, until: datetime | None, allowed: bool, detail: str) -> None:
    settings = Settings(paused=paused, paused_until=until)
    decision = user_decision(settings, NOW)
    assert decision.allowed is allowed
    assert decision.reason == (None if allowed else "user_paused")
    if detail == "until":
        assert until is not None
        assert decision.detail == f"Paused by you until {until.astimezone():%H:%M}"
    else:
        assert decision.detail == detail
