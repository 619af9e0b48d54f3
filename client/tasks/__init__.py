"""The task registry: built-in tasks plus plugins from the ``fedtray.tasks`` entry points.

Contract:

* Importing this package never imports torch (the tray and session processes list task
  names with it).
* :func:`available_tasks` lists built-in names and the names of installed entry points
  in the group ``fedtray.tasks`` *without importing* any plugin module, sorted, without
  duplicates.
* :func:`get_task` returns a fresh, configured :class:`Task` instance. An unknown name,
  a plugin whose module fails to import, or an entry point that is not a :class:`Task`
  subclass raises :class:`client.errors.FedtrayError` with code ``unknown_task`` and the
  cause in plain words; the failure is logged and never escapes as another exception.
  Bad parameters raise ``bad_request``.
* A built-in name always wins over a plugin of the same name (logged once per lookup).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points

from pydantic import JsonValue

from client.errors import FedtrayError
from client.tasks.base import Task

__all__ = ["BUILTIN_TASKS", "ENTRY_POINT_GROUP", "Task", "available_tasks", "get_task"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fedtray.tasks"

# name -> "module:Class"; imported only when asked for, like a plugin.
_BUILTINS: dict[str, str] = {
    "digits": "client.tasks.digits:DigitsTask",
    "synthetic": "client.tasks.synthetic:SyntheticTask",
}
#: The built-in task names: their modules never import torch at import time.
BUILTIN_TASKS: frozenset[str] = frozenset(_BUILTINS)


def _plugin_entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def available_tasks() -> list[str]:
    """Names of every task that :func:`get_task` may resolve (plugins are not imported)."""
    return sorted(set(_BUILTINS) | set(_plugin_entry_points()))


def _load_class(name: str) -> type[Task]:
    target = _BUILTINS.get(name)
    if target is not None:
        module_name, _, attr = target.partition(":")
        loaded: object = getattr(importlib.import_module(module_name), attr)
    else:
        ep = _plugin_entry_points().get(name)
        if ep is None:
            known = ", ".join(available_tasks())
            raise FedtrayError("unknown_task", f"no task named '{name}' (installed: {known})")
        try:
            loaded = ep.load()
        except Exception as exc:
            log.warning("task plugin '%s' (%s) failed to load", name, ep.value, exc_info=True)
            raise FedtrayError(
                "unknown_task",
                f"the task plugin '{name}' ({ep.value}) could not be loaded: "
                f"{type(exc).__name__}: {exc}",
            ) from exc
    if not (isinstance(loaded, type) and issubclass(loaded, Task)):
        log.warning("task plugin '%s' is %r, not a Task subclass", name, loaded)
        raise FedtrayError(
            "unknown_task", f"the task plugin '{name}' does not name a fedtray Task class"
        )
    return loaded


def get_task(name: str, params: Mapping[str, JsonValue] | None = None) -> Task:
    """A new instance of task ``name``, configured with ``params`` (defaults when ``None``).

    Raises ``FedtrayError('unknown_task')`` for a missing or broken task and
    ``FedtrayError('bad_request')`` for bad parameters.
    """
    cls = _load_class(name)
    try:
        task = cls()
    except Exception as exc:
        log.warning("task '%s' failed to initialise", name, exc_info=True)
        raise FedtrayError(
            "unknown_task", f"the task '{name}' failed to start: {type(exc).__name__}: {exc}"
        ) from exc
    return task.configure(params)
