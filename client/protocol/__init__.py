"""Wire protocol v1: every payload exchanged between a fedtray client and a server.

This package is the one wire contract; the reference server imports it, and
``docs/protocol.md`` is generated from it (``python -m server.protocol_doc``). This module
holds the payload models and re-exports those declared beside it, so every public name
is importable from :mod:`client.protocol`: the field types, :class:`WireModel` and
:func:`parse` (:mod:`client.protocol.wire`), what a device says of itself at registration
and in heartbeats (:mod:`client.protocol.device`), what a device works on (:class:`Partition`,
:class:`FileRef`: :mod:`client.protocol.work`) and the federated-evaluation payloads
(:mod:`client.protocol.evaluation`). :mod:`client.protocol.events` declares the event
table (each event's direction, payload and ack model) and :mod:`client.protocol.guard` is
the one handler guard both peers register their handlers through.

Conventions (promised to every peer):

- Transport: Socket.IO v5 (socket.io 4.x compatible), default namespace ``/``,
  WebSocket transport preferred. The client may send ``auth: {"token": "..."}`` when
  connecting.
- Field names are camelCase on the wire; Python code uses snake_case attributes.
- Unknown fields are ignored (a newer peer may add optional fields); missing required
  fields, wrong types and out-of-range values are refused with an :class:`ErrorAck`
  whose code is ``bad_request``.
- Binary data (``bytes`` fields) travels as Socket.IO binary attachments, never as base64.
- Every acknowledged request is answered with its positive ack model or with
  :class:`ErrorAck` ``{ok: false, code, message}``.

Nothing here performs I/O; :func:`parse` turns a raw event payload into a model or
raises :class:`client.errors.FedtrayError` with code ``bad_request`` (or the code a
model's :meth:`WireModel.check_wire` names, e.g. ``unsupported_protocol``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, JsonValue, model_validator

from client.errors import ErrorCode
from client.protocol.device import (
    BatteryStatus as BatteryStatus,
    Capabilities as Capabilities,
    GpuInfo as GpuInfo,
    HardwareInfo as HardwareInfo,
    PlatformInfo as PlatformInfo,
    ResourceSnapshot as ResourceSnapshot,
)
from client.protocol.evaluation import (
    EvaluationFailed as EvaluationFailed,
    EvaluationResult as EvaluationResult,
    EvaluationStart as EvaluationStart,
    EvaluationStartAck as EvaluationStartAck,
)
from client.protocol.wire import (
    DEFAULT_CHUNK_BYTES as DEFAULT_CHUNK_BYTES,
    DEFAULT_INFLIGHT_CHUNKS as DEFAULT_INFLIGHT_CHUNKS,
    DEFAULT_MAX_BLOB_BYTES as DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_PACKAGE_CACHE_BYTES as DEFAULT_PACKAGE_CACHE_BYTES,
    DEFAULT_PARTITION_ALPHA as DEFAULT_PARTITION_ALPHA,
    MAX_PARTITION_ALPHA as MAX_PARTITION_ALPHA,
    PARTITION_SCHEMES as PARTITION_SCHEMES,
    PROTOCOL_VERSION as PROTOCOL_VERSION,
    SOCKETIO_DEFAULT_MAX_BUFFER_BYTES as SOCKETIO_DEFAULT_MAX_BUFFER_BYTES,
    DeviceId as DeviceId,
    DeviceState as DeviceState,
    DeviceType as DeviceType,
    FiniteFloat as FiniteFloat,
    Identifier as Identifier,
    Name as Name,
    NonNegFloat as NonNegFloat,
    NonNegInt as NonNegInt,
    Optimizer as Optimizer,
    PartitionScheme as PartitionScheme,
    PauseReason as PauseReason,
    Percent as Percent,
    PosInt as PosInt,
    RefusalReason as RefusalReason,
    Sha256Hex as Sha256Hex,
    ShortText as ShortText,
    TaskFileKind as TaskFileKind,
    WeightFormat as WeightFormat,
    WireModel as WireModel,
    check_protocol as check_protocol,
    parse as parse,
)
from client.protocol.work import FileRef as FileRef, Partition as Partition

# Event names. The first seven come from the original client and are fixed.
EV_REGISTER = "device:register"
EV_REGISTERED = "device:registered"
EV_HEARTBEAT = "device:heartbeat"
EV_TRAINING_START = "training:start"
EV_TRAINING_PROGRESS = "training:progress"
EV_WEIGHTS_SUBMIT = "weights:submit"
EV_WEIGHTS_GLOBAL = "weights:global"
EV_TRAINING_CANCEL = "training:cancel"
EV_TRAINING_ERROR = "training:error"
EV_BLOB_CHUNK = "blob:chunk"
EV_BLOB_STATUS = "blob:status"
EV_TASK_FILE = "task:file"
EV_EVALUATION_START = "evaluation:start"
EV_EVALUATION_RESULT = "evaluation:result"
EV_EVALUATION_FAILED = "evaluation:failed"


# --- registration and heartbeat --------------------------------------------------------


class DeviceRegister(WireModel):
    """``device:register`` (client -> server, acked with DeviceRegistered or ErrorAck).

    Sent after every (re)connect with the same ``deviceId``.
    """

    protocol: Literal[1] = PROTOCOL_VERSION
    device_id: DeviceId
    name: Name
    device_type: DeviceType
    platform: PlatformInfo
    hardware: HardwareInfo
    resources: ResourceSnapshot
    capabilities: Capabilities
    client_version: ShortText
    weights_version: NonNegInt | None = Field(
        default=None, description="Global weights version the device holds, null if none."
    )
    state: DeviceState = Field(
        default="idle",
        description="State when (re)connecting: a paused device says so here, so it is "
        "never offered a round before its first heartbeat.",
    )
    pause_reason: PauseReason | None = None
    pause_detail: ShortText | None = None

    @classmethod
    def check_wire(cls, payload: dict[str, Any]) -> None:
        check_protocol(cls.__name__, payload)


class Limits(WireModel):
    """Transfer limits of the server; the client never sends more than these."""

    max_chunk_bytes: PosInt = DEFAULT_CHUNK_BYTES
    max_blob_bytes: PosInt = DEFAULT_MAX_BLOB_BYTES
    max_inflight_chunks: PosInt = DEFAULT_INFLIGHT_CHUNKS


class DeviceRegistered(WireModel):
    """``device:registered`` (server -> client), also the positive ack of ``device:register``."""

    ok: Literal[True] = True
    protocol: Literal[1] = PROTOCOL_VERSION
    device_id: DeviceId
    heartbeat_interval_sec: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]
    server_version: ShortText
    limits: Limits
    task: Identifier | None = Field(default=None, description="The task the server trains.")
    global_version: NonNegInt | None = Field(
        default=None, description="Current global weights version, null before the first."
    )

    @classmethod
    def check_wire(cls, payload: dict[str, Any]) -> None:
        check_protocol(cls.__name__, payload)


class CpuBudget(WireModel):
    """How hard the device lets training work now (its politeness rules)."""

    cores: PosInt = Field(description="Cores (torch threads) training may use.")
    cpu_percent: int = Field(
        ge=1, le=100, description="Share of those cores' time training may use, 1-100."
    )
    why: ShortText = Field(description="Plain words, e.g. 'you are using the computer'.")
    applied: bool = Field(
        default=False, description="True once the worker keeps it; false: only requested."
    )


class Heartbeat(WireModel):
    """``device:heartbeat`` (client -> server, acked with OkAck or ErrorAck)."""

    state: DeviceState
    pause_reason: PauseReason | None = None
    pause_detail: ShortText | None = Field(
        default=None, description="Plain words, e.g. 'On battery at 42 %'."
    )
    round_id: Identifier | None = None
    weights_version: NonNegInt | None = None
    resources: ResourceSnapshot
    hardware: HardwareInfo | None = Field(
        default=None,
        description="The device's hardware when it changed since registration (its GPU "
        "probe finished after it registered); it replaces the registered hardware. null: "
        "unchanged. Sent until a heartbeat carrying it is acknowledged.",
    )
    budget: CpuBudget | None = Field(
        default=None, description="The device's CPU budget; null: none decided (yet)."
    )


# --- training --------------------------------------------------------------------------


class TrainingConfig(WireModel):
    """Hyper-parameters of one local round."""

    epochs: Annotated[int, Field(ge=1, le=1000)]
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)]
    learning_rate: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]
    optimizer: Optimizer = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    seed: NonNegInt = 0
    proximal_mu: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        default=0.0,
        description="FedProx: the device adds (proximalMu/2)||w - w_global||^2 to the task's "
        "loss (0: plain local training, the term skipped). Sent by a server run with "
        "--strategy fedprox.",
    )


class TrainingStart(WireModel):
    """``training:start`` (server -> client, acked with TrainingStartAck).

    A packaged task names its package (and, when the server holds the data, this
    device's share of the training data); the server offers both with ``task:file``
    before, and a device that does not hold them refuses with ``missing_package``.
    """

    round_id: Identifier
    task: Identifier
    model_params: dict[str, JsonValue] = Field(
        default_factory=dict, description="Task-specific model parameters (JSON object)."
    )
    config: TrainingConfig
    partition: Partition
    base_version: NonNegInt = Field(description="Global weights version to start from.")
    deadline: NonNegFloat = Field(description="Unix time (seconds) after which the round closes.")
    weight_format: WeightFormat = "safetensors"
    package: FileRef | None = Field(
        default=None,
        description="The task package (.fedtask) to train; absent for an installed task.",
    )
    data: FileRef | None = Field(
        default=None,
        description="This device's share of the training data (safetensors with x and y, "
        "already partitioned); absent when the device reads its own data.",
    )
    base_weights: WeightsGlobal | None = Field(
        default=None,
        description="The base version as its weights:global message, inline, when the device "
        "does not hold it yet and the document fits one chunk (saves a round trip). The "
        "device takes it exactly as a weights:global (verified, validated, stored) before "
        "answering, and answers an ErrorAck when it refuses the weights.",
    )


class TrainingStartAck(WireModel):
    """Answer to ``training:start``. A refusal names a reason; a paused device gives its pause
    reason and plain-words detail."""

    accepted: bool
    reason: RefusalReason | PauseReason | None = None
    detail: ShortText | None = None


class TrainingProgress(WireModel):
    """``training:progress`` (client -> server, not acked); at most 2 per second."""

    round_id: Identifier
    epoch: NonNegInt = Field(description="Epoch in progress, 1-based (0 before the first batch).")
    epochs: PosInt
    step: NonNegInt = Field(description="Batches done in this epoch.")
    steps: PosInt = Field(description="Batches per epoch.")
    fraction: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    loss: FiniteFloat | None = None
    samples_per_sec: NonNegFloat | None = None
    batch_size: PosInt | None = Field(default=None, description="Effective batch size.")
    state: Literal["training", "paused"] = "training"
    pause_reason: PauseReason | None = None
    pause_detail: ShortText | None = Field(
        default=None, description="Plain words when paused, as in the heartbeat."
    )


class TrainingCancel(WireModel):
    """``training:cancel`` (server -> client, not acked): stop work on the round."""

    round_id: Identifier
    reason: ShortText = ""


class TrainingError(WireModel):
    """``training:error`` (client -> server, not acked): the round failed on the device."""

    round_id: Identifier | None
    code: ErrorCode
    message: ShortText


# --- weights ---------------------------------------------------------------------------


class WeightsRef(WireModel):
    """A weights document, inline (``data``) or in a blob sent before (``blobId``)."""

    format: WeightFormat
    size: NonNegInt = Field(description="Byte length of the encoded document.")
    sha256: Sha256Hex = Field(description="Lower-case hex SHA-256 of the encoded document.")
    data: bytes | None = Field(default=None, description="Inline bytes (binary attachment).")
    blob_id: Identifier | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> WeightsRef:
        if (self.data is None) == (self.blob_id is None):
            raise ValueError("exactly one of 'data' and 'blobId' must be given")
        if self.data is not None and len(self.data) != self.size:
            raise ValueError(f"inline data is {len(self.data)} bytes but size says {self.size}")
        return self


Metrics = dict[Identifier, FiniteFloat]


class WeightsSubmit(WireModel):
    """``weights:submit`` (client -> server, acked with SubmitAccepted or ErrorAck)."""

    round_id: Identifier
    base_version: NonNegInt
    num_samples: PosInt
    metrics: Metrics = Field(default_factory=dict, description="e.g. trainLoss, seconds.")
    weights: WeightsRef


class SubmitAccepted(WireModel):
    """Positive ack of ``weights:submit``: the update is counted exactly once."""

    ok: Literal[True] = True
    round_id: Identifier
    received: NonNegInt = Field(description="Updates counted in this round so far.")


class WeightsGlobal(WireModel):
    """``weights:global`` (server -> client, acked with OkAck or ErrorAck)."""

    version: NonNegInt
    task: Identifier
    round_id: Identifier | None = None
    metrics: Metrics = Field(
        default_factory=dict,
        description="What the server knows about this version when it sends it: e.g. the "
        "round's trainLoss (weighted by samples), and evalLoss, evalAccuracy once its "
        "evaluation is done (it may come after the version is published, so the first "
        "copy of a version often lacks them).",
    )
    weights: WeightsRef
    model_params: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="The model the weights are for, as training:start names it; a device "
        "that knows that model's layout refuses weights that do not fit it.",
    )
    package: FileRef | None = Field(
        default=None,
        description="The task package the weights are for, as training:start names it; "
        "absent for an installed task.",
    )


EV_FEDERATION_FINISHED = "federation:finished"


class FederationFinished(WireModel):
    """``federation:finished`` (server -> client, no ack): every round is complete.

    Sent after the final ``weights:global`` (so a device holds the final model), and to a
    device that registers after the end. The server keeps serving until it is stopped.
    """

    task: Identifier
    rounds_completed: NonNegInt
    version: NonNegInt = Field(description="The final global version.")
    metrics: Metrics = Field(
        default_factory=dict,
        description="The final version's evaluation, e.g. evalAccuracy (the server "
        "finishes it before sending this).",
    )


# --- blob transfer sub-protocol ----------------------------------------------------------


class BlobChunk(WireModel):
    """``blob:chunk`` (either direction, acked with BlobProgress or ErrorAck).

    Chunks of one blob are sent in order; ``offset`` must equal what the receiver holds
    (a repeated chunk below it is acknowledged without effect; one past it is refused
    with ``offset_gap``; one that would run past ``total`` is refused with
    ``size_mismatch`` and changes nothing). ``total`` and ``sha256`` are the whole blob's
    and must be the same in every chunk. The chunk that completes the blob is refused
    with ``checksum_mismatch``, and the blob dropped, when the blob does not hash to
    ``sha256``.
    """

    blob_id: Identifier
    offset: NonNegInt
    total: PosInt
    sha256: Sha256Hex
    data: bytes


class BlobStatus(WireModel):
    """``blob:status`` (either direction, acked with BlobProgress): how much is held."""

    blob_id: Identifier


class BlobProgress(WireModel):
    """Bytes of the blob the receiver holds (0 when unknown); the sender resumes there."""

    ok: Literal[True] = True
    received: NonNegInt
    complete: bool = False


# --- task files ------------------------------------------------------------------------


class TaskFile(WireModel):
    """``task:file`` (server -> client, acked with TaskFileHeld or ErrorAck).

    Without ``blobId``: a question, "do you hold this file?" (the device answers from its
    cache). With ``blobId``: the file was just sent as that blob (see Transfers); the
    device checks its size and SHA-256 and keeps it in its task-file cache. Only a device
    that advertised ``taskPackages`` is sent one.
    """

    kind: TaskFileKind = Field(description="package: a .fedtask; data: a data share.")
    sha256: Sha256Hex
    size: PosInt
    blob_id: Identifier | None = None


class TaskFileHeld(WireModel):
    """Answer to ``task:file``: whether the device now holds the file."""

    ok: Literal[True] = True
    held: bool


# --- acks ------------------------------------------------------------------------------


class OkAck(WireModel):
    """A plain positive ack."""

    ok: Literal[True] = True


class ErrorAck(WireModel):
    """The refusal used everywhere: a stable code and a plain-words message."""

    ok: Literal[False] = False
    code: ErrorCode
    message: ShortText


def error_ack(code: ErrorCode, message: str) -> dict[str, Any]:
    """An ErrorAck as a wire dict."""
    return ErrorAck(code=code, message=message[:1000]).to_wire()
