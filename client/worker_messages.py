"""The typed seam between the session, the training worker and a trainer.

Contract:

* Pure data and interfaces: no I/O, no threads, and importing it never imports torch
  (the session process uses every name here). Every value is a frozen dataclass that
  pickles, so it crosses the worker pipe as is; nothing is tagged by a string.
* :class:`TrainJob` is one local round to train. ``work_key`` names the work (see
  :func:`client.workfiles.work_key`): it is computed ONCE, where the job is built
  (:meth:`client.workfiles.WorkDir.job`), and names the checkpoint and output files,
  decides which leftover files are stale and is the identity a checkpoint is trusted by.
* :class:`TrainProgress` is the ONE shape of training progress from a trainer to the
  worker's owner; the owner turns it into the wire's
  :class:`client.protocol.TrainingProgress` (its field names are the wire's).
* Commands go parent -> child: :class:`Warm`, :class:`Submit`, :class:`Pause`,
  :class:`Resume`, :class:`Cancel`, :class:`SetBudget`, :class:`Exit`. Messages go
  child -> parent: the events (:data:`WorkerEvent`: :class:`ProgressEvent`,
  :class:`Paused`, :class:`Resumed` and exactly one of :class:`Done`, :class:`Failed`,
  :class:`Cancelled` per job) and
  :class:`LogRecord` (a child log line, logged by the parent, never an event).
* Federated evaluation: :class:`EvalJob` (a global version to evaluate on the device's
  own test split) is handed over with :class:`Evaluate`; the child answers it with
  exactly one of :class:`EvalDone` (an :class:`EvalResult`) or :class:`EvalFailed`
  (also when cancelled). An evaluation writes nothing: no checkpoint, no output. A
  trainer that can evaluate implements :class:`Evaluator` (``evaluate(job, control)``).
* :class:`Trainer` is what trains a job: :class:`client.trainer.LocalTrainer` (torch)
  and :class:`client.simulation.SimulatedTrainer` implement it. A trainer asks its
  :class:`TrainControl` at every batch boundary and raises :class:`JobCancelled` when
  told to cancel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from pydantic import JsonValue

from client.atomicfile import FileIdentity
from client.budget import check_budget
from client.errors import ErrorCode
from client.protocol import Partition, TrainingConfig

__all__ = [
    "DEFAULT_CHECKPOINT_INTERVAL",
    "Cancel",
    "Cancelled",
    "ChildMessage",
    "Command",
    "Done",
    "EvalDone",
    "EvalFailed",
    "EvalJob",
    "EvalResult",
    "Evaluate",
    "Evaluator",
    "Exit",
    "Failed",
    "JobCancelled",
    "LogRecord",
    "NeverInterrupt",
    "Pause",
    "Paused",
    "ProgressCallback",
    "ProgressEvent",
    "Resume",
    "Resumed",
    "SetBudget",
    "Submit",
    "TrainControl",
    "TrainJob",
    "TrainProgress",
    "TrainResult",
    "Trainer",
    "Warm",
    "WorkerCommand",
    "WorkerEvent",
]

#: Seconds of training between periodic checkpoints (the work a ``kill -9`` may lose).
DEFAULT_CHECKPOINT_INTERVAL = 30.0

#: A control's answer at a batch boundary.
Command = Literal["run", "pause", "cancel"]


# -- the job and its result ---------------------------------------------------------------


@dataclass(frozen=True)
class TrainJob:
    """One local round to train; plain, picklable data (it crosses the worker pipe).

    ``base_weights_path`` is a safetensors file of the global model, or ``None`` to start
    from ``task.build_model(model_params, config.seed)``; ``base_sha256`` is its SHA-256
    as the job's builder knew it (the trainer refuses a file that differs, with
    ``stale_base``). ``base_identity`` is the base file's
    :class:`client.atomicfile.FileIdentity` when the builder verified the file's SHA-256
    itself (the session's :class:`client.global_store.GlobalStore` did, on arrival): a
    file with that identity is not hashed again (it is still fully validated while
    decoded); one with another identity changed since and is refused ``stale_base``.
    ``work_key`` names the work (module docstring); a job built without
    one gets it derived by the trainer from the job itself, by the same function.
    ``torch_threads=None`` lets the worker choose (all cores but one).
    ``checkpoint_interval``: seconds of training between periodic checkpoints; 0 writes
    checkpoints only when paused.
    :attr:`proximal_mu` is FedProx's mu for this round, read from ``config`` (the wire's
    ``config.proximalMu``, so it is part of the work key like every other config value):
    the trainer adds ``(mu/2)||w - w_base||^2`` to the task's loss for every batch, and
    nothing at all when it is 0 (:mod:`client.proximal`).
    ``package_path`` (with its ``package_sha256``) is a task package (``.fedtask``): the
    task is then built from it (:func:`client.taskpkg.task.load_packaged_task`), not
    looked up by ``task``; ``data_path`` (with ``data_sha256``) is this device's share of
    its training data (safetensors ``x``, ``y``), already partitioned: it is trained on
    whole, not partitioned again.
    """

    round_id: str
    task: str
    model_params: dict[str, JsonValue]
    config: TrainingConfig
    partition: Partition
    base_weights_path: Path | None
    output_path: Path
    checkpoint_path: Path
    torch_threads: int | None = None
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    work_key: str | None = None
    base_sha256: str | None = None
    package_path: Path | None = None
    package_sha256: str | None = None
    data_path: Path | None = None
    data_sha256: str | None = None
    base_identity: FileIdentity | None = None

    @property
    def proximal_mu(self) -> float:
        """FedProx's mu of this round (0: plain local training); ``config.proximal_mu``."""
        return self.config.proximal_mu


@dataclass(frozen=True)
class TrainResult:
    """A finished round: where the weights are and what training measured.

    ``metrics`` holds ``trainLoss`` (mean loss of the last epoch), ``trainAccuracy`` (the
    trained model on the partition), ``seconds`` (training time without pauses) and
    ``batchSize``; ``batch_size`` is the effective batch size. ``sha256`` and ``size``
    describe the output file's bytes, computed while writing them (``None`` when the
    trainer did not compute them), so the file need not be read and hashed again.
    """

    round_id: str
    output_path: Path
    num_samples: int
    metrics: dict[str, float]
    batch_size: int
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class TrainProgress:
    """Where a running round is; field names and meanings are those of
    :class:`client.protocol.TrainingProgress` (``epoch`` and ``step`` count from 1).

    It is also what the session's snapshot shows; the session converts it, in one
    place, into the wire message (:func:`client.session.rounds.wire_progress`).
    """

    round_id: str
    epoch: int
    epochs: int
    step: int
    steps: int
    fraction: float
    loss: float | None = None
    samples_per_sec: float | None = None
    batch_size: int | None = None


ProgressCallback = Callable[[TrainProgress], None]


# -- how a trainer is steered -------------------------------------------------------------


class JobCancelled(Exception):  # noqa: N818 -- exported as client.trainer.Cancelled
    """Training stopped because the control said ``"cancel"``."""


class TrainControl(Protocol):
    """How the owner steers a running round; asked at every batch boundary."""

    def check(self) -> Command:
        """``"run"`` to go on, ``"pause"`` to checkpoint and wait, ``"cancel"`` to stop."""
        ...

    def wait_while_paused(self) -> None:
        """Block until the pause is lifted (resumed or cancelled); called after a checkpoint."""
        ...


class NeverInterrupt:
    """A :class:`TrainControl` that always says ``"run"``."""

    def check(self) -> Command:
        return "run"

    def wait_while_paused(self) -> None:
        return None


class Trainer(Protocol):
    """Trains one job: reports progress, obeys ``control``, writes ``job.output_path``.

    Raises :class:`JobCancelled` when cancelled, :class:`client.errors.FedtrayError` with
    a code for a job it cannot train; anything else is a crash (``training_failed``).
    """

    @property
    def checkpoints(self) -> bool:
        """Whether a pause writes a checkpoint first (reported in :class:`Paused`)."""
        ...

    def run(
        self,
        job: TrainJob,
        control: TrainControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TrainResult: ...


@dataclass(frozen=True)
class EvalJob:
    """One federated evaluation: global version ``version`` (the file at
    ``base_weights_path``, verified by the session on arrival: ``base_identity`` and
    ``base_sha256`` as in :class:`TrainJob`) on this device's test split of ``partition``
    (or the package's / the device's own data, as in :class:`TrainJob`). ``eval_id``
    labels it in events; ``torch_threads`` as in :class:`TrainJob`."""

    eval_id: str
    version: int
    task: str
    model_params: dict[str, JsonValue]
    partition: Partition
    base_weights_path: Path
    base_sha256: str | None = None
    base_identity: FileIdentity | None = None
    package_path: Path | None = None
    package_sha256: str | None = None
    data_path: Path | None = None
    data_sha256: str | None = None
    torch_threads: int | None = None


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation measured: mean ``loss`` and ``accuracy`` over ``num_samples``
    test samples; ``holdout`` is True when the task had no test split and a holdout of
    the device's train data was used."""

    eval_id: str
    version: int
    loss: float
    accuracy: float
    num_samples: int
    holdout: bool = False


class Evaluator(Protocol):
    """A trainer that can also evaluate a global version (:class:`EvalJob`).

    Raises :class:`JobCancelled` when ``control`` says cancel (or pause: an evaluation is
    not checkpointed, it is abandoned), :class:`client.errors.FedtrayError` for a job it
    cannot evaluate."""

    def evaluate(self, job: EvalJob, control: TrainControl | None = None) -> EvalResult: ...


# -- parent -> child ----------------------------------------------------------------------


@dataclass(frozen=True)
class Warm:
    """Get ready to train (import the trainer and torch) while idle; no event answers it."""


@dataclass(frozen=True)
class Submit:
    """Train ``job`` (the child is idle)."""

    job: TrainJob


@dataclass(frozen=True)
class Pause:
    """Checkpoint at the next batch boundary and wait."""


@dataclass(frozen=True)
class Resume:
    """Go on after a pause."""


@dataclass(frozen=True)
class Cancel:
    """Stop the job at the next batch boundary, deleting its checkpoint."""


@dataclass(frozen=True)
class SetBudget:
    """Keep this CPU budget from the next batch boundary on, in this job and the next.

    ``cores`` torch threads (at most the job's own ``torch_threads`` when it sets one) and
    at most ``cores * cpu_percent / 100`` CPU-seconds per wall-second, kept by sleeping at
    batch boundaries (:mod:`client.budget`); raises ``ValueError`` unless ``cores >= 1``
    and ``1 <= cpu_percent <= 100``."""

    cores: int
    cpu_percent: int

    def __post_init__(self) -> None:
        check_budget(self.cores, self.cpu_percent)

    def describe(self) -> str:
        """``"1 core at 50 %"``."""
        return f"{self.cores} core{'' if self.cores == 1 else 's'} at {self.cpu_percent} %"


@dataclass(frozen=True)
class Exit:
    """Leave the process (a running job stays checkpointed: it is not cancelled)."""


@dataclass(frozen=True)
class Evaluate:
    """Evaluate ``job`` (the child is idle); answered by EvalDone or EvalFailed."""

    job: EvalJob


WorkerCommand = Warm | Submit | Evaluate | Pause | Resume | Cancel | SetBudget | Exit


# -- child -> parent ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressEvent:
    """Training progress, at most one per the worker's progress interval plus the last."""

    progress: TrainProgress


@dataclass(frozen=True)
class Paused:
    """The job is paused; ``checkpointed`` is True when a checkpoint was written first."""

    checkpointed: bool
    round_id: str | None = None


@dataclass(frozen=True)
class Resumed:
    """The paused job runs again."""

    round_id: str | None = None


@dataclass(frozen=True)
class Done:
    """The job finished; the weights are at ``result.output_path``. ``progress``: the
    round's last progress when no :class:`ProgressEvent` carried it (a job that ended
    within the child's first progress interval; see :mod:`client.worker_child`), for
    the session's snapshot only."""

    result: TrainResult
    progress: TrainProgress | None = None


@dataclass(frozen=True)
class Failed:
    """The job failed; ``code`` is an :data:`client.errors.ErrorCode`."""

    code: ErrorCode
    message: str
    round_id: str | None = None


@dataclass(frozen=True)
class Cancelled:
    """The job stopped after a :class:`Cancel`."""

    round_id: str | None = None


@dataclass(frozen=True)
class LogRecord:
    """A log line of the child (``client.*``, INFO and above), re-logged by the parent."""

    level: int
    name: str
    text: str


@dataclass(frozen=True)
class EvalDone:
    """The evaluation finished."""

    result: EvalResult


@dataclass(frozen=True)
class EvalFailed:
    """The evaluation failed or was cancelled (``code`` ``paused`` then)."""

    eval_id: str
    code: ErrorCode
    message: str


WorkerEvent = ProgressEvent | Paused | Resumed | Done | Failed | Cancelled | EvalDone | EvalFailed
ChildMessage = WorkerEvent | LogRecord
