"""Windows: idle time from ``GetLastInputInfo``, full-screen from ``SHQueryUserNotificationState``.

Contract (on top of :mod:`client.activity.base`):

* The OS calls sit behind the tiny :class:`WinCalls` interface (:class:`Win32Calls` is
  the ctypes one; tests pass a fake). Each raises ``OSError`` when Windows refuses.
* ``idle_seconds()``: ``LASTINPUTINFO.dwTime`` is a 32-bit tick count, so it is compared
  with the low 32 bits of ``GetTickCount64`` modulo 2**32 (:func:`idle_ms_from_ticks`):
  right across the 49.7-day wrap-around.
* ``fullscreen_active()``: ``QUNS_BUSY`` (a full-screen app), ``QUNS_RUNNING_D3D_FULL_SCREEN``
  and ``QUNS_PRESENTATION_MODE`` are full-screen; the other documented states are not;
  an undocumented value is ``None`` (:func:`fullscreen_from_quns`).
* A refused call answers ``None`` and is logged once
  (:class:`~client.activity.guarded.GuardedReads`). Nothing here runs on import: the
  ctypes calls are bound when :class:`Win32Calls` is created (only on Windows).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Final, Protocol

from client.activity.guarded import GuardedReads

__all__ = [
    "FULLSCREEN_STATES",
    "QUNS",
    "Win32Calls",
    "WinCalls",
    "WindowsProbe",
    "fullscreen_from_quns",
    "idle_ms_from_ticks",
]

log = logging.getLogger(__name__)

#: QUERY_USER_NOTIFICATION_STATE (shellapi.h).
QUNS: Final = {
    1: "QUNS_NOT_PRESENT",
    2: "QUNS_BUSY",
    3: "QUNS_RUNNING_D3D_FULL_SCREEN",
    4: "QUNS_PRESENTATION_MODE",
    5: "QUNS_ACCEPTS_NOTIFICATIONS",
    6: "QUNS_QUIET_TIME",
    7: "QUNS_APP",
}
FULLSCREEN_STATES: Final = frozenset({2, 3, 4})
_WRAP: Final = 1 << 32


def idle_ms_from_ticks(tick_count64: int, last_input_tick: int) -> int:
    """Milliseconds since the last input: ``GetTickCount64`` against the 32-bit
    ``LASTINPUTINFO.dwTime``, modulo 2**32."""
    return ((tick_count64 % _WRAP) - (last_input_tick % _WRAP)) % _WRAP


def fullscreen_from_quns(state: int) -> bool | None:
    """Full-screen from a ``QUERY_USER_NOTIFICATION_STATE`` value (None: undocumented)."""
    if state not in QUNS:
        return None
    return state in FULLSCREEN_STATES


class WinCalls(Protocol):
    """The three Win32 calls the probe needs; each raises OSError when refused."""

    def last_input_tick(self) -> int: ...

    def tick_count64(self) -> int: ...

    def notification_state(self) -> int: ...


class _LastInputInfo(ctypes.Structure):
    _fields_ = (("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint32))


class Win32Calls:
    """:class:`WinCalls` through ctypes (Windows only)."""

    def __init__(self) -> None:
        windll = ctypes.WinDLL  # type: ignore[attr-defined,unused-ignore]
        self._user32 = windll("user32", use_last_error=True)
        self._kernel32 = windll("kernel32", use_last_error=True)
        self._shell32 = windll("shell32", use_last_error=True)
        self._kernel32.GetTickCount64.restype = ctypes.c_uint64
        self._kernel32.GetTickCount64.argtypes = ()
        self._user32.GetLastInputInfo.restype = ctypes.c_int
        self._user32.GetLastInputInfo.argtypes = (ctypes.POINTER(_LastInputInfo),)
        self._shell32.SHQueryUserNotificationState.restype = ctypes.c_long
        self._shell32.SHQueryUserNotificationState.argtypes = (ctypes.POINTER(ctypes.c_int),)

    def last_input_tick(self) -> int:
        info = _LastInputInfo()
        info.cbSize = ctypes.sizeof(_LastInputInfo)
        if not self._user32.GetLastInputInfo(ctypes.byref(info)):
            raise OSError(ctypes.get_last_error(), "GetLastInputInfo failed")  # type: ignore[attr-defined,unused-ignore]
        return int(info.dwTime)

    def tick_count64(self) -> int:
        return int(self._kernel32.GetTickCount64())

    def notification_state(self) -> int:
        state = ctypes.c_int(0)
        result = int(self._shell32.SHQueryUserNotificationState(ctypes.byref(state)))
        if result != 0:  # an HRESULT other than S_OK
            raise OSError(
                f"SHQueryUserNotificationState failed: HRESULT {result & 0xFFFFFFFF:#010x}"
            )
        return int(state.value)


class WindowsProbe:
    """Idle time and full-screen state on Windows (see the module contract)."""

    def __init__(self, calls: WinCalls) -> None:
        self._calls = calls
        self._reads = GuardedReads(log)

    def idle_seconds(self) -> float | None:
        return self._reads.read(
            "GetLastInputInfo", self._ticks, lambda ticks: idle_ms_from_ticks(*ticks) / 1000.0
        )

    def fullscreen_active(self) -> bool | None:
        return self._reads.read(
            "SHQueryUserNotificationState",
            self._calls.notification_state,
            fullscreen_from_quns,
            odd="undocumented state",
        )

    def _ticks(self) -> tuple[int, int]:
        """(``GetTickCount64``, ``LASTINPUTINFO.dwTime``); the last input is read first."""
        last = self._calls.last_input_tick()
        return self._calls.tick_count64(), last

    def describe(self) -> str:
        return "idle time from GetLastInputInfo; full-screen from SHQueryUserNotificationState"
