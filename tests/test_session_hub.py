"""The snapshot hub: subscribers hear of every change, and of nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from client.config import Settings
from client.session.hub import SnapshotHub
from client.snapshot import ClientSnapshot


def _hub() -> tuple[SnapshotHub, list[ClientSnapshot]]:
    hub = SnapshotHub(
        ClientSnapshot(settings=Settings(server_url="http://127.0.0.1:1", device_name="t"))
    )
    heard: list[ClientSnapshot] = []
    hub.add(heard.append)
    heard.clear()  # the call at subscription
    return hub, heard


@pytest.mark.parametrize(
    ("changes", "announced"),
    [
        ({}, False),
        ({"rounds_completed": 0}, False),
        ({"rounds_completed": 0, "upload_fraction": None}, False),
        ({"rounds_completed": 1}, True),
        ({"rounds_completed": 0, "upload_fraction": 0.5}, True),
        ({"weights_version": 3, "task": "synthetic"}, True),
    ],
)
def test_a_change_is_announced_and_a_repeat_is_not(
    changes: dict[str, Any], announced: bool
) -> None:
    hub, heard = _hub()
    before = hub.current
    hub.publish(**changes)
    assert heard == ([hub.current] if announced else [])
    assert (hub.current is before) is not announced
    for name, value in changes.items():
        assert getattr(hub.current, name) == value
    hub.publish(**changes)  # the same again: nothing new
    assert len(heard) == (1 if announced else 0)


def test_an_unknown_field_is_refused() -> None:
    hub, heard = _hub()
    with pytest.raises(TypeError):
        hub.publish(no_such_field=1)
    assert heard == []
