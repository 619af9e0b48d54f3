"""The Settings… window: server URL, device name, token, the daily schedule and a task's
data folder, in its own process.

Run as ``python -m tray.settings_dialog [--config PATH]``. It runs in a separate process
so that tkinter's main loop never competes with the tray's (macOS allows one GUI loop
per process, on the main thread).

Contract:

* :func:`validate_form` is pure: it checks the fields (the schedule when given, and the
  task's data folder when a task is named) with :mod:`client.config`'s own rules and
  returns the changes (key -> typed value), or raises :class:`client.config.
  SettingsError` whose message lists every problem, one line each, naming the field
  (a schedule that does not parse says the accepted form, ``22:00-07:00``). The token
  is never echoed.
* :func:`main` shows the window. Save validates; problems are shown in the window and
  nothing is written. A valid form is written with :func:`client.config.update_settings`
  (only these keys, atomic, under the file's lock) and the process exits
  :data:`EXIT_SAVED` (0); Cancel or closing the window exits :data:`EXIT_CANCELLED`
  (1); a display or disk problem exits :data:`EXIT_ERROR` (2) with one ``error:``
  line on stderr. The running session follows the file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from client.config import SettingsError, load_settings, parse_setting, update_settings

__all__ = ["EXIT_CANCELLED", "EXIT_ERROR", "EXIT_SAVED", "main", "validate_form"]

EXIT_SAVED: Final = 0
EXIT_CANCELLED: Final = 1
EXIT_ERROR: Final = 2

# (settings key, label shown in the window)
FIELDS: Final = (
    ("server_url", "Server URL"),
    ("device_name", "Device name"),
    ("auth_token", "Token (leave empty for none)"),
)


def validate_form(
    server_url: str,
    device_name: str,
    token: str,
    task: str = "",
    folder: str = "",
    schedule: str | None = None,
) -> dict[str, Any]:
    """The form as typed changes; raises SettingsError listing all problems.

    ``task`` and ``folder`` name the folder with this device's own data for a task whose
    data stays on the device (``task_data.TASK``); an empty task name changes nothing,
    an empty folder removes the task's folder. ``schedule`` is the daily window
    (``22:00-07:00``; empty: any time); None leaves it unchanged.
    """
    changes: dict[str, Any] = {}
    problems: list[str] = []
    fields = [("server_url", server_url), ("device_name", device_name), ("auth_token", token)]
    if schedule is not None:
        fields.append(("schedule", schedule))
    if task.strip():
        fields.append((f"task_data.{task.strip()}", folder))
    for key, raw in fields:
        try:
            changes[key] = parse_setting(key, raw)
        except SettingsError as exc:
            problems.append(str(exc))
    if problems:
        raise SettingsError("\n".join(problems))
    return changes


def _run_window(path: Path | None) -> int:
    import tkinter as tk
    from tkinter import filedialog, ttk

    current = load_settings(path)
    root = tk.Tk()
    root.title("fedtray settings")
    root.resizable(False, False)
    frame = ttk.Frame(root, padding=12)
    frame.grid(sticky="nsew")

    values = {
        "server_url": tk.StringVar(value=current.server_url),
        "device_name": tk.StringVar(value=current.device_name),
        "auth_token": tk.StringVar(value=current.auth_token or ""),
    }
    for row, (key, label) in enumerate(FIELDS):
        ttk.Label(frame, text=label).grid(row=row, column=0, sticky="w", padx=(0, 8), pady=3)
        entry = ttk.Entry(
            frame, textvariable=values[key], width=42, show="•" if key == "auth_token" else ""
        )
        entry.grid(row=row, column=1, sticky="ew", pady=3)
        if row == 0:
            entry.focus_set()
            entry.select_range(0, "end")  # typing replaces the whole URL

    # When to train: a daily window of local time (empty: any time).
    row = len(FIELDS)
    schedule = tk.StringVar(value=current.schedule)
    ttk.Label(frame, text="Train only between").grid(row=row, column=0, sticky="w", pady=3)
    when = ttk.Frame(frame)
    when.grid(row=row, column=1, sticky="ew", pady=3)
    ttk.Entry(when, textvariable=schedule, width=14).grid(row=0, column=0, sticky="w")
    ttk.Label(when, text="e.g. 22:00-07:00; empty: any time", foreground="#555").grid(
        row=0, column=1, sticky="w", padx=(6, 0)
    )

    # A task whose data stays on this computer: which folder holds it.
    task = tk.StringVar(value=next(iter(current.task_data), ""))
    folder = tk.StringVar(value=current.task_data.get(task.get(), ""))
    row += 1
    ttk.Label(frame, text="Task with local data").grid(row=row, column=0, sticky="w", pady=3)
    ttk.Entry(frame, textvariable=task, width=42).grid(row=row, column=1, sticky="ew", pady=3)
    ttk.Label(frame, text="Its data folder").grid(row=row + 1, column=0, sticky="w", pady=3)
    chooser = ttk.Frame(frame)
    chooser.grid(row=row + 1, column=1, sticky="ew", pady=3)
    ttk.Entry(chooser, textvariable=folder, width=32).grid(row=0, column=0, sticky="ew")

    def browse() -> None:
        chosen = filedialog.askdirectory(parent=root, initialdir=folder.get() or None)
        if chosen:
            folder.set(chosen)

    ttk.Button(chooser, text="Browse…", command=browse).grid(row=0, column=1, padx=(6, 0))

    message = tk.StringVar(value="")
    ttk.Label(frame, textvariable=message, foreground="#b00020", wraplength=420).grid(
        row=row + 2, column=0, columnspan=2, sticky="w", pady=(6, 0)
    )
    result = {"code": EXIT_CANCELLED}

    def save(*_: object) -> None:
        try:
            changes = validate_form(
                values["server_url"].get(),
                values["device_name"].get(),
                values["auth_token"].get(),
                task.get(),
                folder.get(),
                schedule.get(),
            )
        except SettingsError as exc:
            message.set(str(exc))
            return
        try:
            update_settings(path, **changes)
        except OSError as exc:
            message.set(f"Could not save the settings: {exc.strerror or exc}")
            return
        result["code"] = EXIT_SAVED
        root.destroy()

    def cancel(*_: object) -> None:
        root.destroy()

    buttons = ttk.Frame(frame)
    buttons.grid(row=row + 3, column=0, columnspan=2, sticky="e", pady=(10, 0))
    ttk.Button(buttons, text="Cancel", command=cancel).grid(row=0, column=0, padx=(0, 6))
    ttk.Button(buttons, text="Save", command=save).grid(row=0, column=1)
    root.bind("<Return>", save)
    root.bind("<Escape>", cancel)
    root.protocol("WM_DELETE_WINDOW", cancel)
    root.mainloop()
    return result["code"]


def main(argv: Sequence[str] | None = None) -> int:
    """Show the window; the exit code says whether the settings were saved."""
    parser = argparse.ArgumentParser(prog="python -m tray.settings_dialog")
    parser.add_argument("--config", type=Path, default=None, help="settings file to edit")
    args = parser.parse_args(argv)
    try:
        return _run_window(args.config)
    except Exception as exc:  # tkinter.TclError (no display) and friends: one clear line
        print(f"error: cannot show the settings window: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
