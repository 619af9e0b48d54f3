"""Each tray icon state, reached on a real X server by a real ``python -m tray``, with its
tooltip words checked and a screenshot cropped to the icon saved as
``test-artifacts/tray/icon-<state>.png``.

States reached here: connecting (a loopback listener that never answers), not connected
(the same port once closed), error (the server refuses the missing token), training (the
token fixed in the settings file, a one-device round with many epochs) and paused by
power (``FEDTRAY_SIMULATE_BATTERY``). Idle and paused by you come from
``tests/test_tray_e2e.py``, whose helpers this module reuses. At the end of the module a
labelled contact sheet of every icon captured so far is written to
``test-artifacts/tray/icons.png`` (``docs/tray-icons.png`` is a copy of it).

A shot counts only when the tooltip shows the state's words *and* the captured pixels
hold the state's colour, so a screenshot taken before the icon repainted is retaken.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw
from server_harness import TINY_PARAMS, running_server
from test_tray_e2e import ARTIFACTS, DEVICE_ID, Tray, config_file, device, launched_tray
from xharness import XSession, _poll, xsession  # noqa: F401  (fixture)

from client.config import Settings, save_settings
from client.resources import SIMULATE_BATTERY_ENV
from tray import icons
from tray.icons import ICON_STATES, IconState

pytestmark = pytest.mark.slow

# The artifact name of each state's shot, in ICON_STATES order (first found wins).
SHOT_NAMES: dict[IconState, tuple[str, ...]] = {
    "disconnected": ("not-connected", "disconnected"),
    "connecting": ("connecting",),
    "idle": ("idle",),
    "training": ("training",),
    "paused_user": ("paused-user",),
    "paused_power": ("paused-power",),
    "error": ("error",),
}


def has_colour(path: Path, colour: tuple[int, int, int, int], min_pixels: int = 6) -> bool:
    """Whether at least ``min_pixels`` pixels of the image are close to ``colour``."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    distance = np.linalg.norm(pixels - np.array(colour[:3], dtype=np.float64), axis=-1)
    return int((distance < 40).sum()) >= min_pixels


def capture(
    app: Tray,
    name: str,
    words: str | re.Pattern[str],
    colour: tuple[int, int, int, int],
    timeout: float = 20.0,
) -> str:
    """Wait until the tooltip matches ``words`` and the icon shows ``colour``; save the shot
    as ``icon-<name>.png`` and return the tooltip line."""

    def attempt() -> str | None:
        before = app.title()
        if not re.search(words, before):
            return None
        shot = app.icon_shot(name)
        # The title again: the state may have moved on while the screen was captured.
        if not re.search(words, app.title()) or not has_colour(shot, colour):
            return None
        return next(line for line in before.splitlines() if re.search(words, line))

    found: str = _poll(attempt, timeout, f"the {name} icon with tooltip {words!r}")
    return found


def settings_for(url: str, **extra: Any) -> Settings:
    return Settings(server_url=url, device_name="tray-states", device_id=DEVICE_ID, **extra)


@pytest.fixture(scope="module", autouse=True)
def contact_sheet() -> Iterator[None]:
    """After the module: all captured icons side by side, labelled, in ``icons.png``."""
    yield
    shots: list[tuple[str, Path | None]] = []
    for state in ICON_STATES:
        found = [ARTIFACTS / f"icon-{n}.png" for n in SHOT_NAMES[state]]
        shots.append((state.replace("_", " "), next((p for p in found if p.exists()), None)))
    write_contact_sheet(shots, ARTIFACTS / "icons.png")


def write_contact_sheet(shots: list[tuple[str, Path | None]], target: Path) -> Path:
    """Tiles of ``(label, image)`` in one row, each icon scaled to 64 px above its label."""
    tile_w, icon_px, pad = 112, 64, 10
    sheet = Image.new("RGB", (tile_w * len(shots), icon_px + 2 * pad + 22), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (label, path) in enumerate(shots):
        left = index * tile_w
        if path is None:
            draw.text((left + 20, pad + 24), "not captured", fill="grey")
        else:
            with Image.open(path) as image:
                scale = icon_px / max(image.size)  # keep the aspect: tray slots are not square
                size = (round(image.width * scale), round(image.height * scale))
                big = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            sheet.paste(big, (left + (tile_w - size[0]) // 2, pad + (icon_px - size[1]) // 2))
        width = draw.textlength(label)
        draw.text((left + (tile_w - width) / 2, icon_px + pad + 6), label, fill="black")
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target)
    return target


def test_connecting_then_not_connected(xsession: XSession, tmp_path: Path) -> None:  # noqa: F811
    # A listener that never accepts: the kernel completes the TCP handshake, then nothing
    # answers, so the client stays "connecting" until its connect timeout.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        with launched_tray(xsession, tmp_path, settings_for(f"http://127.0.0.1:{port}")) as app:
            capture(app, "connecting", f"Connecting to 127.0.0.1:{port}", icons.BLUE)
            listener.close()  # now the port is closed: every retry is refused
            capture(app, "not-connected", r"Not connected: retrying in \d+ s", icons.GREY)
    finally:
        listener.close()


def test_refused_token_then_training(xsession: XSession, tmp_path: Path) -> None:  # noqa: F811
    # One device is enough for a round, and many epochs over a bigger data set keep the
    # round going for seconds, long enough to see its progress in the tooltip.
    params = {**TINY_PARAMS, "features": 32, "hidden": 64, "samples": 20_000}
    overrides = {"tokens": ("secret",), "min_clients": 1, "epochs": 60,
                 "model_params": params, "round_timeout": 120.0}  # fmt: skip
    with (
        running_server(tmp_path, **overrides) as server,
        launched_tray(xsession, tmp_path, settings_for(server.url)) as app,
    ):
        capture(app, "error", "Server refused this device: check the token", icons.RED)
        assert device(server.status()).get("connected") is not True

        # The token fixed in the settings file: the running tray applies it live.
        save_settings(settings_for(server.url, auth_token="secret"), config_file(tmp_path))
        # At least 20 %, so the progress arc is plain to see in the screenshot.
        training = re.compile(r"training round \d+, ([2-9]\d) %")
        line = capture(app, "training", training, icons.CYAN, timeout=45)
        match = training.search(line)
        assert match is not None and 20 <= int(match.group(1)) <= 99
        status = server.wait_for(
            lambda s: device(s).get("state") == "training", 10, "the device training"
        )
        assert device(status)["connected"] is True


def test_paused_by_power(xsession: XSession, tmp_path: Path) -> None:  # noqa: F811
    with running_server(tmp_path) as server:  # min_clients 2: no round starts
        simulated = {SIMULATE_BATTERY_ENV: "10,unplugged"}
        with launched_tray(xsession, tmp_path, settings_for(server.url), simulated) as app:
            status = server.wait_for(
                lambda s: device(s).get("pauseReason") == "battery_low", 30, "a battery pause"
            )
            assert device(status)["state"] == "paused"
            line = capture(
                app, "paused-power", "Paused: on battery at 10 % — training resumes at 55 %",
                icons.AMBER,
            )  # fmt: skip
            assert "Paused by you" not in line
            assert "battery is SIMULATED" in app.output()
