"""The session's pure decisions: no I/O, no clock of their own, no state.

Contract: every function here is a pure function of its arguments (the caller passes
"now"), so each is tested by a table without a network (``tests/test_session_decisions.py``).

* :func:`user_decision`: the user's pause source from the settings: a pause whose
  ``paused_until`` has passed allows training; one still running says until when, in
  local time ("Paused by you until 15:30"; with the day when it is not today).
* :func:`refuse_round`: why a ``training:start`` is refused, checked in this order:
  paused (the pause's own reason and words), ``busy``, ``unknown_task``,
  ``missing_base``, ``deadline_passed``; ``None`` accepts it.
* :func:`refuse_evaluation`: why an ``evaluation:start`` is refused, in this order:
  paused (the pause's reason and words), ``busy`` (training a round, or evaluating:
  an evaluation never runs beside training; the server asks again next version),
  ``unknown_task`` (not installed, or a simulated device: it has no model to evaluate),
  ``missing_base`` (it does not hold that version), ``deadline_passed``; ``None`` accepts.
* :func:`submit_outcome`: what the server's answer to ``weights:submit`` means for the
  kept update: ``accepted`` and ``duplicate`` count a round and delete it,
  ``round_closed`` and the other codes declared final (:data:`client.errors.CODES`)
  delete it, any other refusal is ``retry`` (kept and sent again later).
* :func:`upload_retry_delay`: the uploader's retry policy after consecutive failures.
* :func:`device_state`: the state heartbeats and the snapshot report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from datetime import datetime
from typing import Final, Literal

from client import errors
from client.config import Settings
from client.protocol import (
    DeviceState,
    EvaluationStart,
    EvaluationStartAck,
    TrainingStart,
    TrainingStartAck,
)
from client.schedule import until_words
from client.snapshot import ALLOW, USER_PAUSED, PauseDecision

__all__ = [
    "UPLOAD_RETRIES",
    "HeldBase",
    "SubmitOutcome",
    "device_state",
    "refuse_evaluation",
    "refuse_round",
    "submit_outcome",
    "upload_retry_delay",
    "user_decision",
]

#: Failed sends in a row after which the uploader waits for the next reconnect.
UPLOAD_RETRIES: Final = 5
#: Longest wait between two tries of the same update.
UPLOAD_RETRY_CAP_S: Final = 30.0

SubmitOutcome = Literal["accepted", "duplicate", "round_closed", "retry", "final"]


def user_decision(settings: Settings, now: datetime) -> PauseDecision:
    """The user's pause source for ``settings`` at the aware time ``now``."""
    if not settings.paused:
        return ALLOW
    until = settings.paused_until
    if until is None:
        return USER_PAUSED
    if until <= now:
        return ALLOW
    return dataclasses.replace(
        USER_PAUSED, detail=f"{USER_PAUSED.detail} until {until_words(until, now)}"
    )


@dataclasses.dataclass(frozen=True)
class HeldBase:
    """The global weights this device holds: the only base a round can start from."""

    version: int
    task: str


def refuse_round(
    start: TrainingStart,
    *,
    pause: PauseDecision,
    training: str | None,
    worker_busy: bool,
    tasks: Collection[str],
    held: HeldBase | None,
    now: float,
) -> TrainingStartAck | None:
    """The refusal of ``start`` (``None``: accept it).

    ``training``: the round being trained here; ``worker_busy``: the worker cannot take
    work (absent, or busy with a round this session does not know); ``tasks``: the tasks
    installed (a packaged round's task is its package, not an installed one: whether the
    device holds its files is checked after, ``missing_package``); ``now``: Unix time.
    """
    if not pause.allowed:
        return TrainingStartAck(accepted=False, reason=pause.reason, detail=pause.detail)
    if training is not None or worker_busy:
        current = training or "another round"
        return TrainingStartAck(accepted=False, reason="busy", detail=f"training {current}")
    if start.package is None and start.task not in tasks:
        return TrainingStartAck(
            accepted=False, reason="unknown_task", detail=f"task {start.task} is not installed here"
        )
    if held is None or held.version != start.base_version or held.task != start.task:
        have = f"v{held.version} of {held.task}" if held else "no global weights"
        return TrainingStartAck(
            accepted=False,
            reason="missing_base",
            detail=f"needs v{start.base_version} of {start.task}, holds {have}",
        )
    if start.deadline <= now:
        return TrainingStartAck(
            accepted=False, reason="deadline_passed", detail="the round's deadline has passed"
        )
    return None


def refuse_evaluation(
    start: EvaluationStart,
    *,
    pause: PauseDecision,
    training: str | None,
    evaluating: int | None,
    worker_busy: bool,
    simulation: bool,
    tasks: Collection[str],
    held: HeldBase | None,
    now: float,
) -> EvaluationStartAck | None:
    """The refusal of ``start`` (``None``: accept it); see the module docstring.

    ``training``: the round being trained here; ``evaluating``: the version being
    evaluated here; ``worker_busy``: the worker cannot take work now; ``simulation``: the
    device simulates training (no model); ``now``: Unix time.
    """
    if not pause.allowed:
        return EvaluationStartAck(accepted=False, reason=pause.reason, detail=pause.detail)
    if training is not None:
        return EvaluationStartAck(accepted=False, reason="busy", detail=f"training {training}")
    if evaluating is not None or worker_busy:
        what = f"evaluating v{evaluating}" if evaluating is not None else "busy"
        return EvaluationStartAck(accepted=False, reason="busy", detail=what)
    if simulation:
        return EvaluationStartAck(
            accepted=False, reason="unknown_task", detail="a simulated device does not evaluate"
        )
    if start.package is None and start.task not in tasks:
        return EvaluationStartAck(
            accepted=False, reason="unknown_task", detail=f"task {start.task} is not installed here"
        )
    if held is None or held.version != start.version or held.task != start.task:
        have = f"v{held.version} of {held.task}" if held else "no global weights"
        return EvaluationStartAck(
            accepted=False,
            reason="missing_base",
            detail=f"asked to evaluate v{start.version} of {start.task}, holds {have}",
        )
    if start.deadline <= now:
        return EvaluationStartAck(
            accepted=False, reason="deadline_passed", detail="the evaluation's deadline has passed"
        )
    return None


def submit_outcome(code: str | None) -> SubmitOutcome:
    """The outcome of a submit answered with error ``code`` (``None``: accepted)."""
    if code is None:
        return "accepted"
    if code == "duplicate":
        return "duplicate"
    if code == "round_closed":
        return "round_closed"
    return errors.submit_outcome(code)


def upload_retry_delay(failures: int) -> float | None:
    """Seconds to wait after ``failures`` failed sends in a row; ``None``: stop trying
    until the next reconnect."""
    if failures >= UPLOAD_RETRIES:
        return None
    return min(UPLOAD_RETRY_CAP_S, 2.0**failures)


def device_state(*, uploading: bool, allowed: bool, training: bool) -> DeviceState:
    """What the device is doing: uploading wins over paused, paused over training."""
    if uploading:
        return "uploading"
    if not allowed:
        return "paused"
    return "training" if training else "idle"
