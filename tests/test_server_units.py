"""Pure server logic by tables: config checks, tokens, registry, round machine, store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_harness import register_payload, resources

from client.errors import FedtrayError
from client.protocol import DeviceRegister, Heartbeat, OkAck, TrainingCancel, events, parse
from client.weights import layout_of
from server.auth import TokenChecker, parse_tokens
from server.config import ConfigError, ServerConfig
from server.handlers import DeviceNamespace, event_handlers, handles
from server.registry import Registry
from server.rounds import Round, select_devices
from server.status import RoundRecord
from server.store import Store, StoreError

# --- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"port": 70000}, "--port"),
        ({"rounds": -1}, "--rounds"),
        ({"min_clients": 0}, "--min-clients"),
        ({"min_clients": 5, "clients_per_round": 3}, "--clients-per-round"),
        ({"round_timeout": 0}, "--round-timeout"),
        ({"round_timeout": float("nan")}, "--round-timeout"),
        ({"min_completion": 0}, "--min-completion"),
        ({"min_completion": 1.5}, "--min-completion"),
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": 0}, "--lr"),
        ({"partition": "random"}, "--partition"),
        ({"heartbeat_interval": -1}, "--heartbeat-interval"),
        ({"tokens": ("ok", " ")}, "--token"),
        ({"task": ""}, "--task"),
    ],
)
def test_bad_config_names_the_flag(tmp_path: Path, overrides: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ServerConfig(state_dir=tmp_path, **overrides)


@pytest.mark.parametrize(
    ("fraction", "selected", "needed"),
    [(0.5, 4, 2), (0.5, 3, 2), (0.5, 1, 1), (0.1, 3, 1), (1.0, 5, 5), (0.3, 10, 3)],
)
def test_required_reports(fraction: float, selected: int, needed: int, tmp_path: Path) -> None:
    cfg = ServerConfig(state_dir=tmp_path, min_completion=fraction)
    assert cfg.required_reports(selected) == needed


def test_tokens_are_not_in_repr(tmp_path: Path) -> None:
    cfg = ServerConfig(state_dir=tmp_path, tokens=("hunter2",))
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in repr(TokenChecker(cfg.tokens))


# --- auth -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "auth", "ok"),
    [
        ((), None, True),
        ((), {"token": "x"}, True),
        (("a1",), None, False),
        (("a1",), {"token": "a1"}, True),
        (("a1", "b2"), {"token": "b2"}, True),
        (("a1",), {"token": "a1 "}, False),
        (("a1",), {"token": ""}, False),
        (("a1",), {"token": 5}, False),
        (("a1",), "a1", False),
        (("a1",), {"token": "é"}, False),
    ],
)
def test_token_checker(tokens: tuple[str, ...], auth: object, ok: bool) -> None:
    assert TokenChecker(tokens).check(auth) is ok


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("a\nb\n", ["a", "b"]),
        ("# comment\n\n  a  # trailing\n", ["a"]),
        ("", []),
    ],
)
def test_parse_tokens(text: str, tokens: list[str]) -> None:
    assert parse_tokens(text) == tokens


# --- registry -------------------------------------------------------------------------

DEV1 = "00000000-0000-4000-8000-000000000001"
DEV2 = "00000000-0000-4000-8000-000000000002"


def _reg(device_id: str, tasks: tuple[str, ...] = ("digits",)) -> DeviceRegister:
    return parse(DeviceRegister, register_payload(device_id, tasks=tasks))


def _hb(state: str, reason: str | None = None) -> Heartbeat:
    return parse(Heartbeat, {"state": state, "pauseReason": reason, "resources": resources()})


@pytest.mark.parametrize(
    ("setup", "now", "expected"),
    [
        ("fresh", 1.0, None),
        ("paused", 1.0, "paused: battery_low"),
        ("fresh", 40.0, "stale"),  # 3 x 10 s without news
        ("disconnected", 1.0, "disconnected"),
        ("no-task", 1.0, "missing task digits"),
    ],
)
def test_registry_eligibility(setup: str, now: float, expected: str | None) -> None:
    reg = Registry(stale_after=30.0)
    record, _ = reg.register(
        _reg(DEV1, ("synthetic",) if setup == "no-task" else ("digits",)), "sid1", 0.0
    )
    if setup == "paused":
        reg.heartbeat(DEV1, _hb("paused", "battery_low"), 0.5)
    if setup == "disconnected":
        reg.disconnect("sid1")
    assert reg.ineligibility(record, "digits", now) == expected
    assert (record in reg.eligible("digits", now)) is (expected is None)


def test_registry_reconnect_replaces_sid_and_keeps_one_entry() -> None:
    reg = Registry(stale_after=30.0)
    reg.register(_reg(DEV1), "old", 0.0)
    record, replaced = reg.register(_reg(DEV1), "new", 1.0)
    assert replaced == "old" and record.sid == "new" and len(reg.all()) == 1
    assert reg.disconnect("old") is None  # the stale connection's goodbye changes nothing
    assert record.connected and reg.by_sid("new") is record


def test_waiting_summary_counts_reasons() -> None:
    reg = Registry(stale_after=30.0)
    assert reg.waiting_summary("digits", 0.0, 2) == "0 of 2 eligible devices (none registered yet)"
    reg.register(_reg(DEV1), "s1", 0.0)
    reg.register(_reg(DEV2), "s2", 0.0)
    reg.heartbeat(DEV2, _hb("paused", "battery_low"), 0.0)
    assert (
        reg.waiting_summary("digits", 1.0, 2) == "1 of 2 eligible devices (1 paused: battery_low)"
    )
    reg.disconnect("s1")
    assert reg.waiting_summary("digits", 1.0, 2) == (
        "0 of 2 eligible devices (1 disconnected, 1 paused: battery_low)"
    )


# --- rounds ---------------------------------------------------------------------------


def _round(selected: tuple[str, ...] = ("a", "b", "c"), required: int = 2) -> Round:
    return Round.open(
        round_id="r1",
        number=1,
        attempt=1,
        base_version=3,
        selected=selected,
        now=100.0,
        timeout=10.0,
        required=required,
    )


@pytest.mark.parametrize(
    ("device", "round_id", "base", "now", "prepare", "code"),
    [
        ("a", "r0", 3, 101.0, None, "round_closed"),
        ("a", "r1", 3, 111.0, None, "round_closed"),
        ("a", "r1", 3, 101.0, "close", "round_closed"),
        ("z", "r1", 3, 101.0, None, "not_selected"),
        ("a", "r1", 3, 101.0, "refuse", "not_selected"),
        ("a", "r1", 3, 101.0, "report", "duplicate"),
        ("a", "r1", 2, 101.0, None, "stale_base"),
        ("z", "r1", 2, 101.0, None, "not_selected"),  # order: selection before base
        ("a", "r1", 3, 101.0, None, None),
        ("a", "r1", 3, 101.0, "drop", None),  # a freed slot may still report in time
    ],
)
def test_check_submit(
    device: str, round_id: str, base: int, now: float, prepare: str | None, code: str | None
) -> None:
    rnd = _round()
    if prepare == "close":
        rnd.close()
    elif prepare == "refuse":
        rnd.mark("a", "refused", "busy")
    elif prepare == "report":
        rnd.record_report("a", 5, {})
    elif prepare == "drop":
        rnd.mark("a", "dropped")
    if code is None:
        rnd.check_submit(device, round_id, base, now)
    else:
        with pytest.raises(FedtrayError) as info:
            rnd.check_submit(device, round_id, base, now)
        assert info.value.code == code


def test_round_settles_succeeds_and_closes() -> None:
    rnd = _round()
    assert not rnd.settled and rnd.can_still_succeed
    rnd.mark("a", "training")
    rnd.record_report("a", 5, {"trainLoss": 1.0})
    rnd.mark("b", "refused", "user_paused")
    assert not rnd.succeeded and rnd.can_still_succeed and rnd.working == ["c"]
    rnd.mark("c", "dropped", "disconnected")
    assert rnd.settled and not rnd.can_still_succeed
    assert rnd.mark("c", "training") is False  # a finished slot does not come back to life
    rnd2 = _round()
    rnd2.record_report("a", 1, {})
    rnd2.record_report("b", 1, {})
    assert rnd2.succeeded and rnd2.close() == ["c"] and rnd2.closed


def test_select_devices_is_random_without_replacement() -> None:
    import random

    picks = select_devices(list(range(10)), 4, random.Random(1))
    assert len(set(picks)) == 4
    assert select_devices([1, 2], 5, random.Random(1)) in ([1, 2], [2, 1])


# --- store ----------------------------------------------------------------------------


def _history() -> list[RoundRecord]:
    return [
        RoundRecord(
            round_id="r1-1-ab",
            number=1,
            outcome="completed",
            version=1,
            clients_selected=2,
            clients_reported=2,
            train_loss=0.5,
            seconds=1.0,
            finished_at=1.0,
        )
    ]


def test_store_roundtrip_and_cleanup(tmp_path: Path) -> None:
    store = Store(tmp_path)
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert store.load("digits", layout_of(state)) is None
    store.save(task="digits", version=0, rounds_completed=0, state=state, history=[])
    store.save(task="digits", version=1, rounds_completed=1, state=state, history=_history())
    saved = store.load("digits", layout_of(state))
    assert saved is not None
    assert (saved.version, saved.rounds_completed) == (1, 1)
    np.testing.assert_array_equal(saved.state["w"], state["w"])
    assert saved.history == _history()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global-v1.safetensors", "history.json"]


@pytest.mark.parametrize("damage", ["task", "layout", "checksum", "json", "missing"])
def test_store_refuses_unusable_state(tmp_path: Path, damage: str) -> None:
    store = Store(tmp_path)
    state = {"w": np.zeros((2, 3), np.float32)}
    store.save(task="digits", version=1, rounds_completed=1, state=state, history=[])
    layout = layout_of(state)
    task = "digits"
    if damage == "task":
        task = "synthetic"
    elif damage == "layout":
        layout = layout_of({"w": np.zeros((3, 3), np.float32)})
    elif damage == "checksum":
        (tmp_path / "global-v1.safetensors").write_bytes(b"junk")
    elif damage == "json":
        (tmp_path / "history.json").write_text("{not json")
    elif damage == "missing":
        (tmp_path / "global-v1.safetensors").unlink()
    with pytest.raises(StoreError, match="--state-dir"):
        store.load(task, layout)


def test_store_history_is_plain_json(tmp_path: Path) -> None:
    Store(tmp_path).save(
        task="digits",
        version=1,
        rounds_completed=1,
        state={"w": np.zeros(2, np.float32)},
        history=_history(),
    )
    meta = json.loads((tmp_path / "history.json").read_text())
    assert meta["history"][0]["roundId"] == "r1-1-ab" and meta["roundsCompleted"] == 1


# --- the handlers and the event table ---------------------------------------------------


def test_every_event_the_server_receives_has_exactly_one_handler() -> None:
    handlers = event_handlers(DeviceNamespace)
    assert set(handlers) == {spec.name for spec in events.handled_by("server")}
    for name, attr in handlers.items():
        assert getattr(DeviceNamespace, attr).__fedtray_event__ is events.BY_NAME[name]


def test_handlers_and_table_cannot_drift() -> None:
    class Missing(DeviceNamespace):
        on_blob_status = None  # type: ignore[assignment]  # the handler of blob:status is gone

    class Extra(DeviceNamespace):
        @handles(events.TRAINING_CANCEL)  # a server -> device event
        async def on_cancel(self, sid: str, cancel: TrainingCancel) -> None:
            return None

    class Twice(DeviceNamespace):
        @handles(events.HEARTBEAT)
        async def on_heartbeat_again(self, sid: str, hb: Heartbeat) -> OkAck:
            return OkAck()

    with pytest.raises(TypeError, match="handles no \\['blob:status'\\]"):
        event_handlers(Missing)
    with pytest.raises(TypeError, match="training:cancel"):
        event_handlers(Extra)
    with pytest.raises(TypeError, match="device:heartbeat has two handlers"):
        event_handlers(Twice)
