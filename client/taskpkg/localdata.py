"""Device-local data: a task's data that never leaves the device.

A package whose manifest says ``data.source == "local"`` carries no data; each device
reads its own from the folder the user chose for that task (the ``task_data.NAME``
setting: ``fedtray-client config set task_data.NAME FOLDER`` or the Settings window).

Contract (torch-free, no network; reading is the only I/O):

* The folder holds exactly one of :data:`DATA_FILES`: ``data.safetensors`` or
  ``data.npz``, with two arrays, ``x`` (samples, then the manifest's ``input.shape``,
  of ``input.dtype``) and ``y`` (samples, then ``label.shape``, of ``label.dtype``).
  ``.npz`` is read with ``allow_pickle=False``: an object array is refused, never
  unpickled.
* :func:`find_local_data` says which file to read, or raises
  :class:`client.errors.FedtrayError` ``no_local_data`` in plain words (no folder set
  for the task, the folder missing, no data file, two data files).
* :func:`read_local_data` returns ``(x, y)`` checked against the manifest, or raises
  ``local_data_mismatch`` naming what differs (array missing, shape, dtype, sample
  counts, an empty set). Nothing is converted silently.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from client.errors import FedtrayError
from client.taskpkg.manifest import Manifest, TensorSpec

__all__ = ["DATA_FILES", "find_local_data", "read_local_data"]

#: The file names a data folder may hold (exactly one of them).
DATA_FILES: Final = ("data.safetensors", "data.npz")


def find_local_data(task: str, folders: Mapping[str, str]) -> Path:
    """The data file of ``task`` in its folder from ``folders`` (the ``task_data`` setting)."""
    folder = folders.get(task)
    if folder is None:
        raise FedtrayError(
            "no_local_data",
            f"no data folder is set for task '{task}': choose one in Settings, or run "
            f"`fedtray-client config set task_data.{task} FOLDER`",
        )
    root = Path(folder)
    if not root.is_dir():
        raise FedtrayError(
            "no_local_data", f"the data folder for task '{task}' ({root}) does not exist"
        )
    found = [root / name for name in DATA_FILES if (root / name).is_file()]
    if not found:
        raise FedtrayError(
            "no_local_data",
            f"the data folder for task '{task}' ({root}) holds neither {' nor '.join(DATA_FILES)}",
        )
    if len(found) > 1:
        raise FedtrayError(
            "no_local_data",
            f"the data folder for task '{task}' ({root}) holds both {' and '.join(DATA_FILES)}; "
            "keep one",
        )
    return found[0]


def _mismatch(path: Path, message: str) -> FedtrayError:
    return FedtrayError("local_data_mismatch", f"{path}: {message}")


def _arrays(path: Path) -> dict[str, npt.NDArray[Any]]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        from safetensors.numpy import load_file

        loaded: dict[str, npt.NDArray[Any]] = load_file(str(path))
        return loaded
    except ValueError as exc:  # np.load refusing an object (pickled) array lands here too
        raise _mismatch(path, f"cannot read the arrays: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise _mismatch(path, f"cannot read the file: {exc}") from None
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise _mismatch(path, f"not a valid data file: {type(exc).__name__}: {exc}") from None


def _check(path: Path, name: str, array: npt.NDArray[Any], spec: TensorSpec) -> None:
    want = ("samples", *spec.shape)
    if array.ndim != len(want) or tuple(array.shape[1:]) != tuple(spec.shape):
        raise _mismatch(path, f"{name} has shape {tuple(array.shape)}; the task wants {want}")
    if str(array.dtype) != spec.dtype:
        raise _mismatch(path, f"{name} is {array.dtype}; the task wants {spec.dtype}")


def read_local_data(path: Path, manifest: Manifest) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """``(x, y)`` from ``path`` (a file :func:`find_local_data` found), checked against
    ``manifest``'s input and label specs."""
    arrays = _arrays(path)
    missing = [name for name in ("x", "y") if name not in arrays]
    if missing:
        raise _mismatch(
            path, f"needs arrays x and y; missing {', '.join(missing)} (found: {sorted(arrays)})"
        )
    x, y = arrays["x"], arrays["y"]
    _check(path, "x", x, manifest.input)
    _check(path, "y", y, manifest.label)
    if len(x) != len(y):
        raise _mismatch(path, f"x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise _mismatch(path, "holds no samples")
    return x, y
