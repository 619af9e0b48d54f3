"""Accuracy per round of the server strategies on label-skewed digits, poisoned and honest.

``python -m benchmarks.strategies_accuracy`` runs whole federations on this machine, the
way ``fedtray-server demo`` does: a real server process (``python -m server --task digits
--partition dirichlet --partition-alpha 0.5 --exit-when-done``) and real client processes
(``python -m client``), each client with its own user directories. "Label-skewed" here is
the Dirichlet split (Hsu et al. 2019, α = ``--alpha``, default 0.5);
``--partition label_skew`` runs McMahan's pathological 2-shards-per-device split instead
(with 5 devices each sees 2 of the 10 digits, so a robust rule that sets one device
aside barely learns two digits: docs/strategies.md). In a *poisoned* run one of the
clients is :mod:`tests.poison_device` (the real client whose trainer trains honestly, then
sends ``w_base + F·(w − w_base)`` (``scale``) or ``w_base − (w − w_base)`` (``flip``)
every round). It is started first and the others only once it has registered, so it holds
the same place in every run, and every run uses the same ``--seed``: the partitions, the
selection order and the local training are the same for every strategy.

Figures: the server-side evaluation of each version (``history.json``'s
``evalAccuracy``, read after the server has exited: ``--exit-when-done`` waits for the
final version's evaluation), one row per strategy, one column per round, then
``/proc/loadavg``. A run that does not finish (a process dies, ``--timeout``) is reported
as failed with its reason; nothing is filled in.

The clipping bound C (``--clip-norm auto``) is measured, not guessed: each partition's
honest first-round update is trained here with the device's own trainer
(:class:`client.trainer.LocalTrainer`; the initial global, round 1's config and partition
as the server sends them) and C is the largest of their L2 norms (the server's
:func:`server.strategies.clipping.update_norm`): no honest round-1 update is clipped, and
the ×F update is cut back to the size of an honest one. With ``--baselines`` the poisoned
part also runs fedavg, median and trimmed mean without the poisoned device (what each
reaches on this data at all); ``--clip-from learnt`` then measures C instead from the
honest FedAvg baseline's final global (the next round's honest updates: the size of an
honest update once the model has learnt, smaller than round 1's).

Contract: :func:`run_federation` runs one federation and returns its accuracies (raises
:class:`RunFailedError` with the reason); :func:`honest_norms` measures honest update norms;
:func:`table` (pure) formats the figures. Every process started is stopped on every way out
(:func:`server.demo.stop_all`); the temporary directories are removed.

    python -m benchmarks.strategies_accuracy                       # everything (~15 runs)
    python -m benchmarks.strategies_accuracy --parts poisoned --kinds scale
    python -m benchmarks.strategies_accuracy --parts honest --mu 0.05 --server-lr 0.03
    python -m benchmarks.strategies_accuracy --kinds flip --only median,clip --clip-norm 0.8
    python -m benchmarks.strategies_accuracy --partition label_skew   # the pathological split
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from client.protocol import DEFAULT_PARTITION_ALPHA, PARTITION_SCHEMES  # noqa: E402
from server.demo import (  # noqa: E402
    Child,
    _child_env,
    _popen,
    _pump,
    _saved_history,
    parse_listening,
    stop_all,
)

TASK = "digits"
#: "Label-skewed" in the figures: Dirichlet(alpha) label proportions per device (Hsu et
#: al. 2019); ``--partition label_skew`` gives McMahan's 2-shards-per-device split.
DEFAULT_PARTITION = "dirichlet"
START_TIMEOUT_S = 120.0
POLL_S = 0.5
#: The client never steps aside for other developers' load on a shared machine, and
#: trains at its idle budget (as the test suite runs): the figures do not depend on who
#: else is busy, only the seconds do.
CLIENT_ENV = {"FEDTRAY_SIMULATE_OTHER_CPU": "0", "FEDTRAY_SIMULATE_IDLE_SECONDS": "86400"}


class RunFailedError(Exception):
    """A federation did not finish; the message is the reason."""


@dataclass(frozen=True)
class Run:
    """One federation to run: a label, the strategy's server flags, the poison (or none)."""

    label: str
    flags: tuple[str, ...]
    poison: str | None = None
    factor: float = 100.0


def _env(base: Path) -> dict[str, str]:
    env = _child_env(base)
    env.update(CLIENT_ENV)
    return env


def _device_count(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/api/status", timeout=5) as resp:
            data = json.loads(resp.read().decode("utf-8"))
    except (OSError, ValueError):
        return 0
    devices = data.get("devices") if isinstance(data, dict) else None
    return len(devices) if isinstance(devices, list) else 0


def _start_server(cmd: list[str], work: Path) -> tuple[Child, str]:
    log_path = work / "server.log"
    log_path.touch()
    proc = subprocess.Popen(
        cmd,
        env=_env(work / "server-home"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    child = Child("server", proc, log_path)
    found = threading.Event()
    threading.Thread(target=_pump, args=(child, False, found), daemon=True).start()
    found.wait(START_TIMEOUT_S)
    url = next((u for u in map(parse_listening, list(child.lines)) if u), None)
    if url is None:
        stop_all([child])
        raise RunFailedError(f"the server did not start: {''.join(child.lines[-3:]).strip()}")
    return child, url


def run_federation(
    run: Run,
    *,
    clients: int,
    rounds: int,
    seed: int,
    timeout: float,
    extra_server_flags: Sequence[str] = (),
    keep_global: Path | None = None,
    partition: str = DEFAULT_PARTITION,
    alpha: float = DEFAULT_PARTITION_ALPHA,
) -> list[float | None]:
    """The server-side eval accuracy after each round (None: not evaluated) of ``run``;
    with ``keep_global``, the final global weights are copied there.

    Raises :class:`RunFailedError` when a process dies or ``timeout`` seconds pass first.
    """
    work = Path(tempfile.mkdtemp(prefix="fedtray-stratacc-"))
    children: list[Child] = []
    state_dir = work / "server-state"
    try:
        server, url = _start_server(
            [
                sys.executable,
                "-m",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--task",
                TASK,
                "--rounds",
                str(rounds),
                "--exit-when-done",
                "--min-clients",
                str(clients),
                "--clients-per-round",
                str(clients),
                *partition_flags(partition, alpha),
                "--seed",
                str(seed),
                "--heartbeat-interval",
                "2",
                "--round-timeout",
                "300",
                "--state-dir",
                str(state_dir),
                *extra_server_flags,
                *run.flags,
            ],
            work,
        )
        children.append(server)
        deadline = time.monotonic() + timeout

        def start(name: str, cmd: list[str]) -> None:
            proc = _popen(cmd, _env(work / name), work / f"{name}.log", False)
            children.append(Child(name, proc, work / f"{name}.log"))

        honest = clients
        if run.poison is not None:
            honest -= 1
            start(
                "poisoned",
                [
                    sys.executable,
                    "-m",
                    "tests.poison_device",
                    "--poison",
                    run.poison,
                    "--factor",
                    str(run.factor),
                    "--",
                    "--server",
                    url,
                    "--name",
                    "poisoned",
                ],
            )
            # Registered first: the same place in the selection order in every run.
            while _device_count(url) < 1:
                _check_alive(children, deadline)
                time.sleep(POLL_S)
        for i in range(1, honest + 1):
            name = f"honest-{i}"
            start(name, [sys.executable, "-m", "client", "--server", url, "--name", name])
        while server.proc.poll() is None:
            _check_alive(children, deadline)
            time.sleep(POLL_S)
        records = [r for r in _saved_history(state_dir) if r.get("outcome") == "completed"]
        if server.proc.returncode != 0 or len(records) < rounds:
            raise RunFailedError(
                f"the server exited with status {server.proc.returncode} after "
                f"{len(records)} of {rounds} rounds: {server.tail(3).strip()}"
            )
        if keep_global is not None:
            shutil.copyfile(state_dir / f"global-v{rounds}.safetensors", keep_global)
        return [_accuracy(r) for r in records[:rounds]]
    finally:
        stop_all(children)
        shutil.rmtree(work, ignore_errors=True)


def partition_flags(partition: str, alpha: float) -> list[str]:
    """The server's ``--partition`` flags for ``partition`` (alpha: dirichlet only)."""
    if partition == "dirichlet":
        return ["--partition", partition, "--partition-alpha", f"{alpha:g}"]
    return ["--partition", partition]


def _accuracy(record: dict[str, Any]) -> float | None:
    acc = record.get("evalAccuracy")
    return float(acc) if isinstance(acc, int | float) else None


def _check_alive(children: list[Child], deadline: float) -> None:
    for child in children:
        code = child.proc.poll()
        if code is not None and child.name != "server":
            raise RunFailedError(f"{child.name} exited with status {code}: {child.tail(3).strip()}")
        if code is not None:
            raise RunFailedError(f"the server exited early ({code}): {child.tail(3).strip()}")
    if time.monotonic() > deadline:
        raise RunFailedError("timed out")


def honest_norms(
    clients: int,
    seed: int,
    base_path: Path | None = None,
    round_number: int = 1,
    overrides: dict[str, Any] | None = None,
    partition: str = DEFAULT_PARTITION,
    alpha: float = DEFAULT_PARTITION_ALPHA,
) -> list[float]:
    """L2 norms of each partition's honest update in round ``round_number`` from the
    global in ``base_path`` (default: the initial model, round 1), with the task's
    training config but ``overrides`` (TrainingConfig fields); module docstring."""
    from client.protocol import Partition, TrainingConfig
    from client.tasks import get_task
    from client.trainer import LocalTrainer
    from client.weights import decode, encode
    from client.worker_messages import TrainJob
    from server.model import initial_state
    from server.strategies.clipping import update_norm

    task = get_task(TASK, {})
    # The round's config, as the server builds it (server.starter.training_config).
    config = TrainingConfig.model_validate(
        {**task.default_config, **(overrides or {}), "seed": seed + round_number}
    )
    norms = []
    with tempfile.TemporaryDirectory(prefix="fedtray-norms-") as tmp:
        if base_path is None:
            base_path = Path(tmp) / "base.safetensors"
            base_path.write_bytes(encode(initial_state(task, task.params, seed)))
        base = decode(base_path.read_bytes())
        trainer = LocalTrainer()
        for index in range(clients):
            job = TrainJob(
                round_id=f"norm-{index}",
                task=TASK,
                model_params={},
                config=config,
                partition=Partition.model_validate(
                    {
                        "index": index,
                        "count": clients,
                        "seed": seed,
                        "scheme": partition,
                        "alpha": alpha,
                    }
                ),
                base_weights_path=base_path,
                output_path=Path(tmp) / f"out-{index}.safetensors",
                checkpoint_path=Path(tmp) / f"ckpt-{index}",
                checkpoint_interval=0.0,
            )
            result = trainer.run(job)
            norms.append(update_norm(decode(result.output_path.read_bytes()), base))
    return norms


def table(rows: Sequence[tuple[str, Sequence[float | None] | str]], rounds: int) -> str:
    """A markdown table: one row per run, accuracy in % per round (pure)."""
    head = "| run | " + " | ".join(str(r) for r in range(1, rounds + 1)) + " |"
    rule = "|---|" + "---:|" * rounds
    lines = [head, rule]
    for label, accs in rows:
        if isinstance(accs, str):
            lines.append(f"| {label} | failed: {accs} |" + " |" * (rounds - 1))
            continue
        cells = [f"{a * 100:.1f}" if a is not None else "–" for a in accs]
        cells += [""] * (rounds - len(cells))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.strategies_accuracy")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partition", choices=PARTITION_SCHEMES, default=DEFAULT_PARTITION)
    p.add_argument("--alpha", type=float, default=DEFAULT_PARTITION_ALPHA, help="dirichlet's alpha")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated run names to run (fedavg, median, trimmed-mean, clip, "
        "fedavgm, fedprox, fedadam); default: all",
    )
    p.add_argument("--parts", choices=["all", "poisoned", "honest"], default="all")
    p.add_argument("--kinds", default="scale,flip", help="poison kinds (scale, flip)")
    p.add_argument("--factor", type=float, default=100.0, help="the scale attack's factor")
    p.add_argument("--poison-rounds", type=int, default=15)
    p.add_argument("--honest-rounds", type=int, default=10)
    p.add_argument("--clip-norm", default="auto", help="C, or auto (module docstring)")
    p.add_argument(
        "--clip-from",
        choices=["first", "learnt"],
        default="first",
        help="auto C: the largest honest norm of round 1, or of the round after the honest "
        "FedAvg baseline (needs --baselines)",
    )
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also run fedavg, median and trimmed mean without the poisoned device",
    )
    p.add_argument("--trim-fraction", type=float, default=0.2)
    p.add_argument("--mu", type=float, default=0.01, help="FedProx's mu")
    p.add_argument("--server-lr", type=float, default=0.1, help="FedAdam's server_lr")
    p.add_argument("--tau", type=float, default=0.001, help="FedAdam's tau")
    p.add_argument("--epochs", type=int, help="local epochs per round (default: the task's)")
    p.add_argument("--lr", type=float, help="local learning rate (default: the task's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per federation")
    args = p.parse_args(argv)
    training = [
        *(["--epochs", str(args.epochs)] if args.epochs is not None else []),
        *(["--lr", str(args.lr)] if args.lr is not None else []),
    ]

    print(f"loadavg at start: {_loadavg()}", flush=True)
    shown_alpha = f" alpha={args.alpha:g}" if args.partition == "dirichlet" else ""
    print(f"partition: {args.partition}{shown_alpha}, seed {args.seed}", flush=True)
    poisoned_rows: list[tuple[str, Sequence[float | None] | str]] = []
    honest_rows: list[tuple[str, Sequence[float | None] | str]] = []
    common: dict[str, Any] = {
        "clients": args.clients,
        "seed": args.seed,
        "timeout": args.timeout,
        "partition": args.partition,
        "alpha": args.alpha,
    }
    only = {name.strip() for name in args.only.split(",") if name.strip()}

    def wanted(name: str) -> bool:
        return not only or name in only

    def do(
        run: Run,
        rounds: int,
        rows: list[tuple[str, Sequence[float | None] | str]],
        keep_global: Path | None = None,
    ) -> None:
        started = time.monotonic()
        try:
            accs: Sequence[float | None] | str = run_federation(
                run, rounds=rounds, keep_global=keep_global, extra_server_flags=training, **common
            )
        except RunFailedError as exc:
            accs = str(exc).replace("\n", " ").replace("|", "/")
        rows.append((run.label, accs))
        shown = (
            accs
            if isinstance(accs, str)
            else " ".join(f"{a * 100:.1f}" if a is not None else "-" for a in accs)
        )
        print(f"{run.label}: {shown}  ({time.monotonic() - started:.0f} s)", flush=True)

    if args.parts in ("all", "poisoned"):
        # --baselines: what each strategy reaches without the poisoned device, first;
        # FedAvg's final global is where --clip-from learnt measures C.
        with tempfile.TemporaryDirectory(prefix="fedtray-calib-") as tmp:
            learnt = Path(tmp) / "global.safetensors"
            baselines: tuple[tuple[str, tuple[str, ...]], ...] = (
                ("fedavg", ("--strategy", "fedavg")),
                ("median", ("--strategy", "median")),
                (
                    f"trimmed-mean b={args.trim_fraction:g}",
                    ("--strategy", "trimmed-mean", "--trim-fraction", str(args.trim_fraction)),
                ),
            )
            if args.clip_from == "learnt" and not args.baselines:
                p.error("--clip-from learnt needs --baselines")
            for label, flags in baselines if args.baselines else ():
                if not wanted(label.split()[0]) and label != "fedavg":
                    continue
                keep = learnt if label == "fedavg" else None
                do(Run(f"{label} (no poison)", flags), args.poison_rounds, poisoned_rows, keep)
            if args.clip_norm == "auto":
                cfg = {
                    **({"epochs": args.epochs} if args.epochs is not None else {}),
                    **({"learning_rate": args.lr} if args.lr is not None else {}),
                }
                where = {"partition": args.partition, "alpha": args.alpha}
                first = honest_norms(args.clients, args.seed, None, 1, cfg, **where)
                text = ", ".join(f"{n:.3f}" for n in first)
                print(f"honest update norms, round 1: {text}", flush=True)
                clip = max(first)
                if args.clip_from == "learnt":
                    late = honest_norms(
                        args.clients, args.seed, learnt, args.poison_rounds + 1, cfg, **where
                    )
                    text = ", ".join(f"{n:.3f}" for n in late)
                    print(f"round {args.poison_rounds + 1} from FedAvg's: {text}", flush=True)
                    clip = max(late)
                print(f"--clip-norm {clip:.3g}: the largest of those", flush=True)
            else:
                clip = float(args.clip_norm)
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
            what = f"×{args.factor:g}" if kind == "scale" else "sign-flipped"
            for label, flags in (
                ("fedavg", ("--strategy", "fedavg")),
                ("median", ("--strategy", "median")),
                (
                    f"trimmed-mean b={args.trim_fraction:g}",
                    ("--strategy", "trimmed-mean", "--trim-fraction", str(args.trim_fraction)),
                ),
                (
                    f"fedavg --clip-norm {clip:.3g}",
                    ("--strategy", "fedavg", "--clip-norm", f"{clip:.6g}"),
                ),
            ):
                if not wanted("clip" if "--clip-norm" in flags else label.split()[0]):
                    continue
                run = Run(f"{label} ({what})", flags, poison=kind, factor=args.factor)
                do(run, args.poison_rounds, poisoned_rows)
    if args.parts in ("all", "honest"):
        honest_runs: tuple[tuple[str, tuple[str, ...]], ...] = (
            ("fedavg", ("--strategy", "fedavg")),
            ("fedavgm lr=1 momentum=0.9", ("--strategy", "fedavgm")),
            (f"fedprox μ={args.mu:g}", ("--strategy", "fedprox", "--proximal-mu", str(args.mu))),
            (
                f"fedadam lr={args.server_lr:g} τ={args.tau:g}",
                (
                    "--strategy",
                    "fedadam",
                    "--server-lr",
                    str(args.server_lr),
                    "--tau",
                    str(args.tau),
                ),
            ),
        )
        for name, strategy_flags in honest_runs:
            if not wanted(name.split()[0]):
                continue
            do(Run(name, strategy_flags), args.honest_rounds, honest_rows)

    if poisoned_rows:
        print(f"\npoisoned ({args.clients} devices, 1 poisoned), eval accuracy % per round:")
        print(table(poisoned_rows, args.poison_rounds))
    if honest_rows:
        print(f"\nhonest ({args.clients} devices), eval accuracy % per round:")
        print(table(honest_rows, args.honest_rounds))
    print(f"\nloadavg at end: {_loadavg()}")
    failed = any(isinstance(a, str) for _, a in poisoned_rows + honest_rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
