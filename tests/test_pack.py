"""Packing (server.pack, server.pack_data, server.pack_export, ``fedtray-server pack``).

Torch runs in this process only (no torch processes) except in the one ``slow`` test that
runs the real command in a subprocess.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.pack_data import PackError, check_dataset, parse_shape, read_dataset

ROOT = Path(__file__).resolve().parent.parent

MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class OnlyHere(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.drop = nn.Dropout(0.5)
            self.fc = nn.Linear(4 * 2 * 2, 3)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            x = nn.functional.max_pool2d(x, 2)
            return self.fc(self.drop(x.flatten(1)))

    def make():
        return OnlyHere()
    """
)

DATA_DEPENDENT_SOURCE = textwrap.dedent(
    """
    from torch import nn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            x = x.flatten(1)
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    def make():
        return Branchy()
    """
)

FIXED_BATCH_SOURCE = textwrap.dedent(
    """
    from torch import nn

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(x.view(8, -1))

    def make():
        return Fixed()
    """
)


def _arrays(n_train: int = 24, n_test: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.random((n_train, 1, 4, 4), dtype=np.float32),
        "y_train": rng.integers(0, 3, n_train).astype(np.int64),
        "x_test": rng.random((n_test, 1, 4, 4), dtype=np.float32),
        "y_test": rng.integers(0, 3, n_test).astype(np.int64),
    }


def _npz(tmp_path: Path, arrays: dict[str, Any], name: str = "data.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _model_file(tmp_path: Path, source: str, name: str = "only_here.py") -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


# -- data files (torch-free) -------------------------------------------------------------


def test_read_dataset_npz_and_safetensors_give_the_same_checked_arrays(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.uint8)  # widened to int64, losslessly
    arrays["y_test"] = arrays["y_test"].astype(np.uint8)
    save_file(arrays, str(tmp_path / "data.safetensors"))
    for path in (_npz(tmp_path, arrays), tmp_path / "data.safetensors"):
        data = read_dataset(path, "cross_entropy")
        assert data.input.shape == [1, 4, 4] and data.input.dtype == "float32"
        assert data.label.shape == [] and data.label.dtype == "int64"
        assert data.y_train.dtype == np.int64
        np.testing.assert_array_equal(data.y_train, arrays["y_train"])
        expected = max(int(arrays["y_train"].max()), int(arrays["y_test"].max())) + 1
        assert data.num_classes == expected


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda a: a.pop("y_test"), "no array y_test"),
        (
            lambda a: a.update(y_train=a["y_train"][:-1]),
            "x_train has 24 samples but y_train has 23",
        ),
        (lambda a: a.update(x_test=a["x_test"].astype(np.complex64)), "x_test has dtype complex64"),
        (lambda a: a.update(x_test=a["x_test"][:, :, :2]), "both splits must match"),
        (
            lambda a: a.update(y_train=a["y_train"] * 0.5, y_test=a["y_test"] * 0.5),
            "needs integer class labels",
        ),
        (lambda a: a.update(y_test=a["y_test"] - 5), "must be >= 0"),
        (lambda a: a.update(x_train=a["x_train"][:0], y_train=a["y_train"][:0]), "no samples"),
    ],
)
def test_bad_data_files_are_refused_with_a_clear_error(
    tmp_path: Path, change: Any, words: str
) -> None:
    arrays = _arrays()
    change(arrays)
    with pytest.raises(PackError, match=words):
        read_dataset(_npz(tmp_path, arrays), "cross_entropy")


def test_pickled_arrays_are_never_loaded(tmp_path: Path) -> None:
    arrays: dict[str, Any] = _arrays()
    arrays["x_train"] = np.array([object()] * 24, dtype=object)
    with pytest.raises(PackError, match="Python objects"):
        read_dataset(_npz(tmp_path, arrays), "cross_entropy")


def test_unreadable_or_unsupported_files(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(PackError, match=r"\.npz or \.safetensors"):
        read_dataset(tmp_path / "data.csv", "cross_entropy")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(PackError, match=r"cannot read broken\.npz"):
        read_dataset(tmp_path / "broken.npz", "cross_entropy")
    with pytest.raises(PackError, match="does not exist"):
        read_dataset(tmp_path / "missing.npz", "cross_entropy")


def test_regression_losses_need_float_labels_and_num_classes_is_checked() -> None:
    arrays = _arrays()
    with pytest.raises(PackError, match=r"mse needs floating labels"):
        check_dataset(arrays, "mse", None)
    floats = dict(arrays, y_train=arrays["y_train"].astype(np.float32))
    floats["y_test"] = arrays["y_test"].astype(np.float32)
    data = check_dataset(floats, "mse", None)
    assert data.num_classes is None and data.label.dtype == "float32"
    with pytest.raises(PackError, match="does not fit 2 classes"):
        check_dataset(arrays, "cross_entropy", 2)


@pytest.mark.parametrize(
    ("text", "shape"), [("1,8,8", [1, 8, 8]), ("64", [64]), ("", []), (" ", [])]
)
def test_parse_shape(text: str, shape: list[int]) -> None:
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["1,x", "0,8", "-1", "1,,2"])
def test_parse_shape_refuses(text: str) -> None:
    with pytest.raises(PackError):
        parse_shape(text)


def test_cli_usage_errors_exit_2_without_torch(capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    assert main(["pack", "m.py:make", "--data", "d.npz"]) == 2  # no -o
    assert main(["pack", "m.py:make", "-o", "out.fedtask"]) == 2  # no data, not local
    assert main(["pack", "m.py:make", "--local-data", "-o", "x.fedtask"]) == 2  # no shape
    assert main(["pack", "m.py:make", "--data", "d.npz", "-o", "x", "--loss", "hinge"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4
    assert all(line.startswith("fedtray-server pack: error: ") for line in lines)


# -- packing (torch in this process) -----------------------------------------------------


@pytest.mark.torch
def test_a_model_that_exists_only_in_a_deleted_file_still_loads_and_trains(
    tmp_path: Path,
) -> None:
    import torch

    from client.taskpkg.archive import read_package
    from client.taskpkg.task import load_packaged_task
    from server.pack import pack

    model_file = _model_file(tmp_path, MODEL_SOURCE)
    data = _npz(tmp_path, _arrays())
    out = pack(f"{model_file}:make", data, tmp_path / "pkg" / "only.fedtask", name="only_here").path
    model_file.unlink()
    for name in list(sys.modules):
        if name.startswith("_fedtray_pack_only_here"):
            del sys.modules[name]

    assert out == tmp_path / "pkg" / "only.fedtask" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["only.fedtask"]  # no temp left
    contents = read_package(out)
    assert contents.manifest.name == "only_here"
    assert contents.manifest.num_classes == 3
    assert contents.manifest.input.shape == [1, 4, 4]
    task = load_packaged_task(out)
    model = task.build_model(task.params, 0)
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = task.load_data("train", None)
    for batch in (5, 3, 16):  # dynamic batch: partial batches train too
        optimizer.zero_grad()
        loss = task.train_step(model, torch.from_numpy(x[:batch]), torch.from_numpy(y[:batch]))
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    metrics = task.evaluate(model, *task.load_data("test", None))
    assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.torch
def test_packing_leaves_the_model_and_its_file_alone(tmp_path: Path) -> None:
    import torch

    from client.tasks.base import model_state
    from server.pack import load_factory, pack

    factory = load_factory(f"{_model_file(tmp_path, MODEL_SOURCE)}:make")
    model = factory()
    before = model_state(model)
    result = pack(lambda: model, _npz(tmp_path, _arrays()), tmp_path / "a.fedtask")
    assert model.training  # mode restored
    for name, array in model_state(model).items():
        np.testing.assert_array_equal(array, before[name])
    raw = result.path.read_bytes()
    assert result.size == len(raw) and result.sha256 == hashlib.sha256(raw).hexdigest()
    assert result.parameters == sum(p.numel() for p in model.parameters())
    assert isinstance(model, torch.nn.Module)


@pytest.mark.torch
@pytest.mark.parametrize(
    ("source", "words"),
    [
        (DATA_DEPENDENT_SOURCE, "depends on the values inside a tensor"),
        (FIXED_BATCH_SOURCE, "fixes the batch size"),
    ],
)
def test_an_unexportable_model_is_explained_in_plain_words(
    tmp_path: Path, source: str, words: str
) -> None:
    from server.pack import pack

    model_file = _model_file(tmp_path, source, "bad_model.py")
    out = tmp_path / "bad.fedtask"
    out.write_bytes(b"an older package")
    with pytest.raises(PackError, match="the model cannot be exported") as info:
        pack(f"{model_file}:make", _npz(tmp_path, _arrays(n_train=8, n_test=8)), out)
    message = str(info.value)
    assert words in message and "(torch: " in message
    assert "\n" not in message and "Traceback" not in message
    assert out.read_bytes() == b"an older package"  # nothing overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fedtask", "bad_model.py", "data.npz"]


@pytest.mark.torch
@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        (
            {**_arrays(), "x_train": _arrays()["x_train"].astype(np.float64)},
            "both splits must match",
        ),
        (
            {
                **_arrays(),
                "x_train": _arrays()["x_train"].astype(np.float64),
                "x_test": _arrays()["x_test"].astype(np.float64),
            },
            "the features are float64 but the model's parameters are float32",
        ),
        (
            {**_arrays(), "y_train": np.full(24, 7), "y_test": np.zeros(12, np.int64)},
            "the labels have 8 classes but the model gives 3 logits",
        ),
    ],
)
def test_data_that_does_not_suit_the_model_is_refused(
    tmp_path: Path, arrays: dict[str, Any], words: str
) -> None:
    from server.pack import pack

    with pytest.raises(PackError, match=words):
        pack(
            f"{_model_file(tmp_path, MODEL_SOURCE)}:make",
            _npz(tmp_path, arrays),
            tmp_path / "x.fedtask",
        )
    assert not (tmp_path / "x.fedtask").exists()


@pytest.mark.torch
def test_model_spec_errors(tmp_path: Path) -> None:
    from server.pack import load_factory

    with pytest.raises(PackError, match=r"path/to/file\.py:factory"):
        load_factory("no_colon")
    with pytest.raises(PackError, match="does not exist"):
        load_factory(f"{tmp_path / 'gone.py'}:make")
    with pytest.raises(PackError, match="has no function or class 'nope'"):
        load_factory(f"{_model_file(tmp_path, MODEL_SOURCE)}:nope")
    with pytest.raises(PackError, match="cannot import no_such_pkg_xyz"):
        load_factory("no_such_pkg_xyz.models:make")
    assert callable(load_factory("docs.examples.digits_cnn:make_model"))


@pytest.mark.torch
def test_cli_exit_codes_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    data = _npz(tmp_path, _arrays())
    good = _model_file(tmp_path, MODEL_SOURCE)
    out = tmp_path / "ok.fedtask"
    assert main(["pack", f"{good}:make", "--data", str(data), "-o", str(out)]) == 0
    printed = capsys.readouterr()
    line = printed.out.strip()
    assert "\n" not in line and str(out) in line
    assert hashlib.sha256(out.read_bytes()).hexdigest() in line
    assert f"{out.stat().st_size:,} bytes" in line and "parameters" in line

    bad = _model_file(tmp_path, DATA_DEPENDENT_SOURCE, "bad.py")
    assert main(["pack", f"{bad}:make", "--data", str(data), "-o", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedtray-server pack: error: the model cannot")

    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"nope")
    assert main(["pack", f"{good}:make", "--data", str(broken), "-o", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read broken.npz" in err[0]


@pytest.mark.torch
def test_local_data_package_carries_no_data(tmp_path: Path) -> None:
    from client.taskpkg.archive import read_package
    from server.pack import pack

    out = pack(
        f"{_model_file(tmp_path, MODEL_SOURCE)}:make",
        None,
        tmp_path / "local.fedtask",
        local_data=True,
        input_shape=[1, 4, 4],
        num_classes=3,
    ).path
    contents = read_package(out)
    assert contents.manifest.data.source == "local"
    assert contents.manifest.num_classes == 3
    assert contents.manifest.input.shape == [1, 4, 4]


@pytest.mark.slow
@pytest.mark.torch
def test_the_command_packs_the_documented_digits_example(tmp_path: Path) -> None:
    env_path = f"{ROOT}"
    subprocess.run(
        [sys.executable, str(ROOT / "docs/examples/digits_data.py"), str(tmp_path / "d.npz")],
        check=True,
        timeout=120,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    out = tmp_path / "digits_cnn.fedtask"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "pack",
            f"{ROOT / 'docs/examples/digits_cnn.py'}:make_model",
            "--data",
            str(tmp_path / "d.npz"),
            "-o",
            str(out),
            "--name",
            "digits_cnn",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"packed {out} (")
    assert out.is_file()
