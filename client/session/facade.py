"""The facade: :class:`DistributedClient`, the ONE thread-safe way into a session.

Threading model (the contract every caller relies on):

* :class:`DistributedClient` owns a background thread ("fedtray-session") that runs an
  asyncio loop; the python-socketio ``AsyncClient`` (over aiohttp), the training
  worker's events, the stores on disk and all session state
  (:class:`client.session.core.SessionCore` and its parts) live on that loop. Every
  facade method hands its work to the loop with ``asyncio.run_coroutine_threadsafe`` /
  ``loop.call_soon_threadsafe``; nothing else is shared between threads except the
  current :class:`client.snapshot.ClientSnapshot` (owned by the
  :class:`client.session.hub.SnapshotHub`) and the current settings, both immutable
  objects whose references are swapped atomically.
* Subscribers (:meth:`DistributedClient.subscribe`) are called ON THE SESSION THREAD,
  once at subscription with the current snapshot and then on every change. They must
  not block or call back into the facade synchronously waiting for a result; a GUI
  hands the snapshot to its own thread.
* The loop is uvloop's where it is installed (:mod:`client.session.eventloop`).
* The loop and the session exist from construction, so :meth:`subscribe`,
  :meth:`pause` and friends may be called before :meth:`start`: their work waits in the
  loop's queue. Once the session has ended they raise ``RuntimeError`` (except
  :meth:`stop`, :meth:`snapshot` and :meth:`wait_for`).
* :meth:`start` keeps the transfer buffers' memory between chunks for the process
  (:func:`client.transfer_memory.keep_transfer_buffers`).
* :meth:`stop` pauses (checkpoints) the round instead of cancelling it, so the same
  round offered again after a restart resumes from the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from types import EllipsisType
from typing import Final, TypeVar

from client.activity import ActivityProbe
from client.backoff import Backoff
from client.config import Settings, SettingsReport, config_path
from client.device import DeviceInfo
from client.power_monitor import DEFAULT_POLL_INTERVAL_S
from client.resources import BatterySource, read_battery
from client.session.core import SessionCore
from client.session.decisions import user_decision
from client.session.eventloop import new_session_loop
from client.session.hub import SnapshotHub, Subscriber
from client.session.live_settings import LiveSettings
from client.session.pause import utc_now
from client.session.politeness import CpuSampler, PollIntervals
from client.session.worker_seam import WorkerFactory, default_worker_factory
from client.snapshot import ClientSnapshot, PauseDecision
from client.trainer import DEFAULT_CHECKPOINT_INTERVAL
from client.transfer_memory import keep_transfer_buffers

__all__ = ["SETTINGS_POLL_INTERVAL_S", "DistributedClient"]

log = logging.getLogger(__name__)

SETTINGS_POLL_INTERVAL_S: Final = 1.0

T = TypeVar("T")


class DistributedClient:
    """The thread-safe facade over one session (see the module docstring).

    ``worker_factory`` builds the training worker (default: :class:`client.worker.
    TrainingWorker`); ``device_info`` skips device detection (tests); ``data_dir``
    replaces the user data dir (global weights, pending updates, work files).
    ``battery_source`` is read every ``power_poll_interval`` seconds (in a worker thread)
    for the power policy. ``settings_file`` (default ``...``: :func:`client.config.
    config_path`) is where the session saves settings changes and what it follows,
    polled every ``settings_poll_interval`` seconds (``fedtray-client pause`` in another
    terminal); ``None`` keeps the settings in memory only.
    ``settings_report``: what loading the settings repaired (from
    :func:`client.config.load_settings_and_report`), shown in the snapshot.
    ``checkpoint_interval``: seconds of training between the worker's periodic
    checkpoints (0: only when paused or stopped). ``activity_probe`` (default: none,
    "cannot tell"), ``cpu_sampler`` (default: the real measurement) and
    ``temperature_reader`` (default: psutil's sensors) feed the politeness rules
    (:mod:`client.session.politeness`), polled every ``poll_intervals`` (default: the
    module's constants).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        no_reconnect: bool = False,
        worker_factory: WorkerFactory | None = None,
        device_info: DeviceInfo | None = None,
        data_dir: Path | None = None,
        backoff: Backoff | None = None,
        battery_source: BatterySource = read_battery,
        power_poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        settings_file: Path | EllipsisType | None = ...,
        settings_poll_interval: float = SETTINGS_POLL_INTERVAL_S,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        settings_report: SettingsReport | None = None,
        warm_worker: bool = True,
        activity_probe: ActivityProbe | None = None,
        cpu_sampler: CpuSampler | None = None,
        temperature_reader: Callable[[], float | None] | None = None,
        poll_intervals: PollIntervals | None = None,
    ) -> None:
        if settings_file is ...:
            settings_file = config_path()
        user = user_decision(settings, utc_now())  # a deadline already passed: unpaused
        self._hub = SnapshotHub(
            ClientSnapshot(
                settings=settings,
                device_state="idle" if user.allowed else "paused",
                pause_reason=user.reason,
                pause_detail=user.detail,
                settings_report=settings_report or SettingsReport(),
            )
        )
        self._live = LiveSettings(
            settings,
            file=settings_file,
            poll_interval=settings_poll_interval,
            report=settings_report,
        )
        # The loop and the session exist from the start, so subscribe(), pause() and
        # friends may be called before start(): their work waits in the loop's queue.
        self._loop = new_session_loop()
        self._session = SessionCore(
            self._hub,
            self._live,
            no_reconnect=no_reconnect,
            worker_factory=worker_factory or default_worker_factory,
            device_info=device_info,
            data_dir=data_dir,
            backoff=backoff or Backoff(),
            battery_source=battery_source,
            power_poll_interval=power_poll_interval,
            checkpoint_interval=checkpoint_interval,
            warm_worker=warm_worker,
            activity_probe=activity_probe,
            cpu_sampler=cpu_sampler,
            temperature_reader=temperature_reader,
            poll_intervals=poll_intervals,
        )
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the session thread and connect. Raises RuntimeError when already started."""
        if self._thread is not None:
            raise RuntimeError("the session was already started")
        keep_transfer_buffers()
        self._thread = threading.Thread(
            target=self._thread_main, name="fedtray-session", daemon=True
        )
        self._thread.start()

    def _thread_main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._session.run())
            # Let callbacks already scheduled (e.g. a final emit) finish quietly.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def stop(self, timeout: float = 15.0) -> bool:
        """Pause and checkpoint training, disconnect and end the session; True when it
        ended in time (the round is not cancelled: offered again, it resumes).

        Safe to call more than once and after the session ended by itself.
        """
        thread = self._thread
        if thread is None:
            return True
        with contextlib.suppress(RuntimeError):  # already ended (e.g. --no-reconnect)
            self._submit(lambda s: s.shutdown())
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def running(self) -> bool:
        """True while the session thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- commands ---------------------------------------------------------------------

    def connect(self) -> None:
        """(Re)connect now, skipping any backoff or auth-failure wait."""
        self._submit(lambda s: s.link.set_connected(True))

    def disconnect(self) -> None:
        """Disconnect and stay disconnected until :meth:`connect`."""
        self._submit(lambda s: s.link.set_connected(False))

    def pause(self, until: datetime | None = None) -> None:
        """Pause training (the user's choice, saved in the settings; survives a restart).

        With ``until`` (a timezone-aware time) the pause ends by itself then, even across
        a restart; without it, any earlier deadline is dropped. Raises ValueError for a
        naive ``until``.
        """
        if until is not None and until.utcoffset() is None:
            raise ValueError("pause(until=...) needs a timezone-aware datetime")
        self._submit(lambda s: s.user_pause.set(True, until))

    def resume(self) -> None:
        """Undo :meth:`pause` (other pause sources, such as power, still apply)."""
        self._submit(lambda s: s.user_pause.set(False))

    def set_pause_source(self, name: str, decision: PauseDecision) -> None:
        """Set the decision of a pause source other than the user (e.g. ``"power"``).

        Sources are combined in the order first set; ``"user"`` always comes first.
        """
        if name == "user":
            raise ValueError("use pause()/resume() for the user's decision")
        self._call_soon(lambda s: s.set_pause_source(name, decision))

    def update_settings(self, **changes: object) -> Future[Settings]:
        """Change settings (typed values, e.g. ``battery_threshold=80``): the session saves
        them to its settings file and applies them; a new URL, token, CA file or name
        reconnects at once.

        The future gives the settings now in use, or raises
        :class:`client.config.SettingsError` (refused, nothing changed) or
        :class:`OSError` (not saved; they apply to this run all the same).
        """
        return self._submit(lambda s: s.settings.update(**changes))

    # -- observing --------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The settings the session runs with now (any thread; immutable).

        A change asked for with :meth:`update_settings` shows here once the session
        thread has applied it.
        """
        return self._live.value

    def snapshot(self) -> ClientSnapshot:
        """The current state (immutable; safe to keep and read from any thread)."""
        return self._hub.current

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(snapshot)`` now and on every change, on the session thread.

        Callbacks must return quickly and must not block on the facade. Returns a
        function that unsubscribes (safe to call from any thread, more than once).
        """
        hub = self._hub
        self._call_soon(lambda _: hub.add(callback))

        def unsubscribe() -> None:
            with contextlib.suppress(RuntimeError):
                self._call_soon(lambda _: hub.remove(callback))

        return unsubscribe

    def wait_for(
        self, predicate: Callable[[ClientSnapshot], bool], timeout: float
    ) -> ClientSnapshot:
        """Block until ``predicate(snapshot)`` holds; raise TimeoutError with the last state.

        Never call it from a subscriber (it would wait on its own thread).
        """
        snap = self._hub.current
        if predicate(snap):
            return snap
        found: list[ClientSnapshot] = []
        event = threading.Event()

        def check(s: ClientSnapshot) -> None:
            if not event.is_set() and predicate(s):
                found.append(s)
                event.set()

        unsubscribe: Callable[[], None] | None = None
        try:
            with contextlib.suppress(RuntimeError):  # the session already ended
                unsubscribe = self.subscribe(check)
            if not event.wait(timeout):
                snap = self._hub.current
                if predicate(snap):
                    return snap
                raise TimeoutError(f"condition not met within {timeout} s; last state: {snap}")
            return found[0]
        finally:
            if unsubscribe is not None:
                unsubscribe()

    # -- internals --------------------------------------------------------------------

    def _call_soon(self, fn: Callable[[SessionCore], None]) -> None:
        """Run ``fn(session)`` on the session loop; RuntimeError once the session ended."""
        self._loop.call_soon_threadsafe(fn, self._session)

    def _submit(self, fn: Callable[[SessionCore], Awaitable[T]]) -> Future[T]:
        """Run ``await fn(session)`` on the session loop; RuntimeError once it ended."""
        session = self._session
        if self._loop.is_closed():
            raise RuntimeError("the session has ended")

        async def run() -> T:
            return await fn(session)

        return asyncio.run_coroutine_threadsafe(run(), self._loop)
