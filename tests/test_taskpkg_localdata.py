"""Device-local data: where a task's own data is (the task_data setting), and reading it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.errors import FedtrayError
from client.taskpkg.localdata import data_folder, read_data
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


def test_the_chosen_folder_is_read(tmp_path: Path) -> None:
    x, y = np.zeros((12, 1, 8, 8), np.float32), np.arange(12, dtype=np.int64) % 3
    np.savez(tmp_path / "train.npz", x=x, y=y)
    folder = data_folder("cnn", {"cnn": str(tmp_path), "other": "/elsewhere"})
    data = read_data(folder, MANIFEST)
    assert data["train"][0].shape == (12, 1, 8, 8) and "test" not in data


@pytest.mark.parametrize(
    ("folders", "fragment"),
    [
        ({}, "no data folder is set for task 'cnn'"),
        ({"other": "/x"}, "`fedtray-client config set task_data.cnn FOLDER`"),
        ({"cnn": "/nonexistent/fedtray-data"}, "(/nonexistent/fedtray-data) is not there"),
    ],
)
def test_no_folder_is_refused_in_words(folders: dict[str, str], fragment: str) -> None:
    with pytest.raises(FedtrayError) as info:
        data_folder("cnn", folders)
    assert info.value.code == "no_local_data"
    assert fragment in info.value.message


def test_data_that_does_not_fit_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(FedtrayError) as info:
        read_data(tmp_path, MANIFEST)
    assert info.value.code == "package_data_mismatch"
