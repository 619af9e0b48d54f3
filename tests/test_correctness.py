"""FedAvg through the whole system equals the arithmetic it promises.

Real server, real clients, real worker processes, digits data:

* one client, one local epoch, full-batch SGD: the new global model equals centralized
  training of the same model on the same data (one gradient step), within 1e-6;
* two clients with equal data sizes: the new global model equals the mean of the two
  locally trained models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.backoff import Backoff
from client.config import Settings
from client.device import detect_device
from client.global_store import GlobalStore
from client.session import DistributedClient
from client.tasks import get_task
from client.weights import StateDict, decode
from server.strategies import Added
from tests.server_harness import ServerHandle, running_server
from tests.waiting import scale_waits, scaled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HIDDEN = 16
LR = 0.5
# One epoch with a batch larger than the data set: exactly one full-batch SGD step
# (momentum has no effect on the first step).
FULL_BATCH = {"epochs": 1, "batch_size": 100_000, "lr": LR}


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[Callable[[str], DistributedClient]]:
    made: list[DistributedClient] = []
    info = detect_device(probe_gpu=False)

    def make(url: str) -> DistributedClient:
        client = DistributedClient(
            Settings(server_url=url, device_name=f"c{len(made)}"),
            device_info=info,
            data_dir=tmp_path / f"client{len(made)}",
            backoff=Backoff(base=0.1, cap=0.5),
            settings_file=None,
        )
        made.append(client)
        client.start()
        return scale_waits(client)

    yield make
    for client in made:
        assert client.stop(scaled(30))


def capture_updates(server: ServerHandle) -> list[StateDict]:
    """Every update the server accepts, as FedAvg receives it."""
    got: list[StateDict] = []
    strategy = server.server.strategy
    original = strategy.add

    def spy(update: StateDict, num_samples: int) -> Added:
        got.append({k: np.array(v, copy=True) for k, v in update.items()})
        return original(update, num_samples)

    strategy.add = spy  # type: ignore[method-assign]
    return got


def global_version(client: DistributedClient, version: int, data_dir: Path) -> StateDict:
    client.wait_for(lambda s: s.weights_version == version, 120)
    held = GlobalStore(data_dir / "global").current()
    assert held is not None and held.version == version
    return decode(held.path.read_bytes())


def run_round(
    tmp_path: Path, make: Callable[[str], DistributedClient], n: int
) -> tuple[StateDict, StateDict, list[StateDict]]:
    """Run one round with ``n`` clients; return (version 0, version 1, the updates)."""
    with running_server(
        tmp_path / "server",
        task="digits",
        model_params={"hidden": HIDDEN},
        partition="iid",
        min_clients=n,
        clients_per_round=n,
        min_completion=1.0,
        rounds=1,
        round_timeout=120.0,
        **FULL_BATCH,
    ) as server:
        updates = capture_updates(server)
        first = make(server.url)
        for _ in range(n - 1):
            make(server.url)
        v0 = global_version(first, 0, tmp_path / "client0")
        v1 = global_version(first, 1, tmp_path / "client0")
    assert len(updates) == n
    return v0, v1, updates


def centralized_step(base: StateDict) -> StateDict:
    """One full-batch SGD step of the digits MLP on the whole training split."""
    task = get_task("digits", {"hidden": HIDDEN})
    model = task.build_model(task.params, seed=0)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in base.items()})
    x, y = task.load_data("train", None)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        for param in model.parameters():
            assert param.grad is not None
            param.sub_(LR * param.grad)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_close(got: StateDict, expected: StateDict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=atol, err_msg=name)


def test_one_client_full_batch_equals_centralized_training(
    tmp_path: Path, clients: Callable[[str], DistributedClient]
) -> None:
    v0, v1, _updates = run_round(tmp_path, clients, 1)
    expected = centralized_step(v0)
    assert_close(v1, expected, atol=1e-6)
    assert not np.allclose(v1["0.weight"], v0["0.weight"])  # it did train


def test_two_equal_clients_global_is_the_mean_of_their_models(
    tmp_path: Path, clients: Callable[[str], DistributedClient]
) -> None:
    _v0, v1, (a, b) = run_round(tmp_path, clients, 2)
    # digits' 1,438 training samples split iid in two: 719 each, so the weights are equal.
    mean: dict[str, Any] = {k: ((a[k].astype(np.float64) + b[k]) / 2) for k in a}
    assert_close(v1, mean, atol=1e-6)
    assert not np.allclose(a["0.weight"], b["0.weight"])  # they trained on different data
