"""Federated evaluation's pure parts, by table, and a real device's answers to
``evaluation:start`` (a real client session behind a scripted server; no torch runs).

What breaks if it is wrong: the wrong versions evaluated (``due``), devices that do not
hold a version asked first (``select_evaluators``), an unweighted mean recorded
(``weighted_metrics``), a result counted twice or from a device never asked (``Tally``),
or a paused / training device evaluating anyway (``refuse_evaluation``, the session).
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import socketio

from client.protocol import (
    EV_EVALUATION_START,
    EvaluationResult,
    EvaluationStart,
    EvaluationStartAck,
    Partition,
    parse,
)
from client.session.decisions import HeldBase, refuse_evaluation
from client.snapshot import ALLOW, USER_PAUSED, PauseDecision
from client.weights import layout_of
from server.background import Background
from server.config import ServerConfig
from server.fedeval import (
    FederatedEvaluation,
    Report,
    Tally,
    due,
    select_evaluators,
    weighted_metrics,
)
from server.globalmodel import GlobalModel
from server.registry import DeviceRecord, Registry
from server.status import RoundRecord
from server.store import HISTORY_FILE, Store
from tests.hostile_server import hostile_client
from tests.waiting import scaled

NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("every", "evaluated"),
    [(1, [1, 2, 3, 4, 5, 6]), (2, [2, 4, 6]), (3, [3, 6]), (0, []), (7, [])],
)
def test_due_evaluates_every_nth_version(every: int, evaluated: list[int]) -> None:
    assert [v for v in range(0, 7) if due(v, every)] == evaluated


@pytest.mark.parametrize(
    ("candidates", "version", "limit", "chosen"),
    [
        ([("b", 3), ("a", 2), ("c", 3)], 3, 10, ["b", "c", "a"]),  # holders first
        ([("b", 3), ("a", 2), ("c", 3)], 3, 2, ["b", "c"]),  # up to the limit
        ([("b", None), ("a", 2)], 3, 5, ["a", "b"]),  # nobody holds it yet: by id
        ([("a", 3)], 3, 0, []),
        ([], 3, 4, []),
    ],
)
def test_select_evaluators(
    candidates: list[tuple[str, int | None]], version: int, limit: int, chosen: list[str]
) -> None:
    assert select_evaluators(candidates, version, limit) == chosen


@pytest.mark.parametrize(
    ("reports", "loss", "accuracy", "samples"),
    [
        ([Report(1.0, 0.5, 100)], 1.0, 0.5, 100),
        # Weighted by samples, not a plain mean of the devices (that would be 1.5 / 0.5).
        ([Report(1.0, 0.9, 300), Report(2.0, 0.1, 100)], 1.25, 0.7, 400),
        ([Report(0.2, 1.0, 1), Report(0.4, 0.0, 1), Report(0.6, 0.5, 2)], 0.45, 0.5, 4),
    ],
)
def test_weighted_metrics_are_sample_weighted(
    reports: list[Report], loss: float, accuracy: float, samples: int
) -> None:
    got = weighted_metrics(reports)
    assert math.isclose(float(got["federated_eval_loss"]), loss)  # type: ignore[arg-type]
    assert math.isclose(float(got["federated_eval_accuracy"]), accuracy)  # type: ignore[arg-type]
    assert got["federated_eval_samples"] == samples
    assert got["federated_eval_devices"] == len(reports)


def test_weighted_metrics_of_nothing_is_empty() -> None:
    assert weighted_metrics([]) == {}


def test_a_tally_counts_each_accepting_device_once() -> None:
    tally = Tally(version=2, deadline=NOW, asked={"a", "b", "c"}, accepted={"a", "b"})
    assert tally.count("a", Report(1.0, 0.5, 10))
    assert not tally.count("a", Report(9.0, 0.0, 99))  # a repeat: the first one stays
    assert not tally.count("c", Report(1.0, 0.5, 10))  # asked but refused
    assert not tally.count("z", Report(1.0, 0.5, 10))  # never asked
    assert tally.reports == {"a": Report(1.0, 0.5, 10)}


def _start(version: int = 3, task: str = "digits", deadline: float = NOW + 60) -> EvaluationStart:
    return EvaluationStart(
        version=version,
        task=task,
        partition=Partition(index=0, count=2),
        deadline=deadline,
    )


HELD = HeldBase(version=3, task="digits")
TASKS = ("digits", "synthetic")


@pytest.mark.parametrize(
    ("start", "pause", "training", "evaluating", "busy", "simulation", "held", "reason"),
    [
        (_start(), ALLOW, None, None, False, False, HELD, None),
        (_start(), USER_PAUSED, None, None, False, False, HELD, "user_paused"),
        # The pause wins over everything else, as for training.
        (_start(), USER_PAUSED, "r1", 2, True, True, None, "user_paused"),
        (_start(), ALLOW, "r4-1-ab", None, True, False, HELD, "busy"),
        (_start(), ALLOW, None, 2, True, False, HELD, "busy"),
        (_start(), ALLOW, None, None, True, False, HELD, "busy"),
        (_start(), ALLOW, None, None, False, True, HELD, "unknown_task"),
        (_start(task="cifar"), ALLOW, None, None, False, False, HELD, "unknown_task"),
        (_start(version=4), ALLOW, None, None, False, False, HELD, "missing_base"),
        (_start(), ALLOW, None, None, False, False, None, "missing_base"),
        (_start(deadline=NOW - 1), ALLOW, None, None, False, False, HELD, "deadline_passed"),
    ],
)
def test_refuse_evaluation(
    start: EvaluationStart,
    pause: PauseDecision,
    training: str | None,
    evaluating: int | None,
    busy: bool,
    simulation: bool,
    held: HeldBase | None,
    reason: str | None,
) -> None:
    answer = refuse_evaluation(
        start,
        pause=pause,
        training=training,
        evaluating=evaluating,
        worker_busy=busy,
        simulation=simulation,
        tasks=TASKS,
        held=held,
        now=NOW,
    )
    if reason is None:
        assert answer is None
    else:
        assert answer is not None and not answer.accepted
        assert answer.reason == reason
        assert answer.detail


def test_a_paused_device_refuses_to_evaluate_with_its_reason(tmp_path: Path) -> None:
    with hostile_client(tmp_path, task="digits") as (server, client):
        client.pause()
        client.wait_for(lambda s: s.device_state == "paused", scaled(10))
        raw = server.call(EV_EVALUATION_START, _start(deadline=4e9).to_wire())
        answer = parse(EvaluationStartAck, raw)
        assert not answer.accepted
        assert answer.reason == "user_paused"
        assert answer.detail == USER_PAUSED.detail
        client.resume()
        client.wait_for(lambda s: s.device_state != "paused", scaled(10))
        # Unpaused, it still refuses a version it does not hold: it never evaluates a guess.
        raw = server.call(EV_EVALUATION_START, _start(deadline=4e9).to_wire())
        answer = parse(EvaluationStartAck, raw)
        assert not answer.accepted and answer.reason == "missing_base"


# ------------------------------------------------------------------ recording results


def _completed(version: int) -> RoundRecord:
    return RoundRecord(
        round_id=f"r{version}",
        number=version,
        outcome="completed",
        version=version,
        clients_selected=2,
        clients_reported=2,
        train_loss=0.5,
        seconds=1.0,
        finished_at=1.0,
    )


def _result(version: int, loss: float, accuracy: float, samples: int) -> EvaluationResult:
    return EvaluationResult(
        version=version, task="synthetic", loss=loss, accuracy=accuracy, num_samples=samples
    )


def test_results_are_recorded_weighted_late_ones_too_and_unasked_ones_dropped(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        state = {"w": np.zeros(4, np.float32)}
        model = GlobalModel(Store(tmp_path), "synthetic")
        model.adopt(state, layout_of(state), None)
        for version in (1, 2):
            prepared = await model.prepare(state, version)
            assert await model.persist(prepared, _completed(version))
            model.publish(prepared, _completed(version), {})
        registry = Registry(stale_after=30.0)
        config = ServerConfig(task="synthetic", state_dir=tmp_path)
        fed = FederatedEvaluation(
            config=config,
            sio=socketio.AsyncServer(async_mode="aiohttp"),
            registry=registry,
            model=model,
            distributor=None,  # type: ignore[arg-type]  # not reached: nobody is asked here
            background=Background(),
        )
        # Version 1 was asked of a and b (both accepted); version 2 was not asked at all.
        fed._tallies[1] = Tally(version=1, deadline=0.0, asked={"a", "b"}, accepted={"a", "b"})
        a, b, z = (cast(DeviceRecord, _Device(d)) for d in ("a", "b", "z"))
        await fed.on_result(a, _result(1, 1.0, 0.9, 300))  # late (deadline 0): still recorded
        await fed.on_result(a, _result(1, 5.0, 0.0, 900))  # a repeat: ignored
        await fed.on_result(z, _result(1, 5.0, 0.0, 900))  # never asked: dropped
        await fed.on_result(b, _result(2, 5.0, 0.0, 900))  # version not asked: dropped
        await fed.on_result(b, _result(1, 2.0, 0.1, 100))
        meta = json.loads((tmp_path / HISTORY_FILE).read_text())
        for history in (
            [r.model_dump(by_alias=True) for r in model.history],
            meta["history"],
        ):
            first, second = history
            assert first["federatedEvalLoss"] == pytest.approx(1.25)
            assert first["federatedEvalAccuracy"] == pytest.approx(0.7)
            assert first["federatedEvalSamples"] == 400
            assert first["federatedEvalDevices"] == 2
            assert second["federatedEvalLoss"] is None and second["federatedEvalDevices"] is None

    asyncio.run(scenario())


class _Device:
    """Just what FederatedEvaluation.on_result reads of a device record."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.name = device_id


def test_evaluate_every_is_a_flag_of_the_server_and_must_not_be_negative(tmp_path: Path) -> None:
    from server.cli import build_parser, config_from_args
    from server.config import ConfigError

    args = build_parser().parse_args(["--evaluate-every", "3", "--state-dir", str(tmp_path)])
    assert config_from_args(args).evaluate_every == 3
    default = build_parser().parse_args(["--state-dir", str(tmp_path)])
    assert config_from_args(default).evaluate_every == 1
    with pytest.raises(ConfigError, match="--evaluate-every"):
        ServerConfig(evaluate_every=-1, state_dir=tmp_path)


def test_a_tally_settles_once_every_device_asked_is_done() -> None:
    async def go() -> None:
        tally = Tally(version=3, deadline=0.0)
        tally.waiting.update({"a", "b", "c"})
        tally.accepted.update({"a", "b"})
        assert tally.count("a", Report(0.5, 0.9, 10))  # a result
        assert not tally.settled.is_set()
        tally.done("c")  # refused or did not answer
        assert not tally.settled.is_set()
        assert not tally.count("c", Report(0.5, 0.9, 10))  # never accepted: not counted
        tally.done("b")  # evaluation:failed
        assert tally.settled.is_set() and tally.waiting == set()

    asyncio.run(go())
