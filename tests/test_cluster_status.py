"""server/cluster/status.py (pure): the cluster's rows as the single-process status models,
by tables; and the device snapshots' encoding (server/cluster/status_board.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from server.cluster.contracts import Assignment, AssignmentState, RoundRow, RoundState, VersionRow
from server.cluster.status import (
    FinishedRound,
    cluster_document,
    history_from,
    merge_devices,
    round_view,
    waiting_reason,
)
from server.cluster.status_board import decode_devices, encode_devices
from server.status import DeviceStatus, ServerStatus, StrategyStatus

NOW = 10_000.0


def row(state: RoundState, *, number: int = 1, opened: float = 100.0) -> RoundRow:
    return RoundRow(
        round_id=f"r{number}-{state}",
        number=number,
        attempt=1,
        base_version=number - 1,
        state=state,
        required=3,
        deadline=opened + 60,
        opened_at=opened,
    )


def version(n: int, created: float, **metrics: float) -> VersionRow:
    return VersionRow(n, f"k{n}", "a" * 64, 10, f"r{n}", created, dict(metrics))


def device(
    ident: str,
    *,
    name: str | None = None,
    connected: bool = True,
    seen: float = 1.0,
    rounds: int = 0,
) -> DeviceStatus:
    return DeviceStatus(
        id=ident,
        name=name or ident,
        type="desktop",
        state="idle",
        cpu_percent=5.0,
        last_seen=seen,
        rounds_completed=rounds,
        connected=connected,
        stale=False,
        client_version="1.0",
    )


# ------------------------------------------------------------------ history

HISTORY_CASES: list[tuple[str, FinishedRound, dict[str, Any]]] = [
    (
        "completed: version, loss, times from the version row and the last update",
        FinishedRound(row("completed"), 3, 3, 130.0, version(1, 150.0, trainLoss=0.5)),
        {
            "outcome": "completed",
            "version": 1,
            "clientsSelected": 3,
            "clientsReported": 3,
            "trainLoss": 0.5,
            "evalAccuracy": None,
            "seconds": 50.0,
            "finishedAt": 150.0,
            "timing": {
                "openedAt": 100.0,
                "collectedAt": 130.0,
                "aggregatedAt": 150.0,
                "publishedAt": 150.0,
            },
            "detail": None,
        },
    ),
    (
        "completed: evaluation figures when the version carries them",
        FinishedRound(
            row("completed"),
            2,
            2,
            None,
            version(1, 120.0, evalLoss=0.25, evalAccuracy=0.75, federatedEvalDevices=2.0),
        ),
        {
            "trainLoss": None,
            "evalLoss": 0.25,
            "evalAccuracy": 0.75,
            "federatedEvalDevices": 2,
            "timing": {
                "openedAt": 100.0,
                "collectedAt": 100.0,
                "aggregatedAt": 120.0,
                "publishedAt": 120.0,
            },
        },
    ),
    (
        "abandoned before now: finished at its deadline, base version kept, why",
        FinishedRound(row("abandoned", number=2), 3, 1, 110.0, None),
        {
            "outcome": "abandoned",
            "number": 2,
            "version": 1,
            "trainLoss": None,
            "seconds": 60.0,
            "finishedAt": 160.0,
            "timing": None,
            "detail": "1 of 3 reported, 3 needed",
        },
    ),
    (
        "abandoned, deadline still ahead: finished now",
        FinishedRound(row("abandoned", opened=NOW - 10), 3, 0, None, None),
        {"finishedAt": NOW, "seconds": 10.0, "detail": "0 of 3 reported, 3 needed"},
    ),
]


@pytest.mark.parametrize(
    ("finished", "expected"), [c[1:] for c in HISTORY_CASES], ids=[c[0] for c in HISTORY_CASES]
)
def test_history_records(finished: FinishedRound, expected: dict[str, Any]) -> None:
    [record] = history_from([finished], NOW)
    got = record.model_dump(by_alias=True, mode="json")
    assert got["roundId"] == finished.round.round_id
    assert {key: got[key] for key in expected} == expected


# ------------------------------------------------------------------ phase and current round


def parts(states: list[AssignmentState]) -> list[Assignment]:
    return [Assignment("r", f"d{i}", i, len(states), state=s) for i, s in enumerate(states)]


VIEW_CASES: list[tuple[str, RoundRow | None, int, int, str, dict[str, Any] | None]] = [
    ("no round yet: waiting for round 1", None, 0, 2, "waiting",
     {"number": 1, "phase": "waiting", "waitingReason": "why",
      "selected": [], "roundId": None, "deadline": None}),
    ("between rounds, more to run", None, 1, 2, "waiting",
     {"number": 2, "phase": "waiting", "waitingReason": "why",
      "selected": [], "roundId": None, "deadline": None}),
    ("every round done", None, 2, 2, "finished", None),
    ("rounds forever never finish", None, 50, 0, "waiting",
     {"number": 51, "phase": "waiting", "waitingReason": "why",
      "selected": [], "roundId": None, "deadline": None}),
    ("open round trains", row("open"), 0, 2, "training",
     {"number": 1, "phase": "training", "roundId": "r1-open", "selected": ["d0", "d1", "d2"],
      "reported": ["d1"], "required": 3, "deadline": 160.0, "waitingReason": None}),
    ("closing round aggregates", row("closing"), 0, 2, "aggregating",
     {"number": 1, "phase": "aggregating", "roundId": "r1-closing",
      "selected": ["d0", "d1", "d2"], "reported": ["d1"], "required": 3, "deadline": 160.0,
      "waitingReason": None}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("current", "latest", "target", "phase", "expected"),
    [c[1:] for c in VIEW_CASES],
    ids=[c[0] for c in VIEW_CASES],
)
def test_round_view(
    current: RoundRow | None,
    latest: int,
    target: int,
    phase: str,
    expected: dict[str, Any] | None,
) -> None:
    assignments = parts(["started", "reported", "refused"]) if current else []
    got_phase, got = round_view(current, assignments, latest, target, "why")
    assert got_phase == phase
    if expected is None:
        assert got is None
    else:
        assert got is not None
        dumped = got.model_dump(by_alias=True)
        assert {key: dumped[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("eligible", "workers", "text"),
    [
        (1, 2, "1 of 3 eligible devices (2 live workers)"),
        (0, 1, "0 of 3 eligible devices (1 live worker)"),
        (None, None, "presence unavailable"),
    ],
)
def test_waiting_reason(eligible: int | None, workers: int | None, text: str) -> None:
    assert waiting_reason(eligible, 3, workers) == text


# ------------------------------------------------------------------ devices


def test_merge_devices_once_each_connected_first_then_latest() -> None:
    a_old = device("a", connected=False, seen=50.0)
    a_now = device("a", connected=True, seen=10.0)
    b_old = device("b", name="beta", connected=False, seen=5.0)
    b_new = device("b", name="beta", connected=False, seen=9.0)
    c = device("c", name="alpha", rounds=7)
    merged = merge_devices([[a_old, b_old], [a_now, c], [b_new]], {"a": 2, "b": 1})
    assert [(d.id, d.connected, d.last_seen, d.rounds_completed) for d in merged] == [
        ("a", True, 10.0, 2),
        ("c", True, 1.0, 0),
        ("b", False, 9.0, 1),
    ]


def test_merge_of_nothing_is_empty() -> None:
    assert merge_devices([], {"a": 1}) == []


def test_snapshot_round_trips_and_rejects_garbage() -> None:
    devices = [device("a"), device("b", connected=False, seen=3.5, rounds=2)]
    data = encode_devices(devices)
    assert b'"lastSeen":3.5' in data  # camelCase, as the status API writes devices
    assert decode_devices(data) == devices
    for bad in (b"not json", b'{"id": "a"}', b'[{"id": "a"}]'):
        with pytest.raises(ValidationError):
            decode_devices(bad)


def test_cluster_document_validates_as_the_single_process_status() -> None:
    doc = cluster_document(
        server_version="9.9",
        protocol=3,
        task="synthetic",
        latest_version=1,
        rounds_target=1,
        current=None,
        assignments=[],
        reason="unused",
        history=[FinishedRound(row("completed"), 1, 1, 120.0, version(1, 130.0, trainLoss=0.1))],
        devices=[device("a", rounds=1)],
        strategy=StrategyStatus(name="fedavg"),
        now=NOW,
    )
    wire = doc.model_dump(by_alias=True, mode="json")
    again = ServerStatus.model_validate(wire)
    assert again == doc
    assert (wire["phase"], wire["currentRound"], wire["globalVersion"]) == ("finished", None, 1)
    assert [r["outcome"] for r in wire["history"]] == ["completed"]
    assert [d["id"] for d in wire["devices"]] == ["a"]
