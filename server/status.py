"""The status API's models (``GET /api/status``) and the pure function that builds them.

Contract: every model here is a pydantic model with camelCase JSON names, listed in
:data:`STATUS_MODELS` so ``docs/protocol.md`` can carry their JSON Schema. The status
never contains a token or any auth material: it is built only from the registry, the
current round and the round history. :func:`build_status` performs no I/O, nor does
:func:`abandoned_record` (the history record of a round given up).
:class:`RoundRecord` is also the format of each entry of the persisted ``history.json``.
A version appears (``globalVersion``, its completed record) as soon as it is published;
its record's ``evalLoss``/``evalAccuracy`` may arrive later (null until the server's
evaluation of it is recorded; null for good if it was skipped for a newer version, or the
server stopped first, or it does not evaluate); likewise its ``federatedEval*`` fields,
recorded (and updated) as devices' federated evaluation results arrive (:mod:`server.fedeval`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from client.protocol import CpuBudget, DeviceState, DeviceType, GpuInfo, PauseReason
from server.registry import Registry
from server.rounds import Round
from server.strategies.settings import StrategySettings

#: Where the federation stands (owned by :class:`server.phase.PhaseMachine`).
FederationPhase = Literal["closed", "waiting", "starting", "training", "aggregating", "finished"]


class StatusModel(BaseModel):
    """Base of the status models: camelCase on the wire, unknown fields ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class RoundTiming(StatusModel):
    """When a completed round reached each step (Unix times; for benchmarks and operators)."""

    opened_at: float = Field(description="The round opened: devices selected, starts sent.")
    collected_at: float = Field(
        description="Collection ended (every update in, or the deadline); aggregation began."
    )
    aggregated_at: float = Field(description="The new global was averaged and evaluated.")
    published_at: float | None = Field(
        default=None,
        description="The new version was saved and published. Set after the record is "
        "first saved: history.json has it only once a later write (the version's "
        "evaluation, the next round) saved the record again.",
    )


class RoundRecord(StatusModel):
    """One finished round attempt."""

    round_id: str
    number: int = Field(description="Round number (1-based); a retried round keeps its number.")
    outcome: Literal["completed", "abandoned"]
    version: int = Field(description="Global version after the round (unchanged if abandoned).")
    clients_selected: int
    clients_reported: int
    train_loss: float | None = Field(description="Mean of metrics.trainLoss weighted by samples.")
    eval_loss: float | None = Field(
        default=None,
        description="The new version's loss on the server's test split; may arrive after "
        "the record (null until then, or for good: skipped for a newer version, or none).",
    )
    eval_accuracy: float | None = Field(
        default=None, description="Like evalLoss: may arrive after the record."
    )
    federated_eval_loss: float | None = Field(
        default=None,
        description="Federated evaluation: the mean of the loss the devices measured on "
        "their own test splits, weighted by their sample counts (--evaluate-every); null "
        "until the first result arrives, or for good when the version was not evaluated.",
    )
    federated_eval_accuracy: float | None = Field(
        default=None, description="Like federatedEvalLoss, for the accuracy."
    )
    federated_eval_samples: int | None = Field(
        default=None, description="Test samples behind the federated means (all devices)."
    )
    federated_eval_devices: int | None = Field(
        default=None, description="Devices whose results are in the federated means."
    )
    seconds: float
    finished_at: float = Field(description="Unix time.")
    detail: str | None = Field(default=None, description="Why an attempt was abandoned.")
    timing: RoundTiming | None = Field(default=None, description="Completed rounds only.")


class CurrentRound(StatusModel):
    """The round being prepared or run."""

    number: int
    phase: Literal["waiting", "starting", "training", "aggregating"]
    round_id: str | None = None
    waiting_reason: str | None = None
    selected: list[str] = Field(default_factory=list, description="Device ids.")
    reported: list[str] = Field(default_factory=list, description="Device ids.")
    required: int | None = Field(default=None, description="Reports needed to succeed.")
    deadline: float | None = Field(default=None, description="Unix time the round closes.")


class DeviceStatus(StatusModel):
    """One device as the server sees it."""

    id: str
    name: str
    type: DeviceType
    state: DeviceState
    pause_reason: PauseReason | None = None
    pause_detail: str | None = None
    refusal: str | None = Field(
        default=None,
        description="Why the device last refused a round (not a pause), until it accepts one; "
        "e.g. no_local_data: no data folder is set for the task.",
    )
    battery_percent: float | None = None
    plugged_in: bool | None = None
    cpu_percent: float
    last_seen: float = Field(description="Unix time of the last message.")
    rounds_completed: int
    connected: bool
    stale: bool
    weights_version: int | None = None
    progress: float | None = Field(default=None, description="Local training fraction, 0-1.")
    client_version: str
    gpu: GpuInfo | None = Field(
        default=None,
        description="The accelerator the device reported (at registration or in a later "
        "heartbeat), null for none or not known yet.",
    )
    clipped_in_round: int | None = Field(
        default=None,
        description="The last round in which this device's update was farther than "
        "--clip-norm from the global and was scaled back; null if never.",
    )
    clipped_norm: float | None = Field(
        default=None, description="That update's L2 distance from the global, before clipping."
    )
    budget: CpuBudget | None = Field(
        default=None,
        description="How hard the device lets training work (cores, cpuPercent, why; "
        "applied false while only requested), from its last heartbeat; null: not reported.",
    )


class StrategyStatus(StatusModel):
    """The aggregation strategy the server runs (docs/strategies.md)."""

    name: str = Field(description="fedavg, fedprox, fedavgm, fedadam, median or trimmed-mean.")
    parameters: dict[str, float] = Field(
        default_factory=dict,
        description="What it runs with, defaults filled in (camelCase: proximalMu, serverLr, "
        "serverMomentum, beta1, beta2, tau, trimFraction; clipNorm when clipping).",
    )


class ServerStatus(StatusModel):
    """``GET /api/status``."""

    server_version: str
    protocol: int
    task: str
    global_version: int
    rounds_target: int = Field(description="Rounds to run; 0 means forever.")
    phase: FederationPhase = Field(
        description="closed (between rounds), waiting, starting, training, aggregating, or "
        "finished (every round is complete; the final global stays available)."
    )
    current_round: CurrentRound | None
    history: list[RoundRecord]
    devices: list[DeviceStatus]
    strategy: StrategyStatus = Field(
        default_factory=lambda: StrategyStatus(name="fedavg"),
        description="The aggregation strategy and its parameters.",
    )


STATUS_MODELS: list[type[BaseModel]] = [
    ServerStatus,
    CurrentRound,
    RoundRecord,
    RoundTiming,
    DeviceStatus,
    StrategyStatus,
]


def build_status(
    *,
    server_version: str,
    protocol: int,
    task: str,
    global_version: int,
    rounds_target: int,
    phase: FederationPhase,
    current: CurrentRound | None,
    history: list[RoundRecord],
    registry: Registry,
    now_mono: float,
    now_unix: float,
    strategy: StrategySettings | None = None,
) -> ServerStatus:
    """The status document. Registry times are monotonic; they are shown as Unix times."""
    devices = device_statuses(registry, now_mono, now_unix)
    return ServerStatus(
        server_version=server_version,
        protocol=protocol,
        task=task,
        global_version=global_version,
        rounds_target=rounds_target,
        phase=phase,
        current_round=current,
        history=list(history),
        devices=devices,
        strategy=strategy_status(strategy or StrategySettings()),
    )


def device_statuses(registry: Registry, now_mono: float, now_unix: float) -> list[DeviceStatus]:
    """Every device of ``registry`` as the status shows it (monotonic times as Unix times)."""
    devices = []
    for rec in registry.all():
        battery = rec.resources.battery
        devices.append(
            DeviceStatus(
                id=rec.device_id,
                name=rec.name,
                type=rec.device_type,
                state=rec.state,
                pause_reason=rec.pause_reason,
                pause_detail=rec.pause_detail,
                refusal=rec.refusal,
                battery_percent=battery.percent if battery else None,
                plugged_in=battery.plugged_in if battery else None,
                cpu_percent=rec.resources.cpu_percent,
                last_seen=now_unix - (now_mono - rec.last_seen),
                rounds_completed=rec.rounds_completed,
                connected=rec.connected,
                stale=registry.is_stale(rec, now_mono),
                weights_version=rec.weights_version,
                progress=rec.progress.fraction if rec.progress else None,
                client_version=rec.client_version,
                gpu=rec.hardware.gpu,
                clipped_in_round=rec.clipped_round,
                clipped_norm=rec.clipped_norm,
                budget=rec.budget,
            )
        )
    return devices


def strategy_status(settings: StrategySettings) -> StrategyStatus:
    """The status view of the strategy settings (parameter names in camelCase)."""
    params = settings.parameters()
    return StrategyStatus(
        name=settings.name, parameters={to_camel(key): value for key, value in params.items()}
    )


def current_from_round(
    rnd: Round,
    phase: Literal["starting", "training", "aggregating"],
    now_mono: float,
    now_unix: float,
) -> CurrentRound:
    """The CurrentRound view of a running round."""
    return CurrentRound(
        number=rnd.number,
        phase=phase,
        round_id=rnd.round_id,
        selected=rnd.selected,
        reported=rnd.reported,
        required=rnd.required,
        deadline=now_unix + (rnd.deadline - now_mono),
    )


def abandoned_record(
    rnd: Round, version: int, detail: str, now_mono: float, now_unix: float
) -> RoundRecord:
    """The history record of ``rnd``, given up at ``now`` with ``version`` still current."""
    return _round_record(rnd, "abandoned", version, now_mono, now_unix, detail=detail)


def completed_record(
    rnd: Round,
    version: int,
    train_loss: float | None,
    collected_at: float,
    now_mono: float,
    now_unix: float,
) -> RoundRecord:
    """The history record of ``rnd``, aggregated into ``version`` at ``now`` (its updates
    all in at Unix time ``collected_at``); ``timing.publishedAt`` is the caller's to set."""
    opened_at = now_unix - (now_mono - rnd.started_at)
    timing = RoundTiming(opened_at=opened_at, collected_at=collected_at, aggregated_at=now_unix)
    return _round_record(
        rnd, "completed", version, now_mono, now_unix, train_loss=train_loss, timing=timing
    )


def _round_record(
    rnd: Round,
    outcome: Literal["completed", "abandoned"],
    version: int,
    now_mono: float,
    now_unix: float,
    *,
    train_loss: float | None = None,
    detail: str | None = None,
    timing: RoundTiming | None = None,
) -> RoundRecord:
    extra = {} if detail is None else {"detail": detail}
    return RoundRecord(
        round_id=rnd.round_id,
        number=rnd.number,
        outcome=outcome,
        version=version,
        clients_selected=len(rnd.slots),
        clients_reported=len(rnd.reported),
        train_loss=train_loss,
        seconds=round(now_mono - rnd.started_at, 3),
        finished_at=now_unix,
        timing=timing,
        **extra,
    )
