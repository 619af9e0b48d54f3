"""The manifest of a task package (``manifest.json``): what the model takes and how it trains.

Contract: pure pydantic models, no I/O, no torch. :func:`parse_manifest` turns the bytes
of ``manifest.json`` into a :class:`Manifest` or raises
:class:`client.errors.FedtrayError` with code ``bad_package`` naming every problem in
plain words. Unknown fields are refused (a manifest is written by a packer of the same
format version, not by a newer peer). Field names are camelCase in the file.
"""

from __future__ import annotations

import json
from typing import Annotated, Final, Literal

from pydantic import Field, StringConstraints, ValidationError

from client.errors import FedtrayError
from client.protocol import Identifier, NonNegInt, PosInt, ShortText, TrainingConfig, WireModel

__all__ = [
    "FORMAT",
    "DataSource",
    "Loss",
    "Manifest",
    "Metric",
    "TensorDtype",
    "TensorSpec",
    "parse_manifest",
]

#: The format this code reads and writes (``format`` in every manifest).
FORMAT: Final = "fedtray-task/1"
#: Largest ``manifest.json`` a reader accepts.
MAX_MANIFEST_BYTES: Final = 64 * 1024

Loss = Literal["cross_entropy", "mse", "bce_with_logits"]
Metric = Literal["loss", "accuracy"]
TensorDtype = Literal[
    "float16", "bfloat16", "float32", "float64", "int64", "int32", "uint8", "bool"
]
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.+-]{1,32}$")]


class _Strict(WireModel):
    model_config = WireModel.model_config | {"extra": "forbid"}


class TensorSpec(_Strict):
    """One sample's tensor, without the batch axis: ``shape`` ``[1, 8, 8]``, ``[]`` for a
    scalar label."""

    shape: Annotated[list[PosInt], Field(max_length=8)]
    dtype: TensorDtype


class ServerData(_Strict):
    """The package carries ``data/train.safetensors`` and ``data/test.safetensors``."""

    source: Literal["server"]
    train_samples: PosInt
    test_samples: NonNegInt


class LocalData(_Strict):
    """No data in the package: each device reads its own (``docs/task-package.md``)."""

    source: Literal["local"]


DataSource = Annotated[ServerData | LocalData, Field(discriminator="source")]


def _loss_only() -> list[Metric]:
    return ["loss"]


class Manifest(_Strict):
    """Everything a device needs to know about a package besides the program and weights."""

    format: Literal["fedtray-task/1"]
    name: Identifier
    version: Version
    description: ShortText = ""
    input: TensorSpec
    label: TensorSpec
    loss: Loss
    metrics: Annotated[list[Metric], Field(min_length=1, max_length=4)] = Field(
        default_factory=_loss_only
    )
    num_classes: PosInt | None = Field(
        default=None,
        description="Classes of a cross_entropy task (labels 0..numClasses-1); for label_skew.",
    )
    training: TrainingConfig = Field(description="The default training config of a round.")
    data: DataSource


def parse_manifest(raw: bytes) -> Manifest:
    """The manifest in ``raw`` (UTF-8 JSON), or ``FedtrayError('bad_package', ...)``."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FedtrayError(
            "bad_package", f"manifest.json is {len(raw)} bytes; at most {MAX_MANIFEST_BYTES}"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedtrayError("bad_package", f"manifest.json is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FedtrayError("bad_package", "manifest.json must hold a JSON object")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(manifest)'}: {err['msg']}"
            for err in exc.errors(include_url=False)[:8]
        )
        raise FedtrayError("bad_package", f"invalid manifest.json: {problems}") from None
