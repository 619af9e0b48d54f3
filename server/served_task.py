"""The task a server trains from ``--task-file``: the package opened and checked once, the
same way for the single-process server (:mod:`server.app`, :mod:`server.cli`) and for each
cluster worker and the supervisor (:mod:`server.cluster`).

Contract:

* :func:`check_package` opens ``--task-file`` for a command line: the package checked by
  :func:`server.taskfile.open_package` (the checks a device makes), or -- for a bad package
  -- None after writing ONE line to stderr
  (``PROG: error: bad task package PATH: CODE: MESSAGE``, the package reader's error code).
* :func:`package_task` is the server's task for ``config.task_file``: the package (opened
  here when not given), its manifest's name is ``config.task`` (the command line sets it),
  and its training settings merge with the operator's flags; it raises
  :class:`server.serving.StartupError` (one line) otherwise and logs what it serves.

Never imports torch and never executes anything from the package.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from client.errors import FedtrayError
from server.config import ServerConfig
from server.serving import StartupError
from server.starter import training_config
from server.taskfile import PackageTask, ServedPackage, open_package

__all__ = ["check_package", "package_task"]

log = logging.getLogger(__name__)


def _refusal(path: Path, exc: FedtrayError) -> str:
    return f"bad task package {path}: {exc.code}: {exc.message}"


def check_package(path: Path, prog: str) -> ServedPackage | None:
    """The checked package at ``path``; None (one line on stderr) when it is bad."""
    try:
        return open_package(path)
    except FedtrayError as exc:
        sys.stderr.write(f"{prog}: error: {_refusal(path, exc)}\n")
        return None


def package_task(config: ServerConfig, package: ServedPackage | None) -> PackageTask:
    """The task of ``config.task_file`` (``package`` when already opened); StartupError."""
    path = config.task_file
    if path is None:
        raise ValueError("package_task needs config.task_file")
    if package is None:
        try:
            package = open_package(path)
        except FedtrayError as exc:
            raise StartupError(_refusal(path, exc)) from None
    if package.manifest.name != config.task:
        raise StartupError(
            f"the task package {path} trains {package.manifest.name!r}, not {config.task!r}"
        )
    task = PackageTask(package)
    try:
        training_config(task, config, 0)
    except ValueError as exc:
        raise StartupError(f"training settings for the package {path}: {exc}") from None
    log.info(
        "task package %s: %s %s (sha256 %s, %d bytes)",
        path,
        package.manifest.name,
        package.manifest.version,
        package.sha256[:12],
        package.size,
    )
    return task
