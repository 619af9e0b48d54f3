"""A device's own data for a task package, read from a file or folder and checked.

Contract (torch-free, no pickle): :func:`read_data` reads

* a folder holding ``train.safetensors`` or ``train.npz`` (required) and optionally
  ``test.safetensors`` / ``test.npz``, each with the arrays ``x`` and ``y``; or
* one ``.safetensors`` / ``.npz`` file holding ``x`` and ``y`` (train only) or
  ``x_train``, ``y_train``, ``x_test``, ``y_test``,

and checks every array against the manifest's input and label specs (dtype and
per-sample shape; any number of samples). :func:`data_folder` finds where a task's data
is from the ``task_data`` setting (``fedtray-client config set task_data.NAME FOLDER``
or the Settings window) and raises ``FedtrayError('no_local_data', ...)`` in plain words
when none is set or it is gone. ``.npz`` files are read with
``allow_pickle=False``; safetensors through :func:`client.weights.decode`. A missing,
unreadable or mismatched file raises ``FedtrayError('package_data_mismatch', ...)``
naming the file and what is wrong.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from client.errors import FedtrayError
from client.taskpkg.archive import Arrays, DataSplit
from client.taskpkg.manifest import Manifest, TensorSpec
from client.weights import decode
from client.weights.spec import WeightsError

__all__ = ["MAX_DATA_BYTES", "data_folder", "read_data"]

#: Largest data file read.
MAX_DATA_BYTES: Final = 4 * 1024**3
_SUFFIXES: Final = (".safetensors", ".npz")


def data_folder(task: str, folders: Mapping[str, str]) -> Path:
    """Where this device's own data for ``task`` is (``folders``: the ``task_data`` setting)."""
    folder = folders.get(task)
    if folder is None:
        raise FedtrayError(
            "no_local_data",
            f"no data folder is set for task '{task}': choose one in Settings, or run "
            f"`fedtray-client config set task_data.{task} FOLDER`",
        )
    path = Path(folder)
    if not path.exists():
        raise FedtrayError("no_local_data", f"the data for task '{task}' ({path}) is not there")
    return path


def _fail(message: str) -> FedtrayError:
    return FedtrayError("package_data_mismatch", message)


def _read_arrays(path: Path) -> dict[str, npt.NDArray[Any]]:
    try:
        size = path.stat().st_size
        if size > MAX_DATA_BYTES:
            raise _fail(f"{path} is {size} bytes; at most {MAX_DATA_BYTES}")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {name: np.asarray(npz[name]) for name in npz.files}
        return decode(path.read_bytes(), "safetensors", max_bytes=MAX_DATA_BYTES)
    except FedtrayError:
        raise
    except WeightsError as exc:
        raise _fail(f"{path}: {exc.message}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise _fail(f"cannot read the data file {path}: {exc}") from None


def _checked(arr: npt.NDArray[Any], spec: TensorSpec, what: str) -> npt.NDArray[Any]:
    if arr.dtype.name != spec.dtype or list(arr.shape[1:]) != spec.shape:
        raise _fail(
            f"{what} is {arr.dtype.name} with sample shape {list(arr.shape[1:])}; the task "
            f"needs {spec.dtype} {spec.shape}"
        )
    return arr


def _pair(
    arrays: dict[str, npt.NDArray[Any]], xk: str, yk: str, manifest: Manifest, where: str
) -> Arrays:
    x = _checked(arrays[xk], manifest.input, f"{where} '{xk}'")
    y = _checked(arrays[yk], manifest.label, f"{where} '{yk}'")
    if len(x) != len(y):
        raise _fail(f"{where}: '{xk}' has {len(x)} samples but '{yk}' has {len(y)}")
    return x, y


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in _SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_data(path: Path, manifest: Manifest) -> dict[DataSplit, Arrays]:
    """``{"train": (x, y), "test": (x, y)}`` from ``path`` (module docstring)."""
    if path.is_dir():
        train = _find(path, "train")
        if train is None:
            raise _fail(f"no train.safetensors or train.npz in {path}")
        out: dict[DataSplit, Arrays] = {}
        splits: tuple[tuple[DataSplit, Path | None], ...] = (
            ("train", train),
            ("test", _find(path, "test")),
        )
        for split, file in splits:
            if file is not None:
                arrays = _read_arrays(file)
                if set(arrays) != {"x", "y"}:
                    raise _fail(f"{file} must hold exactly 'x' and 'y', not {sorted(arrays)}")
                out[split] = _pair(arrays, "x", "y", manifest, str(file))
        return out
    if not path.is_file() or path.suffix not in _SUFFIXES:
        raise _fail(f"no data at {path} (a folder, .safetensors or .npz file)")
    arrays = _read_arrays(path)
    if set(arrays) == {"x", "y"}:
        return {"train": _pair(arrays, "x", "y", manifest, str(path))}
    if set(arrays) == {"x_train", "y_train", "x_test", "y_test"}:
        return {
            "train": _pair(arrays, "x_train", "y_train", manifest, str(path)),
            "test": _pair(arrays, "x_test", "y_test", manifest, str(path)),
        }
    raise _fail(f"{path} must hold x, y or x_train, y_train, x_test, y_test; not {sorted(arrays)}")
