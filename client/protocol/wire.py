"""The base of wire protocol v1: field types, the model base class and :func:`parse`.

Contract: declarations and pure functions only (no I/O). :class:`WireModel` is the base
of every payload (camelCase aliases, strict types, unknown fields ignored, frozen);
:func:`parse` turns a raw event payload into a model or raises
:class:`client.errors.FedtrayError` ``bad_request`` (or the code a model's
:meth:`WireModel.check_wire` names, e.g. ``unsupported_protocol``) naming the offending
fields in plain words. :mod:`client.protocol` re-exports every name here; import from it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.alias_generators import to_camel

from client.errors import FedtrayError

PROTOCOL_VERSION: Literal[1] = 1

#: Default largest blob chunk. 512 KiB, so that one chunk (a single Engine.IO binary
#: message, or 4/3 of it base64-encoded over HTTP long-polling) fits socket.io's default
#: ``maxHttpBufferSize`` of 1,000,000 bytes with room to spare: a peer built with the
#: library defaults does not drop the connection on a full chunk.
DEFAULT_CHUNK_BYTES = 512 * 1024
#: socket.io's (and python-engineio's) default ``maxHttpBufferSize``, in bytes.
SOCKETIO_DEFAULT_MAX_BUFFER_BYTES = 1_000_000
DEFAULT_MAX_BLOB_BYTES = 512 * 1024 * 1024
DEFAULT_INFLIGHT_CHUNKS = 4

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
DeviceId = Annotated[
    str,
    StringConstraints(
        pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    ),
]
Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ShortText = Annotated[str, StringConstraints(max_length=1000)]
Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]

DeviceType = Literal["laptop", "desktop", "server"]
DeviceState = Literal["idle", "training", "paused", "uploading"]
PauseReason = Literal[
    "user_paused",
    "battery_low",
    "unplugged",
    "in_use",
    "step_aside",
    "too_hot",
    "fullscreen",
    "schedule",
]
WeightFormat = Literal["safetensors", "json"]
Optimizer = Literal["sgd", "adam"]
PartitionScheme = Literal["iid", "label_skew", "dirichlet"]
#: The schemes, in the order the literal declares them (for flags and messages).
PARTITION_SCHEMES: tuple[PartitionScheme, ...] = get_args(PartitionScheme)
#: Dirichlet concentration a ``dirichlet`` partition uses when none is given.
DEFAULT_PARTITION_ALPHA = 0.5
#: Largest concentration accepted (far beyond this the split is IID in all but name).
MAX_PARTITION_ALPHA = 1_000_000.0
RefusalReason = Literal[
    "busy", "unknown_task", "missing_base", "deadline_passed", "missing_package", "no_local_data"
]
TaskFileKind = Literal["package", "data"]
#: Package cache a device allows when it does not say (it takes no packages then).
DEFAULT_PACKAGE_CACHE_BYTES = 0


class WireModel(BaseModel):
    """Base of every payload: camelCase aliases, strict types, unknown fields ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        strict=True,
        frozen=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The payload as a Socket.IO event argument (camelCase keys, bytes kept as bytes)."""
        return self.model_dump(by_alias=True, mode="python")

    @classmethod
    def check_wire(cls, payload: dict[str, Any]) -> None:
        """Refusals of a raw payload that need a code other than ``bad_request``.

        Runs before validation; raises FedtrayError. Nothing to check by default.
        """


def check_protocol(model: str, payload: dict[str, Any]) -> None:
    """``protocol`` absent means 1; present, it must be the JSON number 1 (``1`` or
    ``1.0``). Anything else (``2``, ``"1"``, ``true``, ``null``) is ``unsupported_protocol``."""
    if "protocol" not in payload:
        return
    value = payload["protocol"]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != PROTOCOL_VERSION:
        shown = json.dumps(value, default=lambda v: type(v).__name__)[:20]
        raise FedtrayError(
            "unsupported_protocol",
            f"{model} says protocol {shown}; this peer speaks protocol {PROTOCOL_VERSION} "
            "(the JSON number 1)",
        )


M = TypeVar("M", bound=WireModel)


def parse(model: type[M], payload: object) -> M:
    """Validate a raw event payload; raise FedtrayError('bad_request', ...) when it does not fit.

    The message names the offending fields (camelCase, as on the wire) in plain words.
    A model's :meth:`WireModel.check_wire` may refuse with another code first.
    """
    if not isinstance(payload, dict):
        raise FedtrayError(
            "bad_request", f"{model.__name__} must be an object, got {type(payload).__name__}"
        )
    model.check_wire(payload)
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(payload)'}: {err['msg']}"
            for err in exc.errors(include_url=False)[:5]
        )
        raise FedtrayError("bad_request", f"invalid {model.__name__}: {problems}") from None
