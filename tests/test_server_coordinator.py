"""The round phase machine (server/phase.py): every move by table, without sockets."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server.phase import PHASES, TRANSITIONS, PhaseError, PhaseMachine
from server.rounds import Round
from server.status import FederationPhase


def a_round(number: int = 1, devices: tuple[str, ...] = ("a", "b")) -> Round:
    return Round.open(
        round_id=f"r{number}-1-test",
        number=number,
        attempt=1,
        base_version=number - 1,
        selected=list(devices),
        now=100.0,
        timeout=30.0,
        required=1,
        deadline_unix=1_000_030.0,
    )


MOVES: dict[FederationPhase, Callable[[PhaseMachine], object]] = {
    "closed": lambda m: m.close(),
    "waiting": lambda m: m.wait(1, "0 of 2 eligible devices"),
    "starting": lambda m: m.open(a_round()),
    "training": lambda m: m.train(),
    "aggregating": lambda m: m.aggregate(),
    "finished": lambda m: m.finish(),
}

#: How to reach each phase from a new machine.
PATHS: dict[FederationPhase, list[FederationPhase]] = {
    "closed": [],
    "waiting": ["waiting"],
    "starting": ["starting"],
    "training": ["starting", "training"],
    "aggregating": ["starting", "training", "aggregating"],
    "finished": ["finished"],
}


def machine_in(phase: FederationPhase) -> PhaseMachine:
    machine = PhaseMachine()
    for step in PATHS[phase]:
        MOVES[step](machine)
    assert machine.phase == phase
    return machine


def test_the_table_names_every_phase() -> None:
    assert set(TRANSITIONS) == set(PHASES) == set(MOVES) == set(PATHS)
    assert PhaseMachine().phase == "closed"


@pytest.mark.parametrize("start", PHASES)
@pytest.mark.parametrize("target", PHASES)
def test_each_move_is_allowed_exactly_when_the_table_says(
    start: FederationPhase, target: FederationPhase
) -> None:
    machine = machine_in(start)
    if target in TRANSITIONS[start]:
        MOVES[target](machine)
        assert machine.phase == target
    else:
        with pytest.raises(PhaseError):
            MOVES[target](machine)
        assert machine.phase == start  # a refused move changes nothing


def test_finished_is_terminal() -> None:
    assert TRANSITIONS["finished"] == frozenset()
    machine = machine_in("finished")
    assert machine.finished
    for move in MOVES.values():
        with pytest.raises(PhaseError):
            move(machine)


@pytest.mark.parametrize(
    ("phase", "shown"),
    [
        ("closed", None),
        ("waiting", "waiting"),
        ("starting", "starting"),
        ("training", "training"),
        ("aggregating", "aggregating"),
        ("finished", None),
    ],
)
def test_current_round_view_follows_the_one_phase(
    phase: FederationPhase, shown: str | None
) -> None:
    current = machine_in(phase).current(now_mono=110.0, now_unix=1_000_010.0)
    if shown is None:
        assert current is None
        return
    assert current is not None and current.phase == shown and current.number == 1
    if shown == "waiting":
        assert current.waiting_reason == "0 of 2 eligible devices" and current.round_id is None
    else:
        assert current.round_id == "r1-1-test" and current.selected == ["a", "b"]
        assert current.deadline == pytest.approx(1_000_030.0)


def test_aggregate_closes_the_round_and_returns_who_was_still_working() -> None:
    machine = machine_in("training")
    rnd = machine.round
    assert rnd is not None and rnd.is_open(101.0)
    rnd.mark("a", "training")
    rnd.record_report("a", 10, {})
    assert machine.aggregate() == ["b"]
    assert rnd.closed and not rnd.is_open(101.0)
    assert rnd.slots["b"].state == "dropped" and rnd.slots["b"].detail == "round closed"


def test_the_previous_round_answers_for_its_own_id_only() -> None:
    machine = PhaseMachine()
    assert machine.round is None and machine.round_for("r1-1-test") is None
    machine.open(a_round(1))
    machine.train()
    machine.aggregate()
    machine.close()
    first = machine.round
    machine.wait(2, "retrying after an abandoned round")
    assert machine.round is first  # the last round stays visible while waiting
    second = a_round(2)
    machine.open(second)
    assert machine.round is second
    assert machine.round_for("r1-1-test") is first
    assert machine.round_for("r2-1-test") is second
    assert machine.round_for("r9-9-unknown") is second


def test_waiting_again_updates_the_reason() -> None:
    machine = machine_in("waiting")
    machine.wait(1, "1 of 2 eligible devices (1 stale)")
    current = machine.current(0.0, 0.0)
    assert current is not None and current.waiting_reason == "1 of 2 eligible devices (1 stale)"
