"""The trainer's kept model: a job's task and model, built once and reused, and its base file.

Contract (torch is imported only inside functions; the training worker is the one caller):

* :class:`KeptModel` owns at most one built task and model (:class:`BuiltModel`, with its
  layout). :meth:`KeptModel.for_training` returns the kept one for a job of the same
  :func:`model_key` (task, parameters, package and data files, device; not the partition)
  that has base weights -- the caller loads them in place -- and otherwise builds a fresh
  one from ``job.config.seed``: a job without base weights always starts from a freshly
  built model. :meth:`KeptModel.for_evaluation` returns the kept one for the same key
  whatever the job (an evaluation always loads its global), else builds one (seed 0).
  Either way the new one is kept; the old one is let go before building.
* :func:`train_data` is a job's training data (the task's ``load_data("train", ...)``
  of :func:`data_partition`, and its tensors on the job's device), loaded once and kept
  with the built model for the later jobs of that partition: a task's data is a pure
  function of its parameters, files and partition (:class:`client.tasks.base.Task`),
  which the kept model's key and the partition pin. On the CPU the parts of one
  partitioning (same count, seed, scheme and alpha: disjoint rows) are kept side by side,
  as a device is given another part from round to round, so at most one train split is
  held (the tensors share the arrays' memory); on an accelerator only the last part.
  Another partitioning or device drops what was kept. The kept numpy arrays are made
  read-only (every job shares them).
* :func:`resolve_task` is THE task resolution of a job: a job with a package builds the
  task from it (:func:`client.taskpkg.task.load_packaged_task`, which never unpickles or
  runs anything from the package); any other job looks its task up by name.
  :func:`data_partition` is the partition its data is loaded with (``None`` when the
  job's data file is the device's share already).
* :func:`read_base` returns the base file's bytes (mapped read-only, not copied) and
  SHA-256. A job whose file identity is vouched for (``base_identity`` and
  ``base_sha256`` set: the session verified it) is not hashed again, but the file
  opened must have that identity; any other file is hashed and must match
  ``base_sha256`` when set. Else ``FedtrayError('stale_base')``; a file that cannot be
  read raises ``FedtrayError('training_failed')``.
* :func:`load_base` reads the base file (:func:`read_base`), decodes it against the
  built model's layout (a different layout raises the weights codes
  ``layout_mismatch`` / ``shape_mismatch`` / ``dtype_mismatch`` before the model is
  touched) and copies it into the model in place, every tensor of its state dict
  overwritten: by ``load_state_dict``, or, for a model whose modules load their state
  plainly (no module overrides it, no state-dict hooks), by copying each tensor into its
  state-dict tensor directly, which is what ``load_state_dict`` does for such a model.
  A file vouched for by its identity (the session verified it) loaded into such a model
  on the CPU is read straight into the model's own memory (no map, no copy through one):
  its identity, length, header and layout are checked first, as :func:`decode_views`
  checks them, so a file refused for any of those leaves the model untouched; its values
  are checked as read (NaN/Inf: ``non_finite``, bool bytes), so a file refused for them
  leaves the model holding them, which no job uses: every job loads its base whole (or
  builds a fresh model) before it trains or evaluates.
* :func:`cpu_arrays` is a kept CPU model's state as numpy arrays over the model's own
  memory (what the base is read into, and what an update is written from), made once
  per built model and re-checked at every call (each tensor's dtype, shape and address).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import JsonValue

from client.atomicfile import FileIdentity, file_identity
from client.errors import FedtrayError
from client.protocol import Partition, TrainingConfig
from client.tasks import get_task
from client.tasks.base import Task, model_state
from client.weights import (
    MAX_HEADER_BYTES,
    Layout,
    StateDict,
    check_head,
    check_values,
    decode_views,
    layout_of,
    sha256_hex,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "BaseJob",
    "BuiltModel",
    "KeptModel",
    "PartKey",
    "TaskJob",
    "TaskLoader",
    "TrainData",
    "cpu_arrays",
    "data_partition",
    "load_base",
    "model_key",
    "read_base",
    "resolve_task",
    "train_data",
]

#: A safetensors document's first 8 bytes: its header's length (little-endian).
_HEADER_LEN = struct.Struct("<Q")

#: Resolves a task by name and parameters (default :func:`client.tasks.get_task`).
TaskLoader = Callable[[str, Mapping[str, JsonValue]], Task]


class TaskJob(Protocol):
    """What decides a job's task and model (a training or an evaluation job)."""

    @property
    def task(self) -> str: ...
    @property
    def model_params(self) -> dict[str, JsonValue]: ...
    @property
    def partition(self) -> Partition: ...
    @property
    def package_path(self) -> Path | None: ...
    @property
    def package_sha256(self) -> str | None: ...
    @property
    def data_path(self) -> Path | None: ...
    @property
    def data_sha256(self) -> str | None: ...


class BaseJob(Protocol):
    """Where a job's base weights are and how they were verified."""

    @property
    def base_weights_path(self) -> Path | None: ...
    @property
    def base_sha256(self) -> str | None: ...
    @property
    def base_identity(self) -> FileIdentity | None: ...


class _TrainingJob(TaskJob, BaseJob, Protocol):
    @property
    def config(self) -> TrainingConfig: ...


@dataclass
class BuiltModel:
    """A built task and model, kept for the next job of the same ``key``; ``data``: the
    training data loaded for it (:func:`train_data`), and ``sizes``: what the trainer
    measured of it once, both kept with it."""

    key: str
    task: Task
    model: torch.nn.Module
    layout: Layout
    data: dict[PartKey, TrainData] = field(default_factory=dict)
    #: (bytes one training sample needs, bytes of the parameters), once measured.
    sizes: tuple[int, int] | None = None
    #: Whether torch's load_state_dict is a plain copy for this model (:func:`load_base`).
    plain: bool | None = None
    #: Whether the model's output is the same in train and eval mode
    #: (:func:`client.train_metrics.mode_free`), once asked.
    mode_free: bool | None = None
    #: :func:`cpu_arrays`' last answer: per state-dict name, the tensor's dtype, address
    #: and shape then, and the array over its memory.
    arrays: dict[str, tuple[torch.dtype, int, tuple[int, ...], npt.NDArray[Any]]] | None = None


def _loads_plainly(model: torch.nn.Module) -> bool:
    """Whether ``model.load_state_dict`` only copies each tensor in place: no module
    overrides how it loads or saves its state, and none has a state-dict hook."""
    from torch import nn

    for module in model.modules():
        kind = type(module)
        if (
            kind.load_state_dict is not nn.Module.load_state_dict
            or kind.state_dict is not nn.Module.state_dict
            or kind._load_from_state_dict is not nn.Module._load_from_state_dict
            or kind._save_to_state_dict is not nn.Module._save_to_state_dict
            or kind.set_extra_state is not nn.Module.set_extra_state
            or module._load_state_dict_pre_hooks
            or module._load_state_dict_post_hooks
            or module._state_dict_hooks
            or module._state_dict_pre_hooks
        ):
            return False
    return True


#: What picks a job's rows: the partition's (index, count, seed, scheme, alpha), or
#: ``None`` for a job whose data file is its share already.
PartKey = tuple[int, int, int, str, float] | None


@dataclass(frozen=True)
class TrainData:
    """A job's training data on ``device``: the task's numpy arrays (read-only) and the
    tensors made from them."""

    device: str
    x_np: npt.NDArray[Any]
    y_np: npt.NDArray[Any]
    x: torch.Tensor
    y: torch.Tensor


def _part_key(partition: Partition | None) -> PartKey:
    if partition is None:
        return None
    return (partition.index, partition.count, partition.seed, partition.scheme, partition.alpha)


def train_data(built: BuiltModel, job: TaskJob, device: torch.device) -> TrainData:
    """The training data of ``job`` for ``built``'s task on ``device`` (module docstring)."""
    import torch

    key = _part_key(data_partition(job))
    kept = built.data.get(key)
    if kept is not None and kept.device == str(device):
        return kept
    same_split = (
        key is not None
        and device.type == "cpu"
        and all(
            k is not None and k[1:] == key[1:] and d.device == str(device)
            for k, d in built.data.items()
        )
    )
    if not same_split:
        built.data.clear()  # the old arrays go before the new ones are loaded
    x_np, y_np = built.task.load_data("train", data_partition(job))
    x = torch.as_tensor(x_np).to(device)
    y = torch.as_tensor(y_np).to(device)
    # Shared by every job from now on: no task's evaluate may change them in place.
    x_np.flags.writeable = False
    y_np.flags.writeable = False
    built.data[key] = TrainData(str(device), x_np, y_np, x, y)
    return built.data[key]


class KeptModel:
    """The one kept :class:`BuiltModel` of a trainer (module docstring)."""

    def __init__(self, task_loader: TaskLoader = get_task) -> None:
        self._task_loader = task_loader
        self._built: BuiltModel | None = None

    def for_training(self, job: _TrainingJob, device: torch.device) -> BuiltModel:
        key = model_key(job, str(device))
        kept = self._built
        if kept is not None and kept.key == key and job.base_weights_path is not None:
            return kept
        return self._build(job, key, job.config.seed, device)

    def for_evaluation(self, job: TaskJob, device: torch.device) -> BuiltModel:
        key = model_key(job, str(device))
        kept = self._built
        if kept is not None and kept.key == key:
            return kept
        return self._build(job, key, 0, device)

    def _build(self, job: TaskJob, key: str, seed: int, device: torch.device) -> BuiltModel:
        self._built = None  # let the old model go before building the new one
        task, _partition = resolve_task(job, self._task_loader)
        model = task.build_model(task.params, seed)
        layout = layout_of(model_state(model))
        model.to(device)
        self._built = BuiltModel(key, task, model, layout)
        return self._built


def model_key(job: TaskJob, device: str) -> str:
    """What decides the model a job builds (its weights aside): task, parameters, files.
    Not the partition: it picks the data, not the model (a device is given another part
    from round to round)."""
    return json.dumps(
        [
            job.task,
            job.model_params,
            str(job.package_path),
            job.package_sha256,
            str(job.data_path),
            job.data_sha256,
            device,
        ],
        sort_keys=True,
    )


def resolve_task(job: TaskJob, task_loader: TaskLoader = get_task) -> tuple[Task, Partition | None]:
    """THE task resolution of a job: the task, and the partition to load its data with
    (module docstring)."""
    if job.package_path is None:
        return task_loader(job.task, job.model_params), data_partition(job)
    from client.taskpkg.task import load_packaged_task

    task = load_packaged_task(job.package_path, job.data_path)
    return task, data_partition(job)


def data_partition(job: TaskJob) -> Partition | None:
    """The partition a job loads its task's data with: ``None`` when its data file is the
    device's share already (loaded whole), else the job's partition."""
    if job.package_path is not None and job.data_path is not None:
        return None
    return job.partition


def _stale_base(of: str) -> FedtrayError:
    """The refusal of a base file that is no longer the one the job names."""
    return FedtrayError(
        "stale_base", f"the base weights file changed: it is no longer the base of {of}"
    )


def read_base(job: BaseJob, of: str) -> tuple[bytes | mmap.mmap, str]:
    """The base file's bytes (a read-only map of the file: the page cache's own pages, no
    copy; the caller closes it) and SHA-256, hashed only when its identity is not vouched
    for (module docstring); raises ``stale_base`` or ``training_failed``. ``of`` names
    what the file is the base of (``round r3``), for the message. The held globals'
    files are never rewritten in place (each version has its own file), so the map
    stays what was opened."""
    assert job.base_weights_path is not None
    stale = _stale_base(of)
    try:
        with job.base_weights_path.open("rb") as fh:
            # The identity of the file opened, so a replace after this cannot slip in.
            trusted = job.base_identity is not None and job.base_sha256 is not None
            if trusted and file_identity(fh.fileno()) != job.base_identity:
                raise stale
            raw: bytes | mmap.mmap = (
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                if os.fstat(fh.fileno()).st_size
                else b""
            )
    except (OSError, ValueError) as exc:
        raise FedtrayError("training_failed", f"cannot read the base weights: {exc}") from exc
    if trusted:
        assert job.base_sha256 is not None
        return raw, job.base_sha256
    sha = sha256_hex(memoryview(raw))
    if job.base_sha256 is not None and sha != job.base_sha256:
        if isinstance(raw, mmap.mmap):
            # Unmapped now, not when the error is freed: Windows cannot delete a mapped
            # file, and the global store deletes older globals.
            raw.close()
        raise stale
    return raw, sha


def load_base(built: BuiltModel, job: BaseJob, of: str) -> str:
    """Read ``job``'s base file (:func:`read_base`), decode it against ``built``'s layout
    and copy it into its model in place (module docstring); return its SHA-256."""
    import torch

    if built.plain is None:
        built.plain = _loads_plainly(built.model)
    if built.plain and job.base_identity is not None and job.base_sha256 is not None:
        arrays = _cpu_targets(built)
        if arrays is not None:
            _read_into(job, of, built.layout, arrays)
            return job.base_sha256
    raw, sha = read_base(job, of)
    base: StateDict | None = None
    try:
        # Every check of decode(), over the file's mapped bytes (no copy): load_state_dict
        # copies them into the model's own tensors, in place, once.
        base = decode_views(raw, expected=built.layout)
        with warnings.catch_warnings():  # read-only arrays: torch only reads them here
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(v) for k, v in base.items()}
            if built.plain:
                # What load_state_dict does for such a model, without its per-module walk:
                # every tensor of the state dict copied over in place (the layout matched).
                targets = built.model.state_dict(keep_vars=True)
                with torch.no_grad():
                    for name, tensor in tensors.items():
                        targets[name].copy_(tensor)
            else:
                built.model.load_state_dict(tensors)
    finally:
        base = None  # the views of the map, released before it is closed (errors too)
        if isinstance(raw, mmap.mmap):
            with contextlib.suppress(BufferError):  # a view still held: closed when freed
                raw.close()
    return sha


def _iov_max() -> int:
    """Buffers one ``preadv`` call may fill: the OS's limit, else 16 (POSIX's least)."""
    try:
        limit = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):  # no sysconf, or no such name
        return 16
    return limit if limit > 0 else 16  # -1: indeterminate


_IOV_MAX = _iov_max()

#: Bytes of a base file read first: its header's length and (mostly) the header itself;
#: a longer header is read on. The header check reads only the header out of it.
_HEAD_READ = 4096


def cpu_arrays(built: BuiltModel) -> dict[str, npt.NDArray[Any]] | None:
    """The model's state-dict tensors as writable numpy arrays over their own memory (the
    arrays :func:`client.tasks.base.model_state` gives for a dense CPU model), or ``None``
    when one is not a dense tensor on the CPU of a dtype numpy has. Made once and given
    again while every tensor of the state dict is still of that dtype and shape at that
    address (checked at every call, so the arrays are always over the model's memory)."""
    tensors = built.model.state_dict(keep_vars=True)
    kept = built.arrays
    if kept is not None and kept.keys() == tensors.keys():
        for name, (dtype, address, shape, _arr) in kept.items():
            tensor = tensors[name]
            if not (
                tensor.dtype == dtype
                and tensor.data_ptr() == address
                and tensor.shape == shape
                and tensor.device.type == "cpu"
                and tensor.is_contiguous()
            ):
                break
        else:
            return {name: entry[3] for name, entry in kept.items()}
    built.arrays = None
    made: dict[str, tuple[torch.dtype, int, tuple[int, ...], npt.NDArray[Any]]] = {}
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
        try:
            arr = tensor.detach().numpy()
        except (TypeError, RuntimeError):
            return None
        made[name] = (tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), arr)
    built.arrays = made
    return {name: entry[3] for name, entry in made.items()}


def _cpu_targets(built: BuiltModel) -> dict[str, npt.NDArray[Any]] | None:
    """:func:`cpu_arrays`, or ``None`` when this OS cannot read into several buffers at
    once."""
    if not hasattr(os, "preadv") or sys.byteorder != "little":
        return None
    return cpu_arrays(built)


def _read_into(job: BaseJob, of: str, layout: Layout, targets: dict[str, npt.NDArray[Any]]) -> None:
    """The vouched-for base file read straight into ``targets`` (the model's own memory):
    its identity, length and header checked against ``layout`` first (nothing is written
    before that), then its values, as read (module docstring)."""
    assert job.base_weights_path is not None
    try:
        fd = os.open(job.base_weights_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise FedtrayError("training_failed", f"cannot read the base weights: {exc}") from exc
    try:
        identity = file_identity(fd)
        if identity != job.base_identity:
            raise _stale_base(of)
        total = identity.size
        # The length and, for any model's usual header, the whole header in one read.
        head = os.pread(fd, _HEAD_READ, 0)
        if len(head) >= _HEADER_LEN.size:
            (header_len,) = _HEADER_LEN.unpack_from(head)
            body_start = _HEADER_LEN.size + header_len
            if len(head) < body_start and header_len <= min(
                total - _HEADER_LEN.size, MAX_HEADER_BYTES
            ):
                head += os.pread(fd, body_start - len(head), len(head))
        entries, body_start = check_head(head, total, expected=layout)
        buffers = []
        for name, dtype, shape, _offset in sorted(entries, key=lambda e: e[3]):
            target = targets[name]
            if target.dtype != dtype or target.shape != shape:
                raise FedtrayError(
                    "training_failed", f"the model's tensor {name!r} is not {dtype} {shape}"
                )
            if target.nbytes:
                buffers.append(target.reshape(-1).view(np.uint8).data)
        _pread_exactly(fd, buffers, body_start)
    except OSError as exc:
        raise FedtrayError("training_failed", f"cannot read the base weights: {exc}") from exc
    finally:
        os.close(fd)
    check_values(targets)


def _pread_exactly(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Fill ``buffers`` in order from ``offset`` of ``fd`` (``OSError`` at the file's end)."""
    views = list(buffers)
    i = 0
    while i < len(views):
        got = os.preadv(fd, views[i : i + _IOV_MAX], offset)
        if got <= 0:
            raise OSError(f"the file ends at byte {offset}")
        offset += got
        while got and i < len(views):
            if got >= views[i].nbytes:
                got -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][got:]
                got = 0
