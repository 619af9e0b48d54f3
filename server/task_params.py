"""``--task-param KEY=VALUE``: a task's model/data parameters given on the command line.

Contract:

* :func:`parse_task_params` is pure: each ``KEY=VALUE`` item becomes one entry; VALUE is
  read as JSON when it is JSON (``1024``, ``0.5``, ``true``, ``"text"``, ``[1, 2]``) and
  is taken as plain text otherwise (``iid``). An item without ``=``, an empty or spaced
  key, or a key given twice raises :class:`server.config.ConfigError` whose one-line
  message names the flag and the item.
* :func:`check_task_params` checks parameters against the task's own rules
  (:meth:`client.tasks.Task.resolve_params`: an unknown key lists the known ones, a bad
  value says what the task accepts) and raises ``ConfigError`` naming ``--task-param``.
  It never imports torch (task classes are torch-free at import) and performs no I/O
  besides importing the task's module. A task that cannot be found is not its business:
  the server reports that when it starts (exit status 1), so it returns quietly.
* :func:`task_params_from_flags` is both, for the ``fedtray-server`` and ``demo`` flags:
  parameters together with ``--task-file`` raise ``ConfigError`` (a package carries its
  own).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from pydantic import JsonValue

from client.errors import FedtrayError
from server.config import ConfigError

__all__ = ["FLAG", "check_task_params", "parse_task_params", "task_params_from_flags"]

FLAG = "--task-param"


def _value(text: str) -> JsonValue:
    try:
        value: JsonValue = json.loads(text)
    except ValueError:
        return text
    return value


def parse_task_params(items: Sequence[str]) -> dict[str, JsonValue]:
    """``KEY=VALUE`` items as a parameter dict; ConfigError for a malformed item."""
    params: dict[str, JsonValue] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"{FLAG} takes KEY=VALUE, got {item!r}")
        if not key or key != key.strip() or any(c.isspace() for c in key):
            raise ConfigError(f"{FLAG} needs a key without spaces before '=', got {item!r}")
        if key in params:
            raise ConfigError(f"{FLAG} {key} is given twice")
        params[key] = _value(text)
    return params


def check_task_params(task: str, params: Mapping[str, JsonValue]) -> None:
    """Raise ConfigError unless task ``task`` accepts ``params`` (nothing to check if empty)."""
    if not params:
        return
    from client.tasks import get_task  # imports the task's module only (never torch)

    try:
        get_task(task, params)
    except FedtrayError as exc:
        if exc.code == "bad_request":
            raise ConfigError(f"{FLAG}: {exc.message}") from None
        # unknown_task: the server refuses to start with its own line (status 1).


def task_params_from_flags(
    items: Sequence[str], task: str, *, task_file: bool
) -> dict[str, JsonValue]:
    """The checked parameters of ``--task-param`` items for ``--task task``."""
    params = parse_task_params(items)
    if params and task_file:
        raise ConfigError(
            f"{FLAG} sizes a --task; a --task-file package carries its own parameters"
        )
    check_task_params(task, params)
    return params
