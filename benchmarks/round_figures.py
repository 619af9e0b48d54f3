"""The figures of ``benchmarks/vs_flower.py``, from what each run left behind (pure).

Contract: no I/O, no clock; every function takes the texts and records a run produced
and returns numbers (seconds, MB) or text. Times are Unix seconds on one machine's clock.

* fedtray: :func:`client_events` reads a ``python -m client`` log (its stderr, whose
  lines start with ``YYYY-MM-DD HH:MM:SS,mmm``, local time) into per-round event times;
  :func:`fedtray_trial` combines those with the server's ``/api/status`` history (each
  completed round's ``timing``) and the clients' start times.
* Flower: :func:`flower_trial` takes ``benchmarks/flower_side.py``'s records.
* Both give a :class:`Trial`: first-round and steady seconds per round (round k ends when
  its new global is published -- fedtray's ``timing.publishedAt``, Flower's return of
  ``aggregate_fit``; the first round runs from its opening, after the clients joined, to
  its end; a steady round is the time between the ends of rounds k-1 and k, median over
  k >= 2, so time between rounds counts), client start to registered and to its first
  update submitted (the slowest of the clients), and for fedtray the critical path of
  each round cut at: opened, every device acknowledged ``training:start`` (the global is
  on the device), every worker done, every update in (aggregation begins), published.
* :func:`cpu_per_round` turns a process tree's CPU samples (cumulative seconds, taken every
  few tenths of a second by the benchmark) into its CPU per steady round: the CPU between the
  ends of round 2 and of the last round the samples reach past, interpolated at those
  instants, divided by the rounds in between (``None`` when fewer than
  :data:`CPU_MIN_ROUNDS` rounds are spanned). It is machine load's least noisy figure:
  CPU time is charged to a process whether or not it waited for a core.
* :func:`summary_lines` renders trials of both systems as the report's table.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Goals of issue 15 (fedtray / Flower steady s/round per size label; seconds).
RATIO_GOALS: dict[str, float] = {"100MB": 0.5, "0.4MB": 1.0}
REGISTER_GOAL_S = 2.0
FIRST_UPDATE_GOAL_S = 5.0
#: The breakdown's parts, in round order.
PARTS: tuple[tuple[str, str], ...] = (
    ("between", "between rounds (publish -> next round opened)"),
    ("global", "global to clients (opened -> every training:start acked)"),
    ("worker", "worker (acked -> every worker done)"),
    ("upload", "upload and intake (-> every update in)"),
    ("aggregate", "aggregate and publish (-> published)"),
)

#: The fewest steady rounds a CPU-per-round figure may span (fewer: no figure).
CPU_MIN_ROUNDS = 5
#: The CPU figures' roles, in report order: role -> title.
CPU_ROLES: tuple[tuple[str, str], ...] = (
    ("server", "CPU ms per steady round: server"),
    ("client", "  client (largest, with its worker)"),
    ("total", "  all processes"),
)

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+: (.*)$")
_EVENTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("registered", re.compile(r"^connected to \S+ as ")),
    ("started", re.compile(r"^round (\S+): training ")),
    ("trained", re.compile(r"^round (\S+): trained on ")),
    ("accepted", re.compile(r"^round (\S+): update accepted")),
)


@dataclass
class ClientEvents:
    """When one fedtray client logged each step (Unix times; first occurrence)."""

    registered: float | None = None
    #: event -> round id -> time, for started / trained / accepted.
    rounds: dict[str, dict[str, float]] = field(default_factory=dict)


def log_time(stamp: str) -> float:
    """A log line's ``YYYY-MM-DD HH:MM:SS,mmm`` (local time) as Unix seconds."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def client_events(log_text: str) -> ClientEvents:
    """The steps a client's log shows (lines of other formats are skipped)."""
    events = ClientEvents()
    for line in log_text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        message = match.group(2)
        for name, pattern in _EVENTS:
            found = pattern.match(message)
            if not found:
                continue
            at = log_time(match.group(1))
            if name == "registered":
                events.registered = events.registered if events.registered else at
            else:
                events.rounds.setdefault(name, {}).setdefault(found.group(1), at)
    return events


@dataclass
class Trial:
    """One run of one system at one size."""

    system: str
    first_round_s: float
    steady_s: float | None
    register_s: float | None
    first_update_s: float | None
    rss_server_mb: float | None = None
    rss_client_mb: float | None = None
    #: part (see PARTS) -> median seconds over rounds >= 2 (fedtray only).
    breakdown: dict[str, float] = field(default_factory=dict)
    load: str = ""
    #: When each completed round ended (Unix seconds), in round order.
    ends: list[float] = field(default_factory=list)
    #: role (see CPU_ROLES) -> ms of CPU per steady round (see cpu_per_round).
    cpu_ms: dict[str, float] = field(default_factory=dict)


def _median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None


def _slowest(starts: Sequence[float], reached: Sequence[float | None]) -> float | None:
    gaps = [r - s for s, r in zip(starts, reached, strict=True) if r is not None]
    return max(gaps) if len(gaps) == len(starts) and gaps else None


def fedtray_trial(
    history: Sequence[Mapping[str, Any]], logs: Sequence[str], starts: Sequence[float]
) -> Trial:
    """Figures of a fedtray run: its completed rounds (``/api/status`` history records,
    each with ``timing.publishedAt``), each client's log and start time (same order)."""
    done = [r for r in history if r.get("outcome") == "completed" and r.get("timing")]
    done.sort(key=lambda r: int(r["number"]))
    if not done:
        raise ValueError("no completed round with timing in the history")
    clients = [client_events(text) for text in logs]
    ends = [float(r["timing"]["publishedAt"]) for r in done]
    parts: dict[str, list[float]] = {name: [] for name, _ in PARTS}
    for k in range(1, len(done)):
        t, rid = done[k]["timing"], done[k]["roundId"]
        steps = [[c.rounds.get(e, {}).get(rid) for c in clients] for e in ("started", "trained")]
        if any(v is None for row in steps for v in row):
            continue
        acked, trained = (max(v for v in row if v is not None) for row in steps)
        parts["between"].append(t["openedAt"] - ends[k - 1])
        parts["global"].append(acked - t["openedAt"])
        parts["worker"].append(trained - acked)
        parts["upload"].append(t["collectedAt"] - trained)
        parts["aggregate"].append(ends[k] - t["collectedAt"])
    first_accepted = [min(c.rounds.get("accepted", {}).values(), default=None) for c in clients]
    breakdown = {name: m for name, values in parts.items() if (m := _median(values)) is not None}
    return Trial(
        system="fedtray",
        ends=ends,
        first_round_s=ends[0] - float(done[0]["timing"]["openedAt"]),
        steady_s=_median(b - a for a, b in itertools.pairwise(ends)),
        register_s=_slowest(starts, [c.registered for c in clients]),
        first_update_s=_slowest(starts, first_accepted),
        breakdown=breakdown,
    )


def flower_trial(
    server: Mapping[str, Any], fits: Sequence[Sequence[Mapping[str, Any]]], starts: Sequence[float]
) -> Trial:
    """Figures of a Flower run: flower_side's server record, each client's fit lines and
    start time (same order). Flower does not say which connection is which client, so the
    k-th registration is matched with the k-th client start."""
    opened = {int(k): float(v) for k, v in server["opened"].items()}
    aggregated = {int(k): float(v) for k, v in server["aggregated"].items()}
    if not aggregated:
        raise ValueError("Flower completed no round")
    ends = [aggregated[k] for k in sorted(aggregated)]
    registered = sorted(float(t) for t in server["registered"])[: len(starts)]
    first_fit = [min((float(f["fitDone"]) for f in lines), default=None) for lines in fits]
    return Trial(
        system="Flower",
        ends=ends,
        first_round_s=ends[0] - opened[min(aggregated)],
        steady_s=_median(b - a for a, b in itertools.pairwise(ends)),
        register_s=_slowest(
            sorted(starts), [*registered, *[None] * (len(starts) - len(registered))]
        ),
        first_update_s=_slowest(starts, first_fit),
    )


def _cpu_at(samples: Sequence[tuple[float, float]], at: float) -> float | None:
    """The cumulative CPU at ``at``, interpolated between the samples around it."""
    before = [s for s in samples if s[0] <= at]
    after = [s for s in samples if s[0] >= at]
    if not before or not after:
        return None
    (t0, c0), (t1, c1) = before[-1], after[0]
    return c0 if t1 == t0 else c0 + (c1 - c0) * (at - t0) / (t1 - t0)


def cpu_per_round(samples: Sequence[tuple[float, float]], ends: Sequence[float]) -> float | None:
    """Seconds of CPU per steady round of one process tree (see the module docstring):
    ``samples`` are (Unix time, cumulative CPU seconds) in time order, ``ends`` the rounds'
    end times in round order."""
    if len(ends) < 2 or not samples:
        return None
    last = max((k for k, end in enumerate(ends) if end <= samples[-1][0]), default=None)
    if last is None or last - 1 < CPU_MIN_ROUNDS:
        return None
    start, stop = _cpu_at(samples, ends[1]), _cpu_at(samples, ends[last])
    if start is None or stop is None:
        return None
    return (stop - start) / (last - 1)


# -- the report ---------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _med(trials: Sequence[Trial], attr: str) -> float | None:
    return _median(v for t in trials if (v := getattr(t, attr)) is not None)


def verdict(value: float | None, goal: float) -> str:
    """``meets`` / ``MISSES`` a ``<= goal`` target (``-`` without a value)."""
    if value is None:
        return "-"
    return "meets" if value <= goal else "MISSES"


def summary_lines(
    label: str, floats: int, fedtray: Sequence[Trial], flower: Sequence[Trial]
) -> list[str]:
    """The report for one model size: medians over the pairs of each figure, the ratio
    fedtray / Flower of the steady round, the goals, and fedtray's round breakdown."""
    rows = [
        ("steady s/round (median of rounds 2..)", "steady_s", ".3f"),
        ("first round s", "first_round_s", ".3f"),
        ("client start -> registered s (slowest)", "register_s", ".2f"),
        ("client start -> first update s (slowest)", "first_update_s", ".2f"),
        ("peak RSS server MB", "rss_server_mb", ".0f"),
        ("peak RSS client MB (largest)", "rss_client_mb", ".0f"),
    ]
    out = [
        f"== {label} model ({floats:,} float32 = {floats * 4 / 1e6:.1f} MB), "
        f"{len(fedtray)} fedtray run(s), {len(flower)} Flower run(s); medians",
        f"{'':<44}{'fedtray':>10}{'Flower':>10}{'ratio':>8}",
    ]
    for title, attr, spec in rows:
        a, b = _med(fedtray, attr), _med(flower, attr)
        ratio = f"{a / b:.2f}x" if a is not None and b else "-"
        out.append(f"{title:<44}{_fmt(a, spec):>10}{_fmt(b, spec):>10}{ratio:>8}")
    for role, title in CPU_ROLES:
        a, b = (_median(t.cpu_ms[role] for t in ts if role in t.cpu_ms) for ts in (fedtray, flower))
        ratio = f"{a / b:.2f}x" if a is not None and b else "-"
        out.append(f"{title:<44}{_fmt(a, '.1f'):>10}{_fmt(b, '.1f'):>10}{ratio:>8}")
    steady_a, steady_b = _med(fedtray, "steady_s"), _med(flower, "steady_s")
    goal = RATIO_GOALS.get(label)
    if steady_a is not None and steady_b:
        ratio_value = steady_a / steady_b
        goal_text = f"{verdict(ratio_value, goal)} goal <= {goal}x" if goal else "no goal"
        out.append(f"ratio fedtray / Flower (steady s/round) {ratio_value:.2f}x  {goal_text}")
    register = _med(fedtray, "register_s")
    first = _med(fedtray, "first_update_s")
    out.append(
        f"fedtray register {_fmt(register, '.2f')} s: {verdict(register, REGISTER_GOAL_S)} goal "
        f"<= {REGISTER_GOAL_S:g} s; first update {_fmt(first, '.2f')} s: "
        f"{verdict(first, FIRST_UPDATE_GOAL_S)} goal <= {FIRST_UPDATE_GOAL_S:g} s"
        + (" (the goal is for the 0.4MB model)" if label != "0.4MB" else "")
    )
    out.append("fedtray steady round, where it goes (median s over rounds 2..):")
    for name, title in PARTS:
        out.append(f"  {title:<58}{_fmt(_med_part(fedtray, name)):>10}")
    return out


def _med_part(trials: Sequence[Trial], part: str) -> float | None:
    return _median(t.breakdown[part] for t in trials if part in t.breakdown)
