"""Icons: one distinct, visible image per state, at every tray size, and the state mapping."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from PIL import Image, ImageChops

from client.config import Settings
from client.snapshot import NO_PROGRESS, ClientSnapshot
from tray.icons import (
    ICON_SIZES,
    ICON_STATES,
    PROGRESS_STEPS,
    IconState,
    icon_key,
    icon_state,
    render_icon,
)

BASE = ClientSnapshot(
    settings=Settings(
        server_url="http://127.0.0.1:1",
        device_id="00000000-0000-4000-8000-00000000000d",
        device_name="n",
    )
)


def snap(**changes: Any) -> ClientSnapshot:
    return replace(BASE, **changes)


def differs(a: Image.Image, b: Image.Image) -> bool:
    return ImageChops.difference(a, b).getbbox(alpha_only=False) is not None


@pytest.mark.parametrize("size", ICON_SIZES)
@pytest.mark.parametrize("state", ICON_STATES)
def test_each_state_renders_at_size_with_visible_content(state: IconState, size: int) -> None:
    image = render_icon(state, size, 0.5)
    assert image.size == (size, size)
    assert image.mode == "RGBA"
    alpha = image.getchannel("A")
    opaque = alpha.point(lambda a: 255 if a > 200 else 0).histogram()[255]
    # A real glyph covers a good part of the square, but not all of it (round shapes).
    assert size * size * 0.15 < opaque < size * size * 0.95


@pytest.mark.parametrize("size", ICON_SIZES)
def test_states_are_distinct(size: int) -> None:
    images = {state: render_icon(state, size, 0.5) for state in ICON_STATES}
    for i, a in enumerate(ICON_STATES):
        for b in ICON_STATES[i + 1 :]:
            assert differs(images[a], images[b]), f"{a} and {b} look the same at {size} px"


def test_training_ring_shows_progress() -> None:
    quarter = render_icon("training", 32, 0.25)
    three_quarters = render_icon("training", 32, 0.75)
    assert differs(quarter, three_quarters)
    # Other states ignore the fraction.
    assert not differs(render_icon("idle", 32, 0.1), render_icon("idle", 32, 0.9))


@pytest.mark.parametrize(("state", "size"), [("idle", 15), ("idle", 257), ("bogus", 32)])
def test_bad_arguments_are_refused(state: str, size: int) -> None:
    with pytest.raises(ValueError, match=r"size|state"):
        render_icon(state, size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "disconnected"),
        ({"connection": "stopped"}, "disconnected"),
        ({"connection": "connecting"}, "connecting"),
        ({"connection": "auth_failed"}, "error"),
        ({"connection": "connected"}, "idle"),
        ({"connection": "connected", "device_state": "training"}, "training"),
        ({"connection": "connected", "device_state": "uploading"}, "training"),
        (
            {"connection": "connected", "device_state": "paused", "pause_reason": "user_paused"},
            "paused_user",
        ),
        (
            {"connection": "connected", "device_state": "paused", "pause_reason": "battery_low"},
            "paused_power",
        ),
        (
            {"connection": "connected", "device_state": "paused", "pause_reason": "unplugged"},
            "paused_power",
        ),
        # Not connected wins over paused: the first thing to fix is the connection.
        ({"connection": "disconnected", "pause_reason": "user_paused"}, "disconnected"),
    ],
)
def test_icon_state(changes: dict[str, object], expected: IconState) -> None:
    assert icon_state(snap(**changes)) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"connection": "connected"}, ("idle", 0)),
        (
            {
                "connection": "connected",
                "device_state": "training",
                "progress": replace(NO_PROGRESS, fraction=0.5),
            },
            ("training", PROGRESS_STEPS // 2),
        ),
        (
            {
                "connection": "connected",
                "device_state": "training",
                "progress": replace(NO_PROGRESS, fraction=0.501),
            },
            ("training", PROGRESS_STEPS // 2),
        ),
        (
            {
                "connection": "connected",
                "device_state": "uploading",
                "progress": replace(NO_PROGRESS, fraction=0.2),
            },
            ("training", PROGRESS_STEPS),
        ),
    ],
)
def test_icon_key_quantises_progress(changes: dict[str, object], expected: object) -> None:
    assert icon_key(snap(**changes)) == expected
