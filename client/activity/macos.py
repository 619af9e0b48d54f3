"""macOS: idle time from IOKit's ``IOHIDSystem`` ``HIDIdleTime``; full-screen unknown.

Contract (on top of :mod:`client.activity.base`):

* The OS call sits behind the tiny :class:`MacCalls` interface (:class:`IOKitCalls` is the
  ctypes one, on IOKit and CoreFoundation; tests pass a fake). ``hid_idle_ns()`` raises
  ``OSError`` when IOKit refuses. ctypes rather than running ``ioreg`` every second: one
  registry read costs microseconds, a child process tens of milliseconds.
* ``idle_seconds()``: ``HIDIdleTime`` is nanoseconds since the last HID input
  (:func:`idle_from_hid_ns`); a negative or non-integer value is ``None``.
* ``fullscreen_active()`` is ``None``: macOS offers no documented, permission-free call
  that says whether the frontmost window is full-screen; ``describe()`` says so.
* A refused call answers ``None`` and is logged once
  (:class:`~client.activity.guarded.GuardedReads`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any, Final, Protocol

from client.activity.guarded import GuardedReads

__all__ = ["IOKitCalls", "MacCalls", "MacProbe", "idle_from_hid_ns"]

log = logging.getLogger(__name__)

_CF_STRING_ENCODING_UTF8: Final = 0x08000100
_CF_NUMBER_SINT64: Final = 4
_IO_MAIN_PORT_DEFAULT: Final = 0  # kIOMainPortDefault / kIOMasterPortDefault


def idle_from_hid_ns(value: object) -> float | None:
    """Seconds from ``HIDIdleTime`` (nanoseconds); None unless a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value / 1e9


class MacCalls(Protocol):
    """The one IOKit read the probe needs; raises OSError when refused."""

    def hid_idle_ns(self) -> int: ...


class IOKitCalls:
    """:class:`MacCalls` through ctypes on IOKit and CoreFoundation (macOS only)."""

    def __init__(self) -> None:
        iokit_path = ctypes.util.find_library("IOKit")
        cf_path = ctypes.util.find_library("CoreFoundation")
        if not iokit_path or not cf_path:
            raise OSError("IOKit or CoreFoundation not found")
        iokit: Any = ctypes.CDLL(iokit_path)
        cf: Any = ctypes.CDLL(cf_path)
        vp, u32 = ctypes.c_void_p, ctypes.c_uint32
        iokit.IOServiceMatching.restype, iokit.IOServiceMatching.argtypes = vp, (ctypes.c_char_p,)
        iokit.IOServiceGetMatchingService.restype = u32
        iokit.IOServiceGetMatchingService.argtypes = (u32, vp)
        iokit.IORegistryEntryCreateCFProperty.restype = vp
        iokit.IORegistryEntryCreateCFProperty.argtypes = (u32, vp, vp, u32)
        iokit.IOObjectRelease.argtypes = (u32,)
        cf.CFStringCreateWithCString.restype = vp
        cf.CFStringCreateWithCString.argtypes = (vp, ctypes.c_char_p, u32)
        cf.CFGetTypeID.restype, cf.CFGetTypeID.argtypes = ctypes.c_ulong, (vp,)
        cf.CFNumberGetTypeID.restype, cf.CFNumberGetTypeID.argtypes = ctypes.c_ulong, ()
        cf.CFNumberGetValue.restype = ctypes.c_bool
        cf.CFNumberGetValue.argtypes = (vp, ctypes.c_int, vp)
        cf.CFRelease.argtypes = (vp,)
        self._iokit, self._cf = iokit, cf
        # IOServiceGetMatchingService consumes the matching dictionary's reference.
        self._service = int(
            iokit.IOServiceGetMatchingService(
                _IO_MAIN_PORT_DEFAULT, iokit.IOServiceMatching(b"IOHIDSystem")
            )
        )
        if not self._service:
            raise OSError("no IOHIDSystem service")
        self._key = cf.CFStringCreateWithCString(None, b"HIDIdleTime", _CF_STRING_ENCODING_UTF8)
        self._number_type = int(cf.CFNumberGetTypeID())

    def hid_idle_ns(self) -> int:
        ref = self._iokit.IORegistryEntryCreateCFProperty(self._service, self._key, None, 0)
        if not ref:
            raise OSError("IOHIDSystem has no HIDIdleTime")
        try:
            if int(self._cf.CFGetTypeID(ref)) != self._number_type:
                raise OSError("HIDIdleTime is not a number")
            value = ctypes.c_int64(0)
            if not self._cf.CFNumberGetValue(ref, _CF_NUMBER_SINT64, ctypes.byref(value)):
                raise OSError("HIDIdleTime does not fit 64 bits")
            return int(value.value)
        finally:
            self._cf.CFRelease(ref)


class MacProbe:
    """Idle time on macOS (see the module contract)."""

    def __init__(self, calls: MacCalls) -> None:
        self._calls = calls
        self._reads = GuardedReads(log)

    def idle_seconds(self) -> float | None:
        return self._reads.read("HIDIdleTime", self._calls.hid_idle_ns, idle_from_hid_ns)

    def fullscreen_active(self) -> bool | None:
        return None

    def describe(self) -> str:
        return (
            "idle time from IOKit HIDIdleTime; full-screen unknown: macOS does not tell other apps"
        )
