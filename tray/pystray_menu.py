"""The thin adapter from the menu model (:mod:`tray.menu`) to ``pystray``, and the icon port.

Contract: :func:`to_pystray` turns a tuple of :class:`tray.menu.MenuNode` into a
``pystray.Menu`` whose items call ``on_action(entry)`` when clicked (on the GUI thread:
``on_action`` must return at once). :class:`PystrayPort` wraps a ``pystray.Icon`` as the
:class:`tray.app.IconPort` the app talks to. Importing this module imports pystray (and
so a GUI toolkit); nothing else in :mod:`tray` does at import time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Final

import pystray
from PIL import Image

from tray.menu import MenuEntry, MenuNode, Separator

__all__ = ["PystrayPort", "backend_name", "to_pystray"]

log = logging.getLogger(__name__)

OnAction = Callable[[MenuEntry], None]
# Attributes pystray's backends set on their Icon class.
_HAS_MENU: Final = "HAS_MENU"
_HAS_NOTIFICATION: Final = "HAS_NOTIFICATION"


def _clicked(on_action: OnAction, entry: MenuEntry, _icon: Any, _item: Any) -> None:
    on_action(entry)


def _item(node: MenuNode, on_action: OnAction) -> Any:
    if isinstance(node, Separator):
        return pystray.Menu.SEPARATOR
    entry = node
    action: Any
    if entry.submenu:
        action = to_pystray(entry.submenu, on_action)
    elif entry.action is not None:
        # A partial, not a closure: pystray counts a function's parameters to decide how
        # to call it, and a default-argument closure would be refused.
        action = functools.partial(_clicked, on_action, entry)
    else:
        action = None
    checked = entry.checked
    return pystray.MenuItem(
        entry.label,
        action,
        # pystray wants a callable for "checked"; None means "not a check item".
        checked=(lambda _i, c=checked: c) if checked is not None else None,
        radio=entry.radio,
        default=entry.default,
        enabled=entry.enabled,
    )


def to_pystray(menu: tuple[MenuNode, ...], on_action: OnAction) -> Any:
    """A ``pystray.Menu`` that mirrors ``menu``."""
    return pystray.Menu(*(_item(node, on_action) for node in menu))


def backend_name() -> str:
    """The pystray backend in use (``gtk``, ``appindicator``, ``xorg``, ``win32``, ...)."""
    module = str(getattr(pystray.Icon, "__module__", ""))
    return module.rsplit(".", 1)[-1].lstrip("_") or "unknown"


class PystrayPort:
    """The app's view of one ``pystray.Icon``. Every method is safe from any thread."""

    def __init__(self, name: str, image: Image.Image, title: str) -> None:
        self.icon: Any = pystray.Icon(name, icon=image, title=title)
        self.has_menu = bool(getattr(self.icon, _HAS_MENU, True))
        self.has_notification = bool(getattr(self.icon, _HAS_NOTIFICATION, True))
        self._stopping = False

    def set_image(self, image: Image.Image) -> None:
        self.icon.icon = image

    def set_title(self, title: str) -> None:
        self.icon.title = title

    def set_menu(self, menu: tuple[MenuNode, ...], on_action: OnAction) -> None:
        # Without a menu (pystray's xorg backend) pystray still calls the default item
        # on a click, so the menu is set there too.
        self.icon.menu = to_pystray(menu, on_action)

    def notify(self, title: str, message: str) -> None:
        if self.has_notification:
            self.icon.notify(message, title)

    def run(self, setup: Callable[[], None]) -> None:
        """Run the GUI loop on this (the main) thread until :meth:`stop`.

        Raises RuntimeError when the loop fails before :meth:`stop` was called (e.g. no
        D-Bus session for the GTK backend). An error while shutting down is only logged:
        pystray's GTK backend closes its last notification on the way out and fails
        when no notification service runs, which must not turn Quit into a crash.
        """

        def _setup(icon: Any) -> None:
            icon.visible = True
            setup()

        try:
            self.icon.run(setup=_setup)
        except Exception as exc:
            if self._stopping:
                log.warning("the tray toolkit reported an error while closing: %s", exc)
                return
            raise RuntimeError(f"the system-tray icon failed: {exc}") from exc

    def stop(self) -> None:
        self._stopping = True
        self.icon.stop()
