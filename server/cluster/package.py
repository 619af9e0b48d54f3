"""A task package in cluster mode (``fedtray-server --workers N --task-file PKG``).

Contract:

* The supervisor (before any worker starts) and each worker's command line open
  ``--task-file`` with :func:`server.served_task.check_package`, and each worker builds its
  task with :func:`server.served_task.package_task`, as the single-process server does.
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

from client.tasks import Task
from client.weights import Layout, layout_of
from server.serving import StartupError
from server.taskfile import PackageTask

__all__ = ["check_layout", "package_bytes"]

log = logging.getLogger(__name__)


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
