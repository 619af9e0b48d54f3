"""Federated evaluation payloads: ``evaluation:start`` and its answer, ``evaluation:result``
and ``evaluation:failed``.

Contract: declarations only (no I/O); every payload is a :class:`WireModel` validated by
:func:`client.protocol.parse`. The event table (:mod:`client.protocol.events`) names which
event carries which model. :mod:`client.protocol` re-exports every name here; import from it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, JsonValue

from client.errors import ErrorCode
from client.protocol.wire import (
    FiniteFloat,
    Identifier,
    NonNegFloat,
    NonNegInt,
    PauseReason,
    PosInt,
    RefusalReason,
    ShortText,
    WireModel,
)
from client.protocol.work import FileRef, Partition


class EvaluationStart(WireModel):
    """``evaluation:start`` (server -> client, acked with EvaluationStartAck).

    Evaluate global version ``version`` (which the device holds) on this device's own test
    split: a built-in task's test split of ``partition``, a package's shipped test set, or
    the device's own data (its test split; without one, a holdout of its train data). No
    weights are sent back: the result comes later in ``evaluation:result``. A paused
    device refuses with its pause reason, a device training a round refuses ``busy``.
    """

    version: NonNegInt = Field(description="The global version to evaluate.")
    task: Identifier
    model_params: dict[str, JsonValue] = Field(
        default_factory=dict, description="Task-specific model parameters (JSON object)."
    )
    partition: Partition
    deadline: NonNegFloat = Field(
        description="Unix time after which the server no longer waits for the result."
    )
    package: FileRef | None = Field(
        default=None, description="The task package, as training:start names it."
    )
    data: FileRef | None = Field(
        default=None,
        description="A data share the server sent (as training:start names it); absent "
        "when the device reads its own data or the task's.",
    )


class EvaluationStartAck(WireModel):
    """Answer to ``evaluation:start``: the same shape as training:start's answer."""

    accepted: bool
    reason: RefusalReason | PauseReason | None = None
    detail: ShortText | None = None


class EvaluationResult(WireModel):
    """``evaluation:result`` (client -> server, not acked): one device's evaluation of a
    global version on its own test split. A device whose accepted evaluation fails or is
    abandoned (paused) sends ``evaluation:failed`` instead."""

    version: NonNegInt
    task: Identifier
    loss: FiniteFloat = Field(description="Mean loss over the device's test samples.")
    accuracy: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = Field(
        description="Fraction of the device's test samples predicted correctly."
    )
    num_samples: PosInt = Field(description="Test samples evaluated (the weight of the result).")


class EvaluationFailed(WireModel):
    """``evaluation:failed`` (client -> server, not acked): an evaluation the device
    accepted ended without a result (its data, a crash, a pause), so the server stops
    waiting for it."""

    version: NonNegInt
    task: Identifier
    code: ErrorCode
    message: ShortText
