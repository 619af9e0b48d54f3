"""A task package in cluster mode (``fedtray-server --workers N --task-file PKG``).

Contract:

* :func:`check_package` is how the supervisor (before any worker starts) and each worker's
  command line (before it builds anything) open ``--task-file``: the package checked by
  :func:`server.taskfile.open_package` (the checks a device makes), or -- for a bad package
  -- None after writing ONE line to stderr, the single-process CLI's
  (``PROG: error: bad task package PATH: CODE: MESSAGE``, the package reader's error code).
* :func:`package_task` is a worker's task for ``config.task_file``, checked as the
  single-process server checks it (:mod:`server.app`): the package (opened here when not
  given), its manifest's name is ``config.task`` (the command line sets it), and its
  training settings merge with the operator's flags; it raises
  :class:`server.serving.StartupError` (one line) otherwise and logs what it serves.
* :func:`package_bytes` is the size eligibility is judged against: a device takes a
  packaged task only if it advertises task packages and the package fits its cache and
  blob limit (:mod:`server.registry`); None for an installed task.
* :func:`check_layout` refuses (StartupError) a federation whose versions in PostgreSQL
  have another layout than the package's weights (the database holds another model).

Never imports torch (the package's weights are numpy; torch is loaded only where a packaged
model runs) and never executes anything from the package.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from client.errors import FedtrayError
from client.tasks import Task
from client.weights import Layout, layout_of
from server.config import ServerConfig
from server.serving import StartupError
from server.starter import training_config
from server.taskfile import PackageTask, ServedPackage, open_package

__all__ = ["check_layout", "check_package", "package_bytes", "package_task"]

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


def package_bytes(task: Task) -> int | None:
    """The package's size for a packaged task; None for an installed one."""
    return task.package.size if isinstance(task, PackageTask) else None


def check_layout(task: Task, layout: Layout) -> None:
    """StartupError unless a packaged task's weights have ``layout`` (the versions')."""
    if not isinstance(task, PackageTask):
        return
    if layout_of(task.package.weights) != dict(layout):
        raise StartupError(
            f"the cluster's database holds versions of another model than the task "
            f"package {task.package.path} (use a new database for a new model)"
        )
