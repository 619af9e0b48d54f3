"""What a device works on, named in ``training:start`` and ``evaluation:start`` alike.

Contract: declarations only (no I/O). :class:`Partition` is the device's share of a task's
data (refused at parse time when ``index`` is not below ``count``); :class:`FileRef` names
a task file (a package or a data share) by its content. :mod:`client.protocol` re-exports
both; import from it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from client.protocol.wire import (
    DEFAULT_PARTITION_ALPHA,
    MAX_PARTITION_ALPHA,
    NonNegInt,
    PartitionScheme,
    PosInt,
    Sha256Hex,
    WireModel,
)


class Partition(WireModel):
    """Which share of the task's data this device trains on: part ``index`` of ``count``."""

    index: NonNegInt
    count: PosInt
    seed: NonNegInt = 0
    scheme: PartitionScheme = "iid"
    alpha: Annotated[float, Field(gt=0, le=MAX_PARTITION_ALPHA, allow_inf_nan=False)] = Field(
        default=DEFAULT_PARTITION_ALPHA,
        description="Dirichlet concentration of the dirichlet scheme (smaller: more "
        "label skew); ignored by the other schemes.",
    )

    @model_validator(mode="after")
    def _index_in_range(self) -> Partition:
        if self.index >= self.count:
            raise ValueError(f"partition index {self.index} must be below count {self.count}")
        return self


class FileRef(WireModel):
    """A task file (a package or a data share) by its content: what ``task:file`` sent."""

    sha256: Sha256Hex = Field(description="Lower-case hex SHA-256 of the file.")
    size: PosInt = Field(description="Byte length of the file.")
