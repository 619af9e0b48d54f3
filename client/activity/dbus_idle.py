"""Linux (Wayland, GNOME, KDE): idle time over D-Bus, through jeepney (pure Python).

Contract (on top of :mod:`client.activity.base`):

* Sources, asked in this order until one answers (the first that does is kept, and asked
  alone afterwards; when it stops answering, the order is tried again on the next call):

  1. GNOME (X11 or Wayland): ``org.gnome.Mutter.IdleMonitor.GetIdletime`` on
     ``/org/gnome/Mutter/IdleMonitor/Core`` (session bus): milliseconds since input.
  2. KDE Plasma and others: ``org.freedesktop.ScreenSaver.GetSessionIdleTime``
     (session bus), read as milliseconds (what KDE's implementation returns; one that
     returned seconds would read as *less* idle, never more).
  3. logind (system bus): the caller's session (``/org/freedesktop/login1/session/auto``)
     ``IdleHint`` and ``IdleSinceHintMonotonic``. A lower bound: ``0`` while logind says
     the session is not idle (the desktop sets the hint only after its own idle delay),
     else the time since the hint was set.

* Every call waits at most :data:`CALL_TIMEOUT_S`; a failed call answers ``None`` and is
  logged once. When no source answers, the search is repeated at most every
  :data:`RETRY_EVERY_S` (``None`` meanwhile), so a machine without any costs nothing.
  ``fullscreen_active()`` is always ``None`` here (D-Bus has no standard for it);
  :mod:`client.activity.choose` pairs this with another source where one exists.
* The reply parsers (:func:`idle_from_milliseconds`, :func:`idle_from_logind`) are pure
  and table-tested.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from client.activity.base import LogOnce

__all__ = [
    "CALL_TIMEOUT_S",
    "SOURCES",
    "DBusIdleProbe",
    "idle_from_logind",
    "idle_from_milliseconds",
]

log = logging.getLogger(__name__)

CALL_TIMEOUT_S: Final = 0.1
#: After no source answered, the next search waits this long (None meanwhile).
RETRY_EVERY_S: Final = 5.0
_LOGIND_SESSION: Final = "org.freedesktop.login1.Session"


def idle_from_milliseconds(body: Sequence[Any]) -> float | None:
    """Seconds from a ``(milliseconds,)`` reply (Mutter ``t``, ScreenSaver ``u``)."""
    if len(body) != 1 or isinstance(body[0], bool) or not isinstance(body[0], int):
        return None
    if body[0] < 0:
        return None
    return body[0] / 1000.0


def idle_from_logind(hint: Sequence[Any], since: Sequence[Any], now_us: int) -> float | None:
    """Seconds (a lower bound) from logind's ``Get`` replies: ``(("b", idle),)`` and
    ``(("t", microseconds on CLOCK_MONOTONIC),)``; ``now_us`` on the same clock."""
    try:
        (hint_sig, idle), (since_sig, since_us) = hint[0], since[0]
    except (IndexError, TypeError, ValueError):
        return None
    if hint_sig != "b" or since_sig != "t" or not isinstance(since_us, int):
        return None
    if not idle:
        return 0.0
    if since_us <= 0:
        return 0.0  # idle, since an unknown time: the lower bound is zero
    return max(0, now_us - since_us) / 1_000_000


class DBusRefusedError(OSError):
    """The bus answered with an error (no such service, method or property)."""


_REFUSED: Final = (DBusRefusedError,)


@dataclass(frozen=True)
class Source:
    """One D-Bus idle source: which bus, and how to ask."""

    name: str
    bus: str  # "session" or "system"


SOURCES: Final = (
    Source("GNOME Mutter IdleMonitor", "session"),
    Source("org.freedesktop.ScreenSaver", "session"),
    Source("logind IdleHint", "system"),
)


class _Conn:
    """The few jeepney calls this module makes (a seam tests could replace)."""

    def __init__(self, address: str) -> None:
        from jeepney.io.blocking import open_dbus_connection

        self._conn = open_dbus_connection(bus=address, auth_timeout=CALL_TIMEOUT_S)

    def call(
        self,
        path: str,
        bus_name: str,
        interface: str,
        method: str,
        signature: str | None = None,
        body: tuple[Any, ...] = (),
    ) -> tuple[Any, ...]:
        from jeepney import DBusAddress, MessageType, new_method_call

        address = DBusAddress(path, bus_name=bus_name, interface=interface)
        reply = self._conn.send_and_get_reply(
            new_method_call(address, method, signature, body), timeout=CALL_TIMEOUT_S
        )
        if reply.header.message_type == MessageType.error:
            raise DBusRefusedError(f"{method}: {reply.body[0] if reply.body else 'error reply'}")
        return tuple(reply.body)

    def close(self) -> None:
        self._conn.close()


def _monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class DBusIdleProbe:
    """Idle time from the first D-Bus source that answers (see the module contract)."""

    def __init__(
        self,
        session_address: str | None,
        system_address: str | None,
        connect: Callable[[str], Any] = _Conn,
        monotonic_us: Callable[[], int] = _monotonic_us,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._addresses = {"session": session_address, "system": system_address}
        self._connect = connect
        self._monotonic_us = monotonic_us
        self._conns: dict[str, Any] = {}
        self._source: Source | None = None
        self._lock = threading.Lock()
        self._problem = LogOnce(log)
        self._searching = LogOnce(log, logging.INFO)
        self._search_at = 0.0
        self.idle_seconds()  # find the source now, so describe() can name it

    def _conn(self, bus: str) -> Any:
        if bus in self._conns:
            return self._conns[bus]
        address = self._addresses[bus]
        if not address:
            raise OSError(f"no {bus} bus address")
        conn = self._connect(address)
        self._conns[bus] = conn
        return conn

    def _drop(self, bus: str) -> None:
        conn = self._conns.pop(bus, None)
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                conn.close()

    def _ask(self, source: Source) -> float | None:
        conn = self._conn(source.bus)
        if source is SOURCES[0]:
            body = conn.call("/org/gnome/Mutter/IdleMonitor/Core", "org.gnome.Mutter.IdleMonitor",
                             "org.gnome.Mutter.IdleMonitor", "GetIdletime")  # fmt: skip
            return idle_from_milliseconds(body)
        if source is SOURCES[1]:
            body = conn.call("/org/freedesktop/ScreenSaver", "org.freedesktop.ScreenSaver",
                             "org.freedesktop.ScreenSaver", "GetSessionIdleTime")  # fmt: skip
            return idle_from_milliseconds(body)
        path, props = "/org/freedesktop/login1/session/auto", "org.freedesktop.DBus.Properties"
        hint = conn.call(path, "org.freedesktop.login1", props, "Get", "ss",
                         (_LOGIND_SESSION, "IdleHint"))  # fmt: skip
        since = conn.call(path, "org.freedesktop.login1", props, "Get", "ss",
                          (_LOGIND_SESSION, "IdleSinceHintMonotonic"))  # fmt: skip
        return idle_from_logind(hint, since, self._monotonic_us())

    def _try(self, source: Source, report: LogOnce) -> float | None:
        try:
            answer = self._ask(source)
        except Exception as exc:  # never raise for OS trouble: answer None, log once
            if not isinstance(exc, _REFUSED):
                self._drop(source.bus)  # the connection may be broken: reopen next time
            report(f"{source.name}: {exc}")
            return None
        if answer is None:
            report(f"{source.name}: unexpected reply")
        return answer

    def idle_seconds(self) -> float | None:
        with self._lock:
            if self._source is not None:
                answer = self._try(self._source, self._problem)
                if answer is not None:
                    return answer
                self._source = None
                return None
            if self._clock() < self._search_at:
                return None
            for source in SOURCES:
                answer = self._try(source, self._searching)
                if answer is not None:
                    self._source = source
                    log.info("idle time from %s over D-Bus", source.name)
                    return answer
            self._search_at = self._clock() + RETRY_EVERY_S
            return None

    def fullscreen_active(self) -> bool | None:
        return None

    def describe(self) -> str:
        with self._lock:
            if self._source is None:
                names = ", ".join(s.name for s in SOURCES)
                return f"idle time unknown: no D-Bus idle monitor answered ({names})"
            return f"idle time from {self._source.name} (D-Bus)"

    @property
    def source(self) -> str | None:
        """The name of the source in use, or None."""
        with self._lock:
            return None if self._source is None else self._source.name

    def close(self) -> None:
        with self._lock:
            for bus in list(self._conns):
                self._drop(bus)
