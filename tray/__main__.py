"""The ``fedtray`` command (and ``python -m tray``): the tray app and its helpers.

Contract:

* ``fedtray`` runs the tray: one per user (a second launch asks the first to show
  itself and exits 1 with a clear message), GUI loop on the main thread, session on its
  own thread. Exit 0 after Quit.
* ``fedtray --version`` prints the version and exits 0 without starting anything.
* ``fedtray autostart enable|disable|status`` changes or shows start-at-login, and
  keeps the ``autostart`` setting in agreement with the OS. Exit 0 ok, 1 refused.
* ``fedtray settings [--config PATH]`` shows the Settings window (the tray runs this in
  a separate process; see :mod:`tray.settings_dialog`).
* Expected problems are one ``error:`` line on stderr, never a traceback: 1 for a
  runtime refusal (already running, no GUI toolkit, disk), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from client import __version__
from client.logsetup import add_secret, log_level_arg, setup_logging

__all__ = ["build_parser", "main"]

PROG = "fedtray"
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Lend this computer's spare power to federated training."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--log-level", type=log_level_arg, default="INFO", metavar="LEVEL", help="default: INFO"
    )
    sub = parser.add_subparsers(dest="command")
    auto = sub.add_parser("autostart", help="start fedtray at login: enable, disable or status")
    auto.add_argument("action", choices=("enable", "disable", "status"))
    dialog = sub.add_parser("settings", help="show the Settings window")
    dialog.add_argument("--config", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _cmd_autostart(action: str) -> int:
    from client.config import update_settings
    from tray import autostart

    try:
        if action == "enable":
            autostart.enable()
        elif action == "disable":
            autostart.disable()
    except autostart.AutostartError as exc:
        _error(str(exc))
        return EXIT_REFUSED
    print(autostart.describe())
    if action != "status":
        try:
            update_settings(autostart=action == "enable")
        except OSError as exc:
            _error(f"start at login changed, but the setting could not be saved: {exc}")
            return EXIT_REFUSED
    return EXIT_OK


def _run_tray(level: str) -> int:
    from client.config import config_path, load_settings_and_report, update_settings
    from tray import single_instance

    log_file = setup_logging(level)
    try:
        lock = single_instance.acquire()
    except single_instance.AlreadyRunningError as exc:
        _error(str(exc))
        return EXIT_REFUSED
    except OSError as exc:
        _error(f"cannot create the single-instance lock: {exc}")
        return EXIT_REFUSED
    try:
        try:
            from tray.pystray_menu import PystrayPort, backend_name
        except Exception as exc:  # ImportError, or a toolkit that fails to load (no display)
            _error(
                f"cannot load a system-tray toolkit ({exc}); on Linux install PyGObject and "
                "GTK/AppIndicator, and run inside a desktop session (see docs/tray.md)"
            )
            return EXIT_REFUSED
        from client.session import DistributedClient
        from tray.app import TrayApp, autostart_differs, image_for
        from tray.icons import icon_key
        from tray.status import status_text

        settings, report = load_settings_and_report()
        if settings.auth_token:
            add_secret(settings.auth_token)
        if autostart_differs(settings):
            try:
                settings = update_settings(autostart=not settings.autostart)
            except OSError as exc:
                _error(f"cannot save the settings: {exc}")

        client = DistributedClient(settings, settings_report=report)
        snapshot = client.snapshot()
        port = PystrayPort(PROG, image_for(icon_key(snapshot)), status_text(snapshot, 0.0))
        import logging

        logging.getLogger(__name__).info(
            "fedtray %s starting (tray backend: %s; log: %s)",
            __version__,
            backend_name(),
            log_file,
        )
        app = TrayApp(
            client,
            port,
            log_dir=log_file.parent,
            config_file=config_path(),
            show_requested=lock.take_show_request,
        )
        try:
            return app.run()
        except RuntimeError as exc:
            _error(f"{exc}; see docs/tray.md for what the tray needs on this desktop")
            return EXIT_REFUSED
    finally:
        lock.release()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run one command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "autostart":
            return _cmd_autostart(args.action)
        if args.command == "settings":
            from tray.settings_dialog import main as dialog_main

            return dialog_main(["--config", str(args.config)] if args.config else [])
        return _run_tray(args.log_level)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
