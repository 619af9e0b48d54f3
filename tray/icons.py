"""The tray icon, one look per client state, drawn with Pillow.

Contract: :func:`icon_state` maps a snapshot to an :data:`IconState` (pure);
:func:`render_icon` draws that state at an exact pixel size (16 to 256) and returns a new
RGBA :class:`PIL.Image.Image`; it does no file I/O and raises :class:`ValueError` for
a size out of range or an unknown state. Icons are drawn at 4x and downscaled with a
Lanczos filter, so edges stay smooth at 16 px and sharp at 64 px.

States and looks (colour is never the only cue: each has its own glyph too):

* ``disconnected``: grey hollow ring with a slash;
* ``connecting``: blue ring with a gap (an open arc);
* ``idle``: green disc with a white dot (connected, waiting for a round);
* ``training``: dark disc with a bright arc around it whose length is the round's progress;
* ``paused_user``: amber disc with the two bars of a pause sign;
* ``paused_power``: amber disc with a battery;
* ``error``: red disc with an exclamation mark (e.g. the server refused the token).
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from PIL import Image, ImageDraw

from client.snapshot import ClientSnapshot

__all__ = [
    "ICON_SIZES",
    "ICON_STATES",
    "PROGRESS_STEPS",
    "IconState",
    "icon_key",
    "icon_state",
    "render_icon",
]

IconState = Literal[
    "disconnected", "connecting", "idle", "training", "paused_user", "paused_power", "error"
]
ICON_STATES: Final[tuple[IconState, ...]] = get_args(IconState)
ICON_SIZES: Final = (16, 22, 32, 48, 64)
# The progress arc moves in 1/32 steps: finer is invisible at tray sizes, and fewer
# distinct images means fewer icon swaps (each one rewrites a temp file on Linux).
PROGRESS_STEPS: Final = 32
SUPERSAMPLE: Final = 4
MIN_SIZE: Final = 16
MAX_SIZE: Final = 256

Rgba = tuple[int, int, int, int]
WHITE: Final[Rgba] = (255, 255, 255, 255)
GREY: Final[Rgba] = (128, 128, 128, 255)
BLUE: Final[Rgba] = (33, 118, 210, 255)
GREEN: Final[Rgba] = (46, 160, 67, 255)
DARK: Final[Rgba] = (36, 41, 47, 255)
TRACK: Final[Rgba] = (90, 98, 110, 255)
CYAN: Final[Rgba] = (56, 211, 159, 255)
AMBER: Final[Rgba] = (224, 150, 20, 255)
RED: Final[Rgba] = (207, 34, 46, 255)


def icon_state(snapshot: ClientSnapshot) -> IconState:
    """Which look ``snapshot`` gets; the connection problem wins over the training state."""
    conn = snapshot.connection
    if conn == "auth_failed":
        return "error"
    if conn == "connecting":
        return "connecting"
    if conn != "connected":
        return "disconnected"
    if snapshot.pause_reason == "user_paused":
        return "paused_user"
    if snapshot.pause_reason is not None or snapshot.device_state == "paused":
        return "paused_power"
    if snapshot.device_state in ("training", "uploading"):
        return "training"
    return "idle"


def _progress_step(fraction: float) -> int:
    return round(min(1.0, max(0.0, fraction)) * PROGRESS_STEPS)


def icon_key(snapshot: ClientSnapshot) -> tuple[IconState, int]:
    """What the icon depends on: the state and, while training, the progress step.

    Two snapshots with the same key draw the same image, so the tray redraws only
    when the key changes.
    """
    state = icon_state(snapshot)
    if state != "training":
        return state, 0
    # Uploading means local training is done: show the full ring.
    fraction = 1.0 if snapshot.device_state == "uploading" else snapshot.progress.fraction
    return state, _progress_step(fraction)


def render_icon(state: IconState, size: int, fraction: float = 0.0) -> Image.Image:
    """A ``size`` x ``size`` RGBA image of ``state``; ``fraction`` (0..1) is training progress."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"icon size must be {MIN_SIZE} to {MAX_SIZE} pixels, got {size}")
    if state not in ICON_STATES:
        raise ValueError(f"unknown icon state {state!r}; expected one of {', '.join(ICON_STATES)}")
    big = size * SUPERSAMPLE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    _DRAWERS[state](draw, big, _progress_step(fraction) / PROGRESS_STEPS)
    return image.resize((size, size), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------
# Drawing, all on a canvas of side ``s`` (the supersampled size).


def _box(s: int, inset: float) -> tuple[float, float, float, float]:
    return (inset, inset, s - 1 - inset, s - 1 - inset)


def _disc(draw: ImageDraw.ImageDraw, s: int, fill: Rgba) -> None:
    draw.ellipse(_box(s, s * 0.04), fill=fill)


def _draw_disconnected(draw: ImageDraw.ImageDraw, s: int, _fraction: float) -> None:
    width = max(2, round(s * 0.13))
    draw.ellipse(_box(s, s * 0.1), outline=GREY, width=width)
    draw.line((s * 0.22, s * 0.78, s * 0.78, s * 0.22), fill=GREY, width=width)


def _draw_connecting(draw: ImageDraw.ImageDraw, s: int, _fraction: float) -> None:
    width = max(2, round(s * 0.16))
    draw.arc(_box(s, s * 0.1), start=-60, end=210, fill=BLUE, width=width)
    draw.ellipse(_box(s, s * 0.4), fill=BLUE)


def _draw_idle(draw: ImageDraw.ImageDraw, s: int, _fraction: float) -> None:
    _disc(draw, s, GREEN)
    draw.ellipse(_box(s, s * 0.36), fill=WHITE)


def _draw_training(draw: ImageDraw.ImageDraw, s: int, fraction: float) -> None:
    _disc(draw, s, DARK)
    ring = _box(s, s * 0.14)
    width = max(2, round(s * 0.15))
    draw.arc(ring, start=0, end=360, fill=TRACK, width=width)
    if fraction > 0:
        # Clockwise from 12 o'clock, like a clock hand.
        draw.arc(ring, start=-90, end=-90 + 360 * fraction, fill=CYAN, width=width)
    draw.ellipse(_box(s, s * 0.4), fill=CYAN)


def _draw_paused_user(draw: ImageDraw.ImageDraw, s: int, _fraction: float) -> None:
    _disc(draw, s, AMBER)
    bar_w, top, bottom = s * 0.13, s * 0.28, s * 0.72
    for left in (s * 0.31, s * 0.56):
        draw.rectangle((left, top, left + bar_w, bottom), fill=WHITE)


def _draw_paused_power(draw: ImageDraw.ImageDraw, s: int, _fraction: float) -> None:
    _disc(draw, s, AMBER)
    # A battery lying on its side, nearly empty: body outline, terminal nub, low charge.
    left, top, right, bottom = s * 0.22, s * 0.34, s * 0.72, s * 0.66
    width = max(2, round(s * 0.07))
    draw.rectangle((left, top, right, bottom), outline=WHITE, width=width)
    draw.rectangle((right, s * 0.43, right + s * 0.07, s * 0.57), fill=WHITE)
    inner = width + s * 0.03
    draw.rectangle((left + inner, top + inner, left + inner + s * 0.1, bottom - inner), fill=WHITE)


def _draw_error(draw: ImageDraw.ImageDraw, s: int, _fraction: float) -> None:
    _disc(draw, s, RED)
    draw.rectangle((s * 0.43, s * 0.2, s * 0.57, s * 0.58), fill=WHITE)
    draw.ellipse((s * 0.42, s * 0.66, s * 0.58, s * 0.82), fill=WHITE)


_DRAWERS: Final = {
    "disconnected": _draw_disconnected,
    "connecting": _draw_connecting,
    "idle": _draw_idle,
    "training": _draw_training,
    "paused_user": _draw_paused_user,
    "paused_power": _draw_paused_power,
    "error": _draw_error,
}
