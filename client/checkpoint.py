"""The training checkpoint: where training is (:class:`Position`), and its file format.

Contract:

* Importing this module does not import torch; the functions import it when called (they
  run in the training worker process).
* :func:`checkpoint_bytes` encodes the model, the optimizer state, the torch / numpy /
  Python RNG states, the epoch, the position in it, its sample order, the running loss
  sums and the batch size: tensors as safetensors, everything else as JSON in the
  safetensors metadata -- never pickle. It only reads the state it is given (writing a
  checkpoint never changes a result); writing the bytes, atomically, is the caller's
  job (:class:`client.workfiles.JobFiles`).
* :func:`load_checkpoint` restores a checkpoint into the model, the optimizer and the
  global RNGs and returns its :class:`Position`. A checkpoint of another work key, of
  another format version, or whose tensors do not fit the model or the optimizer
  (:meth:`client.optimizers.SGD.load_state_dict`'s checks) raises
  :class:`StaleCheckpointError`; an unreadable one raises whatever reading raised. Either
  way it changes nothing: everything is built and checked first, then applied.
* The optimizer state has ``torch.optim``'s layout (:mod:`client.optimizers` keeps it),
  so checkpoints written while the trainer used ``torch.optim``'s classes still load:
  the format version is unchanged.
* :class:`CheckpointClock` says when the next periodic checkpoint is due (monotonic
  clock; ``interval`` 0 disables it).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import numpy as np
from pydantic import JsonValue

if TYPE_CHECKING:
    import torch

    from client.optimizers import Optimizer

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointClock",
    "Position",
    "StaleCheckpointError",
    "checkpoint_bytes",
    "cpu_copy",
    "load_checkpoint",
]

CHECKPOINT_VERSION: Final = 2  # 2: the fingerprint is the work key
_META_KEY: Final = "fedtray.checkpoint"


@dataclass
class Position:
    """Where training is; everything here goes into a checkpoint."""

    batch_size: int
    epoch: int = 0
    pos: int = 0  # samples of this epoch already trained
    loss_sum: float = 0.0
    loss_count: int = 0
    last_epoch_loss: float = math.nan
    train_seconds: float = 0.0
    order: torch.Tensor | None = None  # this epoch's sample order

    @property
    def step(self) -> int:
        """The 1-based step of this epoch already trained (0 at its start)."""
        return math.ceil(self.pos / self.batch_size)

    def meta(self) -> dict[str, JsonValue]:
        return {
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "pos": self.pos,
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "last_epoch_loss": None if math.isnan(self.last_epoch_loss) else self.last_epoch_loss,
            "train_seconds": self.train_seconds,
        }


class CheckpointClock:
    """When the next periodic checkpoint is due (monotonic clock; time paused excluded)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.interval > 0 and time.monotonic() - self.last >= self.interval

    def reset(self) -> None:
        self.last = time.monotonic()


class StaleCheckpointError(Exception):
    """The checkpoint belongs to another job."""


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy of ``tensor``."""
    return tensor.detach().to(device="cpu", copy=True).contiguous()


def checkpoint_bytes(
    *,
    round_id: str,
    fingerprint: str,
    model: torch.nn.Module,
    optimizer: Optimizer,
    position: Position,
) -> bytes:
    """The checkpoint of this state as safetensors bytes (module docstring)."""
    import torch
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": cpu_copy(v) for k, v in model.state_dict().items()
    }
    scalars: dict[str, JsonValue] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            name = f"{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}"] = cpu_copy(value)
            else:
                scalars[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if position.order is not None:
        tensors["order"] = position.order.clone()
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    meta = {
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        "round_id": round_id,
        "position": position.meta(),
        "optim_scalars": scalars,
        "numpy_rng": [
            np_state[0],
            np.asarray(np_state[1]).tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python_rng": _json_tuple(random.getstate()),
    }
    data: bytes = save(tensors, metadata={_META_KEY: json.dumps(meta)})
    return data


def load_checkpoint(
    path: Path,
    fingerprint: str,
    model: torch.nn.Module,
    optimizer: Optimizer,
    device: torch.device,
) -> Position:
    """Restore the checkpoint at ``path`` (module docstring); raises on a stale one."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = json.loads((fh.metadata() or {})[_META_KEY])
        if meta.get("version") != CHECKPOINT_VERSION or meta.get("fingerprint") != fingerprint:
            raise StaleCheckpointError("it was written for another job")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 -- not a dict
    # Build everything first, then apply: a bad checkpoint changes nothing.
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    current = model.state_dict()
    if model_state.keys() != current.keys() or any(
        v.shape != current[k].shape or v.dtype != current[k].dtype for k, v in model_state.items()
    ):
        raise StaleCheckpointError("its tensors do not fit the model")
    optim_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            index, _, name = key[len("optim.") :].partition(".")
            optim_state.setdefault(int(index), {})[name] = value
    for key, scalar in meta["optim_scalars"].items():
        index, _, name = key.partition(".")
        optim_state.setdefault(int(index), {})[name] = scalar
    pos = meta["position"]
    last = pos["last_epoch_loss"]
    position = Position(
        batch_size=int(pos["batch_size"]),
        epoch=int(pos["epoch"]),
        pos=int(pos["pos"]),
        loss_sum=float(pos["loss_sum"]),
        loss_count=int(pos["loss_count"]),
        last_epoch_loss=math.nan if last is None else float(last),
        train_seconds=float(pos["train_seconds"]),
        order=tensors.get("order"),
    )
    name, keys, np_pos, has_gauss, cached = meta["numpy_rng"]
    np_rng = (str(name), np.asarray(keys, dtype=np.uint32), int(np_pos), int(has_gauss), cached)
    py_rng = _tuple_json(meta["python_rng"])

    groups = optimizer.state_dict()["param_groups"]
    try:  # checks the whole state before it changes anything
        optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    except ValueError as exc:
        raise StaleCheckpointError(f"its optimizer state does not fit: {exc}") from exc
    model.load_state_dict(model_state)
    model.to(device)
    torch.set_rng_state(tensors["rng.torch"])
    np.random.set_state(np_rng)
    random.setstate(py_rng)
    return position


def _json_tuple(value: object) -> JsonValue:
    """random.getstate() (nested tuples of ints/floats/None) as JSON lists."""
    if isinstance(value, tuple):
        return [_json_tuple(v) for v in value]
    return value  # type: ignore[return-value]


def _tuple_json(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuple_json(v) for v in value)
    return value
