"""The reference server's settings: one frozen dataclass, checked when it is built.

Contract: :class:`ServerConfig` holds every setting the server reads (network, task,
round policy, local-training hyper-parameters, aggregation strategy, persistence, auth,
transfer limits).
:meth:`ServerConfig.transfer_budget` is the pure rule for how much a device (and all of
them together) may have the server hold in partial uploads, given the model's size.
:func:`add_partition_flags` declares ``--partition``/``--partition-alpha`` once for
``fedtray-server`` and ``demo``, :func:`partition_problem` is their one check, and
:meth:`ServerConfig.partition_of` builds the partition each device is sent.
Building one with an out-of-range value raises :class:`ConfigError` (a ``ValueError``)
whose message is one plain line naming the setting as its command-line flag. Nothing
here performs I/O except :func:`default_state_dir`, which only computes a path.
Tokens are held here but never appear in ``repr()``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import platformdirs

from client.protocol import (
    DEFAULT_PARTITION_ALPHA,
    MAX_PARTITION_ALPHA,
    PARTITION_SCHEMES,
    Limits,
    Partition,
    PartitionScheme,
)
from client.transfer import MESSAGE_MARGIN_BYTES, REFERENCE_CHUNK_BYTES, message_limit
from server.ratelimit import RateLimits
from server.strategies.settings import StrategySettings

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PARTITION",
    "DEFAULT_PORT",
    "MESSAGE_MARGIN_BYTES",
    "OPEN_UPLOADS_PER_DEVICE",
    "UPDATE_MARGIN_BYTES",
    "UPDATE_SIZE_FACTOR",
    "ConfigError",
    "ServerConfig",
    "TransferBudget",
    "add_partition_flags",
    "default_state_dir",
    "partition_problem",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3001
#: Federated evaluation of every new version by default (``--evaluate-every N``, 0 = off);
#: a round due for it waits for its evaluators before the next round opens (server.fedeval).
DEFAULT_EVALUATE_EVERY: Final = 1
#: An update document may be this many times the model's tensor bytes (a json document of
#: float32 tensors is about 6 times its safetensors), plus UPDATE_MARGIN_BYTES of header.
UPDATE_SIZE_FACTOR = 8
UPDATE_MARGIN_BYTES = 64 * 1024
#: Uploads one device may have open at once: one being resent beside a new one, and spare.
OPEN_UPLOADS_PER_DEVICE = 4


@dataclass(frozen=True)
class TransferBudget:
    """What the server holds in partial uploads (announced totals; see BlobStore)."""

    #: The largest update the server expects: min(maxBlobBytes, 8 x model + 64 KiB).
    update_bytes: int
    #: Per device: two updates (one being resent beside a new one).
    per_device: int
    #: All devices together: ``max_transfer_bytes``, else ``clients_per_round`` devices'.
    total: int
    #: Open uploads per device.
    open_per_device: int = OPEN_UPLOADS_PER_DEVICE


class ConfigError(ValueError):
    """A setting is out of range; the message is one line naming the flag."""


#: The data partition a server uses unless ``--partition`` says otherwise.
DEFAULT_PARTITION: PartitionScheme = "label_skew"


def add_partition_flags(p: argparse.ArgumentParser) -> None:
    """``--partition`` and ``--partition-alpha`` (``fedtray-server`` and its ``demo``)."""
    p.add_argument(
        "--partition",
        choices=PARTITION_SCHEMES,
        default=DEFAULT_PARTITION,
        help=f"how the task's data is split over the devices (default: {DEFAULT_PARTITION}; "
        "docs/tasks.md)",
    )
    p.add_argument(
        "--partition-alpha",
        type=float,
        default=None,
        help="Dirichlet concentration of --partition dirichlet: smaller, more label skew "
        f"(default: {DEFAULT_PARTITION_ALPHA:g})",
    )


def partition_problem(scheme: str, alpha: float | None) -> str | None:
    """One line saying what is wrong with ``--partition``/``--partition-alpha``, or None."""
    if scheme not in PARTITION_SCHEMES:
        return f"--partition must be one of {', '.join(PARTITION_SCHEMES)}, got {scheme!r}"
    if alpha is None:
        return None
    if scheme != "dirichlet":
        return f"--partition-alpha applies to --partition dirichlet only, not {scheme}"
    if not (_finite(alpha) and 0 < alpha <= MAX_PARTITION_ALPHA):
        return f"--partition-alpha must be in (0, {MAX_PARTITION_ALPHA:g}], got {alpha}"
    return None


def default_state_dir() -> Path:
    """Where global weights and history live unless ``--state-dir`` says otherwise."""
    return Path(platformdirs.user_data_dir("fedtray-server", appauthor=False))


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of one server process (see ``fedtray-server --help``)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    task: str = "digits"
    #: A task package (.fedtask) to train instead of an installed task; ``task`` is then
    #: its manifest's name (``fedtray-server --task-file`` sets both).
    task_file: Path | None = None
    #: Overrides merged over the task's default model parameters.
    model_params: dict[str, Any] = field(default_factory=dict)
    rounds: int = 0  # 0 = run forever
    min_clients: int = 2
    clients_per_round: int = 10
    round_timeout: float = 300.0
    min_completion: float = 0.5
    #: Local training settings; None takes the task's recommendation (its default_config).
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    partition: PartitionScheme = DEFAULT_PARTITION
    #: ``--partition-alpha`` (dirichlet only); None: the scheme's default.
    partition_alpha: float | None = None
    seed: int = 0
    heartbeat_interval: float = 10.0
    state_dir: Path = field(default_factory=default_state_dir)
    tokens: tuple[str, ...] = field(default=(), repr=False)
    log_level: str = "INFO"
    limits: Limits = field(default_factory=lambda: Limits(max_chunk_bytes=REFERENCE_CHUNK_BYTES))
    #: Seconds a device has to acknowledge ``training:start`` or one weights message.
    ack_timeout: float = 30.0
    #: Partial blobs untouched this long are dropped.
    blob_ttl: float = 600.0
    #: Bytes of partial uploads (announced totals, on disk in ``state_dir/blobs``) held for
    #: all devices together; None derives it from the model (:meth:`transfer_budget`).
    max_transfer_bytes: int | None = None
    #: The "round N waiting: ..." line is repeated at least this often while nothing changes.
    wait_log_interval: float = 30.0
    #: Pause after an abandoned round before the next attempt (0 = heartbeat interval).
    retry_delay: float = 0.0
    #: PEM certificate (chain) and its key: with both, the port serves HTTPS and WSS.
    certfile: Path | None = None
    keyfile: Path | None = None
    #: Per-connection event budgets (flood protection).
    rate_limits: RateLimits = field(default_factory=RateLimits)
    #: The aggregation strategy and its parameters (``--strategy``, ``--clip-norm``, ...).
    strategy: StrategySettings = field(default_factory=StrategySettings)
    #: Federated evaluation: every this many versions, devices evaluate the new global on
    #: their own test split (``--evaluate-every``; 0 = never). :mod:`server.fedeval`.
    evaluate_every: int = DEFAULT_EVALUATE_EVERY

    def training_overrides(self) -> dict[str, Any]:
        """The local training settings given explicitly, as TrainingConfig fields."""
        given = {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.lr}
        overrides = {key: value for key, value in given.items() if value is not None}
        mu = self.strategy.proximal_mu_sent
        if mu > 0:
            overrides["proximal_mu"] = mu  # FedProx: every round's config carries mu
        return overrides

    def partition_of(self, index: int, count: int) -> Partition:
        """The data partition of the device given part ``index`` of ``count``."""
        alpha = DEFAULT_PARTITION_ALPHA if self.partition_alpha is None else self.partition_alpha
        return Partition(
            index=index, count=count, seed=self.seed, scheme=self.partition, alpha=alpha
        )

    def __post_init__(self) -> None:
        _check(bool(self.host.strip()), "--host must not be empty")
        _check(0 <= self.port <= 65535, f"--port must be 0-65535, got {self.port}")
        _check(bool(self.task.strip()), "--task must not be empty")
        _check(self.rounds >= 0, f"--rounds must be 0 (forever) or more, got {self.rounds}")
        _check(self.min_clients >= 1, f"--min-clients must be at least 1, got {self.min_clients}")
        _check(
            self.clients_per_round >= self.min_clients,
            f"--clients-per-round ({self.clients_per_round}) must be at least "
            f"--min-clients ({self.min_clients})",
        )
        _check(
            _finite(self.round_timeout) and self.round_timeout > 0,
            f"--round-timeout must be a positive number of seconds, got {self.round_timeout}",
        )
        _check(
            _finite(self.min_completion) and 0 < self.min_completion <= 1,
            f"--min-completion must be a fraction in (0, 1], got {self.min_completion}",
        )
        _check(
            self.epochs is None or 1 <= self.epochs <= 1000,
            f"--epochs must be 1-1000, got {self.epochs}",
        )
        _check(
            self.batch_size is None or 1 <= self.batch_size <= 1_000_000,
            f"--batch-size must be 1-1000000, got {self.batch_size}",
        )
        _check(
            self.lr is None or (_finite(self.lr) and 0 < self.lr <= 10),
            f"--lr must be in (0, 10], got {self.lr}",
        )
        problem = partition_problem(self.partition, self.partition_alpha)
        _check(problem is None, problem or "")
        _check(self.seed >= 0, f"--seed must be 0 or more, got {self.seed}")
        _check(
            _finite(self.heartbeat_interval) and 0 < self.heartbeat_interval <= 3600,
            f"--heartbeat-interval must be in (0, 3600] seconds, got {self.heartbeat_interval}",
        )
        _check(all(t.strip() for t in self.tokens), "a --token must not be empty")
        for name in ("ack_timeout", "blob_ttl", "wait_log_interval"):
            value = getattr(self, name)
            _check(_finite(value) and value > 0, f"{name} must be positive, got {value}")
        _check(
            self.max_transfer_bytes is None or self.max_transfer_bytes >= 1,
            f"--max-transfer-bytes must be at least 1, got {self.max_transfer_bytes}",
        )
        _check(
            _finite(self.retry_delay) and self.retry_delay >= 0,
            f"retry_delay must be 0 or more, got {self.retry_delay}",
        )
        _check(
            self.evaluate_every >= 0,
            f"--evaluate-every must be 0 (off) or more, got {self.evaluate_every}",
        )
        problem = self.strategy.problem()
        _check(problem is None, problem or "")
        _check(
            (self.certfile is None) == (self.keyfile is None),
            "--certfile and --keyfile go together: give both to serve HTTPS, or neither",
        )

    @property
    def tls(self) -> bool:
        """True when the server serves HTTPS/WSS (a certificate and key are set)."""
        return self.certfile is not None and self.keyfile is not None

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``."""
        return "https" if self.tls else "http"

    @property
    def max_message_bytes(self) -> int:
        """The Engine.IO ``max_http_buffer_size``: one chunk plus the envelope margin. A
        message over it closes that connection (the transport's limit, not a refusal)."""
        return message_limit(self.limits.max_chunk_bytes)

    def transfer_budget(self, model_bytes: int) -> TransferBudget:
        """The budgets of partial uploads for a model of ``model_bytes`` tensor bytes."""
        expected = UPDATE_SIZE_FACTOR * model_bytes + UPDATE_MARGIN_BYTES
        update = min(self.limits.max_blob_bytes, expected)
        per_device = 2 * update
        total = self.max_transfer_bytes
        if total is None:
            total = self.clients_per_round * per_device
        return TransferBudget(update_bytes=update, per_device=min(per_device, total), total=total)

    @property
    def effective_retry_delay(self) -> float:
        """Seconds to wait after an abandoned round."""
        return self.retry_delay if self.retry_delay > 0 else self.heartbeat_interval

    @property
    def stale_after(self) -> float:
        """A device that has not been heard from for this long is stale (3 missed beats)."""
        return 3 * self.heartbeat_interval

    def required_reports(self, selected: int) -> int:
        """Reports needed for a round with ``selected`` devices to succeed (at least 1)."""
        # The epsilon keeps 0.5 * 4 == 2 from rounding up through float noise.
        return max(1, math.ceil(self.min_completion * selected - 1e-9))


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
