"""The registry's incremental eligibility counts (server/eligibility.py, server/registry.py):
every transition, staleness by time alone, against a brute-force recount of every device."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from server_harness import register_payload, resources

from client.protocol import DeviceRegister, Heartbeat, TrainingProgress, parse
from server.eligibility import Freshness, Tally
from server.registry import Registry

STALE = 3.0
IDS = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 7)]
A, B, C = IDS[:3]
#: The queries counted: an installed task, another one, a packaged task of two sizes.
QUERIES: list[tuple[str, int | None]] = [
    ("synthetic", None),
    ("digits", None),
    ("synthetic", 1_000),
    ("synthetic", 10**12),
]


def reg_payload(device_id: str, **extra: Any) -> DeviceRegister:
    payload = register_payload(
        device_id, f"dev-{device_id[-1]}", tasks=extra.pop("tasks", ("synthetic",))
    )
    payload["capabilities"].update(extra.pop("capabilities", {}))
    payload.update(extra)
    return parse(DeviceRegister, payload)


def hb(state: str = "idle", **extra: Any) -> Heartbeat:
    return parse(Heartbeat, {"state": state, "resources": resources(), **extra})


def progress(state: str, **extra: Any) -> TrainingProgress:
    return parse(
        TrainingProgress,
        {
            "roundId": "r1",
            "epoch": 1,
            "epochs": 2,
            "step": 1,
            "steps": 4,
            "fraction": 0.1,
            "state": state,
            **extra,
        },
    )


def recount(
    registry: Registry, task: str, now: float, package_bytes: int | None
) -> tuple[int, dict[str, int]]:
    """The brute-force answer: every device judged at ``now``."""
    reasons = Counter(registry.ineligibility(r, task, now, package_bytes) for r in registry.all())
    eligible = reasons.pop(None, 0)
    return eligible, {str(k): v for k, v in reasons.items()}


def brute_summary(
    registry: Registry, task: str, now: float, needed: int, package_bytes: int | None
) -> str:
    eligible, reasons = recount(registry, task, now, package_bytes)
    text = f"{eligible} of {needed} eligible devices"
    if reasons:
        text += " (" + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())) + ")"
    elif not registry.all():
        text += " (none registered yet)"
    return text


def assert_counts_match(registry: Registry, now: float) -> None:
    registry.sweep(now)
    for task, package_bytes in QUERIES:
        tally = registry.tally(task, package_bytes)
        assert (tally.eligible, tally.counts()) == recount(registry, task, now, package_bytes)
        assert len(registry.eligible(task, now, package_bytes)) == tally.eligible
        assert registry.waiting_summary(task, now, 3, package_bytes) == brute_summary(
            registry, task, now, 3, package_bytes
        )


def fleet() -> Registry:
    """Three connected devices of different kinds; every query counted from the start."""
    registry = Registry(stale_after=STALE)
    for task, package_bytes in QUERIES:
        registry.tally(task, package_bytes)
    registry.register(reg_payload(A), "sa", 1.0)
    registry.register(
        reg_payload(B, tasks=("synthetic", "digits"), capabilities={"taskPackages": True,
                    "packageCacheBytes": 5_000, "maxBlobBytes": 5_000}),
        "sb", 1.0,
    )  # fmt: skip
    registry.register(reg_payload(C, weights_version=0), "sc", 1.0)
    return registry


Step = Callable[[Registry], object]

# (name, the transition at now = 2.0)
TRANSITIONS: list[tuple[str, Step]] = [
    ("heartbeat idle", lambda r: r.heartbeat(A, hb(), 2.0)),
    ("heartbeat paused", lambda r: r.heartbeat(A, hb("paused", pauseReason="battery_low"), 2.0)),
    ("heartbeat training", lambda r: r.heartbeat(B, hb("training"), 2.0)),
    ("heartbeat with a newer version clears a refusal",
     lambda r: (r.refused_weights(C, 1, "bad_weights", "no"),
                r.heartbeat(C, hb(weightsVersion=1), 2.0))),
    ("progress paused",
     lambda r: r.progress(A, progress("paused", pauseReason="user_paused"), 2.0)),
    ("touch", lambda r: r.touch(A, 2.0)),
    ("training_started after a pause",
     lambda r: (r.refused_paused(A, "unplugged", None), r.training_started(A))),
    ("refused_paused", lambda r: r.refused_paused(B, "user_paused", "until 3 pm")),
    ("refused_round (no change of eligibility)", lambda r: r.refused_round(A, "busy", None)),
    ("refused_weights", lambda r: r.refused_weights(C, 4, "bad_weights", "shape")),
    ("holds_version clears the refusal",
     lambda r: (r.refused_weights(C, 4, "bad_weights", "shape"), r.holds_version(C, 4))),
    ("holds_version of an older version keeps it",
     lambda r: (r.refused_weights(C, 4, "bad_weights", "shape"), r.holds_version(C, 3))),
    ("training_failed", lambda r: (r.training_started(A), r.training_failed(A))),
    ("update_accepted", lambda r: (r.training_started(A), r.update_accepted(A))),
    ("disconnect", lambda r: r.disconnect("sb")),
    ("disconnect of an old sid", lambda r: r.disconnect("s-old")),
    ("register again on a new sid", lambda r: r.register(reg_payload(A), "sa2", 2.0)),
    ("register paused",
     lambda r: r.register(reg_payload(IDS[3], state="paused", pauseReason="unplugged"), "sd", 2.0)),
    ("register a new device",
     lambda r: r.register(reg_payload(IDS[3], tasks=("digits",)), "sd", 2.0)),
    ("a sid speaks for another device", lambda r: r.register(reg_payload(IDS[4]), "sa", 2.0)),
    ("reconnect after a disconnect",
     lambda r: (r.disconnect("sa"), r.register(reg_payload(A), "sa3", 2.0))),
    ("rounds_counted", lambda r: r.rounds_counted([A, B])),
    ("transitions of an unknown device",
     lambda r: (r.training_started(IDS[5]), r.refused_weights(IDS[5], 1, "x", "y"))),
]  # fmt: skip


@pytest.mark.parametrize("step", [t[1] for t in TRANSITIONS], ids=[t[0] for t in TRANSITIONS])
def test_each_transition_keeps_the_counts_equal_to_a_recount(step: Step) -> None:
    registry = fleet()
    assert_counts_match(registry, 1.5)
    step(registry)
    assert_counts_match(registry, 2.0)
    assert_counts_match(registry, 2.0 + STALE + 0.5)  # and once everyone turned stale


def test_staleness_changes_with_time_alone_and_a_heartbeat_ends_it() -> None:
    registry = Registry(stale_after=STALE)
    tally = registry.tally("synthetic")
    registry.register(reg_payload(A), "sa", 10.0)
    registry.register(reg_payload(B), "sb", 11.0)
    assert registry.next_stale_at() == 10.0 + STALE
    registry.sweep(10.0 + STALE)  # exactly stale_after: not yet (staleness is strict)
    assert (tally.eligible, tally.counts()) == (2, {})
    registry.sweep(10.0 + STALE + 0.01)
    assert (tally.eligible, tally.counts()) == (1, {"stale": 1})
    assert registry.next_stale_at() == 11.0 + STALE
    registry.heartbeat(A, hb(), 14.0)  # back
    assert (tally.eligible, tally.counts()) == (2, {})
    registry.sweep(20.0)
    assert (tally.eligible, tally.counts()) == (0, {"stale": 2})
    assert registry.waiting_summary("synthetic", 20.0, 2) == "0 of 2 eligible devices (2 stale)"
    registry.disconnect("sa")  # a stale device that leaves is disconnected, not stale
    assert tally.counts() == {"stale": 1, "disconnected": 1}
    assert registry.next_stale_at() is None  # nobody fresh


def test_a_clock_that_goes_backwards_is_judged_at_the_time_given() -> None:
    registry = Registry(stale_after=STALE)
    registry.register(reg_payload(A), "sa", 10.0)
    registry.register(reg_payload(B), "sb", 5.0)  # older than the one before
    assert registry.next_stale_at() == float("-inf")  # a sweep must restore the order
    assert_counts_match(registry, 8.5)  # B stale, A fresh
    assert_counts_match(registry, 20.0)
    assert_counts_match(registry, 6.0)  # earlier again: both fresh
    assert registry.tally("synthetic").eligible == 2


def test_random_sequences_match_the_recount_after_every_step() -> None:
    rng = random.Random(17)
    registry = Registry(stale_after=STALE)
    for task, package_bytes in QUERIES:
        registry.tally(task, package_bytes)
    sids: dict[str, str] = {}
    now = 0.0
    for step in range(3000):
        now += rng.choice([0.0, 0.1, 0.5, 1.0, 2.5]) if rng.random() > 0.02 else -1.0
        device = rng.choice(IDS)
        known = registry.get(device) is not None
        move = rng.randrange(12)
        if move == 0 or not known:
            sid = f"s{step}"
            sids[device] = sid
            extra: dict[str, Any] = rng.choice(
                [{}, {"state": "paused", "pauseReason": "battery_low"}, {"tasks": ("digits",)},
                 {"capabilities": {"taskPackages": True, "packageCacheBytes": 2_000}}]
            )  # fmt: skip
            registry.register(reg_payload(device, **extra), sid, now)
        elif move == 1:
            registry.disconnect(sids.get(device, "none"))
        elif move in (2, 3, 4) and registry.get(device).connected:  # type: ignore[union-attr]
            state = rng.choice(["idle", "idle", "training", "paused"])
            registry.heartbeat(device, hb(state, pauseReason="unplugged"), now)
        elif move == 5 and registry.get(device).connected:  # type: ignore[union-attr]
            registry.touch(device, now)
        elif move == 6:
            registry.refused_paused(device, "user_paused", None)
        elif move == 7:
            registry.training_started(device)
        elif move == 8:
            registry.refused_weights(device, rng.randrange(3), "bad_weights", "x")
        elif move == 9:
            registry.holds_version(device, rng.randrange(3))
        elif move == 10:
            registry.update_accepted(device)
        else:
            registry.training_failed(device)
        if step % 3 == 0:
            assert_counts_match(registry, now)


def test_listeners_hear_of_count_changes_only() -> None:
    registry = Registry(stale_after=STALE)
    heard: list[tuple[int, int]] = []
    registry.tally("synthetic").listen(lambda old, new: heard.append((old, new)))
    registry.register(reg_payload(A), "sa", 1.0)
    assert heard == [(0, 1)]
    for t in (1.5, 2.0, 2.5):
        registry.touch(A, t)
        registry.heartbeat(A, hb(), t)  # nothing changes: nobody is told
    assert heard == [(0, 1)]
    registry.heartbeat(A, hb("paused", pauseReason="battery_low"), 3.0)
    registry.heartbeat(A, hb("paused", pauseReason="unplugged"), 3.5)  # another reason
    registry.heartbeat(A, hb(), 4.0)
    assert heard == [(0, 1), (1, 0), (0, 0), (0, 1)]
    registry.sweep(4.0 + STALE + 1)
    assert heard[-1] == (1, 0)


TALLY_CASES: list[tuple[str, list[tuple[str, str | None]], int, dict[str, int], str]] = [
    ("empty", [], 0, {}, "0 of 2 eligible devices (none registered yet)"),
    ("one eligible", [("a", None)], 1, {}, "1 of 2 eligible devices"),
    ("moved from eligible to paused", [("a", None), ("a", "paused: x")], 0, {"paused: x": 1},
     "0 of 2 eligible devices (1 paused: x)"),
    ("reasons sorted", [("a", "stale"), ("b", "disconnected"), ("c", None)], 1,
     {"stale": 1, "disconnected": 1}, "1 of 2 eligible devices (1 disconnected, 1 stale)"),
    ("a reason that empties is gone", [("a", "stale"), ("a", None)], 1, {},
     "1 of 2 eligible devices"),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "eligible", "counts", "text"), [c[1:] for c in TALLY_CASES],
                         ids=[c[0] for c in TALLY_CASES])  # fmt: skip
def test_tally_by_table(
    sets: list[tuple[str, str | None]], eligible: int, counts: dict[str, int], text: str
) -> None:
    tally = Tally("synthetic", None)
    for device_id, reason in sets:
        tally.set(device_id, reason)
    assert (tally.eligible, tally.counts(), tally.summary(2)) == (eligible, counts, text)


def test_freshness_sweeps_only_what_expired_in_order() -> None:
    fresh = Freshness(stale_after=1.0)
    for i, t in enumerate([0.0, 0.5, 1.0]):
        fresh.seen(f"d{i}", t)
    assert fresh.seen("d0", 1.2) is False  # d0 moves to the back
    assert fresh.next_expiry() == 1.5
    assert fresh.sweep(1.6) == (["d1"], [])
    assert fresh.is_stale("d1") and not fresh.is_stale("d0")
    assert fresh.seen("d1", 1.7) is True
    assert fresh.sweep(2.1) == (["d2"], [])
    fresh.gone("d2")
    assert not fresh.is_stale("d2") and len(fresh) == 2
