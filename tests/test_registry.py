"""Every device-state transition of the registry (server/registry.py), by table, no sockets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from server_harness import register_payload

from client.protocol import DeviceRegister, GpuInfo, Heartbeat, parse
from server.registry import DeviceRecord, Registry

DEV = "00000000-0000-4000-8000-000000000001"
OTHER = "00000000-0000-4000-8000-000000000002"


def registry_with(state: str = "idle", **register: Any) -> Registry:
    """A registry holding DEV, connected as sid ``s1``, in ``state``."""
    registry = Registry(stale_after=3.0)
    payload = register_payload(DEV, "dev", weights_version=register.pop("weights_version", None))
    payload.update(register)
    registry.register(parse(DeviceRegister, payload), "s1", now=1.0)
    if state == "paused":
        registry.heartbeat(
            DEV,
            parse(
                Heartbeat,
                {
                    "state": "paused",
                    "pauseReason": "battery_low",
                    "pauseDetail": "12 %",
                    "resources": register_payload(DEV)["resources"],
                },
            ),
            now=1.5,
        )
    elif state == "training":
        registry.training_started(DEV)
    return registry


def record(registry: Registry) -> DeviceRecord:
    found = registry.get(DEV)
    assert found is not None
    return found


Transition = Callable[[Registry], object]

# (name, state before, the transition, the fields expected after)
CASES: list[tuple[str, str, Transition, dict[str, Any]]] = [
    ("training_started from idle", "idle", lambda r: r.training_started(DEV),
     {"state": "training", "pause_reason": None, "pause_detail": None}),
    ("training_started clears a pause", "paused", lambda r: r.training_started(DEV),
     {"state": "training", "pause_reason": None, "pause_detail": None}),
    ("refused_paused", "idle", lambda r: r.refused_paused(DEV, "user_paused", "until 3 pm"),
     {"state": "paused", "pause_reason": "user_paused", "pause_detail": "until 3 pm"}),
    ("refused_round says why", "idle",
     lambda r: r.refused_round(DEV, "no_local_data", "no data folder is set for task 't'"),
     {"state": "idle", "refusal": "no_local_data: no data folder is set for task 't'"}),
    ("training_started clears a refusal", "idle",
     lambda r: (r.refused_round(DEV, "missing_package", None), r.training_started(DEV)),
     {"state": "training", "refusal": None}),
    ("training_failed", "training", lambda r: r.training_failed(DEV),
     {"state": "idle"}),
    ("update_accepted", "training", lambda r: r.update_accepted(DEV),
     {"state": "idle", "progress": None}),
    ("holds_version", "idle", lambda r: r.holds_version(DEV, 7),
     {"weights_version": 7, "state": "idle"}),
    ("rounds_counted twice", "idle", lambda r: (r.rounds_counted([DEV]), r.rounds_counted([DEV])),
     {"rounds_completed": 2}),
    ("rounds_counted ignores unknown ids", "idle", lambda r: r.rounds_counted([OTHER, DEV]),
     {"rounds_completed": 1}),
    ("touch", "idle", lambda r: r.touch(DEV, 9.0),
     {"last_seen": 9.0}),
    ("disconnect", "training", lambda r: r.disconnect("s1"),
     {"sid": None, "progress": None, "connected": False}),
    ("disconnect of an old sid changes nothing", "idle", lambda r: r.disconnect("s0"),
     {"sid": "s1", "connected": True}),
    ("register again keeps a pause", "paused",
     lambda r: r.register(parse(DeviceRegister, {
         **register_payload(DEV, "renamed", weights_version=3),
         "state": "paused", "pauseReason": "unplugged"}), "s2", 5.0),
     {"state": "paused", "pause_reason": "unplugged", "sid": "s2", "name": "renamed",
      "weights_version": 3, "last_seen": 5.0}),
    ("register again drops training", "training",
     lambda r: r.register(parse(DeviceRegister, register_payload(DEV, "dev")), "s2", 5.0),
     {"state": "idle", "pause_reason": None, "progress": None, "sid": "s2"}),
]  # fmt: skip


@pytest.mark.parametrize(("before", "transition", "after"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_transition(before: str, transition: Transition, after: dict[str, Any]) -> None:
    registry = registry_with(before)
    transition(registry)
    rec = record(registry)
    assert {field: getattr(rec, field) for field in after} == after


@pytest.mark.parametrize(
    "transition",
    [
        lambda r: r.training_started(OTHER),
        lambda r: r.refused_paused(OTHER, "battery_low", None),
        lambda r: r.refused_round(OTHER, "busy", None),
        lambda r: r.training_failed(OTHER),
        lambda r: r.update_accepted(OTHER),
        lambda r: r.holds_version(OTHER, 1),
    ],
)
def test_a_transition_for_an_unknown_device_does_nothing(transition: Transition) -> None:
    registry = registry_with("idle")
    before = [vars(r).copy() for r in registry.all()]
    transition(registry)
    assert [vars(r) for r in registry.all()] == before
    assert registry.get(OTHER) is None


def test_refused_paused_makes_a_device_ineligible_until_a_heartbeat_says_idle() -> None:
    registry = registry_with("idle")
    registry.refused_paused(DEV, "battery_low", "On battery at 9 %")
    assert registry.eligible("synthetic", 1.0) == []
    assert registry.ineligibility(record(registry), "synthetic", 1.0) == "paused: battery_low"
    hb = parse(Heartbeat, {"state": "idle", "resources": register_payload(DEV)["resources"]})
    registry.heartbeat(DEV, hb, 2.0)
    assert [r.device_id for r in registry.eligible("synthetic", 2.0)] == [DEV]


def test_name_of() -> None:
    registry = registry_with("idle")
    assert registry.name_of(DEV) == "dev"
    assert registry.name_of(OTHER) == OTHER


def test_hardware_reported_replaces_the_registered_hardware_idempotently() -> None:
    registry = registry_with("training")
    hardware = parse(DeviceRegister, register_payload(DEV)).hardware
    assert registry.hardware_reported(DEV, hardware) is False  # the same: nothing changes
    h200 = hardware.model_copy(update={"gpu": GpuInfo(kind="cuda", name="H200", memory_mb=9)})
    assert registry.hardware_reported(DEV, h200) is True
    record = registry.get(DEV)
    assert record is not None and record.hardware.gpu == h200.gpu
    assert record.state == "training"  # an update, not a new registration
    assert registry.hardware_reported(DEV, h200) is False
    assert registry.hardware_reported(OTHER, h200) is False  # unknown device: nothing
