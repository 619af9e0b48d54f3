"""The event table of wire protocol v1: every Socket.IO event, declared once.

For each event: its name, which peer sends it, its payload model, its positive ack model
(``None``: the event is not acknowledged) and a one-line purpose. Everything else is
derived from this table: ``docs/protocol.md`` (:mod:`server.protocol_doc`), the handler
guard (:mod:`client.protocol.guard`) and the set of events each peer must handle
(:func:`handled_by`).

Promises: every acknowledged event is answered with its ack model or with an
:class:`~client.protocol.ErrorAck`; an unacknowledged event is never answered. Pure data:
no I/O, nothing raises at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Generic, Literal, Never, TypeVar

from client.protocol import (
    EV_BLOB_CHUNK,
    EV_BLOB_STATUS,
    EV_EVALUATION_FAILED,
    EV_EVALUATION_RESULT,
    EV_EVALUATION_START,
    EV_FEDERATION_FINISHED,
    EV_HEARTBEAT,
    EV_REGISTER,
    EV_REGISTERED,
    EV_TASK_FILE,
    EV_TRAINING_CANCEL,
    EV_TRAINING_ERROR,
    EV_TRAINING_PROGRESS,
    EV_TRAINING_START,
    EV_WEIGHTS_GLOBAL,
    EV_WEIGHTS_SUBMIT,
    BlobChunk,
    BlobProgress,
    BlobStatus,
    DeviceRegister,
    DeviceRegistered,
    EvaluationFailed,
    EvaluationResult,
    EvaluationStart,
    EvaluationStartAck,
    FederationFinished,
    Heartbeat,
    OkAck,
    SubmitAccepted,
    TaskFile,
    TaskFileHeld,
    TrainingCancel,
    TrainingError,
    TrainingProgress,
    TrainingStart,
    TrainingStartAck,
    WeightsGlobal,
    WeightsSubmit,
    WireModel,
)

Peer = Literal["device", "server"]
Direction = Literal["device→server", "server→device", "both"]
"""Who sends the event; ``both``: either peer sends it (the blob sub-protocol)."""

P = TypeVar("P", bound=WireModel)
A = TypeVar("A", bound=WireModel)


@dataclass(frozen=True)
class EventSpec(Generic[P, A]):
    """One row of the event table.

    ``P`` is the payload model; ``A`` the positive ack model (``Never`` for an event
    that is not acknowledged, whose ``ack`` is ``None``).
    """

    name: str
    direction: Direction
    payload: type[P]
    ack: type[A] | None
    description: str

    @property
    def acked(self) -> bool:
        """True when the receiver answers the event (with ``ack`` or an ErrorAck)."""
        return self.ack is not None

    def sent_by(self, peer: Peer) -> bool:
        """True when ``peer`` sends this event."""
        return self.direction == "both" or self.direction.startswith(peer)

    def handled_by(self, peer: Peer) -> bool:
        """True when ``peer`` receives this event (and so registers a handler for it)."""
        return self.direction == "both" or self.direction.endswith(peer)


REGISTER: Final = EventSpec(
    EV_REGISTER,
    "device→server",
    DeviceRegister,
    DeviceRegistered,
    "Announce the device; repeated after every reconnect with the same deviceId.",
)
REGISTERED: Final[EventSpec[DeviceRegistered, Never]] = EventSpec(
    EV_REGISTERED,
    "server→device",
    DeviceRegistered,
    None,
    "Registration confirmed (same payload as the ack, for clients that do not use acks).",
)
HEARTBEAT: Final = EventSpec(
    EV_HEARTBEAT,
    "device→server",
    Heartbeat,
    OkAck,
    "State and resources every heartbeatIntervalSec; 3 missed intervals mark a device stale. "
    "Also updates the registration: a heartbeat with hardware replaces the registered "
    "hardware (the GPU, found after registering).",
)
WEIGHTS_GLOBAL: Final = EventSpec(
    EV_WEIGHTS_GLOBAL,
    "server→device",
    WeightsGlobal,
    OkAck,
    "New global model; the device stores it and trains the next round from it.",
)
TRAINING_START: Final = EventSpec(
    EV_TRAINING_START,
    "server→device",
    TrainingStart,
    TrainingStartAck,
    "Ask the device to train one round; a paused or busy device refuses with a reason.",
)
TRAINING_PROGRESS: Final[EventSpec[TrainingProgress, Never]] = EventSpec(
    EV_TRAINING_PROGRESS,
    "device→server",
    TrainingProgress,
    None,
    "At most 2 per second, plus the last of the round; state 'paused' while paused.",
)
WEIGHTS_SUBMIT: Final = EventSpec(
    EV_WEIGHTS_SUBMIT,
    "device→server",
    WeightsSubmit,
    SubmitAccepted,
    "The trained update; counted exactly once per device and round.",
)
TRAINING_CANCEL: Final[EventSpec[TrainingCancel, Never]] = EventSpec(
    EV_TRAINING_CANCEL,
    "server→device",
    TrainingCancel,
    None,
    "Stop work on a round (it timed out or was abandoned).",
)
TRAINING_ERROR: Final[EventSpec[TrainingError, Never]] = EventSpec(
    EV_TRAINING_ERROR,
    "device→server",
    TrainingError,
    None,
    "The round failed on the device (bad weights, crash, out of memory).",
)
BLOB_CHUNK: Final = EventSpec(
    EV_BLOB_CHUNK,
    "both",
    BlobChunk,
    BlobProgress,
    "One chunk of a blob (see Transfers).",
)
BLOB_STATUS: Final = EventSpec(
    EV_BLOB_STATUS,
    "both",
    BlobStatus,
    BlobProgress,
    "How many bytes of a blob the receiver holds, to resume after a reconnect.",
)
TASK_FILE: Final = EventSpec(
    EV_TASK_FILE,
    "server→device",
    TaskFile,
    TaskFileHeld,
    "Offer a task package or data share (see Task packages); before training:start.",
)
FEDERATION_FINISHED: Final[EventSpec[FederationFinished, Never]] = EventSpec(
    EV_FEDERATION_FINISHED,
    "server→device",
    FederationFinished,
    None,
    "Every round is complete; sent after the final weights:global. The server keeps serving.",
)

EVALUATION_START: Final = EventSpec(
    EV_EVALUATION_START,
    "server→device",
    EvaluationStart,
    EvaluationStartAck,
    "Ask the device to evaluate a global version it holds on its own test split (federated "
    "evaluation); a paused or training device refuses with a reason. The result follows.",
)
EVALUATION_RESULT: Final[EventSpec[EvaluationResult, Never]] = EventSpec(
    EV_EVALUATION_RESULT,
    "device→server",
    EvaluationResult,
    None,
    "One device's loss, accuracy and sample count for a version it was asked to evaluate; "
    "the server records the sample-weighted means in that version's history record.",
)
EVALUATION_FAILED: Final[EventSpec[EvaluationFailed, Never]] = EventSpec(
    EV_EVALUATION_FAILED,
    "device→server",
    EvaluationFailed,
    None,
    "An evaluation the device accepted ended without a result (no test data, a crash, a "
    "pause): the server stops waiting for it.",
)

#: The whole table, in the order of a session (the doc lists the events in this order).
EVENTS: Final[tuple[EventSpec[Any, Any], ...]] = (
    REGISTER,
    REGISTERED,
    HEARTBEAT,
    WEIGHTS_GLOBAL,
    TASK_FILE,
    TRAINING_START,
    TRAINING_PROGRESS,
    WEIGHTS_SUBMIT,
    TRAINING_CANCEL,
    TRAINING_ERROR,
    EVALUATION_START,
    EVALUATION_RESULT,
    EVALUATION_FAILED,
    BLOB_CHUNK,
    BLOB_STATUS,
    FEDERATION_FINISHED,
)

#: Each event's spec by its name.
BY_NAME: Final[Mapping[str, EventSpec[Any, Any]]] = MappingProxyType(
    {spec.name: spec for spec in EVENTS}
)


def handled_by(peer: Peer) -> tuple[EventSpec[Any, Any], ...]:
    """The events ``peer`` receives, i.e. must register a handler for, in table order."""
    return tuple(spec for spec in EVENTS if spec.handled_by(peer))
