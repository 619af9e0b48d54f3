"""Pure parts of the session: pause decisions, snapshot wording, the global-weights store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from client.config import Settings
from client.global_store import GlobalStore, default_global_dir
from client.snapshot import (
    ALLOW,
    USER_PAUSED,
    ClientSnapshot,
    PauseDecision,
    effective_decision,
)

BATTERY = PauseDecision(allowed=False, reason="battery_low", detail="On battery at 12 %")


@pytest.mark.parametrize(
    ("decisions", "expected"),
    [
        ([], ALLOW),
        ([ALLOW, ALLOW], ALLOW),
        ([USER_PAUSED, ALLOW], USER_PAUSED),
        ([ALLOW, BATTERY], BATTERY),
        ([USER_PAUSED, BATTERY], USER_PAUSED),  # earlier source has priority
        ([BATTERY, USER_PAUSED], BATTERY),
    ],
)
def test_effective_decision(decisions: list[PauseDecision], expected: PauseDecision) -> None:
    assert effective_decision(decisions) == expected


@pytest.mark.parametrize(("allowed", "reason"), [(True, "user_paused"), (False, None)])
def test_inconsistent_decisions_are_refused(allowed: bool, reason: str | None) -> None:
    with pytest.raises(ValueError):
        PauseDecision(allowed=allowed, reason=reason)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("connection", "retry_at", "now", "expected"),
    [
        ("connected", None, 0.0, "connected"),
        ("disconnected", None, 0.0, "disconnected"),
        ("disconnected", 14.2, 10.0, "disconnected, retrying in 4 s"),
        ("disconnected", 9.0, 10.0, "disconnected, retrying in 0 s"),
        ("auth_failed", 70.0, 10.0, "auth failed, retrying in 60 s"),
        ("connecting", 70.0, 10.0, "connecting"),
    ],
)
def test_describe_connection(
    connection: str, retry_at: float | None, now: float, expected: str
) -> None:
    snap = ClientSnapshot(
        settings=Settings(
            server_url="http://127.0.0.1:1",
            device_id="00000000-0000-4000-8000-00000000000d",
            device_name="n",
        ),
        connection=connection,  # type: ignore[arg-type]
        next_retry_at=retry_at,
    )
    assert snap.describe_connection(now) == expected


def test_global_store_roundtrip_and_torn_state(tmp_path: Path) -> None:
    store = GlobalStore(tmp_path / "global")
    assert store.current() is None
    held = store.save(version=4, task="digits", data=b"abc")
    assert held.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert GlobalStore(tmp_path / "global").current() == held
    # A crash between the two writes: the file no longer matches its record.
    store.weights_path.write_bytes(b"abd")
    assert store.current() is None
    store.save(version=5, task="digits", data=b"new")
    assert store.current() is not None
    (tmp_path / "global" / "current.json").write_text("{not json")
    assert store.current() is None


def test_global_store_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_global_dir() == tmp_path / "fedtray" / "global"


def test_global_store_disk_error_raises(tmp_path: Path) -> None:
    (tmp_path / "global").write_text("not a directory")
    with pytest.raises(OSError):
        GlobalStore(tmp_path / "global").save(version=1, task="digits", data=b"x")
