"""The documented CNN example (docs/tasks.md), packed and trained as an operator would.

* Packed in this process with ``fedtray-server pack`` (``server.cli.main``), the server's
  view of the package (:func:`server.taskfile.open_package`) keeps every initial weight's
  shape -- batch norm's 0-d ``num_batches_tracked`` included (devices refused a global
  where it had become shape ``(1,)``).
* ``slow``: ``fedtray-server demo --task-file`` with 3 label-skewed clients reaches the
  issue's ≥ 95 % test accuracy within 10 rounds, and leaves no process behind.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from server.cli import main as server_main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs/examples/digits_cnn.py"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``digits_cnn.fedtask``, made with the commands docs/tasks.md shows."""
    folder = tmp_path_factory.mktemp("digits_cnn")
    data = folder / "digits.npz"
    subprocess.run(
        [sys.executable, str(ROOT / "docs/examples/digits_data.py"), str(data)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    out = folder / "digits_cnn.fedtask"
    pack_args = ["--data", str(data), "-o", str(out), "--name", "digits_cnn"]
    code = server_main(["pack", f"{EXAMPLE}:make_model", *pack_args])
    assert code == 0
    return out


@pytest.mark.torch
def test_the_server_keeps_the_shape_of_every_initial_weight(packed: Path) -> None:
    from client.taskpkg.archive import read_package
    from server.taskfile import open_package

    served = open_package(packed)
    package = read_package(packed)
    assert {k: v.shape for k, v in served.weights.items()} == {
        k: v.shape for k, v in package.weights.items()
    }
    assert served.weights["features.1.num_batches_tracked"].shape == ()
    assert all(v.flags.c_contiguous for v in served.weights.values())


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.timeout(300)
def test_the_packed_cnn_reaches_95_percent_with_three_label_skewed_clients(
    packed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    federation = ["--clients", "3", "--rounds", "10", "--partition", "label_skew"]
    target = ["--target", "0.95", "--require-target", "--timeout", "240"]
    code = server_main(["demo", "--task-file", str(packed), *federation, *target])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    lines = out.out.splitlines()
    assert sum(1 for line in lines if line.startswith("round ")) == 10, out.out
    assert "abandoned" not in out.out
    assert "target 95 % met" in lines[-1], out.out
    leftovers = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.is_running()
    ]
    assert [p for p in leftovers if p.status() != psutil.STATUS_ZOMBIE] == []


@pytest.mark.torch
def test_the_packaged_module_calls_its_programs_past_their_hooks_with_the_same_results(
    packed: Path,
) -> None:
    """The adapter skips the rebuilt programs' input pre-hooks (call overhead): same
    outputs and gradients as calling the program with them, same refusals."""
    import torch

    from client.taskpkg.task import _hooks_are_exports_own, load_packaged_task

    model = load_packaged_task(packed).build_model({}, 0)
    programs = object.__getattribute__(model, "_programs")
    assert object.__getattribute__(model, "_direct") == (True, True)
    x = torch.rand(5, 1, 8, 8)
    for mode, program in ((True, programs[0]), (False, programs[1])):
        model.train(mode)
        torch.manual_seed(3)
        direct = model(x)
        direct.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        assert len(grads) == len(list(model.parameters()))
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        hooked = program(x)  # with torch's own hooks
        hooked.sum().backward()
        assert torch.equal(direct, hooked)
        for want, param in zip(grads, model.parameters(), strict=True):
            assert param.grad is not None
            assert torch.equal(want, param.grad)
        model.zero_grad(set_to_none=True)
    model.train()
    for bad in (torch.rand(2, 1, 9, 8), torch.rand(2, 8, 8)):
        with pytest.raises(AssertionError, match="Guard failed"):
            model(bad)  # the graph's own guards
        with pytest.raises(AssertionError, match="Guard failed"):
            programs[0](bad)
    with pytest.raises(TypeError, match="one tensor"):
        model("x")
    # A program with hooks other than export's own keeps them.
    programs[0].register_forward_pre_hook(lambda module, args: None)
    assert not _hooks_are_exports_own(programs[0])
