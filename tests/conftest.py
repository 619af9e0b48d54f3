"""Shared pytest setup: per-test user directories, the suite's time scale, the torch guard.

* Every test runs with its own user directories: the autouse fixture points the XDG base
  directories (and HOME) at a per-test temp folder, so no test reads or writes the
  developer's real settings, cache or logs. It also sets ``FEDTRAY_SIMULATE_OTHER_CPU=0``,
  so a session never steps aside for other programs' load on a shared machine, and
  ``FEDTRAY_SIMULATE_IDLE_SECONDS=86400``, so sessions train at the idle budget.
* The time scale (tests/waiting.py) is measured once per session, before any test, shown in
  the header and exported as ``FEDTRAY_TEST_TIME_SCALE`` so xdist workers and subprocesses
  use the same value. Set that variable yourself to skip the measurement (``make test``
  needs nothing: the measurement is the default).
* pytest-timeout's per-test limits (the ini's ``timeout`` and ``@pytest.mark.timeout``) are
  reference seconds too: each test's limit is multiplied by the time scale.
* The "not slow" tier spawns no torch process: while a test not marked ``slow`` runs, every
  Python process it starts carries tests/torchguard on ``PYTHONPATH``, which records any
  ``import torch`` there; such a test fails, naming the process, and should be marked slow.
  (A child started with a ``PYTHONPATH`` of its own is not watched.)
* tests/engines.py's fixtures (``redis_url``, ``postgres_url``, ...: real servers, started on
  first use) are available to every test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The real Redis and PostgreSQL fixtures (cluster tests), registered by import.
from tests.engines import (  # noqa: F401
    postgres_server,
    postgres_url,
    private_redis,
    redis_server,
    redis_url,
)
from tests.waiting import SCALE_ENV, scaled, time_scale

TORCH_GUARD_DIR_ENV = "FEDTRAY_TORCH_GUARD_DIR"
_GUARD_PATH = Path(__file__).resolve().parent / "torchguard"


def pytest_configure(config: pytest.Config) -> None:
    os.environ[SCALE_ENV] = f"{time_scale():g}"


def _base_timeout(config: pytest.Config) -> float | None:
    """pytest-timeout's per-test limit from the command line or the ini file (None: none)."""
    try:
        given = config.getoption("timeout", None) or config.getini("timeout")
    except ValueError:  # pytest-timeout is not loaded
        return None
    return float(given) if given else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Scale every test's pytest-timeout limit (marker, option or ini) by the time scale."""
    default = _base_timeout(config)
    for item in items:
        marker = item.get_closest_marker("timeout")
        args, kwargs = (marker.args, dict(marker.kwargs)) if marker else ((), {})
        limit = kwargs.pop("timeout", args[0] if args else default)
        if limit:
            item.add_marker(
                pytest.mark.timeout(scaled(float(limit)), *args[1:], **kwargs), append=False
            )


def pytest_report_header(config: pytest.Config) -> str:
    return f"fedtray test time scale: {time_scale():g} (set {SCALE_ENV} to override)"


@pytest.fixture(autouse=True)
def isolated_user_dirs(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("home")
    for var, sub in (
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_CACHE_HOME", ".cache"),
        ("XDG_STATE_HOME", ".local/state"),
        ("XDG_DATA_HOME", ".local/share"),
    ):
        path = home / sub
        path.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(path))
    monkeypatch.setenv("HOME", str(home))
    # Other developers' load on a shared machine must not make sessions step aside: the
    # step-aside rule's own tests measure the real CPU (they pass their own sampler).
    monkeypatch.setenv("FEDTRAY_SIMULATE_OTHER_CPU", "0")
    # Nobody uses a test machine: sessions train at the idle budget unless a test injects
    # its own activity probe (tests of the in-use rules do, and the X tests read the OS).
    monkeypatch.setenv("FEDTRAY_SIMULATE_IDLE_SECONDS", "86400")
    yield home


@pytest.fixture(autouse=True)
def no_torch_processes_unless_slow(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[None]:
    """Fail a test not marked slow that starts a Python process importing torch."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    folder = tmp_path_factory.mktemp("torchguard")
    monkeypatch.setenv(TORCH_GUARD_DIR_ENV, str(folder))
    paths = [str(_GUARD_PATH), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    yield
    found = sorted(folder.iterdir())
    if found:
        who = "; ".join(f"pid {p.name[9:-4]}: {p.read_text()}" for p in found)
        pytest.fail(
            f"this test is not marked slow but started a process that imported torch ({who}); "
            "mark it @pytest.mark.slow or keep torch out of the process",
            pytrace=False,
        )
