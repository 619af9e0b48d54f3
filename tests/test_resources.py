"""Resource monitoring: snapshots on this machine, battery conversion, CPU arithmetic."""

from __future__ import annotations

import threading
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import psutil
import pytest

import client.resources
from client.protocol import BatteryStatus, ResourceSnapshot, parse
from client.resources import (
    SIMULATE_BATTERY_ENV,
    ResourceMonitor,
    battery_from_psutil,
    battery_present,
    cpu_busy_percent,
    parse_simulated_battery,
    read_battery,
)
from tests.waiting import scaled

# psutil's own shape (sbattery) for battery readings: no battery exists on the test
# machine, so made-up readings are the only way to exercise the conversion.
FakeBattery = namedtuple("FakeBattery", ["percent", "secsleft", "power_plugged"])
PercentOnly = namedtuple("PercentOnly", ["percent"])
PluggedOnly = namedtuple("PluggedOnly", ["power_plugged"])

# The real cpu_times() type of this platform, so the arithmetic sees real field names.
CpuTimes = type(psutil.cpu_times())


def cpu_times(**fields: float) -> Any:
    return CpuTimes(**{name: fields.get(name, 0.0) for name in CpuTimes._fields})


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    # A simulated battery in the developer's shell must not leak into these tests, and
    # each test starts with no remembered simulation values (so each logs afresh).
    monkeypatch.delenv(SIMULATE_BATTERY_ENV, raising=False)
    monkeypatch.setattr(client.resources, "_simulated", {})


# --- battery conversion ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),  # no battery: never "on battery"
        (FakeBattery(80, 3600, True), BatteryStatus(percent=80, plugged_in=True)),
        (FakeBattery(42.5, 1200, False), BatteryStatus(percent=42.5, plugged_in=False)),
        (FakeBattery(55, -2, None), BatteryStatus(percent=55, plugged_in=None)),  # unknown
        (FakeBattery(101, -2, True), BatteryStatus(percent=100, plugged_in=True)),
        (FakeBattery(-3, -1, False), BatteryStatus(percent=0, plugged_in=False)),
        (FakeBattery(50, 1, "yes"), BatteryStatus(percent=50, plugged_in=None)),
        (FakeBattery(50, 1, 1), BatteryStatus(percent=50, plugged_in=None)),
        (PercentOnly(70), BatteryStatus(percent=70, plugged_in=None)),
        (PluggedOnly(True), None),  # no percent attribute
        (object(), None),
        (FakeBattery(None, 1, True), None),
        (FakeBattery("80", 1, True), None),
        (FakeBattery(True, 1, True), None),
        (FakeBattery(float("nan"), 1, False), None),
        (FakeBattery(float("inf"), 1, False), None),
    ],
)
def test_battery_from_psutil(raw: object, expected: BatteryStatus | None) -> None:
    assert battery_from_psutil(raw) == expected


def test_sensors_battery_that_raises_means_no_battery(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> object:
        raise OSError("ACPI said no")

    monkeypatch.setattr(psutil, "sensors_battery", broken)
    assert read_battery() is None
    assert battery_present() is False
    assert ResourceMonitor().snapshot().battery is None


def test_missing_sensors_battery_means_no_battery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(psutil, "sensors_battery")
    assert read_battery() is None
    assert battery_present() is False


def test_read_battery_converts_psutil_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: FakeBattery(120, -2, None))
    assert read_battery() == BatteryStatus(percent=100, plugged_in=None)
    assert battery_present() is True


def test_battery_matches_this_machine() -> None:
    raw = psutil.sensors_battery()
    assert read_battery() == battery_from_psutil(raw)
    assert battery_present() is (raw is not None)


def test_injected_battery_source_reaches_snapshot() -> None:
    reading = BatteryStatus(percent=12, plugged_in=False)
    monitor = ResourceMonitor(battery_source=lambda: reading)
    assert monitor.snapshot().battery == reading
    assert battery_present(lambda: reading) is True
    assert battery_present(lambda: None) is False


# --- CPU arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (cpu_times(user=1, idle=1), cpu_times(user=1, idle=1), 0.0),  # no time elapsed
        (cpu_times(), cpu_times(user=1, idle=3), 25.0),
        (cpu_times(), cpu_times(user=2, system=2), 100.0),
        (cpu_times(), cpu_times(idle=5), 0.0),
        (cpu_times(user=5, idle=5), cpu_times(user=6, idle=6), 50.0),
        # a counter going backwards counts as no time, not negative time
        (cpu_times(user=5, idle=0), cpu_times(user=4, idle=2), 0.0),
    ],
)
def test_cpu_busy_percent(before: Any, after: Any, expected: float) -> None:
    assert cpu_busy_percent(before, after) == pytest.approx(expected)


def test_cpu_busy_percent_linux_fields() -> None:
    fields = set(CpuTimes._fields)
    if {"iowait", "guest"} <= fields:
        # iowait is idle time; guest time is already inside user
        after = cpu_times(user=4, guest=2, iowait=2, idle=2)
        assert cpu_busy_percent(cpu_times(), after) == pytest.approx(50.0)
    else:
        assert cpu_busy_percent(cpu_times(), cpu_times(user=1, idle=1)) == pytest.approx(50.0)


# --- snapshots on this machine -------------------------------------------------------------------


def test_snapshot_on_this_machine() -> None:
    snap = ResourceMonitor().snapshot()
    memory = psutil.virtual_memory()
    assert 0 <= snap.cpu_percent <= 100
    assert 0 < snap.ram_used_percent <= 100
    total_mb = memory.total // (1024 * 1024)
    assert 0 < snap.ram_available_mb <= total_mb
    # within 10 % of total RAM of what psutil says right now (other processes move it)
    assert abs(snap.ram_available_mb - memory.available // (1024 * 1024)) < total_mb / 10
    assert (snap.battery is None) is (psutil.sensors_battery() is None)
    wire = snap.to_wire()
    assert set(wire) == {"cpuPercent", "ramUsedPercent", "ramAvailableMb", "battery"}
    assert parse(ResourceSnapshot, wire) == snap


def _burn_cpu(seconds: float) -> None:
    """Keep one core busy for ``seconds`` of CPU time (not wall time)."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def test_first_snapshot_is_meaningful_from_another_thread() -> None:
    """Construction primes the CPU reading, even when snapshot() runs in another thread
    (psutil's own cpu_percent keeps its previous reading per thread)."""
    monitor = ResourceMonitor()
    _burn_cpu(0.3)
    result: list[ResourceSnapshot] = []
    worker = threading.Thread(target=lambda: result.append(monitor.snapshot()))
    worker.start()
    worker.join(timeout=scaled(30))
    assert not worker.is_alive()
    assert result[0].cpu_percent > 0


# --- simulated battery (FEDTRAY_SIMULATE_BATTERY) ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42,unplugged", BatteryStatus(percent=42, plugged_in=False)),
        ("80,plugged", BatteryStatus(percent=80, plugged_in=True)),
        ("55,unknown", BatteryStatus(percent=55, plugged_in=None)),
        (" 12.5 , Unplugged ", BatteryStatus(percent=12.5, plugged_in=False)),
        ("0,unplugged", BatteryStatus(percent=0, plugged_in=False)),
        ("100,PLUGGED", BatteryStatus(percent=100, plugged_in=True)),
        ("none", None),
        ("  None ", None),
    ],
)
def test_parse_simulated_battery(text: str, expected: BatteryStatus | None) -> None:
    assert parse_simulated_battery(text) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "is not understood"),
        ("42", "is not understood"),  # no plug state
        ("unplugged", "is not understood"),
        ("42,", "is not understood"),
        ("42,on battery", "is not understood"),
        ("42,true", "is not understood"),
        ("forty,unplugged", "is not understood"),
        ("42,unplugged,extra", "is not understood"),
        ("101,plugged", "0 to 100"),  # a typo is an error, never clamped to a full battery
        ("-1,unplugged", "0 to 100"),
        ("nan,unplugged", "0 to 100"),
        ("inf,plugged", "0 to 100"),
        ("null", "is not understood"),
    ],
)
def test_parse_simulated_battery_rejects(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        parse_simulated_battery(text)
    assert SIMULATE_BATTERY_ENV in str(info.value)
    assert '"none"' in str(info.value)  # says what would have been accepted


def test_simulated_battery_replaces_the_real_one_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: FakeBattery(90, 1, True))
    monkeypatch.setenv(SIMULATE_BATTERY_ENV, "10,unplugged")
    with caplog.at_level("WARNING", logger="client.resources"):
        readings = [read_battery() for _ in range(5)]
        snapshot = ResourceMonitor().snapshot()
    assert readings == [BatteryStatus(percent=10, plugged_in=False)] * 5
    assert snapshot.battery == BatteryStatus(percent=10, plugged_in=False)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, caplog.text
    assert "SIMULATED" in warnings[0].getMessage()
    assert "10,unplugged" in warnings[0].getMessage()


def test_simulating_no_battery_hides_a_real_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: FakeBattery(90, 1, False))
    monkeypatch.setenv(SIMULATE_BATTERY_ENV, "none")
    with caplog.at_level("WARNING", logger="client.resources"):
        assert read_battery() is None
        assert battery_present() is False
    assert "SIMULATED" in caplog.text and "no battery" in caplog.text


def test_a_bad_simulation_value_is_ignored_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: FakeBattery(77, 1, True))
    monkeypatch.setenv(SIMULATE_BATTERY_ENV, "10%,unplugged")
    with caplog.at_level("WARNING", logger="client.resources"):
        readings = [read_battery() for _ in range(3)]
    assert readings == [BatteryStatus(percent=77, plugged_in=True)] * 3  # the real one
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "'10%,unplugged' is not understood" in warnings[0]
    assert "reading the real battery" in warnings[0]
