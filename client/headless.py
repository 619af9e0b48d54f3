"""The headless run mode of ``fedtray-client``: run the session until told to stop.

Contract:

* :func:`run_client` starts a :class:`client.session.DistributedClient` with the given
  settings and blocks until Ctrl-C or SIGTERM (graceful: the worker's round is paused and
  checkpointed, not cancelled, the session disconnects, exit status 0) or, with
  ``--no-reconnect``, until the connection is refused or lost (exit status 1 and one
  ``error: ...`` line on stderr).
* When stdout is a terminal it shows a ``rich`` live panel (connection, round, epoch,
  loss, samples/s, state); otherwise it prints one plain line per meaningful change.
* Settings that were reset (a typo in the file, a file that cannot be read; the
  snapshot's ``settings_report``) are said where the user looks: a ``Settings`` row in
  the live panel, and a ``settings: ...`` line (:func:`settings_line`) at start and
  whenever the report changes; a terminal also gets every detail once at start.
* The CPU budget (:attr:`client.snapshot.ClientSnapshot.budget`, "requested" until the
  worker keeps it) is a ``Budget`` row and a ``budget: ...`` line whenever it changes,
  and ends each epoch line; the surroundings row says whether the computer is in use
  ("unknown, treated as in use" when the OS cannot tell), the CPU temperature
  ("unknown" when unknown) and other programs' CPU share.
* :func:`status_rows`, :func:`change_line`, :func:`settings_line` are pure (snapshot
  in, words out) and tested by tables. Signal handlers are restored on return.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Final, TextIO

from client.config import Settings, SettingsReport
from client.rules.pauses import temperature_words
from client.session import DistributedClient
from client.snapshot import ClientSnapshot

EXIT_OK: Final = 0
EXIT_ENDED: Final = 1
STOP_TIMEOUT_S: Final = 20.0


def _round_words(snap: ClientSnapshot) -> str:
    if snap.round_id is None:
        return "-"
    return snap.round_id


def _epoch_words(snap: ClientSnapshot) -> str:
    p = snap.progress
    if snap.round_id is None or p.epochs <= 0:
        return "-"
    return f"{p.epoch}/{p.epochs} ({p.fraction:.0%})"


def _loss_words(snap: ClientSnapshot) -> str:
    loss = snap.progress.loss
    return "-" if snap.round_id is None or loss is None else f"{loss:.4f}"


def _speed_words(snap: ClientSnapshot) -> str:
    sps = snap.progress.samples_per_sec
    return "-" if snap.round_id is None or sps is None else f"{sps:,.0f}"


def _state_words(snap: ClientSnapshot) -> str:
    if snap.device_state == "paused":
        return f"paused: {snap.pause_detail or snap.pause_reason}"
    if snap.device_state == "uploading" and snap.upload_fraction is not None:
        return f"uploading ({snap.upload_fraction:.0%})"
    return snap.device_state


def budget_words(snap: ClientSnapshot) -> str:
    """The CPU budget in words (``"-"`` before one is decided)."""
    return "-" if snap.budget is None else snap.budget.describe()


def _surroundings_words(snap: ClientSnapshot) -> str:
    activity = snap.activity.replace("_", " ")
    if snap.activity == "unknown":
        activity = "unknown, treated as in use"
    others = "-" if snap.other_cpu_percent is None else f"{snap.other_cpu_percent:.0f} %"
    return (
        f"computer {activity}; CPU {temperature_words(snap.temperature_c)}; other programs {others}"
    )


def status_rows(snap: ClientSnapshot, now: float | None = None) -> list[tuple[str, str]]:
    """The live panel's rows, as (label, value) pairs."""
    connection = snap.describe_connection(now)
    if snap.last_error and snap.connection != "connected":
        connection += f" — {snap.last_error}"
    weights = "none" if snap.weights_version is None else f"v{snap.weights_version}"
    return [
        ("Device", f"{snap.device_name} ({snap.device_id})"),
        ("Server", snap.server_url),
        ("Connection", connection),
        ("State", _state_words(snap) + (" [simulation]" if snap.simulation else "")),
        ("Budget", budget_words(snap)),
        ("Surroundings", _surroundings_words(snap)),
        ("Round", _round_words(snap)),
        ("Epoch", _epoch_words(snap)),
        ("Loss", _loss_words(snap)),
        ("Samples/s", _speed_words(snap)),
        ("Global weights", weights),
        ("Rounds completed", str(snap.rounds_completed)),
    ] + ([("Settings", snap.settings_report.summary())] if not snap.settings_report.ok else [])


def settings_line(old: ClientSnapshot | None, new: ClientSnapshot) -> str | None:
    """``"settings: ..."`` when the settings report is new or changed (also when it
    became empty: the user fixed it), else None."""
    before = old.settings_report if old is not None else None
    report = new.settings_report
    if before == report or (before is None and report.ok):
        return None
    if report.ok:
        return "settings: the settings file is fine again"
    return f"settings: {report.summary()}"


def change_line(
    old: ClientSnapshot | None, new: ClientSnapshot, now: float | None = None
) -> str | None:
    """One plain line describing what changed from ``old`` to ``new``, or None if nothing
    worth a line did (progress is reported once per epoch, not per batch)."""
    if old is None and new.connection == "disconnected" and new.last_error is None:
        return None  # the state before the first attempt: nothing has happened yet
    if old is None or old.connection != new.connection:
        text = f"connection: {new.connection.replace('_', ' ')}"
        if new.connection == "connecting":
            text += f" to {new.server_url}"
        if new.last_error and new.connection != "connected":
            text += f" ({new.last_error})"
        return text
    if old.next_retry_at is None and new.next_retry_at is not None:
        return f"connection: {new.describe_connection(now)}"
    if (old.device_state, old.pause_detail) != (new.device_state, new.pause_detail):
        return f"state: {_state_words(new)}" + (f" (round {new.round_id})" if new.round_id else "")
    if old.budget != new.budget and new.budget is not None:
        return f"budget: {budget_words(new)}"
    if (
        new.round_id is not None
        and old.round_id == new.round_id
        and new.progress.epoch != old.progress.epoch
        and new.progress.epoch > 0
    ):
        return (
            f"round {new.round_id}: epoch {_epoch_words(new)}, loss {_loss_words(new)}, "
            f"{_speed_words(new)} samples/s"
        ) + ("" if new.budget is None else f", budget {budget_words(new)}")
    if old.weights_version != new.weights_version and new.weights_version is not None:
        return f"global weights: v{new.weights_version}"
    if old.rounds_completed != new.rounds_completed:
        return f"rounds completed: {new.rounds_completed}"
    return None


@contextlib.contextmanager
def _stop_signals(on_signal: Callable[[], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``on_signal`` (main thread only); restore afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        on_signal()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _plain_printer(out: TextIO) -> Callable[[ClientSnapshot], None]:
    last: list[ClientSnapshot | None] = [None]

    def on_change(snap: ClientSnapshot) -> None:
        lines = (settings_line(last[0], snap), change_line(last[0], snap))
        last[0] = snap
        for line in lines:
            if line is not None:
                out.write(line + "\n")  # one write (print makes two), then flushed
                out.flush()

    return on_change


def _wait(client: DistributedClient, stop: threading.Event, ended: threading.Event) -> None:
    # Short waits so a signal handler (which runs on this thread) is noticed promptly.
    while not (stop.is_set() or ended.is_set()):
        stop.wait(0.25)


def run_client(
    args: argparse.Namespace, settings: Settings, report: SettingsReport | None = None
) -> int:
    """Run the session until a signal (exit 0) or, with --no-reconnect, a lost link (1).

    ``report``: what loading the settings repaired (shown until dealt with)."""
    no_reconnect = bool(getattr(args, "no_reconnect", False))
    client = DistributedClient(settings, no_reconnect=no_reconnect, settings_report=report)
    stop = threading.Event()
    ended = threading.Event()

    def watch_end(snap: ClientSnapshot) -> None:
        if snap.connection == "stopped":
            ended.set()

    client.subscribe(watch_end)
    out = sys.stdout
    with _stop_signals(stop.set):
        if out.isatty():
            from rich.console import Console
            from rich.live import Live
            from rich.table import Table

            def render() -> Table:
                table = Table(title="fedtray client", show_header=False, expand=False)
                table.add_column(style="bold")
                table.add_column()
                for label, value in status_rows(client.snapshot()):
                    table.add_row(label, value)
                return table

            for detail in report.lines() if report is not None else ():
                print(f"settings: {detail}", file=out, flush=True)
            with Live(get_renderable=render, console=Console(file=out), refresh_per_second=4):
                client.start()
                _wait(client, stop, ended)
        else:
            client.subscribe(_plain_printer(out))
            client.start()
            _wait(client, stop, ended)
        stopped_in_time = client.stop(STOP_TIMEOUT_S)
    if stop.is_set():
        if not stopped_in_time:
            print("error: the client did not stop in time", file=sys.stderr)
            return EXIT_ENDED
        return EXIT_OK
    reason = client.snapshot().last_error or "the connection to the server ended"
    print(f"error: {reason}", file=sys.stderr)
    return EXIT_ENDED
