"""The task registry, the built-in tasks and the plugin entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.errors import FedtrayError
from client.protocol import Partition, TrainingConfig
from client.tasks import available_tasks, get_task
from client.tasks.digits import DigitsTask
from client.trainer import LocalTrainer, TrainJob
from client.weights import decode
from tests.waiting import scaled

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SRC = ROOT / "tests" / "plugin_task"


def test_importing_tasks_and_listing_them_does_not_import_torch() -> None:
    code = (
        "import sys; from client.tasks import available_tasks, get_task; "
        "names = available_tasks(); t = get_task('digits'); t.load_data('train', None); "
        "get_task('synthetic').load_data('test', None); "
        "print(names); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert done.returncode == 0, done.stderr
    assert "'digits'" in done.stdout and "'synthetic'" in done.stdout


def test_builtins_are_listed_and_unknown_names_refused() -> None:
    assert {"digits", "synthetic"} <= set(available_tasks())
    assert available_tasks() == sorted(set(available_tasks()))
    with pytest.raises(FedtrayError) as info:
        get_task("no-such-task")
    assert info.value.code == "unknown_task"
    assert "no-such-task" in info.value.message


def test_digits_data_is_the_real_set_split_and_scaled() -> None:
    task = get_task("digits")
    x_train, y_train = task.load_data("train", None)
    x_test, y_test = task.load_data("test", None)
    assert len(y_train) + len(y_test) == 1797
    assert len(y_test) == 359
    assert x_train.dtype == np.float32 and x_train.shape == (1438, 64)
    assert y_train.dtype == np.int64 and set(y_train.tolist()) == set(range(10))
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    # pixel counts 0..16 scaled by 1/16 exactly
    assert np.array_equal(x_train * 16, np.round(x_train * 16))
    # no test row is also a train row (the set has a few duplicate images; allow those)
    train_rows = {row.tobytes() for row in x_train}
    assert sum(row.tobytes() in train_rows for row in x_test) < 10
    # the split is fixed
    again_x, again_y = get_task("digits").load_data("test", None)
    assert np.array_equal(again_x, x_test) and np.array_equal(again_y, y_test)


def test_digits_partition_and_caller_cannot_corrupt_the_cache() -> None:
    task = get_task("digits")
    parts = [task.load_data("train", Partition(index=i, count=3)) for i in range(3)]
    assert sum(len(y) for _, y in parts) == 1438
    parts[0][0][:] = 99.0
    x_again, _ = task.load_data("train", Partition(index=0, count=3))
    assert x_again.max() <= 1.0


def test_build_model_is_deterministic_per_seed_and_leaves_global_rng_alone() -> None:
    task = get_task("digits", {"hidden": 16})
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = task.build_model(task.params, seed=7).state_dict()
    after = torch.rand(3)
    b = task.build_model(task.params, seed=7).state_dict()
    c = task.build_model(task.params, seed=8).state_dict()
    assert torch.equal(before, after)
    assert {k: tuple(v.shape) for k, v in a.items()} == {
        "0.weight": (16, 64),
        "0.bias": (16,),
        "2.weight": (10, 16),
        "2.bias": (10,),
    }
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


@pytest.mark.parametrize(
    ("name", "params", "words"),
    [
        ("digits", {"hidden": 0}, "between 1 and 4096"),
        ("digits", {"hidden": "64"}, "must be an integer"),
        ("digits", {"hidden": True}, "must be an integer"),
        ("digits", {"layers": 3}, "no parameter 'layers'"),
        ("synthetic", {"classes": 1}, "between 2 and 1000"),
        ("synthetic", {"features": 65_536, "samples": 10_000}, "over the limit"),
    ],
)
def test_bad_params_are_refused(name: str, params: dict[str, Any], words: str) -> None:
    with pytest.raises(FedtrayError) as info:
        get_task(name, params)
    assert info.value.code == "bad_request"
    assert words in info.value.message


def test_synthetic_sizes_follow_params_and_data_is_deterministic() -> None:
    params = {"features": 8, "classes": 3, "hidden": 5, "samples": 500}
    task = get_task("synthetic", params)
    x, y = task.load_data("train", None)
    xt, yt = task.load_data("test", None)
    assert x.shape == (400, 8) and xt.shape == (100, 8) and x.dtype == np.float32
    assert set(y.tolist()) == {0, 1, 2}
    x2, y2 = get_task("synthetic", params).load_data("train", None)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    model = task.build_model(task.params, 0)
    assert [tuple(p.shape) for p in model.parameters()] == [(5, 8), (5,), (3, 5), (3,)]
    # the rule is learnable: a least-squares linear fit on train beats chance on test
    w, *_ = np.linalg.lstsq(x, np.eye(3)[y], rcond=None)
    assert float(np.mean((xt @ w).argmax(1) == yt)) > 0.8


def test_synthetic_can_describe_a_100_mb_model_without_building_it() -> None:
    task = get_task("synthetic", {"features": 1024, "hidden": 24_000, "samples": 100})
    features, hidden, classes = 1024, 24_000, 4
    params = features * hidden + hidden + hidden * classes + classes
    assert 95e6 < 4 * params < 105e6
    hint = task.sample_bytes_hint(task.params)
    assert hint == 4 * (features + 4 * hidden + 2 * classes)


def test_default_evaluate_reports_loss_and_accuracy() -> None:
    task = DigitsTask()
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    y = np.array([0, 1, 1, 1])
    result = task.evaluate(model, x, y)
    assert result["accuracy"] == pytest.approx(0.75)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(x)), torch.from_numpy(y)
        )
    assert result["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert model.training  # mode restored


# -- plugins -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin package installed with pip into a temporary --target dir."""
    src = tmp_path_factory.mktemp("plugin-src") / "plugin_task"
    shutil.copytree(PLUGIN_SRC, src)  # building writes into the source tree
    target = tmp_path_factory.mktemp("plugin-site")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(src),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=scaled(180),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(target.glob("fedtray_echo_task-*.dist-info/entry_points.txt"))
    return target


@pytest.fixture
def with_plugin(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield plugin_dir
    sys.modules.pop("fedtray_echo_task", None)


def test_plugin_is_listed_without_importing_it_and_trains(
    with_plugin: Path, tmp_path: Path
) -> None:
    sys.modules.pop("fedtray_echo_task", None)
    assert "echo" in available_tasks()
    assert "fedtray_echo_task" not in sys.modules
    task = get_task("echo", {"width": 5})
    assert task.name == "echo" and task.params == {"width": 5}
    job = TrainJob(
        round_id="plugin-1",
        task="echo",
        model_params={"width": 5},
        config=TrainingConfig(epochs=20, batch_size=20, learning_rate=0.5, momentum=0.9),
        partition=Partition(index=1, count=2),
        base_weights_path=None,
        output_path=tmp_path / "out.safetensors",
        checkpoint_path=tmp_path / "ckpt.safetensors",
    )
    result = LocalTrainer(device="cpu").run(job)
    assert result.num_samples == 100
    state = decode(result.output_path.read_bytes())
    assert {k: v.shape for k, v in state.items()} == {"weight": (5, 5), "bias": (5,)}
    assert result.metrics["trainAccuracy"] > 0.6  # it learned something (chance is 0.2)


def test_a_broken_plugin_is_reported_as_unknown_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[fedtray.tasks]\nbroken = fedtray_no_such_module_xyz:Task\nnotatask = json:dumps\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"broken", "notatask"} <= set(available_tasks())
    with pytest.raises(FedtrayError) as missing:
        get_task("broken")
    assert missing.value.code == "unknown_task"
    assert "No module named 'fedtray_no_such_module_xyz'" in missing.value.message
    assert "failed to load" in caplog.text
    with pytest.raises(FedtrayError) as wrong:
        get_task("notatask")
    assert wrong.value.code == "unknown_task"
    assert "does not name a fedtray Task" in wrong.value.message
