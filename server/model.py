"""The server's torch work: the initial global model and held-out evaluation.

Contract: torch is imported inside these functions only (importing this module stays
cheap, so the status models and the CLI's ``--help`` never load torch). The functions
are blocking; the server runs them in ``asyncio.to_thread`` so its loop keeps serving.
State dicts are numpy: floating tensors as float32, other tensors in their own dtype.
Task errors (:class:`client.errors.FedtrayError`) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import JsonValue

from client.tasks import Task
from client.weights import StateDict

if TYPE_CHECKING:
    import torch


def to_numpy_state(model: torch.nn.Module) -> StateDict:
    """The model's state dict as numpy arrays (floats as float32, others unchanged)."""
    out: StateDict = {}
    for name, tensor in model.state_dict().items():
        arr = tensor.detach().cpu().numpy()
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        out[name] = np.ascontiguousarray(arr)
    return out


def initial_state(task: Task, params: Mapping[str, JsonValue], seed: int) -> StateDict:
    """The task's freshly initialised model for ``seed``, as a numpy state dict."""
    return to_numpy_state(task.build_model(params, seed))


def evaluate_state(
    task: Task,
    params: Mapping[str, JsonValue],
    state: StateDict,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of the model holding ``state`` on ``x``, ``y``."""
    import torch

    model = task.build_model(params, 0)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return task.evaluate(model, x, y)
