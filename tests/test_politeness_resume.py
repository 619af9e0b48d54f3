"""The bit-identical resume guarantee across every politeness pause, end to end.

A real server, a real session and a real worker train one long 1-client round; the round
is paused mid-way by one of the politeness sources and resumed, and the update the server
receives must be byte-identical to that of an unpaused run with the same seed. The table
has one row per source (:mod:`client.session.politeness`), each driven through its real
seam: the activity probe (``in_use`` with ``while_in_use = "pause"``, ``fullscreen``),
the CPU sampler (``step_aside``), the temperature reader (``too_hot``) and the
``schedule`` setting (a window that excludes now, then any time). Each pause must also
reach ``/api/status`` with its reason, and leave a checkpoint (the worker really paused
mid-round).

The thread count is the same in every run (``in_use_cores == idle_cores``): a different
torch thread count may round floats differently (client/budget.py), which is not what
this guarantee is about. The pattern (and its helpers) are those of the power pause's
bit-identical test in tests/test_power_integration.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.backoff import Backoff
from client.config import Settings
from client.rules.pauses import HEAT_MARGIN_C, STEP_ASIDE_CALM_SAMPLES
from client.session import DistributedClient
from client.session.politeness import PollIntervals
from tests.device_info import quick_device_info
from tests.test_power_integration import (
    _assert_identical,
    _capture_updates,
    _checkpoints,
    _device,
    _long_server,
    _wait_training,
)
from tests.waiting import scale_waits, scaled, wait_until

pytestmark = pytest.mark.slow

IDLE_AFTER_S = 5  # the smallest idle_after_seconds the settings accept
MAX_TEMPERATURE = 85
#: The politeness settings of every run: every rule on, one thread whatever the activity.
POLITE: dict[str, Any] = {
    "while_in_use": "pause",
    "idle_after_seconds": IDLE_AFTER_S,
    "in_use_cores": 1,
    "idle_cores": 1,
    "in_use_cpu_percent": 100,
    "idle_cpu_percent": 100,
    "step_aside_cpu_percent": 50,
    "max_temperature": MAX_TEMPERATURE,
    "pause_when_fullscreen": True,
    "schedule": "",
}
#: Reference seconds for what follows a source's decision: the worker's batch, the
#: checkpoint write and a heartbeat to the server.
SLACK_S = 5.0
#: Every source polls this often in these runs (the defaults are up to 5 s: the heat
#: source's reading would set the round's length). Each wait below derives from it, and
#: the round (the power test's long round) lasts many polls, so each pause lands mid-round.
POLL_S = 0.2
INTERVALS = PollIntervals(
    in_use=POLL_S, fullscreen=POLL_S, step_aside_window=POLL_S, heat=POLL_S, schedule_check=POLL_S
)


class Edges:
    """The OS readings the session's sources poll, set by the test (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.idle_s = 86400.0
        self.full_screen = False
        self.other_cpu = 0.0
        self.celsius = MAX_TEMPERATURE - HEAT_MARGIN_C - 10.0

    def set(self, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                assert hasattr(self, key), key
                setattr(self, key, value)

    # ActivityProbe
    def idle_seconds(self) -> float | None:
        with self._lock:
            return self.idle_s

    def fullscreen_active(self) -> bool | None:
        with self._lock:
            return self.full_screen

    def describe(self) -> str:
        return "test edges"

    # CpuSampler
    def sample_other_cpu(self) -> float | None:
        with self._lock:
            return self.other_cpu

    # temperature reader
    def temperature(self) -> float | None:
        with self._lock:
            return self.celsius


def schedule_excluding_now() -> str:
    """A daily window that starts two hours from now and lasts one hour."""
    start = datetime.now().astimezone() + timedelta(hours=2)
    end = start + timedelta(hours=1)
    return f"{start:%H:%M}-{end:%H:%M}"


@dataclass(frozen=True)
class Source:
    """How the test makes one source pause and resume, and how long each may take."""

    reason: str
    pause: Callable[[Edges, DistributedClient], None]
    resume: Callable[[Edges, DistributedClient], None]
    pause_within: float  # reference seconds (from the source's interval in INTERVALS)
    resume_within: float


SOURCES = [
    Source(
        "in_use",
        lambda e, c: e.set(idle_s=0.0),
        lambda e, c: e.set(idle_s=86400.0),
        INTERVALS.in_use + SLACK_S,
        INTERVALS.in_use + SLACK_S,
    ),
    Source(
        "fullscreen",
        lambda e, c: e.set(full_screen=True),
        lambda e, c: e.set(full_screen=False),
        INTERVALS.fullscreen + SLACK_S,
        INTERVALS.fullscreen + SLACK_S,
    ),
    Source(
        "step_aside",
        lambda e, c: e.set(other_cpu=90.0),
        lambda e, c: e.set(other_cpu=0.0),
        INTERVALS.step_aside_window + SLACK_S,
        (STEP_ASIDE_CALM_SAMPLES + 1) * INTERVALS.step_aside_window + SLACK_S,
    ),
    Source(
        "too_hot",
        lambda e, c: e.set(celsius=MAX_TEMPERATURE + 10.0),
        lambda e, c: e.set(celsius=MAX_TEMPERATURE - HEAT_MARGIN_C - 10.0),
        INTERVALS.heat + SLACK_S,
        INTERVALS.heat + SLACK_S,
    ),
    Source(
        "schedule",
        lambda e, c: c.update_settings(schedule=schedule_excluding_now()).result(scaled(10)),
        lambda e, c: c.update_settings(schedule="").result(scaled(10)),
        INTERVALS.schedule_check + SLACK_S,
        INTERVALS.schedule_check + SLACK_S,
    ),
]


@pytest.fixture
def polite_client(tmp_path: Path) -> Iterator[Callable[[str, Path, Edges], DistributedClient]]:
    made: list[DistributedClient] = []

    def make(url: str, data_dir: Path, edges: Edges) -> DistributedClient:
        client = DistributedClient(
            Settings(server_url=url, device_name=f"polite{len(made)}", **POLITE),
            device_info=quick_device_info(),
            data_dir=data_dir,
            backoff=Backoff(base=0.1, cap=0.5),
            settings_file=None,
            battery_source=lambda: None,
            activity_probe=edges,
            cpu_sampler=edges.sample_other_cpu,
            temperature_reader=edges.temperature,
            poll_intervals=INTERVALS,
        )
        made.append(client)
        return scale_waits(client)

    yield make
    for client in made:
        assert client.stop(scaled(30)), "the session did not stop in time"


def run_round(
    tmp: Path,
    make: Callable[[str, Path, Edges], DistributedClient],
    source: Source | None,
) -> dict[str, np.ndarray]:
    """One 1-client round, paused once mid-round by ``source`` (None: never); the update."""
    edges = Edges()
    with _long_server(tmp / "server") as server:
        updates = _capture_updates(server)
        data_dir = tmp / "client"
        client = make(server.url, data_dir, edges)
        client.start()
        if source is not None:
            device_id = _wait_training(client, above=0.05).device_id
            source.pause(edges, client)
            paused = client.wait_for(
                lambda s: s.device_state == "paused" and s.pause_reason == source.reason,
                source.pause_within,
            )
            assert paused.round_id is not None, "the pause must land mid-round"
            status = server.wait_for(
                lambda st: _device(st, device_id)["pauseReason"] == source.reason,
                timeout=SLACK_S,
                what=f"/api/status showing the {source.reason} pause",
            )
            assert _device(status, device_id)["pauseDetail"], "a pause says why in words"
            wait_until(lambda: bool(_checkpoints(data_dir)), SLACK_S, "the pause's checkpoint")
            assert not updates, "the round must not have finished before the pause"
            source.resume(edges, client)
            client.wait_for(lambda s: s.device_state == "training", source.resume_within)
            server.wait_for(
                lambda st: _device(st, device_id)["pauseReason"] is None,
                timeout=SLACK_S,
                what="/api/status showing the pause over",
            )
        client.wait_for(lambda s: s.rounds_completed == 1, 180)
        assert len(updates) == 1
        return updates[0]


@pytest.fixture(scope="module")
def baseline_store() -> dict[str, dict[str, np.ndarray]]:
    return {}


@pytest.mark.parametrize("source", SOURCES, ids=[s.reason for s in SOURCES])
def test_a_round_paused_by_each_source_gives_a_bit_identical_update(
    tmp_path: Path,
    polite_client: Callable[[str, Path, Edges], DistributedClient],
    baseline_store: dict[str, dict[str, np.ndarray]],
    source: Source,
) -> None:
    if "update" not in baseline_store:  # the unpaused run, once for the whole table
        baseline_store["update"] = run_round(tmp_path / "plain", polite_client, None)
    paused = run_round(tmp_path / source.reason, polite_client, source)
    _assert_identical(baseline_store["update"], paused)
