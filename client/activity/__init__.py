"""Is someone using this computer? Idle time and full-screen state from the OS.

The one interface is :class:`ActivityProbe` (declared in :mod:`client.activity.base`,
contract there): ``idle_seconds() -> float | None``, ``fullscreen_active() -> bool |
None``, ``describe() -> str``; ``None`` means *cannot tell* and is never a guess.
:func:`default_probe` picks the backend for this OS and session
(:mod:`client.activity.choose`): X11 (:mod:`.x11`), D-Bus for Wayland/GNOME/KDE/logind
(:mod:`.dbus_idle`), Windows (:mod:`.windows`), macOS (:mod:`.macos`).

Use: build one probe with :func:`default_probe` and poll it about once a second from one
thread of its own (never from an asyncio loop); calls never raise for OS trouble.
Torch-free and GUI-free; backends import their OS libraries only when built.
"""

from client.activity.base import (
    ActivityProbe as ActivityProbe,
    CombinedProbe as CombinedProbe,
    SimulatedProbe as SimulatedProbe,
    UnknownProbe as UnknownProbe,
)
from client.activity.choose import (
    SIMULATE_IDLE_ENV as SIMULATE_IDLE_ENV,
    Plan as Plan,
    default_probe as default_probe,
    plan as plan,
)
