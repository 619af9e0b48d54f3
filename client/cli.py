"""The headless command line: ``fedtray-client`` and ``python -m client``.

Contract:

* :func:`main` parses ``argv``, sets up logging and runs one command; it returns the
  exit code and never lets a traceback reach the user for expected problems:
  0 ok, 1 the disk refused (e.g. settings could not be saved), 2 usage or validation
  error, 130 interrupted. Every error is one line on stderr starting with ``error:``.
* Without a subcommand it runs the client: ``--server``, ``--name``,
  ``--battery-threshold`` and ``--ca-file`` are validated and saved to the settings first
  (:func:`apply_cli_overrides`), then :func:`run_client` is called.
* ``config show [--json]`` / ``config path`` / ``config set KEY VALUE`` read and change
  the settings; the auth token is never printed. ``config show`` reads the file as the
  client does (repairing a damaged one: every valid key kept, see
  :mod:`client.config`) and marks each key it had to reset: ``  # reset: <why>`` after
  the key's line, ``# ...`` lines with the rest of the report (where the original was
  kept, a file that cannot be read); with ``--json``, a ``"_settings_report"`` object
  (``reset``: key to why, ``file_problem``, ``kept_aside``, ``in_memory``), present only
  when something was reset. A file a running client already repaired shows no marks
  (the running client's tray or status says what it reset).
* Before :func:`run_client` imports the session, it starts the training process
  (:func:`client.worker.start_early`: it imports torch at low priority while this
  process imports the session, connects and registers) when :func:`early_start_wanted`:
  the settings neither pause training (``paused``) nor keep it outside the ``schedule``
  window now. The session adopts that process (it decides every other pause later).
* ``info`` prints this device's description and a resource snapshot as JSON.
* ``pause`` / ``resume`` set the user's ``paused`` setting and say what happened; a
  running client (headless or tray) notices the settings file change within about a
  second and pauses (checkpointing its round) or resumes. ``pause --for DURATION``
  (:func:`parse_duration`: ``30m``, ``1h``, ``2h30m``) also sets ``paused_until``, when
  the running client resumes by itself; ``pause --until-tomorrow`` sets it to
  :func:`client.schedule.until_tomorrow` (07:00 tomorrow, or the start of tomorrow's
  ``schedule`` window), as the tray's "Until tomorrow" does; plain ``pause`` drops any
  such deadline and ``resume`` clears both.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from client import __version__
from client.config import (
    SETTABLE_KEYS,
    Settings,
    SettingsError,
    SettingsReport,
    config_path,
    load_settings,
    load_settings_and_report,
    parse_setting,
    redacted,
    update_settings,
    with_changes,
)
from client.logsetup import add_secret, log_level_arg, setup_logging
from client.schedule import parse_schedule, until_tomorrow, until_words

__all__ = ["apply_cli_overrides", "build_parser", "main", "parse_duration", "run_client"]

PROG = "fedtray-client"
EXIT_OK = 0
EXIT_IO = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# (argparse dest, settings key) for the run-mode flags that persist.
_OVERRIDES: tuple[tuple[str, str], ...] = (
    ("server", "server_url"),
    ("name", "device_name"),
    ("battery_threshold", "battery_threshold"),
    ("ca_file", "ca_file"),
)


#: The longest timed pause: past a week, a plain `pause` (ended by `resume`) says it better.
MAX_PAUSE: Final = timedelta(days=7)
_DURATION: Final = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_DURATION_WORDS: Final = "a duration such as 30m, 1h or 2h30m (units d, h, m, s, in that order)"


def parse_duration(text: str) -> timedelta:
    """``"2h30m"`` -> 2 h 30 min (pure). Units d, h, m, s, each at most once, in that
    order, whole numbers; case and surrounding spaces are ignored. Raises ValueError in
    plain words for anything else, for zero, and for more than :data:`MAX_PAUSE`."""
    raw = text.strip().lower()
    match = _DURATION.fullmatch(raw)
    if not raw or match is None:
        raise ValueError(f"expected {_DURATION_WORDS}, got {text!r}")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    try:
        total = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except OverflowError:  # more days than a timedelta holds: far past the limit anyway
        total = timedelta.max
    if total <= timedelta(0):
        raise ValueError(f"the duration must be longer than zero, got {text!r}")
    if total > MAX_PAUSE:
        raise ValueError(
            f"at most {MAX_PAUSE.days} days, got {text!r}; for longer, use `pause` without "
            "--for and `resume` when you want"
        )
    return total


def _duration_arg(text: str) -> timedelta:
    """An argparse ``type=``: :func:`parse_duration` with argparse's error type."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _absolute_path(value: str) -> str:
    """An argparse ``type=``: the path made absolute, so the saved setting works anywhere."""
    return str(Path(value).expanduser().absolute()) if value.strip() else value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command (exposed for tests and later commands)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Lend this computer's spare power to federated training (headless client).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--log-level",
        type=log_level_arg,
        default="INFO",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: INFO)",
    )
    run = parser.add_argument_group("running the client (saved to the settings)")
    # Default None rather than the URL: only a value the user typed may overwrite the
    # saved setting. The setting itself defaults to http://localhost:3001.
    run.add_argument(
        "--server",
        "-s",
        metavar="URL",
        help="server URL to connect to (default: the saved setting, initially "
        "http://localhost:3001)",
    )
    run.add_argument("--name", "-n", metavar="NAME", help="this device's display name")
    run.add_argument(
        "--no-reconnect",
        action="store_true",
        help="exit instead of reconnecting when the connection drops",
    )
    run.add_argument(
        "--ca-file",
        metavar="PATH",
        type=_absolute_path,
        help="PEM file of the CA that signed an https:// server's certificate "
        "(a private CA; public ones are trusted already)",
    )
    run.add_argument(
        "--battery-threshold",
        metavar="PERCENT",
        help="on battery, only train above this charge (0-100; 100 = only when plugged in)",
    )

    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    config = commands.add_parser("config", help="show or change the settings")
    config_cmds = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_cmds.add_parser("show", help="print the settings (the token is hidden)")
    show.add_argument("--json", action="store_true", help="print JSON instead of key = value")
    config_cmds.add_parser("path", help="print the settings file's path")
    set_ = config_cmds.add_parser("set", help="change one setting and save it")
    set_.add_argument("key", metavar="KEY", help=f"one of: {', '.join(SETTABLE_KEYS)}")
    set_.add_argument("value", metavar="VALUE", help="new value ('none' clears an optional one)")
    commands.add_parser("info", help="print device info and a resource snapshot as JSON")
    pause = commands.add_parser(
        "pause", help="pause training (a running client checkpoints and waits; survives restarts)"
    )
    until = pause.add_mutually_exclusive_group()
    until.add_argument(
        "--for",
        dest="duration",
        metavar="DURATION",
        type=_duration_arg,
        help="resume by itself after this long, e.g. 30m, 1h, 2h30m (also after a restart)",
    )
    until.add_argument(
        "--until-tomorrow",
        action="store_true",
        help="resume by itself tomorrow at 07:00, or when tomorrow's `schedule` window "
        "starts (also after a restart)",
    )
    commands.add_parser("resume", help="undo `pause` (battery rules still apply)")
    return parser


def _format_value(value: object) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)


def _print_settings(
    settings: Settings, *, as_json: bool, report: SettingsReport | None = None
) -> None:
    shown = redacted(settings)
    report = report if report is not None else SettingsReport()
    marks = report.marks()
    if as_json:
        out: dict[str, object] = dict(shown)
        if not report.ok:
            out["_settings_report"] = {
                "reset": marks,
                "file_problem": report.file_problem,
                "kept_aside": report.kept_aside,
                "in_memory": report.in_memory,
            }
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return

    def line(key: str, value: object) -> str:
        mark = f"  # reset: {marks[key]}" if key in marks else ""
        return f"{key} = {_format_value(value)}{mark}"

    for key, value in shown.items():
        if isinstance(value, dict):  # a table: one line per entry, as `config set` takes it
            for entry, item in sorted(value.items()):
                print(line(f"{key}.{entry}", item))
            for gone in sorted(k for k in marks if k.startswith(f"{key}.")):
                if gone.partition(".")[2] not in value:  # a refused entry: now unset
                    print(line(gone, None))
        else:
            print(line(key, value))
    for detail in report.lines():
        if not detail.startswith("reset: "):
            print(f"# {detail}")


def apply_cli_overrides(
    settings: Settings, args: argparse.Namespace, *, path: Path | None = None
) -> Settings:
    """Validate the run-mode flags (``--server``, ``--ca-file``, ...) and save changed ones.

    Returns the updated settings. Raises :class:`SettingsError` for a bad value (nothing
    is saved then). A settings file that cannot be written is reported on stderr and the
    given values are used for this run only.
    """
    changes = {
        key: parse_setting(key, str(raw))
        for dest, key in _OVERRIDES
        if (raw := getattr(args, dest, None)) is not None
    }
    if not changes:
        return settings
    updated = with_changes(settings, changes)  # raises SettingsError before anything is saved
    if updated != settings:
        try:
            updated = update_settings(path, **changes)
        except OSError as exc:
            _error(f"could not save settings to {path or config_path()} ({exc}); using them once")
    return updated


def early_start_wanted(settings: Settings, now: datetime) -> bool:
    """Whether to start the training process before the session (module docstring);
    ``now``: the aware local time."""
    if settings.paused:
        return False
    window = parse_schedule(settings.schedule)
    return window is None or window.contains(now.time())


def run_client(
    args: argparse.Namespace, settings: Settings, report: SettingsReport | None = None
) -> int:
    """Run the networked session until interrupted (see :mod:`client.headless`)."""
    if early_start_wanted(settings, datetime.now().astimezone()):
        from client.worker import start_early

        start_early()
    # Imported here so `config` and `info` stay quick and never load the session stack.
    from client import headless

    return headless.run_client(args, settings, report)


def _cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "path":
        print(config_path())
        return EXIT_OK
    if args.config_command == "show":
        settings, report = load_settings_and_report()
        _print_settings(settings, as_json=args.json, report=report)
        return EXIT_OK
    # config set
    value = parse_setting(args.key, args.value)
    try:
        updated = update_settings(**{args.key: value})
    except OSError as exc:
        _error(f"could not save settings to {config_path()}: {exc}")
        return EXIT_IO
    table, dot, entry = args.key.partition(".")
    shown = redacted(updated)[table]
    if dot:
        shown = shown.get(entry) if isinstance(shown, dict) else None
    print(f"{args.key} = {_format_value(shown)}")
    return EXIT_OK


def _cmd_info() -> int:
    # Imported here so that `config` commands work without probing the hardware.
    from client.device import detect_device
    from client.resources import ResourceMonitor

    device = detect_device()
    snapshot = ResourceMonitor().snapshot()
    report = {
        "device": device.model_dump(mode="json", by_alias=True),
        "resources": snapshot.model_dump(mode="json", by_alias=True),
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return EXIT_OK


def _cmd_pause(paused: bool, duration: timedelta | None = None, tomorrow: bool = False) -> int:
    settings = load_settings()
    now = datetime.now(UTC).replace(microsecond=0)
    until = now + duration if paused and duration is not None else None
    if paused and tomorrow:
        # The local wall clock decides what "tomorrow" is; the file keeps the instant.
        local = now.astimezone().replace(tzinfo=None)
        until = until_tomorrow(local, parse_schedule(settings.schedule)).astimezone(UTC)
    earlier = settings.paused_until if settings.paused else None
    if (settings.paused, settings.paused_until) == (paused, until):
        print("training is already paused" if paused else "training is not paused")
        return EXIT_OK
    try:
        update_settings(paused=paused, paused_until=until)
    except OSError as exc:
        _error(f"could not save settings to {config_path()}: {exc}")
        return EXIT_IO
    if until is not None:
        print(
            f"Paused until {until_words(until, now)}: a running client stops at its next batch, "
            "keeps its progress and resumes by itself then (earlier with "
            "`fedtray-client resume`)"
        )
    elif paused:
        dropped = f" (no longer ending at {until_words(earlier, now)})" if earlier else ""
        print(
            f"paused training{dropped}; a running client stops at its next batch and keeps "
            "its progress (undo with `fedtray-client resume`)"
        )
    else:
        print("resumed training; a running client continues where it stopped")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    loaded, report = load_settings_and_report()
    settings = apply_cli_overrides(loaded, args)
    # A key given on the command line is no longer one that was reset.
    report = report.without(key for dest, key in _OVERRIDES if getattr(args, dest, None))
    if settings.auth_token:
        add_secret(settings.auth_token)
    return run_client(args, settings, report)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedtray-client``; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    if args.command is not None:
        given = [f"--{dest.replace('_', '-')}" for dest, _ in _OVERRIDES if getattr(args, dest)]
        if given or args.no_reconnect:
            given += ["--no-reconnect"] if args.no_reconnect else []
            verb = "applies" if len(given) == 1 else "apply"
            _error(
                f"{', '.join(given)} {verb} only when running the client; "
                "use `config set KEY VALUE` to change settings"
            )
            return EXIT_USAGE

    setup_logging(args.log_level)
    try:
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "info":
            return _cmd_info()
        if args.command == "pause":
            return _cmd_pause(True, args.duration, args.until_tomorrow)
        if args.command == "resume":
            return _cmd_pause(False)
        return _cmd_run(args)
    except SettingsError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
