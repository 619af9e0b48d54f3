"""Write the application icon files the installers need, drawn by :mod:`tray.icons`.

``python packaging/make_icons.py OUT_DIR`` writes into OUT_DIR (created if missing):

* ``hicolor/<N>x<N>/apps/fedtray.png`` for N in :data:`HICOLOR_SIZES` (Linux menus);
* ``fedtray.png`` (256 px), ``fedtray.ico`` (Windows, 16-256 px) and ``fedtray.icns``
  (macOS) -- all the "idle" look, the same drawing the tray shows when connected.

One source of truth: the tray draws its icons with Pillow at run time, so the app icon
is drawn by the same code instead of kept as a second set of binary files. Exit 0 on
success; an unwritable OUT_DIR raises OSError with the path (a build script stops).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
HICOLOR_SIZES: Final = (16, 22, 24, 32, 48, 64, 128, 256)
ICO_SIZES: Final = (16, 24, 32, 48, 64, 128, 256)
APP_ICON_STATE: Final = "idle"


def write_icons(out: Path) -> list[Path]:
    """Write every icon file into ``out``; returns the paths written."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run as a script from a source checkout
    from tray.icons import render_icon

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for size in HICOLOR_SIZES:
        path = out / "hicolor" / f"{size}x{size}" / "apps" / "fedtray.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_icon(APP_ICON_STATE, size).save(path)
        written.append(path)
    big = render_icon(APP_ICON_STATE, 256)
    big.save(out / "fedtray.png")
    big.save(out / "fedtray.ico", sizes=[(s, s) for s in ICO_SIZES])
    big.save(out / "fedtray.icns")
    written += [out / "fedtray.png", out / "fedtray.ico", out / "fedtray.icns"]
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python packaging/make_icons.py OUT_DIR", file=sys.stderr)
        return 2
    for path in write_icons(Path(argv[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
