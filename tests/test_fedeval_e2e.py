"""Federated evaluation end to end: the reference server on a free loopback port and two
real client sessions, each with its real (spawned, torch) worker, on the digits task.

What breaks if it is wrong anywhere on the path (server selection, ``evaluation:start``,
the device's refusal rules, the worker's EvalJob, the trainer's evaluate, the result
event, the sample-weighted record): the history's federated metrics would be missing,
counted from one device only, unweighted, or computed on other weights or data than
each device's test split of its partition of the version it was asked about.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client.backoff import Backoff
from client.config import Settings
from client.protocol import Partition
from client.session import DistributedClient, Worker
from client.tasks import get_task
from client.weights import layout_of
from server.model import initial_state
from server.store import Store
from tests.device_info import quick_device_info
from tests.server_harness import running_server
from tests.waiting import scaled

pytestmark = [pytest.mark.slow, pytest.mark.torch]

ROUND_TIMEOUT = 120.0
DEVICES = 2
ROUNDS = 2
SEED = 0


def _torch_worker(on_event: Callable[[object], None]) -> Worker:
    from client.worker import TrainingWorker

    worker: Worker = TrainingWorker(on_event=on_event, simulation=False)
    return worker


def _expected(state_dir: Path) -> tuple[float, float, int]:
    """The sample-weighted loss, accuracy and samples of the saved (latest) global over
    every device's test split: parts 0..n-1 of n, whichever device had which part."""
    import torch

    task = get_task("digits", {})
    model = task.build_model(task.params, 0)
    layout = layout_of(initial_state(task, task.params, seed=0))
    saved = Store(state_dir).load("digits", layout)
    assert saved is not None and saved.version == ROUNDS
    model.load_state_dict({k: torch.from_numpy(v) for k, v in saved.state.items()})
    loss_sum = acc_sum = 0.0
    total = 0
    for index in range(DEVICES):
        part = Partition(index=index, count=DEVICES, seed=SEED, scheme="label_skew")
        x, y = task.load_data("test", part)
        scores = task.evaluate(model, x, y)
        loss_sum += scores["loss"] * len(y)
        acc_sum += scores["accuracy"] * len(y)
        total += len(y)
    return loss_sum / total, acc_sum / total, total


def _record(status: dict[str, Any], version: int) -> dict[str, Any] | None:
    done = [r for r in status["history"] if r["outcome"] == "completed"]
    return next((r for r in done if r["version"] == version), None)


@pytest.mark.parametrize("every", [1, 2])
def test_devices_evaluate_new_globals_and_the_history_holds_the_weighted_means(
    tmp_path: Path, every: int
) -> None:
    clients: list[DistributedClient] = []
    with running_server(
        tmp_path,
        task="digits",
        model_params={},
        min_clients=DEVICES,
        clients_per_round=DEVICES,
        rounds=ROUNDS,
        epochs=1,
        seed=SEED,
        partition="label_skew",
        round_timeout=ROUND_TIMEOUT,
        evaluate_every=every,
    ) as server:
        try:
            for i in range(DEVICES):
                client = DistributedClient(
                    Settings(server_url=server.url, device_name=f"dev{i}"),
                    device_info=quick_device_info(),
                    data_dir=tmp_path / f"client{i}",
                    backoff=Backoff(base=0.1, cap=0.5),
                    settings_file=None,
                    worker_factory=_torch_worker,
                )
                clients.append(client)
                client.start()

            def evaluated(st: dict[str, Any]) -> bool:
                rec = _record(st, ROUNDS)
                return rec is not None and rec.get("federatedEvalDevices") == DEVICES

            status = server.wait_for(
                evaluated, scaled(ROUND_TIMEOUT * ROUNDS), "the last version evaluated"
            )
        finally:
            for client in clients:
                assert client.stop(scaled(30)), "a session did not stop in time"

    loss, accuracy, samples = _expected(tmp_path / "server-state")
    last = _record(status, ROUNDS)
    assert last is not None
    assert last["federatedEvalSamples"] == samples
    assert math.isclose(last["federatedEvalLoss"], loss, rel_tol=1e-4), (last, loss)
    assert math.isclose(last["federatedEvalAccuracy"], accuracy, rel_tol=1e-6), last
    first = _record(status, 1)
    assert first is not None
    if every == 1:
        # Version 1 was evaluated too, by both devices on all the test data.
        assert first["federatedEvalDevices"] == DEVICES, first
        assert first["federatedEvalSamples"] == samples
    else:
        # --evaluate-every 2: only every second version.
        assert first.get("federatedEvalLoss") is None, first
        assert first.get("federatedEvalDevices") is None, first
    # Persisted in history.json like the server's own evaluation.
    saved = Store(tmp_path / "server-state").load(
        "digits", layout_of(initial_state(get_task("digits", {}), {}, seed=0))
    )
    assert saved is not None
    kept = next(r for r in saved.history if r.version == ROUNDS and r.outcome == "completed")
    assert kept.federated_eval_samples == samples
    assert kept.federated_eval_loss is not None
    assert math.isclose(kept.federated_eval_loss, loss, rel_tol=1e-4)
