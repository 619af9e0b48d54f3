"""BaseWeights: a new version is stored under its own name and the work built on older
bases is deleted in the same hop, sparing the work in use; the held version again is not
stored again."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.atomicfile import file_identity
from client.global_store import GlobalStore, GlobalWeights
from client.protocol import WeightsGlobal
from client.session.base_weights import BaseWeights
from client.session.hub import SnapshotHub
from client.settings_model import Settings
from client.snapshot import ClientSnapshot
from client.weights import encode, sha256_hex
from client.workfiles import WorkDir


def _message(version: int, fill: float) -> WeightsGlobal:
    data = encode({"w": np.full((2, 3), fill, np.float32)}, "safetensors")
    return WeightsGlobal.model_validate(
        {
            "version": version,
            "task": "synthetic",
            "weights": {
                "format": "safetensors",
                "size": len(data),
                "sha256": sha256_hex(data),
                "data": data,
            },
        }
    )


def test_a_newer_version_drops_older_work_but_the_busy_and_the_held_again_is_kept(
    tmp_path: Path,
) -> None:
    asyncio.run(_newer_version(tmp_path))


async def _newer_version(tmp_path: Path) -> None:
    hub = SnapshotHub(
        ClientSnapshot(settings=Settings(server_url="http://127.0.0.1:1", device_name="t"))
    )
    work = WorkDir(tmp_path / "work")
    store = GlobalStore(tmp_path / "global")
    busy = {"work-v1-" + "b" * 24}
    weights = BaseWeights(hub, store, work=work, busy_keys=lambda: busy)
    await weights.on_weights_global(_message(1, 1.0))
    assert weights.held is not None and weights.held.version == 1
    assert hub.current.weights_version == 1
    work.directory.mkdir()
    names = [f"work-v1-{c * 24}.ckpt" for c in "ab"] + [f"work-v2-{'c' * 24}.ckpt"]
    for name in names:
        (work.directory / name).write_bytes(b"x")
    first = file_identity(weights.held.path)

    await weights.on_weights_global(_message(1, 1.0))  # the held document again
    assert file_identity(weights.held.path) == first
    assert sorted(p.name for p in work.directory.iterdir()) == sorted(names)

    await weights.on_weights_global(_message(2, 2.0))
    assert weights.held.version == 2 and hub.current.weights_version == 2
    # v1's work is dead but for the busy one; v2's is the held version's.
    assert sorted(p.name for p in work.directory.iterdir()) == sorted(names[1:])
    assert store.current() == weights.held


@pytest.mark.parametrize(
    ("fmt", "shape", "package", "on_loop"),
    [
        ("safetensors", (2, 3), False, True),  # small: no hop to a thread
        ("safetensors", (600, 600), False, False),  # 1.44 MB, over SMALL_DISK_BYTES
        ("json", (2, 3), False, False),  # parsed and re-encoded: in a thread whatever its size
        # A package's expected layout reads the package (up to its archive limit).
        ("safetensors", (2, 3), True, False),
    ],
)
def test_small_safetensors_are_saved_on_the_loop_and_the_rest_in_a_thread(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    shape: tuple[int, int],
    package: bool,
    on_loop: bool,
) -> None:
    store = GlobalStore(tmp_path / "global")
    threads: list[threading.Thread] = []
    save = store.save

    def noted_save(**kwargs: Any) -> GlobalWeights:
        threads.append(threading.current_thread())
        return save(**kwargs)

    monkeypatch.setattr(store, "save", noted_save)
    state = {"w": np.full(shape, 0.5, np.float32)}
    data = encode(state, fmt)  # type: ignore[arg-type]
    message = WeightsGlobal.model_validate(
        {
            "version": 1,
            "task": "synthetic",
            "weights": {"format": fmt, "size": len(data), "sha256": sha256_hex(data), "data": data},
            # Not held by this device: no layout to check against (nothing read either).
            "package": {"sha256": "0" * 64, "size": 5} if package else None,
        }
    )

    async def run() -> BaseWeights:
        hub = SnapshotHub(
            ClientSnapshot(settings=Settings(server_url="http://127.0.0.1:1", device_name="t"))
        )
        weights = BaseWeights(hub, store, work=WorkDir(tmp_path / "work"), busy_keys=set)
        await weights.on_weights_global(message)
        return weights

    weights = asyncio.run(run())
    assert (threads == [threading.main_thread()]) is on_loop and len(threads) == 1
    assert weights.held is not None and store.current() == weights.held
