"""Local training of one federated round: :class:`LocalTrainer` and its job/result types.

Contract:

* :class:`LocalTrainer` is the torch :class:`client.worker_messages.Trainer`. Importing
  this module does not import torch (it re-exports the seam's :class:`TrainJob`,
  :class:`TrainResult` and :class:`Cancelled`, which the session process needs);
  :meth:`LocalTrainer.run` imports it. ``run`` is meant to execute in the training
  worker process. Progress is reported as :class:`client.worker_messages.TrainProgress`
  after every batch (unthrottled: the worker throttles).
* The task comes from :func:`resolve_task`: a job naming a task package is trained on
  the task built from it (the worker is the only process that loads a package), its
  data share loaded whole; any other job's task is looked up by name.
* The base file must have the SHA-256 the job names (``job.base_sha256``, when set),
  else ``FedtrayError('stale_base')`` before any training. A job carrying the file's
  ``base_identity`` (its SHA-256 verified by the session) is not hashed again: the file
  opened must have that identity, else ``stale_base`` (:func:`client.kept_model.read_base`).
* One :class:`LocalTrainer` keeps the model it built (with its task and layout) for the
  next job of the same task, parameters, package and data share
  (:class:`client.kept_model.KeptModel`): a job with base weights loads them into that
  model in place (every tensor of the state dict is overwritten, and the optimizer is
  new), so the result is the same as with a freshly built model. A job without base
  weights always builds a fresh model from the seed. The gradients are released at the
  end of a job. The built model also keeps the training data of the parts it was given
  (:func:`client.kept_model.train_data`: loaded and partitioned once per part) and what
  the batch-size cap measured of it (a sample's and the parameters' bytes).
* The optimizer is :func:`client.optimizers.make_optimizer`'s: torch's SGD / Adam
  arithmetic, bit for bit, without ``torch.optim``'s classes (which import
  ``torch._dynamo``, seconds of CPU, on first use); no part of a job imports
  ``torch._dynamo``.
* ``run`` reads the base weights (safetensors, via :mod:`client.weights`) and checks them
  against the task's model: a different layout raises :class:`client.errors.FedtrayError`
  ``layout_mismatch`` / ``shape_mismatch`` / ``dtype_mismatch`` before any training.
* It trains ``config.epochs`` epochs over the device's partition. Each epoch's sample
  order comes from a ``torch.Generator`` seeded by ``(config.seed, partition.index,
  epoch)``, so a run is reproducible; on CPU with a fixed thread count it is
  bit-for-bit reproducible. Torch's global RNG (the model's dropout draws) is seeded
  from ``(config.seed, partition.index)`` when a run starts fresh.
* FedProx: with ``job.proximal_mu`` (mu) > 0 every batch back-propagates the task's loss
  plus ``(mu/2)||w - w_base||^2`` (:mod:`client.proximal`), ``w_base`` being a detached
  copy of the trainable float parameters taken right after the base weights are loaded
  (held on the model's device for the run: one more copy of the parameters). It is not
  in checkpoints: a resumed run takes it again from the same base file, so it is the
  same. Progress and ``trainLoss`` report the task's loss alone. With mu == 0 nothing
  is computed or added: the run is FedAvg's, byte for byte.
* At every batch boundary it asks ``control.check()``: ``"pause"`` first writes a
  checkpoint (model, optimizer state, RNG states, epoch, position, sample order, running
  loss sums, batch size) to ``job.checkpoint_path`` -- tensors as safetensors, the rest as
  JSON in the safetensors metadata, never pickle, written atomically -- then calls
  ``control.wait_while_paused()``; ``"cancel"`` raises :class:`Cancelled`.
* It also writes that checkpoint at the first batch boundary after every
  ``job.checkpoint_interval`` seconds of training (0 disables), so a ``kill -9`` of the
  process loses at most about that much work. Writing a checkpoint reads the state and
  changes nothing, so it never changes the result.
* A later ``run`` of a job with the same work key (:func:`client.workfiles.work_key`:
  task, parameters, config, partition and base weights; taken from ``job.work_key``, or
  derived from the job by that same function when the job carries none) resumes from
  that checkpoint -- whatever its ``round_id``: the result is a pure function of those
  inputs, the round id only labels the envelope -- logging
  ``resuming round <id> from epoch E step S``, and produces weights bit-identical to an
  uninterrupted run (also in a fresh process). A checkpoint of anything else, or an
  unreadable one, is deleted and ignored. The checkpoint is deleted when the round
  finishes or is cancelled; it is kept when training fails otherwise.
* :meth:`LocalTrainer.evaluate` (federated evaluation, an
  :class:`client.worker_messages.EvalJob`) is :func:`client.evaluation.evaluate_global`
  with this trainer's kept model: it writes nothing and raises :class:`Cancelled` when
  the control says pause or cancel (an evaluation is abandoned, never checkpointed).
* The batch size is ``config.batch_size`` capped by the memory available
  (:func:`cap_batch_size`; the machine's available memory is read at most once per
  :data:`FREE_MEMORY_TTL_S`, an accelerator's at every job); when an epoch runs out of
  memory anyway, it is retried from the state at the start of the epoch with half the
  batch size, down to 1, after which
  ``FedtrayError('training_failed')`` is raised. A fresh job's first epoch keeps no copy
  of its model for that (:class:`client.train_memory.EpochSnapshot` with ``reload``): its
  model is its base file's weights, so a retry loads that file again, checked as the
  first load was (``stale_base`` if it is no longer there: the device has since held two
  newer globals). The effective batch size is reported.
* The result's ``trainAccuracy`` is the task's ``evaluate`` accuracy of the trained
  model on its training data (:func:`client.train_metrics.train_accuracy`: the same
  value computed directly, without the loss or mode switches, for a task with
  :class:`~client.tasks.base.Task`'s own ``evaluate`` and ``train_step`` and a
  mode-free model: plain modules, no forward hooks).
* The trained state dict (:func:`client.tasks.base.model_state`: every tensor in its own
  dtype; for a CPU model the kept arrays over its memory,
  :func:`client.kept_model.cpu_arrays`) is written as safetensors to ``job.output_path``
  atomically: readers see the old file or the whole new one; its size and SHA-256
  (hashed as written) are in the :class:`TrainResult`. Every file write and delete goes
  through :class:`client.workfiles.JobFiles`.

Its parts: the checkpoint format and :class:`client.checkpoint.Position` live in
:mod:`client.checkpoint`, the batch-size cap and the out-of-memory retry in
:mod:`client.train_memory`, the kept model, the task resolution and the base file in
:mod:`client.kept_model`, federated evaluation in :mod:`client.evaluation`, the optimizers
in :mod:`client.optimizers`, ``trainAccuracy`` in :mod:`client.train_metrics`; this module
runs the loop over them.
Its names (``cap_batch_size``, ``is_out_of_memory``, ``DEFAULT_MEMORY_SAFETY``, ``resolve_task``,
``data_partition``, the seam's job types) stay importable from here.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import psutil

from client.checkpoint import (
    CheckpointClock,
    Position,
    StaleCheckpointError,
    checkpoint_bytes,
    load_checkpoint,
)
from client.errors import FedtrayError
from client.evaluation import evaluate_global
from client.kept_model import (
    BuiltModel,
    KeptModel,
    TaskLoader,
    cpu_arrays,
    data_partition,
    load_base,
    resolve_task,
    train_data,
)
from client.optimizers import Optimizer, make_optimizer, state_slots
from client.protocol import TrainingConfig
from client.proximal import ProximalAnchor, proximal_anchor
from client.tasks import get_task
from client.tasks.base import Task, model_state
from client.train_memory import (
    DEFAULT_MEMORY_SAFETY,
    EpochSnapshot,
    cap_batch_size,
    estimate_sample_bytes,
    free_accelerator_memory,
    is_out_of_memory,
)
from client.train_metrics import mode_free, train_accuracy
from client.weights import encode_parts
from client.worker_messages import (
    DEFAULT_CHECKPOINT_INTERVAL,
    Command,
    EvalJob,
    EvalResult,
    JobCancelled as Cancelled,
    NeverInterrupt,
    ProgressCallback,
    TrainControl,
    TrainJob,
    TrainProgress,
    TrainResult,
)
from client.workfiles import JobFiles, work_key

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_CHECKPOINT_INTERVAL",
    "DEFAULT_MEMORY_SAFETY",
    "Cancelled",
    "Command",
    "LocalTrainer",
    "NeverInterrupt",
    "ProgressCallback",
    "TrainControl",
    "TrainJob",
    "TrainResult",
    "cap_batch_size",
    "data_partition",
    "epoch_seed",
    "is_out_of_memory",
    "resolve_task",
    "warm_up",
]

log = logging.getLogger(__name__)


#: Seconds a reading of the machine's available memory (the batch-size cap) is used for:
#: rounds a few milliseconds long do not read ``/proc/meminfo`` each.
FREE_MEMORY_TTL_S = 1.0

#: The ``epoch`` argument of :func:`epoch_seed` that seeds torch's global RNG (dropout).
MODEL_RNG_STREAM = 1 << 32


@functools.lru_cache(maxsize=256)
def epoch_seed(seed: int, partition_index: int, epoch: int) -> int:
    """The shuffle seed of one epoch, mixed by numpy's SeedSequence (fits torch's uint64);
    pure, so remembered for the next rounds."""
    state = np.random.SeedSequence([seed, partition_index, epoch]).generate_state(
        1, dtype=np.uint64
    )
    return int(state[0])


class LocalTrainer:
    """The torch trainer: trains one round of a task on this machine (module docstring).

    ``task_loader`` resolves a task name and parameters (default
    :func:`client.tasks.get_task`); ``device`` forces ``"cpu"``/``"cuda"``/``"mps"``
    (default: CUDA, else MPS, else CPU); ``memory_safety`` is the share of free memory a
    batch may use; ``available_memory`` overrides the free-memory probe (bytes).
    """

    def __init__(
        self,
        *,
        task_loader: TaskLoader = get_task,
        device: str | None = None,
        memory_safety: float = DEFAULT_MEMORY_SAFETY,
        available_memory: Callable[[], int] | None = None,
    ) -> None:
        self._device_name = device
        self._memory_safety = memory_safety
        self._available_memory = available_memory
        self._kept = KeptModel(task_loader)
        self._free_read: tuple[float, int] | None = None  # (monotonic time, bytes)
        self._found_device: torch.device | None = None

    # -- public -------------------------------------------------------------------------

    @property
    def checkpoints(self) -> bool:
        """True: a pause writes a checkpoint first."""
        return True

    def run(
        self,
        job: TrainJob,
        control: TrainControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TrainResult:
        """Train ``job`` and write its weights; see the module docstring.

        Raises :class:`Cancelled`, :class:`client.errors.FedtrayError` (``bad_request``,
        ``unknown_task``, ``stale_base``, a weights code, ``training_failed``) or the
        task's own errors.
        """
        import torch

        ctl: TrainControl = control or NeverInterrupt()
        report: ProgressCallback = on_progress or (lambda _p: None)
        device = self._device()
        built = self._kept.for_training(job, device)
        task, model = built.task, built.model
        data = train_data(built, job, device)
        x_np, y_np, x, y = data.x_np, data.y_np, data.x, data.y
        n = len(y_np)
        if n == 0:
            raise FedtrayError("bad_request", "this device's data partition holds no samples")
        base_sha = "none"
        if job.base_weights_path is not None:
            base_sha = load_base(built, job, f"round {job.round_id}")
        fingerprint = _work_key_of(job, base_sha)
        files = JobFiles.of(job)
        # FedProx: the round's base, taken before a checkpoint's weights are restored.
        anchor = proximal_anchor(model, job.proximal_mu)
        # Over every parameter of the model: its zero_grad is the model's (set to None).
        optimizer = make_optimizer(model.parameters(), job.config)
        optimizer.zero_grad()
        if not all(m.training for m in model.modules()):  # a kept model is in train mode
            model.train()

        position = self._resume(job, files, fingerprint, model, optimizer, device)
        # A fresh job's model starts as the base file: its first epoch is retried (after
        # running out of memory) from that file, not from an in-memory copy of the model.
        from_base = position is None and job.base_weights_path is not None
        if position is None:
            # The model's own random draws (dropout) start from the job's seed, so a run
            # is reproducible; a resumed run restores the RNG from its checkpoint.
            seed = epoch_seed(job.config.seed, job.partition.index, MODEL_RNG_STREAM)
            if device.type == "cpu":
                # The generator a CPU model draws from, seeded as torch.manual_seed seeds
                # it; without the accelerators' lazy seeding, which records a traceback
                # per call (0.2 ms of a job's CPU at 0.4 MB).
                torch.default_generator.manual_seed(seed)
            else:
                torch.manual_seed(seed)
            batch = self._initial_batch_size(built, x[:1], job.config, n, device)
            position = Position(batch_size=batch)
        periodic = CheckpointClock(job.checkpoint_interval)
        try:
            while position.epoch < job.config.epochs:
                snapshot = EpochSnapshot.take(
                    model,
                    optimizer,
                    position,
                    # A fresh job's first epoch: its model is the base file's weights.
                    reload=(lambda: load_base(built, job, f"round {job.round_id}"))
                    if from_base and position.epoch == 0
                    else None,
                )
                try:
                    self._train_epoch(
                        job,
                        task,
                        model,
                        optimizer,
                        x,
                        y,
                        position,
                        ctl,
                        report,
                        files,
                        fingerprint,
                        periodic,
                        anchor=anchor,
                    )
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    if position.batch_size <= 1:
                        raise FedtrayError(
                            "training_failed",
                            "ran out of memory even with a batch size of 1",
                        ) from exc
                    smaller = max(1, position.batch_size // 2)
                    log.warning(
                        "out of memory at batch size %d; retrying the epoch with %d",
                        position.batch_size,
                        smaller,
                    )
                    position = snapshot.restore(model, optimizer)
                    position.batch_size = smaller
                    free_accelerator_memory(device)
        except Cancelled:
            files.discard_checkpoint()
            raise

        optimizer.zero_grad()  # the kept model holds no gradients between jobs
        if built.mode_free is None:
            built.mode_free = mode_free(model)
        accuracy = train_accuracy(task, model, (x_np, y_np, x, y), direct=built.mode_free)
        # Written and hashed from the model's own tensors (no copy of the document).
        pieces = encode_parts(cpu_arrays(built) or model_state(model))
        digest = files.write_output(pieces)
        size = sum(memoryview(p).nbytes for p in pieces)
        del pieces
        files.discard_checkpoint()
        metrics = {
            "trainLoss": position.last_epoch_loss,
            "trainAccuracy": accuracy,
            "seconds": position.train_seconds,
            "batchSize": float(position.batch_size),
        }
        return TrainResult(
            round_id=job.round_id,
            output_path=job.output_path,
            num_samples=n,
            metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
            batch_size=position.batch_size,
            sha256=digest,
            size=size,
        )

    # -- training -----------------------------------------------------------------------

    def _train_epoch(
        self,
        job: TrainJob,
        task: Task,
        model: torch.nn.Module,
        optimizer: Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        position: Position,
        control: TrainControl,
        report: ProgressCallback,
        files: JobFiles,
        fingerprint: str,
        periodic: CheckpointClock,
        anchor: ProximalAnchor | None = None,
    ) -> None:
        import torch

        n = len(y)
        epochs = job.config.epochs
        if position.order is None:
            gen = torch.Generator().manual_seed(
                epoch_seed(job.config.seed, job.partition.index, position.epoch)
            )
            position.order = torch.randperm(n, generator=gen)
        while position.pos < n:
            command = control.check()
            if command == "pause":
                self._save_checkpoint(job, files, fingerprint, model, optimizer, position)
                while command == "pause":
                    control.wait_while_paused()
                    command = control.check()
                periodic.reset()  # just written; time paused is not training time
            if command == "cancel":
                raise Cancelled(f"round {job.round_id} was cancelled")
            if periodic.due():
                self._save_checkpoint(job, files, fingerprint, model, optimizer, position)
                periodic.reset()
            started = time.perf_counter()
            bs = position.batch_size
            idx = position.order[position.pos : position.pos + bs].to(x.device)
            optimizer.zero_grad()
            loss = task.train_step(model, x[idx], y[idx])
            objective = loss if anchor is None else loss + anchor.term(model)
            objective.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            value = float(loss.detach().item())
            taken = len(idx)
            position.loss_sum += value * taken
            position.loss_count += taken
            position.pos += taken
            elapsed = time.perf_counter() - started
            position.train_seconds += elapsed
            steps = math.ceil(n / bs)
            report(
                TrainProgress(
                    round_id=job.round_id,
                    epoch=position.epoch + 1,
                    epochs=epochs,
                    step=math.ceil(position.pos / bs),
                    steps=steps,
                    fraction=min(1.0, (position.epoch * n + position.pos) / (epochs * n)),
                    loss=value if math.isfinite(value) else None,
                    samples_per_sec=taken / elapsed if elapsed > 0 else None,
                    batch_size=bs,
                )
            )
        position.last_epoch_loss = position.loss_sum / max(1, position.loss_count)
        position.epoch += 1
        position.pos = 0
        position.loss_sum = 0.0
        position.loss_count = 0
        position.order = None

    def _device(self) -> torch.device:
        """The device jobs run on: found once per trainer (torch's accelerators do not
        come and go within a process)."""
        if self._found_device is None:
            self._found_device = self._find_device()
        return self._found_device

    def _find_device(self) -> torch.device:
        import torch

        if self._device_name is not None:
            return torch.device(self._device_name)
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

    def _free_bytes(self, device: torch.device) -> int:
        import torch

        if self._available_memory is not None:
            return self._available_memory()
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free)
        now = time.monotonic()
        if self._free_read is None or now - self._free_read[0] >= FREE_MEMORY_TTL_S:
            self._free_read = (now, int(psutil.virtual_memory().available))
        return self._free_read[1]

    def _initial_batch_size(
        self,
        built: BuiltModel,
        one_sample: torch.Tensor,
        config: TrainingConfig,
        n: int,
        device: torch.device,
    ) -> int:
        if built.sizes is None:  # measured once per built model (a sample's shape is fixed)
            task, model = built.task, built.model
            per_sample = task.sample_bytes_hint(task.params) or estimate_sample_bytes(
                model, one_sample
            )
            param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            built.sizes = (per_sample, param_bytes)
        per_sample, param_bytes = built.sizes
        slots = state_slots(config)
        slots += 1 if config.proximal_mu > 0 else 0  # FedProx's copy of the base
        batch = cap_batch_size(
            config.batch_size,
            n,
            per_sample,
            self._free_bytes(device),
            fixed_bytes=param_bytes * (1 + slots),
            safety=self._memory_safety,
        )
        if batch < min(config.batch_size, n):
            log.info("batch size capped from %d to %d by free memory", config.batch_size, batch)
        return batch

    def evaluate(self, job: EvalJob, control: TrainControl | None = None) -> EvalResult:
        """Evaluate global ``job.version`` on this device's test split
        (:func:`client.evaluation.evaluate_global`, with this trainer's kept model).

        Raises :class:`Cancelled`, :class:`client.errors.FedtrayError` (``stale_base``, a
        weights code, ``bad_request`` when there is no data to evaluate on).
        """
        return evaluate_global(job, control or NeverInterrupt(), self._kept, self._device())

    # -- checkpoints --------------------------------------------------------------------

    def _save_checkpoint(
        self,
        job: TrainJob,
        files: JobFiles,
        fingerprint: str,
        model: torch.nn.Module,
        optimizer: Optimizer,
        position: Position,
    ) -> None:
        data = checkpoint_bytes(
            round_id=job.round_id,
            fingerprint=fingerprint,
            model=model,
            optimizer=optimizer,
            position=position,
        )
        files.write_checkpoint(data)
        log.debug(
            "checkpointed round %s at epoch %d step %d",
            job.round_id,
            position.epoch + 1,
            position.step,
        )

    def _resume(
        self,
        job: TrainJob,
        files: JobFiles,
        fingerprint: str,
        model: torch.nn.Module,
        optimizer: Optimizer,
        device: torch.device,
    ) -> Position | None:
        path = job.checkpoint_path
        if not path.exists():
            return None
        try:
            position = load_checkpoint(path, fingerprint, model, optimizer, device)
        except StaleCheckpointError as exc:
            log.info("ignoring checkpoint %s: %s", path, exc)
        except Exception:
            log.warning("ignoring unreadable checkpoint %s", path, exc_info=True)
        else:
            log.info(
                "resuming round %s from epoch %d step %d",
                job.round_id,
                position.epoch + 1,
                position.step,
            )
            return position
        files.discard_checkpoint()
        return None


def warm_up() -> None:
    """Pay a first job's one-time costs now (importing torch, the first autograd pass and
    optimizer step), on a throwaway parameter: no random number is drawn and nothing is
    kept, so no result changes. The optimizers are :mod:`client.optimizers`' (torch.optim's
    classes, whose first use imports ``torch._dynamo``, are never used)."""
    import torch

    from client.optimizers import SGD, Adam

    param = torch.zeros(2, requires_grad=True)
    for optimizer in (SGD([param], lr=0.1, momentum=0.9), Adam([param], lr=0.1)):
        optimizer.zero_grad()
        loss = (param * param).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()


def _work_key_of(job: TrainJob, base_sha: str) -> str:
    """The job's work key; a job built without one gets it from the same function."""
    if job.work_key is not None:
        return job.work_key
    return work_key(
        task=job.task,
        model_params=job.model_params,
        config=job.config,
        partition=job.partition,
        base_version=0,
        base_sha256=base_sha,
        package_sha256=job.package_sha256,
        data_sha256=job.data_sha256,
    )
