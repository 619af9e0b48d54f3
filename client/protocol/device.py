"""What a device says of itself: its hardware, platform, capabilities and current load.

Contract: declarations only (no I/O). These models are parts of ``device:register`` and
``device:heartbeat`` (declared in :mod:`client.protocol`); a machine without a battery
reports ``battery: null``, never "on battery". :mod:`client.protocol` re-exports every name
here; import from it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from client.protocol.wire import (
    DEFAULT_INFLIGHT_CHUNKS,
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_PACKAGE_CACHE_BYTES,
    Identifier,
    NonNegInt,
    Percent,
    PosInt,
    ShortText,
    WeightFormat,
    WireModel,
)


class BatteryStatus(WireModel):
    """A battery reading. Absent (``null``) on machines without a battery."""

    percent: Percent
    plugged_in: bool | None = Field(
        description="True on mains power, false on battery, null when the OS cannot tell."
    )


class ResourceSnapshot(WireModel):
    """Current load of the machine, sent at registration and with every heartbeat."""

    cpu_percent: Percent = Field(description="System-wide CPU use, 0-100.")
    ram_used_percent: Percent
    ram_available_mb: NonNegInt
    battery: BatteryStatus | None = Field(
        description="null when the machine has no battery (never reported as 'on battery')."
    )


class GpuInfo(WireModel):
    """An accelerator torch can use."""

    kind: Literal["cuda", "mps"]
    name: ShortText | None = None
    memory_mb: NonNegInt | None = None


class PlatformInfo(WireModel):
    """Operating system and interpreter."""

    os: ShortText = Field(description="OS name as Python's platform.system() gives it.")
    release: ShortText
    arch: ShortText
    python: ShortText


class HardwareInfo(WireModel):
    """Static hardware facts."""

    cpu_cores: PosInt
    ram_total_mb: PosInt
    gpu: GpuInfo | None = None
    battery_present: bool


class Capabilities(WireModel):
    """What the device can do."""

    torch_version: ShortText | None = Field(description="null when torch is not installed.")
    simulation: bool = Field(description="True when the device fakes training (no torch).")
    tasks: list[Identifier] = Field(max_length=256, description="Task names installed here.")
    weight_formats: list[WeightFormat] = Field(
        min_length=1,
        description="Formats this device decodes. The order is not a preference: a server "
        "sends safetensors when it is listed, else json.",
    )
    max_chunk_bytes: PosInt = Field(description="Largest blob chunk this device accepts.")
    max_blob_bytes: PosInt = Field(
        default=DEFAULT_MAX_BLOB_BYTES,
        description="Largest blob (announced total) this device accepts from the server; "
        "absent means the default, 512 MiB.",
    )
    max_inflight_chunks: PosInt = Field(
        default=DEFAULT_INFLIGHT_CHUNKS,
        description="Most blob:chunk messages a server may have unacknowledged at once "
        "towards this device; absent means the default, 4.",
    )
    task_packages: bool = Field(
        default=False,
        description="True when the device trains task packages (.fedtask) it receives "
        "with task:file; absent means false: it is never selected for a packaged task.",
    )
    package_cache_bytes: NonNegInt = Field(
        default=DEFAULT_PACKAGE_CACHE_BYTES,
        description="Bytes of task files (packages and data shares) the device keeps; a "
        "server selects it for a packaged task only when the package and its share fit.",
    )
