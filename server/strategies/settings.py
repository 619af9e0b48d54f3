"""The aggregation strategy an operator chose, and its parameters: declared once, checked.

Contract: :data:`STRATEGIES` names every strategy (the ``--strategy`` choices) and
:data:`PARAMETERS` every strategy parameter with its flag, the strategies that read it,
its default per strategy and its valid range. :class:`StrategySettings` is the frozen
choice; :meth:`StrategySettings.problem` returns one plain line naming the flag when a
value is out of range or given to a strategy that does not use it (None when fine) --
:class:`server.config.ServerConfig` raises it as a ``ConfigError``.
:meth:`StrategySettings.parameters` is what the strategy runs with (defaults filled in),
shown in ``/api/status`` and on the dashboard. :func:`add_flags`, :func:`settings_from_args`
and :func:`flags_of` derive the flags of ``fedtray-server`` and ``demo`` from the same
tables. Pure: no I/O.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Literal, get_args

StrategyName = Literal["fedavg", "fedprox", "fedavgm", "fedadam", "median", "trimmed-mean"]
STRATEGIES: tuple[StrategyName, ...] = get_args(StrategyName)


@dataclass(frozen=True)
class Parameter:
    """One strategy parameter: its flag, who reads it, defaults, and its range."""

    flag: str
    used_by: dict[StrategyName, float]  # strategy -> default
    low: float
    high: float
    low_open: bool
    high_open: bool
    meaning: str

    def accepts(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    @property
    def range_text(self) -> str:
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        high = "inf" if math.isinf(self.high) else f"{self.high:g}"
        return f"{left}{self.low:g}, {high}{right}"


#: Every parameter, keyed by its StrategySettings field (and camelCase in /api/status).
PARAMETERS: dict[str, Parameter] = {
    "proximal_mu": Parameter(
        "--proximal-mu",
        {"fedprox": 0.01},
        0.0,
        math.inf,
        False,
        True,
        "FedProx: weight mu of the proximal term (mu/2)||w - w_global||^2 sent to devices",
    ),
    "server_lr": Parameter(
        "--server-lr",
        {"fedavgm": 1.0, "fedadam": 0.1},
        0.0,
        10.0,
        True,
        False,
        "server learning rate: how far the server steps along the round's update",
    ),
    "server_momentum": Parameter(
        "--server-momentum",
        {"fedavgm": 0.9},
        0.0,
        1.0,
        False,
        True,
        "FedAvgM: momentum of the server's update",
    ),
    "beta1": Parameter(
        "--beta1", {"fedadam": 0.9}, 0.0, 1.0, False, True, "FedAdam: first-moment decay"
    ),
    "beta2": Parameter(
        "--beta2", {"fedadam": 0.99}, 0.0, 1.0, False, True, "FedAdam: second-moment decay"
    ),
    "tau": Parameter(
        "--tau", {"fedadam": 1e-3}, 0.0, math.inf, True, True, "FedAdam: adaptivity (epsilon)"
    ),
    "trim_fraction": Parameter(
        "--trim-fraction",
        {"trimmed-mean": 0.2},
        0.0,
        0.5,
        False,
        True,
        "trimmed mean: fraction of the updates dropped at each end, per coordinate",
    ),
}
CLIP_FLAG = "--clip-norm"


@dataclass(frozen=True)
class StrategySettings:
    """The operator's choice; a parameter left None takes its strategy's default."""

    name: str = "fedavg"
    proximal_mu: float | None = None
    server_lr: float | None = None
    server_momentum: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    tau: float | None = None
    trim_fraction: float | None = None
    #: Clip each update to this L2 distance from the base (every strategy); None: no clip.
    clip_norm: float | None = None

    def problem(self) -> str | None:
        """One line naming the flag when something is wrong, else None."""
        if self.name not in STRATEGIES:
            return f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.name!r}"
        for field, param in PARAMETERS.items():
            value = getattr(self, field)
            if value is None:
                continue
            if self.name not in param.used_by:
                users = ", ".join(param.used_by)
                return f"{param.flag} applies to --strategy {users}, not {self.name}"
            if not param.accepts(value):
                return f"{param.flag} must be in {param.range_text}, got {value}"
        if self.clip_norm is not None and not (
            math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            return f"{CLIP_FLAG} must be a positive number, got {self.clip_norm}"
        return None

    @property
    def strategy(self) -> StrategyName:
        for name in STRATEGIES:
            if name == self.name:
                return name
        raise ValueError(self.problem())

    def parameters(self) -> dict[str, float]:
        """The parameters this strategy runs with (defaults filled in), by field name;
        ``clip_norm`` only when clipping is on."""
        out: dict[str, float] = {}
        for field, param in PARAMETERS.items():
            default = param.used_by.get(self.strategy)
            if default is not None:
                value = getattr(self, field)
                out[field] = float(default if value is None else value)
        if self.clip_norm is not None:
            out["clip_norm"] = float(self.clip_norm)
        return out

    @property
    def proximal_mu_sent(self) -> float:
        """The mu every ``training:start`` carries (0 unless FedProx)."""
        return self.parameters().get("proximal_mu", 0.0)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``--strategy``, ``--clip-norm`` and every parameter flag (``fedtray-server`` and
    ``demo`` both; a flag not given is None: the strategy's default)."""
    group = parser.add_argument_group("aggregation (docs/strategies.md)")
    group.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="fedavg",
        help="how the server combines a round's updates (default: %(default)s)",
    )
    for field, param in PARAMETERS.items():
        defaults = ", ".join(f"{name}: {value:g}" for name, value in param.used_by.items())
        group.add_argument(
            param.flag,
            dest=field,
            type=float,
            default=None,
            help=f"{param.meaning}; in {param.range_text} (default {defaults})",
        )
    group.add_argument(
        CLIP_FLAG,
        dest="clip_norm",
        type=float,
        default=None,
        help="scale back any update farther than this L2 distance from the global, and "
        "flag its device (every strategy; default: no clipping)",
    )


def settings_from_args(args: argparse.Namespace) -> StrategySettings:
    """The settings the flags of :func:`add_flags` gave (not yet checked)."""
    values = {field: getattr(args, field) for field in (*PARAMETERS, "clip_norm")}
    return StrategySettings(name=args.strategy, **values)


def flags_of(settings: StrategySettings) -> list[str]:
    """The command-line flags that give ``settings`` (for the demo's server)."""
    flags = ["--strategy", settings.name]
    for field, param in PARAMETERS.items():
        value = getattr(settings, field)
        if value is not None:
            flags += [param.flag, repr(float(value))]
    if settings.clip_norm is not None:
        flags += [CLIP_FLAG, repr(float(settings.clip_norm))]
    return flags
