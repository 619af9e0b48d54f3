"""The layout a ``weights:global`` must have, when the device can know it without torch.

Contract: :meth:`ExpectedLayouts.of` answers, for one ``weights:global``, the layout its
tensors must have (names, numpy dtype names, shapes) and in words where it comes from, or
``None`` when this process cannot know it cheaply. The model is the one the message
names, exactly as ``training:start`` names it (``task``, ``modelParams`` -- absent means
the task's defaults -- and ``package``):

* ``package`` given: the layout of that package's ``weights.safetensors`` when the device
  holds the package (its task-file cache, by SHA-256), read with every check of
  :func:`client.taskpkg.archive.read_package`. A package not held yet (the server gives
  it before the first round) or one that fails its checks gives ``None``.
* otherwise a built-in task (:data:`client.tasks.BUILTIN_TASKS`): the task's torch-free
  :meth:`client.tasks.base.Task.weights_layout` for ``modelParams``. Parameters the
  task refuses give ``None``.
* any other task (a plugin, whose module may import torch, or one not installed): ``None``.

Where it gives ``None`` nothing is checked on receipt; the worker still checks the base
against the model it builds before training (``client.trainer``). Answers are kept per
model (a small LRU), so each new version of the same model costs a dictionary lookup.
Reads files for a ``package`` (call it from a worker thread then; for any other message it
reads none). Never imports torch, never raises for a
peer's input (a bug in a task's ``weights_layout`` is logged and gives ``None``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Final

from client.errors import FedtrayError
from client.protocol import WeightsGlobal
from client.taskpkg.archive import read_package
from client.tasks import BUILTIN_TASKS, get_task
from client.weights import Layout, layout_of

__all__ = ["Expected", "ExpectedLayouts"]

log = logging.getLogger(__name__)

#: Models whose layouts are remembered.
KEEP: Final = 8

Expected = tuple[Layout, str]
"""A layout and, in words, the model it is of (e.g. ``task digits {"hidden": 64}``)."""


class ExpectedLayouts:
    """Finds the expected layout of received weights (see the module docstring)."""

    def __init__(self, package_path: Callable[[str], Path | None]) -> None:
        """``package_path(sha256)``: the held package with that content, or None."""
        self._package_path = package_path
        self._known: OrderedDict[str, Expected | None] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, message: WeightsGlobal) -> Expected | None:
        """The layout ``message``'s weights must have, or None when not known here."""
        if message.package is not None:
            key = f"package {message.package.sha256}"
        elif message.task in BUILTIN_TASKS:
            params = json.dumps(message.model_params, sort_keys=True)
            key = f"task {message.task} {params}"
        else:
            return None
        with self._lock:
            if key in self._known:
                self._known.move_to_end(key)
                return self._known[key]
        found = self._find(message, key)
        if found is None and message.package is not None:
            return None  # not held yet (or bad): ask again next time
        with self._lock:
            self._known[key] = found
            while len(self._known) > KEEP:
                self._known.popitem(last=False)
        return found

    def _find(self, message: WeightsGlobal, key: str) -> Expected | None:
        if message.package is not None:
            path = self._package_path(message.package.sha256)
            if path is None:
                return None
            try:
                contents = read_package(path, require_data=False)
            except FedtrayError as exc:
                log.info("not checking weights against package %s: %s", path.name, exc.message)
                return None
            return layout_of(contents.weights), f"the package {message.package.sha256[:12]}"
        try:
            task = get_task(message.task, message.model_params)
            layout = task.weights_layout(task.params)
        except FedtrayError as exc:
            log.info("not checking weights against %s: %s", key, exc.message)
            return None
        except Exception:
            log.exception("bug in the weights_layout of task %s", message.task)
            return None
        if layout is None:
            return None
        return layout, key
