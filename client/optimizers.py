"""The training loop's optimizers: torch's SGD and Adam arithmetic without ``torch.optim``'s
classes, whose first use imports ``torch._dynamo`` (1.4-2.5 s of CPU per training process).

Contract:

* Importing this module does not import torch; making an optimizer does (it runs in the
  training worker process). Nothing here imports ``torch._dynamo``: every
  ``torch.optim.Optimizer`` method (``__init__``/``add_param_group``, ``zero_grad``,
  ``step``, ``state_dict``, ``load_state_dict``) imports it, torch's functional
  ``torch.optim.sgd.sgd`` and ``torch.optim.adam.adam`` do not (checked for torch 2.13,
  the pinned version, by tests/test_optimizers.py in a fresh process).
* :class:`SGD` and :class:`Adam` take one parameter group (a model's ``parameters()``)
  and the hyper-parameters of ``torch.optim.SGD`` / ``torch.optim.Adam`` with the same
  defaults, and :meth:`~SGD.step` calls the same functional implementation with the same
  arguments as those classes (``foreach``/``fused`` left to torch's per-device default:
  the single-tensor path on CPU), so a step gives bit-identical parameters and state to
  torch's for the same inputs. A parameter whose ``grad`` is ``None`` is skipped, as
  torch does.
* :meth:`~SGD.state_dict` has ``torch.optim``'s layout -- ``{"state": {index: {name:
  value}}, "param_groups": [group]}``, the parameters numbered in order, state only for
  parameters that have some (SGD: ``momentum_buffer`` once momentum is used; Adam:
  ``step``, a 0-d tensor on the CPU, float32 unless torch's default dtype is float64,
  ``exp_avg``, ``exp_avg_sq``) -- so a checkpoint written by either loads into the
  other. Its tensors are the live state, not copies (as torch's): the caller copies
  what it keeps.
* :meth:`~SGD.load_state_dict` checks the whole dict first (one group with as many
  parameters; each index a parameter; the names of this optimizer's state; tensors of the
  parameter's shape) and raises ``ValueError`` without changing anything when it does not
  fit; then it takes copies, cast as torch does (to the parameter's device, and its dtype
  when floating point; Adam's ``step`` as it is). The group's hyper-parameters are this
  optimizer's own: they are not read from the dict.
* :meth:`~SGD.zero_grad` sets every gradient to ``None`` (torch's default).
* :func:`make_optimizer` picks the optimizer a :class:`client.protocol.TrainingConfig`
  names; :func:`state_slots` says how many parameter-sized tensors of state it keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from client.protocol import TrainingConfig

if TYPE_CHECKING:
    import torch

__all__ = ["SGD", "Adam", "Optimizer", "make_optimizer", "state_slots"]


class Optimizer(Protocol):
    """What the training loop, the checkpoint and the epoch snapshot use of an optimizer."""

    def zero_grad(self) -> None: ...
    def step(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None: ...


class _Base:
    """One parameter group and its per-parameter state (module docstring)."""

    #: The state names this optimizer keeps per parameter.
    STATE_NAMES: frozenset[str] = frozenset()

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("an optimizer needs at least one parameter")
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def hyper(self) -> dict[str, Any]:
        """The group's hyper-parameters, as ``torch.optim`` names them."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        group = {**self.hyper(), "params": list(range(len(self.params)))}
        return {
            "state": {i: dict(s) for i, s in sorted(self.state.items())},
            "param_groups": [group],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        import torch

        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError("the optimizer state is for other parameters")
        loaded: dict[int, dict[str, torch.Tensor]] = {}
        for index, entries in state_dict["state"].items():
            i = int(index)
            if not 0 <= i < len(self.params):
                raise ValueError(f"the optimizer state names parameter {i} of {len(self.params)}")
            param = self.params[i]
            if set(entries) != self.STATE_NAMES:
                raise ValueError(f"the optimizer state of parameter {i} has {sorted(entries)}")
            values: dict[str, torch.Tensor] = {}
            for name, value in entries.items():
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"the optimizer state {i}.{name} is not a tensor")
                if name == "step":
                    if value.numel() != 1:
                        raise ValueError(f"the optimizer state {i}.step is not a scalar")
                    values[name] = value.detach().clone()
                    continue
                if value.shape != param.shape:
                    raise ValueError(f"the optimizer state {i}.{name} does not fit its parameter")
                cast = (
                    value.to(dtype=param.dtype, device=param.device)
                    if param.is_floating_point()
                    else value.to(device=param.device)
                )
                values[name] = cast.detach().clone() if cast is value else cast.detach()
            loaded[i] = values
        self.state = loaded

    def _with_grad(self) -> list[int]:
        return [i for i, p in enumerate(self.params) if p.grad is not None]


class SGD(_Base):
    """``torch.optim.SGD`` (one group; module docstring)."""

    STATE_NAMES = frozenset({"momentum_buffer"})

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params)
        self.lr = lr
        self.momentum = momentum
        self.dampening = dampening
        self.weight_decay = weight_decay
        self.nesterov = nesterov

    def hyper(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "weight_decay": self.weight_decay,
            "nesterov": self.nesterov,
            "maximize": False,
            "foreach": None,
            "differentiable": False,
            "fused": None,
        }

    def step(self) -> None:
        import torch
        from torch.optim.sgd import sgd

        indices = self._with_grad()
        params = [self.params[i] for i in indices]
        grads: list[torch.Tensor] = [p.grad for p in params if p.grad is not None]
        buffers: list[torch.Tensor | None] = (
            [self.state.get(i, {}).get("momentum_buffer") for i in indices]
            if self.momentum != 0
            else []
        )
        with torch.no_grad():
            sgd(
                params,
                grads,
                buffers,
                weight_decay=self.weight_decay,
                momentum=self.momentum,
                lr=self.lr,
                dampening=self.dampening,
                nesterov=self.nesterov,
                maximize=False,
                has_sparse_grad=any(g.is_sparse for g in grads),
                foreach=None,
                fused=None,
                grad_scale=None,
                found_inf=None,
            )
        if self.momentum != 0:
            for i, buffer in zip(indices, buffers, strict=True):
                if buffer is not None:
                    self.state.setdefault(i, {})["momentum_buffer"] = buffer


class Adam(_Base):
    """``torch.optim.Adam`` (one group, no amsgrad; module docstring)."""

    STATE_NAMES = frozenset({"step", "exp_avg", "exp_avg_sq"})

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas!r}")
        super().__init__(params)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay

    def hyper(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": False,
        }

    def step(self) -> None:
        import torch
        from torch.optim.adam import adam

        indices = self._with_grad()
        params = [self.params[i] for i in indices]
        grads: list[torch.Tensor] = [p.grad for p in params if p.grad is not None]
        for i, p in zip(indices, params, strict=True):
            if not self.state.get(i):
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients")
                # As torch.optim.Adam: the step on the CPU, float64 only when that is
                # torch's default dtype.
                default = torch.get_default_dtype()
                scalar = torch.float64 if default == torch.float64 else torch.float32
                self.state[i] = {
                    "step": torch.tensor(0.0, dtype=scalar, device="cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        states = [self.state[i] for i in indices]
        with torch.no_grad():
            adam(
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                [s["step"] for s in states],
                foreach=None,
                capturable=False,
                differentiable=False,
                fused=None,
                grad_scale=None,
                found_inf=None,
                has_complex=any(torch.is_complex(p) for p in params),
                decoupled_weight_decay=False,
                amsgrad=False,
                beta1=self.betas[0],
                beta2=self.betas[1],
                lr=self.lr,
                weight_decay=self.weight_decay,
                eps=self.eps,
                maximize=False,
            )


def make_optimizer(params: Iterable[torch.Tensor], config: TrainingConfig) -> Optimizer:
    """The optimizer ``config`` names, over ``params`` (a model's ``parameters()``)."""
    if config.optimizer == "adam":
        return Adam(params, lr=config.learning_rate)
    return SGD(params, lr=config.learning_rate, momentum=config.momentum)


def state_slots(config: TrainingConfig) -> int:
    """Parameter-sized tensors of state the optimizer of ``config`` keeps (0, 1 or 2)."""
    if config.optimizer == "adam":
        return 2
    return 1 if config.momentum > 0 else 0
