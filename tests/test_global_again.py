"""The held global sent again is acknowledged without storing it again.

A device can get the same version twice: by ``weights:global`` when it registers and
inside a ``training:start`` (``baseWeights``) when the round opens before the server saw
the first ack. Storing it again replaced the file a round had just started from, and the
round failed ``stale_base`` (found by ``benchmarks/startup.py --first-update``). A real
:class:`client.session.DistributedClient` against the hostile test server (real
Socket.IO on loopback): the same document again leaves the file untouched; another
document, at the same or a newer version, is stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from client.atomicfile import file_identity
from client.global_store import GlobalStore
from client.protocol import EV_WEIGHTS_GLOBAL
from client.weights import StateDict, encode, sha256_hex
from tests.hostile_server import HostileServer, hostile_client

PARAMS = {"features": 4, "classes": 2, "hidden": 3}


def _state(seed: int) -> StateDict:
    rng = np.random.default_rng(seed)
    shapes = {"0.weight": (3, 4), "0.bias": (3,), "2.weight": (2, 3), "2.bias": (2,)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _send(fake: HostileServer, version: int, state: StateDict) -> Any:
    data = encode(state, "safetensors")
    weights = {"format": "safetensors", "size": len(data), "sha256": sha256_hex(data)}
    payload = {
        "version": version,
        "task": "synthetic",
        "modelParams": PARAMS,
        "weights": weights | {"data": data},
    }
    return fake.call(EV_WEIGHTS_GLOBAL, payload)


def test_the_held_global_again_is_not_stored_again_and_another_one_is(tmp_path: Path) -> None:
    with hostile_client(tmp_path) as (fake, client):
        store = GlobalStore(tmp_path / "client-data" / "global")
        assert _send(fake, 1, _state(1)) == {"ok": True}
        client.wait_for(lambda s: s.weights_version == 1, 10)
        first = file_identity(store.weights_path)

        assert _send(fake, 1, _state(1)) == {"ok": True}  # the same document again
        assert file_identity(store.weights_path) == first

        assert _send(fake, 1, _state(2)) == {"ok": True}  # other bytes: stored
        second = file_identity(store.weights_path)
        assert second != first
        assert _send(fake, 2, _state(2)) == {"ok": True}  # a newer version: stored
        client.wait_for(lambda s: s.weights_version == 2, 10)
        assert file_identity(store.weights_path) != second
        held = store.current()
        assert held is not None and held.version == 2
