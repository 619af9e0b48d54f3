"""Federated evaluation: devices evaluate new globals on their own test splits.

Contract:

* Which versions: :func:`due` -- every ``--evaluate-every`` N-th version (versions
  N, 2N, ...; 0 = never). :class:`FederatedEvaluation` is told each published version
  (:meth:`FederatedEvaluation.published`) and asks devices (a background task per
  device). As in Flower's rounds (fit, then evaluate), the coordinator opens the next
  round only once that evaluation is settled (:meth:`FederatedEvaluation.settled`: every
  device asked has answered with a result, refused, failed or not answered, or the
  deadline passed), so a device is never asked to train while it evaluates
  (``--evaluate-every 0`` keeps rounds back to back).
* Which devices: :func:`select_evaluators` -- the eligible devices (connected, not
  paused, not stale, able to take the task: :meth:`server.registry.Registry.eligible`),
  those already holding the version first, then by device id, up to
  ``clients_per_round``. Each is brought up to date (:meth:`server.distribution.
  Distributor.ensure_global`) and skipped if it then holds another version; each gets
  (:func:`ask_device`, also each cluster worker's way of asking)
  ``evaluation:start`` with part ``i`` of ``n`` (its test split of that partition, the
  package, or its own data) and the deadline ``round_timeout`` from now. A device that
  refuses because it is paused is marked paused in the registry (as a training refusal
  is); one that refuses otherwise, does not answer, says ``evaluation:failed`` or sends
  nothing by the deadline is skipped.
* Results: ``evaluation:result`` is counted once per device and version, only from a
  device that was asked for that version and accepted (a result of a version not asked,
  or forgotten, is dropped and logged). The tallies of the last :data:`KEPT_VERSIONS`
  versions are kept, so a late result for an old version is still recorded (its record
  exists); older ones are dropped. After each counted result, the version's sample-weighted
  means (:func:`weighted_metrics`) are written into its history record
  (:meth:`server.globalmodel.GlobalModel.record_fields`: ``federated_eval_loss``,
  ``federated_eval_accuracy``, ``federated_eval_samples``, ``federated_eval_devices``), in
  memory and ``history.json``, as the server's own evaluation is.
* Never raises into a handler except :class:`client.errors.FedtrayError`; the background
  tasks log their failures. Pure parts (:func:`due`, :func:`select_evaluators`,
  :func:`weighted_metrics`) do no I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, get_args

import socketio

from client.errors import FedtrayError
from client.protocol import (
    EV_EVALUATION_START,
    EvaluationFailed,
    EvaluationResult,
    EvaluationStart,
    EvaluationStartAck,
    PauseReason,
    parse,
)
from client.tasks import Task
from server.background import Background
from server.config import DEFAULT_EVALUATE_EVERY, ServerConfig
from server.distribution import Distributor
from server.globalmodel import GlobalModel
from server.registry import DeviceRecord, Registry
from server.taskfile import PackageTask

__all__ = [
    "KEPT_VERSIONS",
    "EvaluationAsk",
    "FederatedEvaluation",
    "Report",
    "Tally",
    "add_evaluate_flag",
    "ask_device",
    "due",
    "select_evaluators",
    "weighted_metrics",
]

log = logging.getLogger(__name__)

#: Versions whose tallies are kept for late results.
KEPT_VERSIONS: Final = 16

_PAUSE_REASONS: dict[str, PauseReason] = {r: r for r in get_args(PauseReason)}


def add_evaluate_flag(parser: argparse.ArgumentParser) -> None:
    """``--evaluate-every N`` (the one declaration, for ``fedtray-server`` and ``demo``)."""
    parser.add_argument(
        "--evaluate-every",
        type=int,
        default=DEFAULT_EVALUATE_EVERY,
        metavar="N",
        help="federated evaluation: every N-th new global is evaluated by the devices on "
        "their own test splits (sample-weighted means in the history); 0 = off "
        "(default: %(default)s)",
    )


# ----------------------------------------------------------------------- pure parts


def due(version: int, every: int) -> bool:
    """Whether version ``version`` is evaluated by the devices (every ``every``-th)."""
    return every > 0 and version > 0 and version % every == 0


def select_evaluators(
    candidates: Sequence[tuple[str, int | None]], version: int, limit: int
) -> list[str]:
    """Up to ``limit`` device ids from ``candidates`` (eligible ``(device id, version held)``):
    holders of ``version`` first, then the others, each group by device id."""
    ordered = sorted(candidates, key=lambda c: (c[1] != version, c[0]))
    return [device_id for device_id, _held in ordered[: max(0, limit)]]


@dataclass(frozen=True)
class EvaluationAsk:
    """What one device is asked: ``version``, its part ``index`` of ``count``, by ``deadline``."""

    version: int
    index: int
    count: int
    deadline: float


async def ask_device(
    sio: socketio.AsyncServer,
    registry: Registry,
    distributor: Distributor,
    config: ServerConfig,
    task: Task,
    record: DeviceRecord,
    ask: EvaluationAsk,
) -> bool:
    """Ask ``record`` to evaluate ``ask.version`` with ``evaluation:start`` (the one spelling
    of it, for the single process and each cluster worker); True when it accepted.

    The device must hold the version (it is sent first when it does not); one that does not,
    has no connection, answers badly or not at all is logged and False. A refusal whose
    reason is a pause marks the device paused in ``registry`` (not eligible again until a
    heartbeat says it is back, as for training)."""
    version = ask.version
    if not await distributor.ensure_global(record) or record.weights_version != version:
        log.info("version %d: %s does not hold it; not evaluated there", version, record.name)
        return False
    sid = record.sid
    if sid is None:
        return False
    start = EvaluationStart(
        version=version,
        task=config.task,
        model_params=dict(task.params),
        partition=config.partition_of(ask.index, ask.count),
        deadline=ask.deadline,
        package=task.package.ref if isinstance(task, PackageTask) else None,
    )
    try:
        ack = await sio.call(
            EV_EVALUATION_START, start.to_wire(), to=sid, timeout=config.ack_timeout
        )
        answer = parse(EvaluationStartAck, ack)
    except FedtrayError as exc:
        log.info("%s answered evaluation:start badly: %s", record.name, exc.message)
        return False
    except Exception as exc:  # timeout or disconnect
        log.info("%s did not answer evaluation:start (%s)", record.name, type(exc).__name__)
        return False
    if answer.accepted:
        log.info("version %d: %s evaluates it", version, record.name)
        return True
    log.info(
        "version %d: %s refused to evaluate it: %s%s",
        version,
        record.name,
        answer.reason or "no reason given",
        f" ({answer.detail})" if answer.detail else "",
    )
    pause = _PAUSE_REASONS.get(answer.reason or "")
    if pause is not None:
        registry.refused_paused(record.device_id, pause, answer.detail)
    return False


@dataclass(frozen=True)
class Report:
    """One device's result: mean loss and accuracy over ``num_samples`` test samples."""

    loss: float
    accuracy: float
    num_samples: int


def weighted_metrics(reports: Sequence[Report]) -> dict[str, object]:
    """The RoundRecord fields of ``reports``: sample-weighted mean loss and accuracy, the
    samples and devices behind them; empty for no reports (or no samples)."""
    total = sum(r.num_samples for r in reports)
    if not reports or total <= 0:
        return {}
    return {
        "federated_eval_loss": sum(r.loss * r.num_samples for r in reports) / total,
        "federated_eval_accuracy": sum(r.accuracy * r.num_samples for r in reports) / total,
        "federated_eval_samples": total,
        "federated_eval_devices": len(reports),
    }


@dataclass
class Tally:
    """One version's federated evaluation: who was asked, who accepted, what came back."""

    version: int
    deadline: float
    asked: set[str] = field(default_factory=set)
    accepted: set[str] = field(default_factory=set)
    reports: dict[str, Report] = field(default_factory=dict)
    #: Asked devices still to be heard from (a result, or the end of their ask).
    waiting: set[str] = field(default_factory=set)
    #: Set once ``waiting`` is empty.
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, device_id: str, report: Report) -> bool:
        """Count ``report`` once, from a device that accepted; whether it was counted."""
        if device_id not in self.accepted or device_id in self.reports:
            return False
        self.reports[device_id] = report
        self.done(device_id)
        return True

    def done(self, device_id: str) -> None:
        """Nothing more is expected from ``device_id`` for this version."""
        self.waiting.discard(device_id)
        if not self.waiting:
            self.settled.set()


# ----------------------------------------------------------------------- the owner


class FederatedEvaluation:
    """Asks devices to evaluate versions and records the results (module docstring)."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        sio: socketio.AsyncServer,
        registry: Registry,
        model: GlobalModel,
        distributor: Distributor,
        background: Background,
    ) -> None:
        self._config = config
        self._sio = sio
        self._registry = registry
        self._model = model
        self._distributor = distributor
        self._background = background
        self._tallies: OrderedDict[int, Tally] = OrderedDict()

    def tally(self, version: int) -> Tally | None:
        """The kept tally of ``version`` (None: not asked, or forgotten)."""
        return self._tallies.get(version)

    def published(self, task: Task, version: int) -> None:
        """Version ``version`` is published: ask devices to evaluate it when it is due."""
        cfg = self._config
        if not due(version, cfg.evaluate_every):
            return
        package_bytes = task.package.size if isinstance(task, PackageTask) else None
        eligible = self._registry.eligible(cfg.task, time.monotonic(), package_bytes)
        chosen = select_evaluators(
            [(d.device_id, d.weights_version) for d in eligible], version, cfg.clients_per_round
        )
        if not chosen:
            log.info("version %d: no device can evaluate it now", version)
            return
        tally = Tally(version=version, deadline=time.time() + cfg.round_timeout)
        self._tallies[version] = tally
        while len(self._tallies) > KEPT_VERSIONS:
            self._tallies.popitem(last=False)
        log.info(
            "version %d: asking %d device(s) to evaluate it [%s]",
            version,
            len(chosen),
            ", ".join(self._registry.name_of(d) for d in chosen),
        )
        tally.waiting.update(chosen)
        for index, device_id in enumerate(chosen):
            tally.asked.add(device_id)
            self._background.spawn(
                self._ask(task, tally, device_id, index, len(chosen)),
                f"evaluate-v{version}-{device_id}",
                device_id,
            )

    async def _ask(self, task: Task, tally: Tally, device_id: str, index: int, count: int) -> None:
        try:
            await self._ask_one(task, tally, device_id, index, count)
        except asyncio.CancelledError:
            tally.done(device_id)
            raise
        except Exception:
            log.exception("bug while asking %s to evaluate version %d", device_id, tally.version)
        if device_id not in tally.accepted:
            tally.done(device_id)  # refused, failed or did not answer: nothing will come

    async def settled(self, version: int) -> None:
        """Return once version ``version``'s evaluation is settled (module docstring), at
        the latest at its deadline; at once when it was not asked."""
        tally = self._tallies.get(version)
        if tally is None:
            return
        left = tally.deadline - time.time()
        if left > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tally.settled.wait(), left)
        if not tally.settled.is_set():
            log.info(
                "version %d: evaluation deadline passed; %d device(s) did not report",
                version,
                len(tally.waiting),
            )

    async def _ask_one(
        self, task: Task, tally: Tally, device_id: str, index: int, count: int
    ) -> None:
        record = self._registry.get(device_id)
        if record is None or record.sid is None:
            return
        asked = EvaluationAsk(tally.version, index, count, tally.deadline)
        registry, distributor = self._registry, self._distributor
        if await ask_device(self._sio, registry, distributor, self._config, task, record, asked):
            tally.accepted.add(device_id)

    def on_failed(self, record: DeviceRecord, failed: EvaluationFailed) -> None:
        """A device's ``evaluation:failed``: nothing more will come from it (logged)."""
        tally = self._tallies.get(failed.version)
        if tally is None or record.device_id not in tally.accepted:
            return
        log.info(
            "version %d: %s could not evaluate it (%s): %s",
            failed.version,
            record.name,
            failed.code,
            failed.message,
        )
        tally.done(record.device_id)

    async def on_result(self, record: DeviceRecord, result: EvaluationResult) -> None:
        """A device's ``evaluation:result``: counted once and recorded (module docstring)."""
        tally = self._tallies.get(result.version)
        report = Report(result.loss, result.accuracy, result.num_samples)
        if tally is None or result.task != self._config.task:
            log.info(
                "dropping %s's evaluation of version %d: not asked (or forgotten)",
                record.name,
                result.version,
            )
            return
        if not tally.count(record.device_id, report):
            log.info(
                "dropping %s's evaluation of version %d: not expected from it (or a repeat)",
                record.name,
                result.version,
            )
            return
        late = time.time() > tally.deadline
        fields = weighted_metrics(list(tally.reports.values()))
        await self._model.record_fields(result.version, fields)
        log.info(
            "version %d: %s evaluated it%s: loss %.4f, accuracy %.4f on %d samples; "
            "federated means over %d device(s): loss %.4f, accuracy %.4f",
            result.version,
            record.name,
            " (late)" if late else "",
            result.loss,
            result.accuracy,
            result.num_samples,
            len(tally.reports),
            fields["federated_eval_loss"],
            fields["federated_eval_accuracy"],
        )
