"""Training within the memory it may use: the batch-size cap and the out-of-memory retry.

Contract:

* Importing this module does not import torch; the torch helpers import it when called
  (they run in the training worker process).
* :func:`cap_batch_size` (pure) is the requested batch size, at most the number of
  samples, at most what fits in ``available_bytes * safety - fixed_bytes``; never below 1.
* :func:`is_out_of_memory` (pure) says whether an exception means the machine or the
  accelerator ran out of memory.
* :func:`estimate_sample_bytes` measures one sample's activations by a forward pass
  (x 3 for gradients and scratch); it leaves the model's mode and state as they were.
* :meth:`EpochSnapshot.take` copies the model, optimizer, torch RNG and position at the
  start of an epoch; :meth:`EpochSnapshot.restore` puts them back, so an epoch that ran
  out of memory is retried from exactly where it began. Neither changes the snapshot.
  Given ``reload`` (a fresh job's first epoch, whose model is its base file's weights),
  the model is not copied: :meth:`EpochSnapshot.restore` calls ``reload`` to load that
  file into it again instead (whatever ``reload`` raises passes through).
* :func:`free_accelerator_memory` releases the CUDA cache (nothing on other devices).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from client.checkpoint import Position, cpu_copy

if TYPE_CHECKING:
    import torch

    from client.optimizers import Optimizer

__all__ = [
    "DEFAULT_MEMORY_SAFETY",
    "EpochSnapshot",
    "cap_batch_size",
    "estimate_sample_bytes",
    "free_accelerator_memory",
    "is_out_of_memory",
]

#: Share of the free memory a batch may use (the rest is left to the owner of the machine).
DEFAULT_MEMORY_SAFETY = 0.25


def cap_batch_size(
    requested: int,
    num_samples: int,
    bytes_per_sample: int,
    available_bytes: int,
    *,
    fixed_bytes: int = 0,
    safety: float = DEFAULT_MEMORY_SAFETY,
) -> int:
    """The batch size to use: ``requested``, at most ``num_samples``, at most what fits.

    A batch may use ``available_bytes * safety - fixed_bytes`` (``fixed_bytes`` = model,
    gradients and optimizer state); it is never below 1.
    """
    budget = int(available_bytes * safety) - fixed_bytes
    fits = budget // max(1, bytes_per_sample)
    return max(1, min(requested, num_samples, fits))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the machine or accelerator ran out of memory."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


@dataclass
class EpochSnapshot:
    """In-memory state at the start of an epoch, to retry it after running out of memory
    (the model's state copied, or put back by ``reload``: module docstring)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor
    position: Position
    reload: Callable[[], object] | None = None

    @classmethod
    def take(
        cls,
        model: torch.nn.Module,
        optimizer: Optimizer,
        position: Position,
        reload: Callable[[], object] | None = None,
    ) -> EpochSnapshot:
        import torch

        state = optimizer.state_dict()
        return cls(
            model=(
                {}
                if reload is not None
                else {k: cpu_copy(v) for k, v in model.state_dict().items()}
            ),
            # A new optimizer's state dict holds no tensor, and is built afresh by each
            # call (client.optimizers): nothing in it to copy.
            optimizer=copy.deepcopy(state) if state["state"] else state,
            rng=torch.get_rng_state(),
            position=_copy_position(position),
            reload=reload,
        )

    def restore(self, model: torch.nn.Module, optimizer: Optimizer) -> Position:
        """Put the model, optimizer and RNG back; return a copy of the position."""
        import torch

        if self.reload is not None:
            self.reload()
        else:
            model.load_state_dict(self.model)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        torch.set_rng_state(self.rng)
        return _copy_position(self.position)


def _copy_position(position: Position) -> Position:
    """An independent copy of ``position`` (its sample order cloned)."""
    order = None if position.order is None else position.order.clone()
    return dataclasses.replace(position, order=order)


def free_accelerator_memory(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def estimate_sample_bytes(model: torch.nn.Module, one_sample: torch.Tensor) -> int:
    """Activations of one sample (measured by a forward pass) x 3 for gradients and scratch."""
    import torch

    total = 0

    def count(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    model.eval()  # no dropout draws, no batch-norm statistics updates
    try:
        with torch.no_grad():
            model(one_sample)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return max(1, 3 * total + one_sample.numel() * one_sample.element_size())
