"""Export an operator's model with ``torch.export``, or say in plain words why it cannot be.

Contract: :func:`export_programs` exports the model twice -- in train mode and in eval mode
-- with a dynamic batch axis (:func:`client.taskpkg.program.export_program`:
``torch.export.Dim("batch")`` on the first dimension of the one input), so the programs
run at any batch size (a fixed batch would fail its guard on the last partial batch or a
halved batch). The model's mode is restored after;
its parameters and buffers are not changed. A model that cannot be exported raises
:class:`server.pack_data.PackError` with one line: what to change in the model, followed
by torch's own first line (:func:`explain_export_error`). :func:`check_model_output`
runs the model eagerly on the example batch first, so a wrong input dtype, a non-tensor
output or an output that does not suit the loss is reported before exporting. Imports
torch (only the packer and tests import this module).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from client.taskpkg.manifest import Loss, TensorSpec
from server.pack_data import PackError, one_line

__all__ = [
    "ExportedPrograms",
    "check_model_output",
    "count_parameters",
    "explain_export_error",
    "export_programs",
    "lifted_constants",
]

#: (pattern in torch's message or exception type name, what to tell the operator), first match wins.
_EXPLANATIONS: Final[tuple[tuple[str, str], ...]] = (
    (
        "Constraints violated (batch)",
        "the model fixes the batch size (for example x.view(32, -1) or a tensor created with "
        "a fixed first dimension); use x.flatten(1) or x.view(x.size(0), -1) so any batch "
        "size works",
    ),
    (
        "data-dependent",
        "the model's Python depends on the values inside a tensor (an `if` or loop on a "
        "tensor, .item(), .tolist(), int()/float()/bool() of a tensor, or numpy on a tensor); "
        "a package is a fixed graph of operators, so compute both branches and pick with "
        "torch.where (torch.cond is not accepted in a package), or remove the dependence",
    ),
    (
        "Unsupported",
        "the model calls Python that torch.export cannot trace (an unsupported builtin, a "
        "third-party library or I/O inside forward); keep forward to torch operations",
    ),
    (
        "mutat",
        "the model changes a tensor in place in a way torch.export cannot record (for example "
        "an in-place op on its input, x.add_(1)); use the out-of-place form (x = x + 1)",
    ),
)
_FALLBACK: Final = (
    "torch.export cannot turn the model into a graph of PyTorch operators; keep forward "
    "to torch operations on its one input tensor (see docs/tasks.md)"
)


@dataclass(frozen=True)
class ExportedPrograms:
    """The model exported in train mode and in eval mode (same parameter names)."""

    train: torch.export.ExportedProgram
    eval: torch.export.ExportedProgram


def explain_export_error(exc: BaseException) -> str:
    """One line: what to change in the model, then torch's own first line."""
    text = str(exc)
    kind = type(exc).__name__
    advice = _FALLBACK
    for needle, words in _EXPLANATIONS:
        if needle in text or needle in kind:
            advice = words
            break
    detail = next((line.strip() for line in text.splitlines() if line.strip()), kind)
    torch_line = one_line(ValueError(detail), 240)
    return f"the model cannot be exported: {advice} (torch: {kind}: {torch_line})"


def _batch_tensor(x: npt.NDArray[Any]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def check_model_output(
    model: nn.Module,
    example: npt.NDArray[Any],
    loss: Loss,
    label: TensorSpec,
    num_classes: int | None,
) -> None:
    """Run ``model`` eagerly (eval mode, no gradients) on ``example``; PackError unless its
    output is one tensor that suits ``loss`` and the labels."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    if example.dtype.kind == "f" and params and params[0].dtype != _torch_dtype(example):
        raise PackError(
            f"the features are {example.dtype} but the model's parameters are "
            f"{str(params[0].dtype).removeprefix('torch.')}; convert the data (x.astype(...)) "
            "or the model (model.to(dtype)) so they match"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(_batch_tensor(example))
    except Exception as exc:
        raise PackError(
            f"the model fails on a batch of the data (input {tuple(example.shape)} "
            f"{example.dtype}): {type(exc).__name__}: {one_line(exc, 240)}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise PackError(
            f"the model returns {type(out).__name__}; forward must return one tensor "
            "(the logits or predictions)"
        )
    batch = len(example)
    if loss == "cross_entropy":
        if out.dim() != 2 or out.shape[0] != batch:
            raise PackError(
                f"cross_entropy needs logits of shape (batch, classes); the model returns "
                f"{tuple(out.shape)} for a batch of {batch}"
            )
        if num_classes is not None and out.shape[1] < num_classes:
            raise PackError(
                f"the labels have {num_classes} classes but the model gives {out.shape[1]} "
                "logits per sample"
            )
    elif tuple(out.shape) != (batch, *label.shape):
        raise PackError(
            f"{loss} compares the output with the labels; the model returns "
            f"{tuple(out.shape)} for a batch of {batch} but labels are {tuple(label.shape)} "
            "per sample"
        )


def _torch_dtype(array: npt.NDArray[Any]) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype=array.dtype)).dtype


def export_programs(model: nn.Module, example: npt.NDArray[Any]) -> ExportedPrograms:
    """``model`` exported in train and eval mode on ``example`` with a dynamic batch axis."""
    was_training = model.training
    try:
        train = _export(model.train(), example)
        evaluation = _export(model.eval(), example)
    finally:
        model.train(was_training)
    return ExportedPrograms(train=train, eval=evaluation)


def quiet_torch_logs() -> None:
    """Keep torch's export warnings (symbolic shapes, tracing) off an operator's terminal."""
    with contextlib.suppress(Exception):  # a private torch API: best effort only
        torch._logging.set_logs(all=logging.ERROR)  # type: ignore[attr-defined]


def _export(model: nn.Module, example: npt.NDArray[Any]) -> torch.export.ExportedProgram:
    from client.taskpkg.program import export_program  # the one export: dynamic batch axis

    # On failure torch.export prints the traced graph to stderr; the error says enough.
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return export_program(model, _batch_tensor(example))
    except Exception as exc:
        raise PackError(explain_export_error(exc)) from None


def lifted_constants(programs: ExportedPrograms) -> dict[str, npt.NDArray[Any]]:
    """The programs' tensor constants (non-persistent buffers, lifted constants) as numpy."""
    out: dict[str, npt.NDArray[Any]] = {}
    for program in (programs.train, programs.eval):
        for name, value in program.constants.items():
            if not isinstance(value, torch.Tensor):
                raise PackError(
                    f"the model holds a non-tensor constant {name!r} "
                    f"({type(value).__name__}); a package carries only tensors"
                )
            array = np.require(value.detach().cpu().numpy(), requirements="C")  # keeps 0-d as 0-d
            if name in out and not np.array_equal(out[name], array):
                raise PackError(f"the constant {name!r} differs between train and eval mode")
            out[name] = array
    return out


def count_parameters(model: nn.Module) -> int:
    """The number of trainable scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
