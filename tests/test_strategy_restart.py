"""FedAdam's state survives ``kill -9`` between rounds: same weights as a run never stopped.

Two real server subprocesses (``--strategy fedadam``) train the same three rounds from a
scripted device sending fixed updates (the base plus a constant per round). One runs
uninterrupted; the other is killed with SIGKILL once version 1 is saved and restarted on
the same state directory. The final weights files (and the optimizer state saved beside
them) must be equal byte for byte: the moments were written beside each version and read
back at the restart.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.weights import StateDict
from tests.server_harness import ScriptedDevice, run_devices, server_process

pytestmark = pytest.mark.slow

ROUNDS = 3
FLAGS = (
    "--strategy",
    "fedadam",
    "--server-lr",
    "0.05",
    "--min-clients",
    "1",
    "--clients-per-round",
    "1",
    "--rounds",
    str(ROUNDS),
)


def _fixed_update(base: StateDict, number: int) -> StateDict:
    """What the device sends in round ``number``: the base shifted by a round constant."""
    return {
        k: (v + np.asarray(0.01 * number * (1 + np.arange(v.size) % 3)).reshape(v.shape)).astype(
            v.dtype
        )
        if v.dtype.kind == "f"
        else v.copy()
        for k, v in base.items()
    }


def _number(start: dict[str, Any]) -> int:
    """The round number in a training:start's round id (``r<number>-<attempt>-<tag>``)."""
    return int(str(start["roundId"]).split("-", maxsplit=1)[0].removeprefix("r"))


def _open(start: dict[str, Any], answered: set[str], version: int) -> bool:
    return start["roundId"] not in answered and _number(start) <= version


async def _train_until(url: str, version: int, held: dict[int, StateDict]) -> dict[int, StateDict]:
    """Join (holding ``held``), answer each training:start up to round ``version`` with its
    fixed update until ``version`` is held; the versions held."""
    dev = ScriptedDevice(url, name="fixed")
    dev.device_id = "6f1c2d3e-0000-4000-8000-000000000001"  # the same device after a restart
    dev.weights.update(held)
    ack = await dev.join(weights_version=max(held) if held else None)
    assert ack.get("ok") is not False, ack
    beats = asyncio.create_task(dev.heartbeat_forever(period=0.2))
    answered: set[str] = set()
    try:
        while version not in dev.weights:
            await dev.until(
                lambda: (
                    version in dev.weights or any(_open(s, answered, version) for s in dev.starts)
                ),
                60,
                f"a new round or version {version}",
            )
            for start in list(dev.starts):
                round_id, base_version = str(start["roundId"]), int(start["baseVersion"])
                number = _number(start)
                if round_id in answered or number > version:
                    continue  # a later round stays open (unanswered) until the restart
                await dev.until(lambda b=base_version: b in dev.weights, 30, "the round's base")
                update = _fixed_update(dev.weights[base_version], number)
                ack = await dev.submit(round_id, base_version, update, num_samples=10)
                assert ack.get("ok") is True or ack.get("code") == "duplicate", ack
                answered.add(round_id)
    finally:
        beats.cancel()
    return dict(dev.weights)


def _final_files(state: Path) -> tuple[bytes, bytes]:
    return (
        (state / f"global-v{ROUNDS}.safetensors").read_bytes(),
        (state / f"optimizer-v{ROUNDS}.safetensors").read_bytes(),
    )


def test_fedadam_state_survives_kill_9_between_rounds(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    with server_process(straight, *FLAGS) as srv:
        run_devices(_train_until(srv.url, ROUNDS, {}))
        srv.wait_for(lambda st: st["globalVersion"] == ROUNDS, 60, "the last version")
    with server_process(killed, *FLAGS) as srv:
        held = run_devices(_train_until(srv.url, 1, {}))
        srv.wait_for(lambda st: st["globalVersion"] == 1, 60, "version 1")
        srv.kill()
    assert (killed / "server-state" / "optimizer-v1.safetensors").exists()
    with server_process(killed, *FLAGS) as srv:
        assert "goes on with the optimizer state saved with version 1" in srv.output()
        run_devices(_train_until(srv.url, ROUNDS, held))
        srv.wait_for(lambda st: st["globalVersion"] == ROUNDS, 60, "the last version")
    weights_a, moments_a = _final_files(straight / "server-state")
    weights_b, moments_b = _final_files(killed / "server-state")
    assert weights_a == weights_b
    assert moments_a == moments_b
