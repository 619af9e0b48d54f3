"""A set of loop tasks kept referenced until done (asyncio keeps only weak references).

Contract: loop-only. :meth:`TaskSet.spawn` starts a task and holds it until it ends;
:meth:`TaskSet.cancel_all` cancels every task still running and waits for them, never
raising their exceptions. Each part of the session owns its own sets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["TaskSet"]

T = TypeVar("T")


class TaskSet:
    """Tasks of one owner and one lifetime (e.g. one connection)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
