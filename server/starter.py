"""Starting and stopping devices' work in a round: ``training:start`` and ``training:cancel``.

Contract: :meth:`RoundStarter.start` brings one selected device up to date (the current
global, through :class:`server.distribution.Distributor`: inside ``training:start`` as
``baseWeights`` when the device lacks it and it fits one chunk
(:meth:`~server.distribution.Distributor.inline_global`; an ErrorAck then is the device
refusing those weights, recorded as for ``weights:global``, and the slot fails), else
with ``weights:global`` first), sends it ``training:start``
(its partition, the round's base version and deadline, the task's training settings
merged with the operator's flags, :func:`training_config`). For a packaged task
(:class:`server.taskfile.PackageTask`) the device is first given the package and its
share of the train data (:meth:`server.distribution.Distributor.ensure_file`), and
``training:start`` names both and records the answer in the
round's slot: ``training`` when it accepts, ``refused`` (a device refusing because it is
paused is marked paused in the registry, not eligible until a heartbeat says it is back),
``dropped`` when it is gone or does not answer, ``failed`` when the weights cannot be sent
or it answers badly. It never raises except ``CancelledError``: a bug is logged and
the slot fails. :meth:`RoundStarter.cancel` sends ``training:cancel`` and ignores peers
that are gone.

:class:`StrayTraining` tells a device heard (in its heartbeat) training a round that is
not the open one to stop: a device that missed its round's ``training:cancel`` (it was
disconnected when the round closed) would otherwise train on for nothing and refuse
every offer as busy until it is done. It tells each connection once per round.
"""

from __future__ import annotations

import asyncio
import logging
from typing import get_args

import socketio

from client.errors import FedtrayError
from client.protocol import (
    EV_TRAINING_CANCEL,
    EV_TRAINING_START,
    FileRef,
    Partition,
    PauseReason,
    TrainingCancel,
    TrainingConfig,
    TrainingStart,
    TrainingStartAck,
    parse,
)
from client.tasks import Task
from server.background import Background
from server.config import ServerConfig
from server.distribution import Distributor, format_for
from server.registry import DeviceRecord, Registry
from server.rounds import Round
from server.taskfile import PackageTask

log = logging.getLogger(__name__)

_PAUSE_REASONS: dict[str, PauseReason] = {r: r for r in get_args(PauseReason)}


def training_config(task: Task, config: ServerConfig, round_number: int) -> TrainingConfig:
    """The task's recommended training settings, overridden by the operator's flags."""
    defaults = task.training_defaults() if isinstance(task, PackageTask) else task.default_config
    fields = {**defaults, **config.training_overrides()}
    fields["seed"] = config.seed + round_number
    return TrainingConfig.model_validate(fields)


class RoundStarter:
    """Sends ``training:start`` and ``training:cancel`` (see the module docstring)."""

    def __init__(
        self,
        sio: socketio.AsyncServer,
        config: ServerConfig,
        registry: Registry,
        distributor: Distributor,
    ) -> None:
        self._sio = sio
        self._config = config
        self._registry = registry
        self._distributor = distributor
        #: The round's training settings, made once per round (task, round id), not per device.
        self._round_config: tuple[Task, str, TrainingConfig] | None = None

    def _training_config(self, task: Task, rnd: Round) -> TrainingConfig:
        """:func:`training_config` of ``rnd``, the same object for each of its devices."""
        kept = self._round_config
        if kept is not None and kept[0] is task and kept[1] == rnd.round_id:
            return kept[2]
        config = training_config(task, self._config, rnd.number)
        self._round_config = (task, rnd.round_id, config)
        return config

    async def cancel(self, round_id: str, device_ids: list[str], reason: str) -> None:
        """Tell the devices still working on round ``round_id`` to stop
        (``training:cancel``)."""
        message = TrainingCancel(round_id=round_id, reason=reason).to_wire()
        sends = []
        for device_id in device_ids:
            record = self._registry.get(device_id)
            if record is not None and record.sid is not None:
                sends.append(self._sio.emit(EV_TRAINING_CANCEL, message, to=record.sid))
        await asyncio.gather(*sends, return_exceptions=True)

    async def start(self, task: Task, rnd: Round, device_id: str, index: int, count: int) -> None:
        """Bring one selected device up to date and start it; free its slot on failure."""
        try:
            await self._start_one(task, rnd, device_id, index, count)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bug while starting %s in round %s", device_id, rnd.round_id)
            rnd.mark(device_id, "failed", "server error")
        finally:
            self._distributor.release_inline(device_id)  # however the start ended

    async def _send_task_files(
        self, task: PackageTask, record: DeviceRecord, partition: Partition
    ) -> tuple[FileRef, FileRef | None] | None:
        """Make sure the device holds the package and its data share; their refs, or None
        when it could not be given them (logged by the distributor)."""
        package = task.package
        if not await self._distributor.ensure_file(
            record, "package", package.content, package.sha256
        ):
            return None
        if task.shares is None:
            return package.ref, None
        try:
            share = await asyncio.to_thread(task.shares.share, partition)
        except FedtrayError as exc:
            log.warning("cannot cut the data share %s: %s", partition, exc.message)
            return None
        if not await self._distributor.ensure_file(record, "data", share.content, share.sha256):
            return None
        return package.ref, share.ref

    async def _start_one(
        self, task: Task, rnd: Round, device_id: str, index: int, count: int
    ) -> None:
        cfg = self._config
        record = self._registry.get(device_id)
        if record is None or record.sid is None:
            rnd.mark(device_id, "dropped", "disconnected")
            return
        # A small global rides in training:start (one round trip less); else it goes first.
        inline = await self._distributor.inline_global(record)
        if inline is None and not await self._distributor.ensure_global(record):
            rnd.mark(device_id, "failed", "could not send the global weights")
            return
        partition = cfg.partition_of(index, count)
        package: FileRef | None = None
        data: FileRef | None = None
        if isinstance(task, PackageTask):
            sent = await self._send_task_files(task, record, partition)
            if sent is None:
                rnd.mark(device_id, "failed", "could not send the task package")
                if inline is not None:  # it was left out of the broadcast for this start
                    self._distributor.send_global_later(record)
                return
            package, data = sent
        sid = record.sid
        if sid is None:
            rnd.mark(device_id, "dropped", "disconnected")
            return
        start = TrainingStart(
            round_id=rnd.round_id,
            task=cfg.task,
            model_params=dict(task.params),
            config=self._training_config(task, rnd),
            partition=partition,
            base_version=rnd.base_version,
            deadline=rnd.deadline_unix,
            weight_format=format_for(record),
            package=package,
            data=data,
            base_weights=inline,
        )
        try:
            ack = await self._sio.call(
                EV_TRAINING_START, start.to_wire(), to=sid, timeout=cfg.ack_timeout
            )
        except Exception as exc:  # timeout or disconnect
            rnd.mark(device_id, "dropped", f"no answer to training:start ({type(exc).__name__})")
            return
        if inline is not None and not self._distributor.settle_inline(record, inline, ack):
            rnd.mark(device_id, "failed", "could not send the global weights")
            return
        try:
            answer = parse(TrainingStartAck, ack)
        except FedtrayError as exc:
            log.warning("device %s answered training:start badly: %s", record.name, exc.message)
            rnd.mark(device_id, "failed", "bad answer to training:start")
            return
        if answer.accepted:
            rnd.mark(device_id, "training")
            self._registry.training_started(device_id)
            return
        rnd.mark(device_id, "refused", answer.reason)
        log.info(
            "round %s: %s refused to train: %s%s",
            rnd.round_id,
            record.name,
            answer.reason or "no reason given",
            f" ({answer.detail})" if answer.detail else "",
        )
        pause = _PAUSE_REASONS.get(answer.reason or "")
        if pause is not None:
            # Not eligible again until a heartbeat says it is back.
            self._registry.refused_paused(device_id, pause, answer.detail)
        elif answer.reason is not None:
            self._registry.refused_round(device_id, answer.reason, answer.detail)


class StrayTraining:
    """Devices heard training a round that is not open: told to stop (module docstring).
    Loop-only."""

    def __init__(self, starter: RoundStarter, background: Background) -> None:
        self._starter = starter
        self._background = background
        #: device id -> (connection, round id) it was last told to stop
        self._told: dict[str, tuple[str, str]] = {}

    def heard(self, record: DeviceRecord, round_id: str, open_round: str | None) -> None:
        """A heartbeat of ``record`` says it trains ``round_id``; ``open_round``: the
        round open here (None: none)."""
        if round_id == open_round or record.sid is None:
            return
        told = (record.sid, round_id)
        if self._told.get(record.device_id) == told:
            return
        self._told[record.device_id] = told
        log.info(
            "device %s is still on round %s, which is not open; telling it to stop",
            record.name,
            round_id,
        )
        self._background.spawn(
            self._starter.cancel(round_id, [record.device_id], "the round is closed"),
            f"stop-{record.device_id}",
            record.device_id,
        )

    def forget(self, device_id: str) -> None:
        """The device disconnected."""
        self._told.pop(device_id, None)
