"""The session's description of its device: known at once, the GPU found in the background.

Contract (a loop-only object; every method runs on the session loop):

* :meth:`DeviceDescription.detect` describes the device off the loop without probing
  (the GPU from the cache, see :func:`client.device.detect_device`), so the session can
  register at once; when no answer is cached and torch is installed it starts
  :func:`client.device.find_gpu` in a background task (the OS first, the torch probe
  subprocess only when the OS cannot tell). A description given at construction
  (tests) is used as it is: no detection, no probe.
* When the probe's answer differs from the registered one, :attr:`info` takes it and
  :meth:`unreported` gives the new hardware, which the session puts in its heartbeats
  (``Heartbeat.hardware``, the protocol's registration update) until :meth:`acked` sees
  a heartbeat carrying it acknowledged; ``on_found`` runs when the answer arrives (the
  session sends a heartbeat at once). :meth:`for_registration` gives the hardware a new
  ``device:register`` carries, which reports it as well.
* :meth:`stop` cancels a probe still running (its subprocess is killed). The probe
  never raises into the session: a failure means "no GPU" (logged by
  :mod:`client.device`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from client.device import DeviceInfo, cached_gpu, detect_device, find_gpu
from client.protocol import GpuInfo, HardwareInfo, Heartbeat

__all__ = ["DeviceDescription"]

log = logging.getLogger(__name__)


class DeviceDescription:
    """This device as the session registers it (see the module docstring)."""

    def __init__(self, info: DeviceInfo | None, *, on_found: Callable[[], None]) -> None:
        self._info = info
        self._on_found = on_found
        self._unreported: HardwareInfo | None = None
        self._probe: asyncio.Task[None] | None = None

    @property
    def info(self) -> DeviceInfo:
        """The description (after :meth:`detect`)."""
        if self._info is None:
            raise RuntimeError("the device has not been detected yet")
        return self._info

    async def detect(self) -> None:
        """Describe the device now (fast: no probe) and find the GPU in the background."""
        if self._info is not None:
            return
        started = time.monotonic()
        info, known = await asyncio.to_thread(_describe)
        self._info = info
        log.debug("device described in %.3f s", time.monotonic() - started)
        if not known and info.torch_version is not None:
            self._probe = asyncio.create_task(self._find_gpu(info.torch_version))

    async def _find_gpu(self, torch_version: str) -> None:
        started = time.monotonic()
        gpu = await find_gpu(torch_version)
        log.info("GPU probe: %s (%.1f s)", _words(gpu), time.monotonic() - started)
        info = self.info
        if gpu == info.hardware.gpu:
            return  # what the registration said already
        self._info = info.with_gpu(gpu)
        self._unreported = self._info.hardware
        self._on_found()

    def for_registration(self) -> HardwareInfo:
        """The hardware a ``device:register`` carries now (which reports any update)."""
        self._unreported = None
        return self.info.hardware

    def unreported(self) -> HardwareInfo | None:
        """Hardware learnt since the registration and not yet acknowledged, else None."""
        return self._unreported

    def acked(self, beat: Heartbeat) -> None:
        """A heartbeat was acknowledged: the hardware it carried is reported."""
        if beat.hardware is not None and beat.hardware == self._unreported:
            self._unreported = None

    async def stop(self) -> None:
        """Cancel a probe still running."""
        probe, self._probe = self._probe, None
        if probe is not None and not probe.done():
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe


def _describe() -> tuple[DeviceInfo, bool]:
    """The device without a probe, and whether its GPU is settled (cached, or no torch)."""
    info = detect_device(probe_gpu=False)
    version = info.torch_version
    return info, version is None or cached_gpu(version) is not None


def _words(gpu: GpuInfo | None) -> str:
    if gpu is None:
        return "none torch can use"
    memory = f", {gpu.memory_mb} MB" if gpu.memory_mb is not None else ""
    return f"{gpu.kind} {gpu.name or ''}{memory}".replace(" ,", ",").strip()
