"""One detected :class:`client.device.DeviceInfo` per test process, for building sessions.

Detection runs once, without the GPU probe, so tests that build many
:class:`client.session.DistributedClient` objects neither re-read the hardware nor import
torch for a probe. The result is the real machine's description; nothing is faked.
"""

from __future__ import annotations

import functools

from client.device import DeviceInfo, detect_device


@functools.cache
def quick_device_info() -> DeviceInfo:
    """This machine's DeviceInfo, detected on first use without the GPU probe."""
    return detect_device(probe_gpu=False)
