"""The session's loop (uvloop where installed) and where its disk work runs."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from client.session.eventloop import new_session_loop
from client.session.offload import SMALL_DISK_BYTES, is_small, run_disk


def test_the_session_loop_is_uvloop_where_it_is_installed() -> None:
    import uvloop  # a dependency on every platform but Windows (pyproject.toml)

    loop = new_session_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()


def test_without_uvloop_the_session_loop_is_asyncios(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    loop = new_session_loop()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


def test_the_distributed_client_runs_its_session_on_the_session_loop() -> None:
    import uvloop

    from client.config import Settings
    from client.session import DistributedClient

    client = DistributedClient(Settings(server_url="http://127.0.0.1:1", device_name="t"))
    try:
        assert isinstance(client._loop, uvloop.Loop)
    finally:
        client.stop(5)


@pytest.mark.parametrize(
    ("nbytes", "small"),
    [
        (0, True),
        (400_000, True),
        (SMALL_DISK_BYTES, True),
        (SMALL_DISK_BYTES + 1, False),
        (100_000_000, False),
        (None, False),
    ],
)
def test_small_disk_work_runs_on_the_loop_and_the_rest_in_a_thread(
    nbytes: int | None, small: bool
) -> None:
    def where(tag: str) -> tuple[str, threading.Thread]:
        return tag, threading.current_thread()

    async def run() -> tuple[str, threading.Thread]:
        return await run_disk(nbytes, where, "done")

    assert is_small(nbytes) is small
    tag, thread = asyncio.run(run())
    assert tag == "done"
    assert (thread is threading.current_thread()) is small


def test_disk_work_raises_its_own_errors_wherever_it_runs() -> None:
    def fail() -> None:
        raise OSError(28, "No space left on device")

    for nbytes in (1, None):
        with pytest.raises(OSError, match="No space"):
            asyncio.run(run_disk(nbytes, fail))
