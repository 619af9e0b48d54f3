"""Write the digits shipped with fedtray as a data file for ``fedtray-server pack``.

    python docs/examples/digits_data.py digits.npz

Writes ``x_train``, ``y_train``, ``x_test``, ``y_test``: the same fixed train/test split as
the built-in ``digits`` task, images as float32 ``(N, 1, 8, 8)`` in [0, 1], labels int64
0-9. A plain ``.npz`` of numeric arrays (no pickled objects).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from client.tasks.digits import DigitsTask


def write_digits(path: Path) -> Path:
    """Write the digits data file to ``path``; the path."""
    task = DigitsTask()
    arrays = {}
    for split in ("train", "test"):
        x, y = task.load_data(split, None)
        arrays[f"x_{split}"] = x.reshape(-1, 1, 8, 8).astype(np.float32)
        arrays[f"y_{split}"] = y.astype(np.int64)
    np.savez(path, **arrays)
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "digits.npz")
    write_digits(out)
    print(f"wrote {out}")
