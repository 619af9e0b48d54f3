"""The tray app: glue between the session facade and the icon, on two threads.

Threading contract:

* The GUI loop (pystray) runs on the MAIN thread (macOS requires it) inside
  :meth:`TrayApp.run`. The session runs on its own thread inside the
  :class:`SessionFacade` (:class:`client.session.DistributedClient`). Training runs in
  the session's worker process; this process never imports torch.
* Session subscribers only store the newest snapshot and wake the tray's own
  ``fedtray-tray`` thread; menu clicks (on the GUI thread) only queue an action. That
  thread does everything else: it applies actions to the facade, recomputes the view
  (icon, tooltip, menu) from the snapshot, and decides notifications with
  :func:`tray.notify.decide`. No other state is shared; the Settings window's waiting
  thread only logs and wakes the tray thread.
* The session owns the settings: the tray shows what the snapshot's ``settings`` say
  (the session follows the file, so a change made by ``fedtray-client config set`` or
  the Settings window shows within a poll) and changes them only through
  :meth:`SessionFacade.update_settings`. It keeps no copy and never writes the file.
* The icon port's setters are thread-safe (pystray hands them to the GUI loop), so the
  tray thread may call them; it calls them only when what they show changes.

Quit: the session is stopped (:meth:`SessionFacade.stop`: the worker stops, the
connection closes) within :data:`QUIT_TIMEOUT`, then the GUI loop ends and :meth:`run`
returns. A "Pause for a while" (1, 3 or 8 hours, until tomorrow) is the user's pause with
a deadline (``paused_until`` in the settings, computed at the click by
:func:`tray.menu.snooze_end`): the session ends it, even across a restart of either
process; the menu and tooltip show the deadline the settings hold, not a timer of their
own. "While I'm using this computer" changes the ``while_in_use`` setting through the
session, like the battery threshold.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

from PIL import Image

from client.config import Settings, SettingsError, parse_setting
from client.snapshot import ClientSnapshot
from tray import autostart
from tray.icons import IconState, icon_key, render_icon
from tray.menu import MenuEntry, MenuNode, build_menu, snooze_end
from tray.notify import NotifyMemory, decide
from tray.status import Activity, CpuBudget, status_text

__all__ = ["QUIT_TIMEOUT", "IconPort", "SessionFacade", "TrayApp", "TrayView", "compute_view"]

log = logging.getLogger(__name__)

QUIT_TIMEOUT: Final = 8.0
TICK_S: Final = 1.0
# Pixels of the image handed to the toolkit: what each platform's tray shows best.
TRAY_ICON_SIZE: Final = 32 if sys.platform == "win32" else 44 if sys.platform == "darwin" else 64


class SessionFacade(Protocol):
    """What the tray needs from :class:`client.session.DistributedClient`."""

    def start(self) -> None: ...
    def stop(self, timeout: float = ...) -> bool: ...
    def connect(self) -> None: ...
    def disconnect(self) -> None: ...
    def pause(self, until: datetime | None = None) -> None: ...
    def resume(self) -> None: ...
    def update_settings(self, **changes: object) -> Future[Settings]: ...
    def snapshot(self) -> ClientSnapshot: ...
    def subscribe(self, callback: Callable[[ClientSnapshot], None]) -> Callable[[], None]: ...


class IconPort(Protocol):
    """What the tray needs from the icon (see :class:`tray.pystray_menu.PystrayPort`)."""

    has_menu: bool

    def set_image(self, image: Image.Image) -> None: ...
    def set_title(self, title: str) -> None: ...
    def set_menu(
        self, menu: tuple[MenuNode, ...], on_action: Callable[[MenuEntry], None]
    ) -> None: ...
    def notify(self, title: str, message: str) -> None: ...
    def run(self, setup: Callable[[], None]) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True)
class TrayView:
    """Everything the icon shows at one moment; equal views need no redraw."""

    icon: tuple[IconState, int]
    title: str
    menu: tuple[MenuNode, ...]


def compute_view(
    snapshot: ClientSnapshot,
    *,
    monotonic_now: float,
    wall_now: datetime,
    snoozed_until: datetime | None,
    budget: CpuBudget | None = None,
    activity: Activity = "unknown",
) -> TrayView:
    """The view for this moment (pure). ``wall_now`` is the naive local time;
    ``budget`` and ``activity`` are the session's CPU budget and whether the computer is
    in use (the politeness rules' snapshot fields), when it reports them."""
    return TrayView(
        icon=icon_key(snapshot),
        title=status_text(
            snapshot,
            monotonic_now,
            snoozed_until,
            wall_now=wall_now,
            budget=budget,
            activity=activity,
        ),
        menu=build_menu(
            snapshot,
            monotonic_now=monotonic_now,
            wall_now=wall_now,
            snoozed_until=snoozed_until,
            budget=budget,
            activity=activity,
        ),
    )


def image_for(key: tuple[IconState, int], size: int = TRAY_ICON_SIZE) -> Image.Image:
    """The image for an :func:`tray.icons.icon_key`."""
    from tray.icons import PROGRESS_STEPS

    state, step = key
    return render_icon(state, size, step / PROGRESS_STEPS)


def open_folder(path: Path) -> None:
    """Show ``path`` in the desktop's file manager, without waiting for it."""
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined,unused-ignore]
        return
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    subprocess.Popen([opener, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def self_command() -> list[str]:
    """How to start this program again (for the settings window's own process)."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "tray"]


class TrayApp:
    """One tray icon over one session. Construct, then call :meth:`run` on the main thread.

    ``show_requested`` is polled each tick (a second launch's "show yourself" request).
    ``autostart_env`` chooses where start-at-login is recorded (tests pass a temp one).
    """

    def __init__(
        self,
        client: SessionFacade,
        icon: IconPort,
        *,
        log_dir: Path,
        config_file: Path | None = None,
        show_requested: Callable[[], bool] = lambda: False,
        autostart_env: autostart.AutostartEnv | None = None,
        dialog_command: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.client = client
        self.icon = icon
        self.log_dir = log_dir
        self.config_file = config_file
        self._show_requested = show_requested
        self._autostart_env = autostart_env
        self._dialog_command = list(dialog_command or [*self_command(), "settings"])
        self._clock = clock
        self._wall = wall_clock
        self._latest: ClientSnapshot = client.snapshot()
        self._wake = threading.Event()
        self._actions: queue.SimpleQueue[MenuEntry] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._view: TrayView | None = None
        self._prev_snapshot: ClientSnapshot | None = None
        self._memory = NotifyMemory()
        self._dialog: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._loop, name="fedtray-tray", daemon=True)
        self.exit_code = 0
        self._quit_started = False

    # -- inputs from other threads (must return at once) ------------------------------

    def _on_snapshot(self, snapshot: ClientSnapshot) -> None:
        self._latest = snapshot  # a reference swap: atomic, and snapshots are immutable
        self._wake.set()

    def on_action(self, entry: MenuEntry) -> None:
        """A menu click (GUI thread): queue it for the tray thread."""
        self._actions.put(entry)
        self._wake.set()

    # -- lifecycle --------------------------------------------------------------------

    def run(self) -> int:
        """Run until Quit; returns the process exit code. Call on the main thread."""
        if not self.icon.has_menu:
            log.warning(
                "this tray backend has no menu (pystray's xorg backend): only a click on "
                "the icon works, and it opens Settings. Install PyGObject and the "
                "AppIndicator/GTK libraries for the full menu (see docs/tray.md)"
            )
        self._apply_view(force=True)
        unsubscribe = self.client.subscribe(self._on_snapshot)
        # A logout or `kill` sends SIGTERM: quit as from the menu (checkpoint, disconnect,
        # exit 0). The handler only queues the action; the tray thread does the work.
        on_main = threading.current_thread() is threading.main_thread()  # signal's rule
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if on_main else None
        try:
            self.icon.run(self._started)
        finally:
            if on_main:
                signal.signal(signal.SIGTERM, previous)
            unsubscribe()
            self._stopping.set()
            self._wake.set()
            if self._thread.is_alive():
                self._thread.join(QUIT_TIMEOUT + 2)
            if not self._quit_started:
                # The GUI loop ended without Quit (e.g. the desktop session closed).
                self.client.stop(QUIT_TIMEOUT)
        return self.exit_code

    def _on_sigterm(self, signum: int, frame: object) -> None:
        log.info("terminated by a signal: quitting")
        self.on_action(MenuEntry("Quit", action="quit"))

    def _started(self) -> None:
        """GUI loop is up (called by the port): start the session and the tray thread."""
        self.client.start()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            try:
                self._tick()
            except Exception:
                log.exception("the tray failed to update; it keeps running")

    def _tick(self) -> None:
        while True:
            try:
                entry = self._actions.get_nowait()
            except queue.Empty:
                break
            self._do(entry)
            if self._stopping.is_set():
                return
        now = self._clock()
        if self._show_requested():
            words = status_text(self._latest, now, self._paused_until(), wall_now=self._wall())
            self.icon.notify("fedtray is already running", words)
        self._apply_view()
        snapshot = self._latest
        notes, self._memory = decide(self._prev_snapshot, snapshot, self._memory, now)
        self._prev_snapshot = snapshot
        for note in notes:
            log.info("notify: %s: %s", note.title, note.message)
            self.icon.notify(note.title, note.message)

    def _apply_view(self, force: bool = False) -> None:
        view = compute_view(
            self._latest,
            monotonic_now=self._clock(),
            wall_now=self._wall(),
            snoozed_until=self._paused_until(),
        )
        old = self._view
        if force or old is None or old.icon != view.icon:
            self.icon.set_image(image_for(view.icon))
        if force or old is None or old.title != view.title:
            self.icon.set_title(view.title)
        if force or old is None or old.menu != view.menu:
            self.icon.set_menu(view.menu, self.on_action)
        self._view = view

    # -- actions (tray thread) --------------------------------------------------------

    def _paused_until(self) -> datetime | None:
        """When the user's timed pause ends, in local time (from the settings), or None."""
        settings = self._latest.settings
        until = settings.paused_until
        return until.astimezone() if settings.paused and until is not None else None

    def _do(self, entry: MenuEntry) -> None:
        action = entry.action
        log.info("menu: %s", entry.label)
        if action == "connect":
            self.client.connect()
        elif action == "disconnect":
            self.client.disconnect()
        elif action == "pause":
            self.client.pause()
        elif action == "resume":
            self.client.resume()
        elif action == "snooze":
            # A naive wall clock is local time; astimezone() makes it an exact instant.
            end = snooze_end(entry.value, self._wall(), self._latest.settings)
            self.client.pause(until=end.astimezone(UTC))
        elif action == "set_threshold" and entry.value is not None:
            self._change_setting("battery_threshold", str(entry.value))
        elif action == "set_while_in_use" and entry.value is not None:
            self._change_setting("while_in_use", str(entry.value))
        elif action == "toggle_autostart":
            self._toggle_autostart()
        elif action == "settings":
            self._open_settings()
        elif action == "open_logs":
            try:
                open_folder(self.log_dir)
            except OSError as exc:
                self.icon.notify("Cannot open the log folder", f"{self.log_dir}: {exc}")
        elif action == "quit":
            self.quit()

    def quit(self) -> None:
        """Stop the session (bounded by QUIT_TIMEOUT), then end the GUI loop."""
        self._quit_started = True
        self._stopping.set()
        if not self.client.stop(QUIT_TIMEOUT):
            log.warning("the session did not stop within %s s; quitting anyway", QUIT_TIMEOUT)
        if self._dialog is not None and self._dialog.poll() is None:
            self._dialog.terminate()
        self.icon.stop()

    def _change_setting(self, key: str, raw: str) -> bool:
        """Ask the session (the settings' owner) to change one key; True when saved."""
        try:
            value = parse_setting(key, raw)
            self.client.update_settings(**{key: value}).result(QUIT_TIMEOUT)
        except SettingsError as exc:
            log.error("cannot change %s: %s", key, exc)
            return False
        except (OSError, TimeoutError) as exc:
            log.error("cannot save the settings: %s", exc)
            self.icon.notify("Cannot save the settings", str(exc))
            return False
        return True

    def _toggle_autostart(self) -> None:
        want = not self._latest.settings.autostart
        try:
            if want:
                autostart.enable(self._autostart_env)
            else:
                autostart.disable(self._autostart_env)
        except autostart.AutostartError as exc:
            log.error("cannot change start at login: %s", exc)
            self.icon.notify("Cannot change start at login", str(exc))
            return
        self._change_setting("autostart", "true" if want else "false")

    def _open_settings(self) -> None:
        if self._dialog is not None and self._dialog.poll() is None:
            return  # one window is enough; it is already open
        command = list(self._dialog_command)
        if self.config_file is not None:
            command += ["--config", str(self.config_file)]
        try:
            dialog = subprocess.Popen(command)
        except OSError as exc:
            self.icon.notify("Cannot open Settings", str(exc))
            return
        self._dialog = dialog
        threading.Thread(
            target=self._wait_dialog, args=(dialog,), name="fedtray-settings", daemon=True
        ).start()

    def _wait_dialog(self, dialog: subprocess.Popen[bytes]) -> None:
        # Runs on its own thread: it only logs and wakes the tray thread. The window
        # saved through the settings file, which the session follows.
        if dialog.wait() == 0 and not self._stopping.is_set():
            log.info("settings saved in the Settings window; the session applies them")
            self._wake.set()


def autostart_differs(settings: Settings, env: autostart.AutostartEnv | None = None) -> bool:
    """Whether the ``autostart`` setting disagrees with the OS (the OS is the truth: the
    user may have switched the login item off in the desktop's own settings)."""
    actual = autostart.is_enabled(env)
    if actual != settings.autostart:
        log.info("start at login is %s in the OS; updating the setting", "on" if actual else "off")
    return actual != settings.autostart
