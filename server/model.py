"""The server's torch work: the initial global model and held-out evaluation.

Contract: torch is imported inside these functions only (importing this module stays
cheap, so the status models and the CLI's ``--help`` never load torch). The functions
are blocking; the server runs them in ``asyncio.to_thread`` so its loop keeps serving.
State dicts are numpy, every tensor in its own dtype (the one rule of
:func:`client.tasks.base.model_state`, which the trainer uses too: a float64 task's global
weights are float64, so its devices' updates fit them). Task errors
(:class:`client.errors.FedtrayError`) pass through unchanged.

:class:`Evaluator` keeps one model across rounds: built on its first use, each new
global is loaded into it in place (``load_state_dict`` copies into the existing
parameters), so a round never pays for building a model. It is used by one thread at a
time (:class:`server.evaluation.EvaluationQueue` evaluates one version after another, in
the background, after the version is published). It runs torch on
:data:`EVALUATION_THREADS` intra-op thread (set for the process on its first use): the
evaluation is background work within a CPU budget, and torch's thread pool spin-waits
(measured on a 2-core machine, a 0.4 MB model on 2 test samples: 10-20 ms of CPU per
evaluation with 2 threads, 0.2-0.4 ms with 1). :class:`ModelEvaluator` is what the
coordinator needs of it (tests inject a slow one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pydantic import JsonValue

from client.tasks import Task
from client.tasks.base import model_state
from client.weights import StateDict

if TYPE_CHECKING:
    import torch


def initial_state(task: Task, params: Mapping[str, JsonValue], seed: int) -> StateDict:
    """The task's freshly initialised model for ``seed``, as a numpy state dict."""
    return model_state(task.build_model(params, seed))


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


class ModelEvaluator(Protocol):
    """Evaluates a state dict on a test split (blocking; one caller at a time)."""

    def evaluate(
        self, state: StateDict, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]
    ) -> dict[str, float]: ...


#: torch's intra-op threads in a server process, from its first evaluation on.
EVALUATION_THREADS = 1


class Evaluator:
    """Held-out evaluation of successive globals with one model, loaded in place."""

    def __init__(self, task: Task, params: Mapping[str, JsonValue]) -> None:
        self._task = task
        self._params = params
        self._model: torch.nn.Module | None = None

    def evaluate(
        self, state: StateDict, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]
    ) -> dict[str, float]:
        """``{"loss", "accuracy"}`` of the model holding ``state`` on ``x``, ``y``."""
        import torch

        if self._model is None:
            if torch.get_num_threads() != EVALUATION_THREADS:
                torch.set_num_threads(EVALUATION_THREADS)
            self._model = self._task.build_model(self._params, 0)
        # from_numpy shares memory; a read-only array is copied (torch wants writable).
        tensors = {
            k: torch.from_numpy(v if v.flags.writeable else np.array(v)) for k, v in state.items()
        }
        self._model.load_state_dict(tensors)
        return self._task.evaluate(self._model, x, y)
