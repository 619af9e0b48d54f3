"""Device-local data: finding the user's data file for a task and checking it (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from client.errors import FedtrayError
from client.taskpkg.localdata import find_local_data, read_local_data
from client.taskpkg.manifest import Manifest, parse_manifest

MANIFEST: Manifest = parse_manifest(
    json.dumps(
        {
            "format": "fedtray-task/1",
            "name": "cnn",
            "version": "1",
            "input": {"shape": [1, 8, 8], "dtype": "float32"},
            "label": {"shape": [], "dtype": "int64"},
            "loss": "cross_entropy",
            "training": {"epochs": 1, "batchSize": 8, "learningRate": 0.1},
            "data": {"source": "local"},
        }
    ).encode()
)


def good(n: int = 12) -> dict[str, Any]:
    return {"x": np.zeros((n, 1, 8, 8), np.float32), "y": np.arange(n, dtype=np.int64) % 3}


@pytest.mark.parametrize("kind", ["safetensors", "npz"])
def test_a_folder_with_good_data_is_read(tmp_path: Path, kind: str) -> None:
    if kind == "npz":
        np.savez(tmp_path / "data.npz", **good())
    else:
        save_file(good(), str(tmp_path / "data.safetensors"))
    path = find_local_data("cnn", {"cnn": str(tmp_path)})
    x, y = read_local_data(path, MANIFEST)
    assert x.shape == (12, 1, 8, 8) and y.tolist() == (np.arange(12) % 3).tolist()


@pytest.mark.parametrize(
    ("folders", "files", "fragment"),
    [
        ({}, [], "no data folder is set for task 'cnn'"),
        ({"cnn": "/nonexistent/fedtray-data"}, [], "does not exist"),
        ({"cnn": "HERE"}, [], "holds neither data.safetensors nor data.npz"),
        ({"cnn": "HERE"}, ["data.npz", "data.safetensors"], "keep one"),
    ],
)
def test_no_usable_folder_is_refused_in_words(
    tmp_path: Path, folders: dict[str, str], files: list[str], fragment: str
) -> None:
    for name in files:
        (tmp_path / name).write_bytes(b"")
    folders = {k: str(tmp_path) if v == "HERE" else v for k, v in folders.items()}
    with pytest.raises(FedtrayError) as info:
        find_local_data("cnn", folders)
    assert info.value.code == "no_local_data"
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"x": good()["x"]}, "missing y"),
        ({**good(), "x": np.zeros((12, 8, 8), np.float32)}, "x has shape (12, 8, 8)"),
        ({**good(), "x": np.zeros((12, 1, 8, 8), np.float64)}, "x is float64"),
        ({**good(), "y": np.zeros((12,), np.int32)}, "y is int32"),
        ({**good(), "y": np.zeros((12, 1), np.int64)}, "y has shape (12, 1)"),
        ({**good(), "y": np.zeros((11,), np.int64)}, "x has 12 samples but y has 11"),
        (good(0), "holds no samples"),
    ],
)
def test_data_that_does_not_fit_the_specs_is_refused(
    tmp_path: Path, arrays: dict[str, Any], fragment: str
) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(FedtrayError) as info:
        read_local_data(path, MANIFEST)
    assert info.value.code == "local_data_mismatch"
    assert fragment in info.value.message


def test_a_pickled_object_array_is_refused_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(FedtrayError) as info:
        read_local_data(path, MANIFEST)
    assert info.value.code == "local_data_mismatch"
    assert "allow_pickle" in info.value.message or "cannot read" in info.value.message


def test_a_broken_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(FedtrayError) as info:
        read_local_data(path, MANIFEST)
    assert info.value.code == "local_data_mismatch"
