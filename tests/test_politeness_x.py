"""Politeness on a real X server (Xvfb), end to end: a real server, a training session
in this process with its real worker, and the activity probe the session picks itself
(:func:`client.activity.default_probe`: X11's MIT-SCREEN-SAVER idle time and the
window manager's ``_NET_WM_STATE_FULLSCREEN``) from ``DISPLAY``.

* Pointer input (``xdotool mousemove``) switches the training client to its in-use
  budget (snapshot and ``/api/status``, applied), the worker's measured CPU share drops
  to it, and without input it returns to the idle budget, never before
  ``idle_after_seconds``.
* With ``while_in_use = "pause"`` input pauses it (``in_use`` on ``/api/status``) and it
  resumes after ``idle_after_seconds`` without input.
* A full-screen window under openbox (``wmctrl -b add,fullscreen``, activated) pauses it
  (``fullscreen`` on ``/api/status``); un-full-screened, or closed, it trains again.

The latencies measured (input → budget applied, input → pause, input → the worker's CPU
share within the in-use budget) are printed (``-s``) for docs/benchmarks.md
("Politeness"); they are figures, not assertions. Waits derive from the poll intervals
the sources declare (client/session/politeness.py) and ``idle_after_seconds``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from client.backoff import Backoff
from client.config import Settings
from client.rules.budget import WHY
from client.session import DistributedClient
from client.session.politeness import FULLSCREEN_POLL_S, INUSE_POLL_S
from client.snapshot import Budget, ClientSnapshot
from tests.device_info import quick_device_info
from tests.test_activity_x import Desktop, stop, xvfb
from tests.test_power_integration import _device, _long_server
from tests.waiting import holds_for, scale_waits, scaled, wait_until

pytestmark = pytest.mark.slow

IDLE_AFTER_S = 5  # the smallest idle_after_seconds the settings accept
IN_USE_PERCENT = 50
#: Reference seconds for what follows a source's decision: a batch, a heartbeat.
SLACK_S = 3.0
#: Long enough to train for the whole test; the test stops the client mid-round.
EPOCHS = 400
TITLE = "fedtray-politeness-fullscreen"
#: The worker's CPU share is sampled this often; the "out of the way" window.
SAMPLE_S = 0.02
SHARE_WINDOW_S = 0.5
#: The measured share may exceed its budget by this much (the issue's ±10 %).
SHARE_TOLERANCE = 0.10
#: CPU-seconds per wall-second a paused worker may still use (its threads wait).
PAUSED_RATE = 0.05


@pytest.fixture(scope="module")
def desktop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desktop]:
    with xvfb(tmp_path_factory.mktemp("politeness-x")) as running:
        yield running


_positions = itertools.cycle([(40, 60), (300, 200), (120, 400)])


def touch(desktop: Desktop) -> float:
    """Move the pointer (to a new place: a motion to where it is is no input); returns
    the monotonic time just before the input."""
    x, y = next(_positions)
    t0 = time.monotonic()
    desktop.run("xdotool", "mousemove", str(x), str(y))
    return t0


@pytest.fixture
def x_client(
    desktop: Desktop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., DistributedClient]]:
    """Sessions that read this X server the way a real one does: ``default_probe()``
    from the environment (no simulated idle time, no Wayland, no D-Bus to fall back on)."""
    monkeypatch.delenv("FEDTRAY_SIMULATE_IDLE_SECONDS", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("XDG_SESSION_TYPE", raising=False)
    monkeypatch.setenv("DISPLAY", desktop.display)
    nowhere = f"unix:path={tmp_path}/no-bus"
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", nowhere)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", nowhere)
    made: list[DistributedClient] = []

    def make(url: str, **settings: Any) -> DistributedClient:
        client = DistributedClient(
            Settings(
                server_url=url,
                device_name=f"x{len(made)}",
                idle_after_seconds=IDLE_AFTER_S,
                in_use_cores=1,
                in_use_cpu_percent=IN_USE_PERCENT,
                max_temperature=0,  # this machine's own temperature is not under test
                **settings,
            ),
            device_info=quick_device_info(),
            data_dir=tmp_path / f"client{len(made)}",
            backoff=Backoff(base=0.1, cap=0.5),
            settings_file=None,
            battery_source=lambda: None,
        )
        made.append(client)
        return scale_waits(client)

    yield make
    for client in made:
        assert client.stop(scaled(30)), "the session did not stop in time"


def is_in_use_budget(budget: Budget | None) -> bool:
    return (
        budget is not None
        and budget.applied
        and (budget.cores, budget.cpu_percent, budget.why) == (1, IN_USE_PERCENT, WHY["in_use"])
    )


def is_idle_budget(budget: Budget | None) -> bool:
    return budget is not None and budget.applied and budget.why == WHY["idle"]


def wire_budget(status: dict[str, Any], device_id: str) -> dict[str, Any] | None:
    return _device(status, device_id)["budget"]  # type: ignore[no-any-return]


class Timeline:
    """Each snapshot with the monotonic time it was published (a subscriber)."""

    def __init__(self, client: DistributedClient) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[float, ClientSnapshot]] = []
        client.subscribe(self._add)

    def _add(self, snap: ClientSnapshot) -> None:
        with self._lock:
            self._seen.append((time.monotonic(), snap))

    def first(self, after: float, predicate: Callable[[ClientSnapshot], bool]) -> float:
        """The first time after ``after`` a published snapshot satisfied ``predicate``."""
        with self._lock:
            return next(t for t, s in self._seen if t >= after and predicate(s))


class CpuTrace:
    """The CPU time (all threads) of this process's training worker, every SAMPLE_S."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._proc = worker_process()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            times = self._proc.cpu_times()
            self.samples.append((time.monotonic(), times.user + times.system))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def rate(self, start: float, end: float) -> float:
        """CPU-seconds per wall-second between the samples nearest ``start`` and ``end``."""
        inside = [(t, c) for t, c in self.samples if start <= t <= end]
        assert len(inside) >= 2, f"no CPU samples between {start} and {end}"
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0)

    def out_of_the_way(self, since: float, limit: float) -> float:
        """Seconds from ``since`` to the first sample from which the worker's rate over
        the next SHARE_WINDOW_S stays within ``limit``."""
        end = self.samples[-1][0]
        for t, _cpu in self.samples:
            within = since <= t <= end - SHARE_WINDOW_S
            if within and self.rate(t, t + SHARE_WINDOW_S) <= limit:
                return t - since
        raise AssertionError(f"the worker never kept {limit:.2f} CPU-s/s after the input")


def worker_process() -> psutil.Process:
    """The training worker: the spawned child of this process (not the resource tracker)."""
    found = [
        p
        for p in psutil.Process().children(recursive=True)
        if any("spawn_main" in part for part in p.cmdline())
    ]
    assert len(found) == 1, f"expected one training worker, found {found}"
    return found[0]


def wait_training(client: DistributedClient) -> ClientSnapshot:
    return client.wait_for(lambda s: s.device_state == "training" and s.progress.fraction > 0, 90)


def test_input_switches_training_to_the_in_use_budget_and_back(
    desktop: Desktop, tmp_path: Path, x_client: Callable[..., DistributedClient]
) -> None:
    with _long_server(tmp_path / "s", epochs=EPOCHS, round_timeout=600) as server:
        client = x_client(server.url, while_in_use="light")
        timeline = Timeline(client)
        client.start()
        device_id = wait_training(client).device_id
        # Nobody touches this X server: after idle_after_seconds the idle budget.
        client.wait_for(
            lambda s: s.device_state == "training" and is_idle_budget(s.budget),
            IDLE_AFTER_S + INUSE_POLL_S + SLACK_S,
        )
        server.wait_for(
            lambda st: (wire_budget(st, device_id) or {}).get("why") == WHY["idle"],
            timeout=SLACK_S,
            what="/api/status showing the idle budget",
        )
        trace = CpuTrace()
        try:
            wait_until(lambda: len(trace.samples) > 1 / SAMPLE_S, 5, "a second of CPU samples")
            t_input = touch(desktop)
            snap = client.wait_for(lambda s: is_in_use_budget(s.budget), INUSE_POLL_S + SLACK_S)
            assert snap.device_state == "training" and snap.activity == "in_use", snap
            assert "input within the last 5 s" in snap.activity_detail, snap.activity_detail
            t_applied = timeline.first(t_input, lambda s: is_in_use_budget(s.budget))
            status = server.wait_for(
                lambda st: (wire_budget(st, device_id) or {}).get("cpuPercent") == IN_USE_PERCENT,
                timeout=SLACK_S,
                what="/api/status showing the in-use budget",
            )
            assert wire_budget(status, device_id) == {
                "cores": 1,
                "cpuPercent": IN_USE_PERCENT,
                "why": WHY["in_use"],
                "applied": True,
            }
            # The worker keeps it: its measured share over the next seconds (the budget
            # is 1 core, so CPU-seconds per wall-second is the share of that core).
            measured_from = t_applied + SHARE_WINDOW_S
            wait_until(lambda: trace.samples[-1][0] >= measured_from + 2.0, 10, "2 s of samples")
            limit = IN_USE_PERCENT / 100 + SHARE_TOLERANCE
            share_before = trace.rate(t_input - 1.0, t_input)
            share_after = trace.rate(measured_from, measured_from + 2.0)
            assert share_after <= limit, f"the worker used {share_after:.0%} of a core"
            # Only a worker above the budget before the input can be seen stepping down.
            away = trace.out_of_the_way(t_input, limit) if share_before > limit else None
        finally:
            trace.close()
        # No more input: the idle budget again, never before idle_after_seconds.
        client.wait_for(lambda s: is_idle_budget(s.budget), IDLE_AFTER_S + INUSE_POLL_S + SLACK_S)
        t_idle = timeline.first(t_applied, lambda s: is_idle_budget(s.budget))
        assert t_idle - t_input >= IDLE_AFTER_S, "idle again before idle_after_seconds"
        assert client.snapshot().device_state == "training"
        server.wait_for(
            lambda st: (wire_budget(st, device_id) or {}).get("why") == WHY["idle"],
            timeout=SLACK_S,
            what="/api/status showing the idle budget again",
        )
        print(
            f"\nPOLITENESS input->in-use budget applied {t_applied - t_input:.3f} s; "
            f"worker share {share_before:.0%} before, {share_after:.0%} after "
            f"(budget {IN_USE_PERCENT} % of 1 core); out of the way "
            f"{'unmeasurable (already below)' if away is None else f'{away:.2f} s'}; "
            f"idle budget again {t_idle - t_input:.2f} s after the input "
            f"(idle_after_seconds {IDLE_AFTER_S})"
        )


def test_input_pauses_training_with_while_in_use_pause(
    desktop: Desktop, tmp_path: Path, x_client: Callable[..., DistributedClient]
) -> None:
    with _long_server(tmp_path / "s", epochs=EPOCHS, round_timeout=600) as server:
        client = x_client(server.url, while_in_use="pause")
        timeline = Timeline(client)
        client.start()
        # Paused (in use) until this X server has seen no input for idle_after_seconds.
        device_id = wait_training(client).device_id
        trace = CpuTrace()
        try:
            wait_until(lambda: len(trace.samples) > 1 / SAMPLE_S, 5, "a second of CPU samples")
            t_input = touch(desktop)
            snap = client.wait_for(
                lambda s: s.device_state == "paused" and s.pause_reason == "in_use",
                INUSE_POLL_S + SLACK_S,
            )
            assert snap.round_id is not None, "paused mid-round"
            t_paused = timeline.first(t_input, lambda s: s.pause_reason == "in_use")
            # Paused, the worker uses (next to) no CPU; measured over a second that ends
            # well before idle_after_seconds can resume it.
            quiet_from = t_paused + SHARE_WINDOW_S
            assert quiet_from + 1.0 < t_input + IDLE_AFTER_S, "the pause came too late to measure"
            wait_until(lambda: trace.samples[-1][0] >= quiet_from + 1.0, 10, "1 s of samples")
            paused_rate = trace.rate(quiet_from, quiet_from + 1.0)
            share_before = trace.rate(t_input - 1.0, t_input)
            assert paused_rate <= PAUSED_RATE, f"paused, the worker used {paused_rate:.0%}"
            away = trace.out_of_the_way(t_input, PAUSED_RATE)
        finally:
            trace.close()
        status = server.wait_for(
            lambda st: _device(st, device_id)["pauseReason"] == "in_use",
            timeout=SLACK_S,
            what="/api/status showing the in_use pause",
        )
        assert _device(status, device_id)["state"] == "paused"
        assert _device(status, device_id)["pauseDetail"] == "Paused while you use the computer"
        # No more input: training resumes, never before idle_after_seconds.
        client.wait_for(
            lambda s: s.device_state == "training", IDLE_AFTER_S + INUSE_POLL_S + SLACK_S
        )
        t_resumed = timeline.first(t_paused, lambda s: s.device_state == "training")
        assert t_resumed - t_input >= IDLE_AFTER_S, "resumed before idle_after_seconds"
        server.wait_for(
            lambda st: (
                _device(st, device_id)["state"] == "training"
                and _device(st, device_id)["pauseReason"] is None
            ),
            timeout=SLACK_S,
            what="/api/status showing training again",
        )
        print(
            f"\nPOLITENESS input->in_use pause {t_paused - t_input:.3f} s; worker share "
            f"{share_before:.0%} before, {paused_rate:.1%} paused; its CPU stopped growing "
            f"{away:.2f} s after the input; "
            f"resumed {t_resumed - t_input:.2f} s after the input"
        )


def test_a_fullscreen_window_pauses_training_until_it_leaves(
    desktop: Desktop, tmp_path: Path, x_client: Callable[..., DistributedClient]
) -> None:
    wm = desktop.start("openbox")
    window = None
    try:
        wait_until(lambda: _wm_up(desktop), 15, "openbox to manage the screen")
        with _long_server(tmp_path / "s", epochs=EPOCHS, round_timeout=600) as server:
            client = x_client(server.url, while_in_use="full", pause_when_fullscreen=True)
            client.start()
            device_id = wait_training(client).device_id
            window = desktop.start("xmessage", "-title", TITLE, "training should step aside")
            wait_until(lambda: TITLE in desktop.windows(), 15, "the window to be managed")
            desktop.run("wmctrl", "-F", "-a", TITLE)

            def paused_fullscreen() -> None:
                client.wait_for(
                    lambda s: s.device_state == "paused" and s.pause_reason == "fullscreen",
                    FULLSCREEN_POLL_S + SLACK_S,
                )
                status = server.wait_for(
                    lambda st: _device(st, device_id)["pauseReason"] == "fullscreen",
                    timeout=SLACK_S,
                    what="/api/status showing the fullscreen pause",
                )
                assert _device(status, device_id)["state"] == "paused"

            def training_again() -> None:
                client.wait_for(lambda s: s.device_state == "training", FULLSCREEN_POLL_S + SLACK_S)
                server.wait_for(
                    lambda st: _device(st, device_id)["pauseReason"] is None,
                    timeout=SLACK_S,
                    what="/api/status showing training again",
                )

            # An active window that is not full-screen changes nothing (two checks).
            holds_for(
                lambda: client.snapshot().device_state == "training",
                2 * FULLSCREEN_POLL_S,
                "training beside an ordinary window",
            )
            desktop.run("wmctrl", "-F", "-r", TITLE, "-b", "add,fullscreen")
            paused_fullscreen()
            desktop.run("wmctrl", "-F", "-r", TITLE, "-b", "remove,fullscreen")
            training_again()
            desktop.run("wmctrl", "-F", "-r", TITLE, "-b", "add,fullscreen")
            paused_fullscreen()
            stop(window)  # closing the full-screen window ends it
            training_again()
    finally:
        if window is not None:
            stop(window)
        stop(wm)


def _wm_up(desktop: Desktop) -> bool:
    """openbox answers ``wmctrl -m`` once it manages the screen."""
    try:
        return "Openbox" in desktop.run("wmctrl", "-m")
    except RuntimeError:
        return False
