"""FedProx's proximal term: (mu/2)||w - w_global||^2 over a model's trainable parameters.

Contract (torch is imported only inside functions; the training worker is the one caller):

* :func:`proximal_anchor` takes the round's base: a detached copy of every trainable
  floating-point parameter of the model (``requires_grad`` and a float dtype, in
  ``named_parameters()`` order, on the parameter's own device and in its dtype) as it is
  when called, i.e. right after the round's base weights were loaded. Buffers (batch-norm
  statistics, counters) are not part of it. ``mu == 0`` gives ``None``: no copy is made
  and the caller adds nothing, so a round without FedProx runs exactly the operations
  of plain FedAvg training (bit-identical results, not ``loss + 0 * term``).
* :meth:`ProximalAnchor.term` is ``(mu/2) * sum_p ||p - p0||^2`` as a scalar tensor in the
  autograd graph of the model's parameters: its gradient with respect to ``p`` is
  ``mu * (p - p0)``. It is added to the task's loss outside the task, so built-in
  tasks, plugin tasks and task packages (whose exported program computes only the
  outputs, or even the loss) get it alike, on the parameters themselves.
* The anchor is never written to a checkpoint: it is a pure function of the base
  weights, which a resumed run loads again from the same file before the checkpoint's
  state is restored, so the anchor of a resumed run equals the uninterrupted run's.
* Raises ``ValueError`` for a negative or non-finite ``mu`` (the wire already refuses
  one); never changes the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["ProximalAnchor", "is_anchored", "proximal_anchor"]


@dataclass(frozen=True)
class ProximalAnchor:
    """The round's base parameters ``p0`` and the weight ``mu`` of the proximal term."""

    mu: float
    names: tuple[str, ...]
    base: tuple[torch.Tensor, ...]

    def term(self, model: torch.nn.Module) -> torch.Tensor:
        """``(mu/2) * sum ||p - p0||^2`` over the anchored parameters of ``model``."""
        params = dict(model.named_parameters())
        total: torch.Tensor | None = None
        for name, p0 in zip(self.names, self.base, strict=True):
            part = (params[name] - p0).pow(2).sum()
            total = part if total is None else total + part
        if total is None:  # a model without trainable float parameters
            import torch

            return torch.zeros(())
        return total * (self.mu / 2)


def is_anchored(param: torch.Tensor) -> bool:
    """Whether a parameter takes part in the proximal term: trainable and floating point."""
    return param.requires_grad and param.is_floating_point()


def proximal_anchor(model: torch.nn.Module, mu: float) -> ProximalAnchor | None:
    """The anchor at ``model``'s current weights, or ``None`` when ``mu`` is 0 (module
    docstring); raises ``ValueError`` for a negative or non-finite ``mu``."""
    if not math.isfinite(mu) or mu < 0:
        raise ValueError(f"the proximal mu must be a finite number >= 0, got {mu!r}")
    if mu == 0:
        return None
    names: list[str] = []
    base: list[torch.Tensor] = []
    for name, param in model.named_parameters():
        if is_anchored(param):
            names.append(name)
            base.append(param.detach().clone())
    return ProximalAnchor(mu=mu, names=tuple(names), base=tuple(base))
