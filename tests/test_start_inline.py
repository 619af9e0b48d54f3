"""A small global rides in ``training:start`` (``baseWeights``), over the real server.

* A device selected for a round that lacks the new version gets it inside
  ``training:start`` (inline, with the round's base version), not by a separate
  ``weights:global``; the server then counts it as holding that version.
* A device not selected still gets the version by ``weights:global``.
* A device that refuses the carried weights (an ErrorAck to ``training:start``) is
  recorded as refusing that version, as for ``weights:global``, and is not trained.
* A device whose connection is cut while a ``training:start`` carrying the global is
  unanswered is offered its part again as soon as it is back, not once that dead
  start's ack times out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.protocol import WeightsGlobal, error_ack, parse
from tests.server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

pytestmark = pytest.mark.timeout(60)


@dataclass(eq=False)
class _RefusesV1(ScriptedDevice):
    """Takes version 0, refuses version 1 as unusable."""

    async def _on_global(self, payload: Any) -> dict[str, Any]:
        if parse(WeightsGlobal, payload).version == 1:
            return error_ack("shape_mismatch", "the tensors do not match the model")
        return await super()._on_global(payload)


@dataclass(eq=False)
class _CutWhileCarried(ScriptedDevice):
    """Takes a start carrying version 1 but answers it only after ``answer`` is set (the
    test cuts the connection meanwhile: the answer is never delivered)."""

    answer: asyncio.Event = field(default_factory=asyncio.Event)

    async def _on_start(self, payload: dict[str, Any]) -> dict[str, Any]:
        reply = await super()._on_start(payload)
        base = payload.get("baseWeights")
        if base is not None and parse(WeightsGlobal, base).version == 1:
            await self.answer.wait()
        return reply


def _half(dev: ScriptedDevice, version: int) -> dict[str, np.ndarray[Any, Any]]:
    return {k: v * np.float32(0.5) for k, v in dev.weights[version].items()}


def test_the_next_round_carries_a_small_global_in_training_start(tmp_path: Path) -> None:
    out: dict[str, Any] = {}

    async def scenario(srv: ServerHandle) -> None:
        a = ScriptedDevice(srv.url, name="a")
        b = ScriptedDevice(srv.url, name="b")
        for dev in (a, b):
            await dev.join()
            await dev.until(lambda d=dev: 0 in d.weights, what="version 0")  # type: ignore[misc]
        await a.until(lambda: len(a.starts) == 1 and len(b.starts) == 1, what="round 1")
        for dev in (a, b):
            start = dev.starts[0]
            assert (await dev.submit(start["roundId"], 0, _half(dev, 0), num_samples=4))["ok"]
        await a.until(lambda: len(a.starts) == 2 and len(b.starts) == 2, what="round 2")
        out["a"], out["b"] = a, b
        out["status"] = await srv.await_status(
            lambda s: all(d["weightsVersion"] == 1 for d in s["devices"])
        )

    with running_server(
        tmp_path, min_clients=2, clients_per_round=2, rounds=2, evaluate_every=0
    ) as srv:
        run_devices(scenario(srv))
    for dev in (out["a"], out["b"]):
        second = dev.starts[1]
        assert second["baseVersion"] == 1
        carried = parse(WeightsGlobal, second["baseWeights"])
        assert carried.version == 1 and carried.weights.data is not None
        assert 1 in dev.weights  # taken from training:start ...
        # ... and never sent again by weights:global (version 0 was, before round 1).
        assert [m["version"] for m in dev.globals_meta] == [0, 1]
        assert all(m["inline"] for m in dev.globals_meta)


def test_a_device_not_started_gets_the_version_by_weights_global(tmp_path: Path) -> None:
    async def scenario(srv: ServerHandle) -> None:
        a = ScriptedDevice(srv.url, name="a")
        await a.join()
        await a.until(lambda: len(a.starts) == 1, what="round 1")
        idle = ScriptedDevice(srv.url, name="idle", start_reply={"accepted": False})
        await idle.join()
        await idle.until(lambda: 0 in idle.weights, what="version 0")
        start = a.starts[0]
        assert (await a.submit(start["roundId"], 0, _half(a, 0), num_samples=4))["ok"]
        await idle.until(lambda: 1 in idle.weights, what="version 1 by weights:global")
        assert idle.starts == []  # never started: the one slot of the one round was taken

    with running_server(
        tmp_path, min_clients=1, clients_per_round=1, rounds=1, evaluate_every=0
    ) as srv:
        run_devices(scenario(srv))


def test_weights_refused_inside_training_start_are_recorded_and_not_trained(
    tmp_path: Path,
) -> None:
    out: dict[str, Any] = {}

    async def scenario(srv: ServerHandle) -> None:
        bad = _RefusesV1(srv.url, name="bad")
        await bad.join()
        await bad.until(lambda: len(bad.starts) == 1, what="round 1")
        start = bad.starts[0]
        assert (await bad.submit(start["roundId"], 0, _half(bad, 0), num_samples=4))["ok"]
        await bad.until(lambda: len(bad.starts) == 2, what="round 2 offered")
        assert "baseWeights" in bad.starts[1]
        out["status"] = await srv.await_status(lambda s: s["devices"][0].get("refusal") is not None)

    with running_server(
        tmp_path, min_clients=1, clients_per_round=1, rounds=3, evaluate_every=0
    ) as srv:
        run_devices(scenario(srv))
    [device] = out["status"]["devices"]
    assert device["refusal"].startswith("global weights v1: shape_mismatch: ")
    assert device["weightsVersion"] == 0


def test_a_device_cut_while_a_start_carries_the_global_is_offered_again_at_once(
    tmp_path: Path,
) -> None:
    ack_timeout = 60.0  # the dead start's answer is awaited this long (scaled)

    async def scenario(srv: ServerHandle) -> None:
        cut = _CutWhileCarried(srv.url, name="cut")
        holder = ScriptedDevice(srv.url, name="holder")  # keeps round 2 open meanwhile
        for dev in (cut, holder):
            await dev.join()
            await dev.until(lambda d=dev: 0 in d.weights, what="version 0")  # type: ignore[misc]
        await cut.until(lambda: len(cut.starts) == 1 and len(holder.starts) == 1, what="round 1")
        for dev in (cut, holder):
            start = dev.starts[0]
            assert (await dev.submit(start["roundId"], 0, _half(dev, 0), num_samples=4))["ok"]
        await cut.until(lambda: len(cut.starts) == 2, what="round 2, carrying version 1")
        assert cut.starts[1].get("baseWeights") is not None and 1 in cut.weights
        # Both stay alive (heartbeats): round 2 stays open while the cut device is away.
        beats = [asyncio.create_task(holder.heartbeat_forever("training"))]
        try:
            await cut.disconnect()  # its answer to that training:start never arrives
            cut.answer.set()
            await cut.join(weights_version=1)
            beats.append(asyncio.create_task(cut.heartbeat_forever("training")))
            # Far sooner than the dead start's ack timeout (the re-offer used to wait it out).
            await cut.until(lambda: len(cut.starts) == 3, 10.0, "round 2 offered again")
            status = await srv.await_status(lambda s: s["currentRound"] is not None)
        finally:
            for beat in beats:
                beat.cancel()
        round_id = cut.starts[1]["roundId"]
        assert (cut.starts[2]["roundId"], status["currentRound"]["roundId"]) == (round_id,) * 2
        assert cut.starts[2].get("baseWeights") is None  # it said it holds version 1
        assert [m["version"] for m in cut.globals_meta] == [0, 1]  # never sent twice

    with running_server(
        tmp_path,
        min_clients=2,
        clients_per_round=2,
        rounds=2,
        evaluate_every=0,
        ack_timeout=ack_timeout,
        round_timeout=2 * ack_timeout,
    ) as srv:
        run_devices(scenario(srv))
