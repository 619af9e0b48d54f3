"""Unusable global weights are refused at ``weights:global``, and the server learns from it.

* The layout check lists every difference, with the code of the first kind present
  (table tests of :func:`client.weights.check_layout_matches`).
* :class:`client.session.expected_layout.ExpectedLayouts` knows the layout of a built-in
  task's model from the message's ``modelParams`` without torch, a held package's from its
  weights, and nothing for tasks it cannot know cheaply.
* A hostile server (a real python-socketio server on loopback) sends a real
  :class:`client.session.DistributedClient` weights that do not fit: the ack is
  ``ok: false`` with the exact code and every mismatch, nothing is stored, and the
  previous global stays held (on disk and in the snapshot).
* The real server, answered ``layout_mismatch`` by a device, records the refusal (the
  dashboard's ``refusal``), never sends that version again (not even after a reconnect),
  never selects the device, and offers the next version as usual.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.global_store import GlobalStore
from client.protocol import (
    EV_WEIGHTS_GLOBAL,
    DeviceRegister,
    FileRef,
    WeightsGlobal,
    error_ack,
    parse,
)
from client.session import DistributedClient
from client.session.expected_layout import ExpectedLayouts
from client.tasks.base import mlp_layout
from client.weights import (
    Layout,
    LayoutMismatchError,
    StateDict,
    TensorSpec,
    check_layout_matches,
    decode,
    encode,
    layout_mismatches,
    layout_of,
    sha256_hex,
)
from client.weights.checks import mismatch_text
from server.registry import Registry
from tests.hostile_server import HostileServer, hostile_client
from tests.server_harness import (
    TINY_PARAMS,
    ScriptedDevice,
    ServerHandle,
    register_payload,
    run_devices,
    running_server,
)
from tests.waiting import scaled

EXPECTED: Layout = {
    "conv.w": TensorSpec("float32", (4, 3)),
    "conv.b": TensorSpec("float32", (4,)),
}

# --------------------------------------------------------------------------- the check


def test_every_kind_of_difference_is_listed_not_only_the_first() -> None:
    state = {
        "conv.w": np.zeros((3, 4), np.float64),  # shape and dtype
        "fc.w": np.zeros(2, np.float32),  # unexpected
    }  # conv.b missing
    with pytest.raises(LayoutMismatchError) as excinfo:
        decode(encode(state), expected=EXPECTED)
    assert excinfo.value.code == "layout_mismatch"
    assert excinfo.value.problems == [
        "missing 'conv.b'",
        "unexpected 'fc.w'",
        "'conv.w': shape [3, 4] expected [4, 3]",
        "'conv.w': dtype float64 expected float32",
    ]
    assert excinfo.value.message == mismatch_text(excinfo.value.problems)
    assert excinfo.value.message.endswith("; ".join(excinfo.value.problems))


CODE_CASES: list[tuple[str, Layout, str]] = [
    (
        "dtype and shape: dtype",
        {"conv.w": TensorSpec("float64", (4, 3)), "conv.b": TensorSpec("float32", (5,))},
        "dtype_mismatch",
    ),
    (
        "shape only",
        {"conv.w": TensorSpec("float32", (4, 3)), "conv.b": TensorSpec("float32", (5,))},
        "shape_mismatch",
    ),
    (
        "a name and a dtype: layout",
        {"conv.w": TensorSpec("float16", (4, 3))},
        "layout_mismatch",
    ),
]


@pytest.mark.parametrize(
    ("got", "code"), [c[1:] for c in CODE_CASES], ids=[c[0] for c in CODE_CASES]
)
def test_the_code_is_the_first_kind_present(got: Layout, code: str) -> None:
    with pytest.raises(LayoutMismatchError) as excinfo:
        check_layout_matches(got, EXPECTED)
    assert excinfo.value.code == code
    assert excinfo.value.problems == layout_mismatches(got, EXPECTED)


def test_a_match_passes() -> None:
    check_layout_matches(dict(EXPECTED), EXPECTED)
    assert layout_mismatches(EXPECTED, EXPECTED) == []


def test_long_names_and_shapes_stay_within_an_ack() -> None:
    got = {"n" * 500 + str(i): TensorSpec("float32", (7,) * 300) for i in range(50)}
    with pytest.raises(LayoutMismatchError) as excinfo:
        check_layout_matches(got, EXPECTED)
    assert len(excinfo.value.problems) == 52
    assert len(excinfo.value.message) <= 900
    assert excinfo.value.message.endswith(" more")


# --------------------------------------------------------------------------- what is expected


def _global(task: str, params: dict[str, Any] | None = None, **extra: Any) -> WeightsGlobal:
    data = encode({})
    return WeightsGlobal.model_validate(
        {
            "version": 1,
            "task": task,
            "weights": {
                "format": "safetensors",
                "size": len(data),
                "sha256": sha256_hex(data),
                "data": data,
            },
            "modelParams": params or {},
            **extra,
        }
    )


def test_built_in_tasks_are_known_from_the_model_params_without_torch() -> None:
    known = ExpectedLayouts(lambda sha: None)
    digits = known.of(_global("digits"))
    assert digits is not None and digits[0] == mlp_layout(64, 64, 10)  # the defaults
    small = known.of(_global("digits", {"hidden": 8}))
    assert small is not None and small[0] == mlp_layout(64, 8, 10)
    synthetic = known.of(_global("synthetic", dict(TINY_PARAMS)))
    features, classes, hidden = (TINY_PARAMS[k] for k in ("features", "classes", "hidden"))
    assert synthetic is not None
    assert synthetic[0] == mlp_layout(int(features), int(hidden), int(classes))  # type: ignore[call-overload]


def test_finding_a_built_in_layout_imports_no_torch() -> None:
    script = (
        "import sys\n"
        "from client.protocol import WeightsGlobal\n"
        "from client.session.expected_layout import ExpectedLayouts\n"
        "m = WeightsGlobal.model_validate({'version': 0, 'task': 'digits', 'weights': "
        "{'format': 'json', 'size': 2, 'sha256': '0' * 64, 'data': b'{}'}})\n"
        "assert ExpectedLayouts(lambda s: None).of(m) is not None\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert done.returncode == 0, done.stderr


def test_unknown_models_are_not_checked() -> None:
    asked: list[str] = []

    def package_path(sha: str) -> Path | None:
        asked.append(sha)
        return None

    known = ExpectedLayouts(package_path)
    assert known.of(_global("float64-plugin")) is None  # a plugin: may import torch
    assert known.of(_global("no-such-task")) is None
    assert known.of(_global("digits", {"hidden": 0})) is None  # bad params: training says
    ref = FileRef(sha256="a" * 64, size=10)
    assert known.of(_global("pkg", package=ref.to_wire())) is None  # not held yet
    assert known.of(_global("pkg", package=ref.to_wire())) is None  # asked again
    assert asked == ["a" * 64, "a" * 64]


# --------------------------------------------------------------------------- hostile server


def send_global(
    fake: HostileServer,
    version: int,
    state: StateDict,
    params: dict[str, Any],
    fmt: str = "safetensors",
) -> Any:
    """``weights:global`` with the weights inline, as the hostile server's device sees it."""
    data = encode(state, fmt)  # type: ignore[arg-type]
    payload = {
        "version": version,
        "task": "digits",
        "modelParams": params,
        "weights": {"format": fmt, "size": len(data), "sha256": sha256_hex(data), "data": data},
    }
    return fake.call(EV_WEIGHTS_GLOBAL, payload)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[HostileServer, DistributedClient, Path]]:
    with hostile_client(tmp_path, task="digits") as (fake, client):
        yield fake, client, tmp_path / "client-data"


def _mlp(hidden: int, features: int = 64, classes: int = 10) -> StateDict:
    rng = np.random.default_rng(hidden)
    return {
        name: rng.standard_normal(spec.shape).astype(spec.dtype)
        for name, spec in mlp_layout(features, hidden, classes).items()
    }


def test_weights_that_do_not_fit_are_refused_with_every_mismatch_and_the_old_global_kept(
    hostile: tuple[HostileServer, DistributedClient, Path], caplog: pytest.LogCaptureFixture
) -> None:
    fake, client, data_dir = hostile
    good = _mlp(64)
    assert send_global(fake, 1, good, {}) == {"ok": True}
    client.wait_for(lambda s: s.weights_version == 1, 10)
    store = GlobalStore(data_dir / "global")
    kept = store.weights_path.read_bytes()

    bad = dict(good)
    bad["0.weight"] = np.zeros((64, 65), np.float32)  # shape
    bad["0.bias"] = np.zeros(64, np.float64)  # dtype
    del bad["2.weight"]  # missing
    bad["extra"] = np.zeros(3, np.float32)  # unexpected
    problems = [
        "missing '2.weight'",
        "unexpected 'extra'",
        "'0.bias': dtype float64 expected float32",
        "'0.weight': shape [64, 65] expected [64, 64]",
    ]
    refusals: list[tuple[str, dict[str, Any], StateDict, str, list[str]]] = [
        ("every kind", {}, bad, "layout_mismatch", problems),
        (
            # The model the message names: hidden=8, so the hidden=64 weights do not fit.
            "other params",
            {"hidden": 8},
            good,
            "shape_mismatch",
            [
                "'0.bias': shape [64] expected [8]",
                "'0.weight': shape [64, 64] expected [8, 64]",
                "'2.weight': shape [10, 64] expected [10, 8]",
            ],
        ),
        (
            "dtype only",
            {},
            {k: v.astype(np.float64) for k, v in good.items()},
            "dtype_mismatch",
            [f"'{n}': dtype float64 expected float32" for n in sorted(good)],
        ),
    ]
    with caplog.at_level(logging.WARNING, logger="client.session"):
        for label, params, state, code, lines in refusals:
            for fmt in ("safetensors", "json"):
                ack = send_global(fake, 2, state, params, fmt)
                assert ack["ok"] is False and ack["code"] == code, (label, fmt, ack)
                # safetensors lists tensors in its own order; compare the set, and the count.
                listed = ack["message"].split(": ", 1)[1].split("; ")
                assert sorted(listed) == sorted(lines), (label, fmt, ack["message"])
                assert f"({len(lines)} difference" in ack["message"]
    # Nothing stored: the previous global is held, on disk and in the snapshot.
    assert store.weights_path.read_bytes() == kept
    held = store.current()
    assert held is not None and held.version == 1
    assert client.snapshot().weights_version == 1
    assert sum("refused global weights v2" in r.getMessage() for r in caplog.records) == 6
    # A fitting version is still taken.
    assert send_global(fake, 3, _mlp(8), {"hidden": 8}) == {"ok": True}
    client.wait_for(lambda s: s.weights_version == 3, 10)


# --------------------------------------------------------------------------- the server learns


@dataclass(eq=False)
class _RefusingDevice(ScriptedDevice):
    """Answers every ``weights:global`` with ``layout_mismatch``; records the versions."""

    offered: list[int] | None = None

    async def _on_global(self, payload: Any) -> dict[str, Any]:
        msg = parse(WeightsGlobal, payload)
        assert self.offered is not None
        self.offered.append(msg.version)
        return error_ack(
            "layout_mismatch", "the tensors do not match the model (1 difference): missing 'x'"
        )


def test_registry_keeps_a_device_that_refused_weights_out_until_it_holds_them() -> None:
    registry = Registry(stale_after=30)
    device_id = str(uuid.uuid4())
    reg = parse(DeviceRegister, register_payload(device_id, "dev", tasks=("synthetic",)))
    registry.register(reg, "sid1", 0.0)
    registry.refused_weights(device_id, 4, "shape_mismatch", "the tensors ...")
    record = registry.get(device_id)
    assert record is not None
    assert registry.ineligibility(record, "synthetic", 1.0) == "refused the global weights"
    assert record.refusal == "global weights v4: shape_mismatch: the tensors ..."
    registry.register(reg, "sid2", 2.0)  # a reconnect holding nothing newer: still refused
    assert registry.ineligibility(record, "synthetic", 2.0) == "refused the global weights"
    registry.holds_version(device_id, 5)  # took a newer version
    assert record.refused_version is None and record.refusal is None
    assert registry.ineligibility(record, "synthetic", 3.0) is None


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_server_records_the_refusal_and_stops_resending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    offered: list[int] = []
    out: dict[str, Any] = {}

    async def scenario(srv: ServerHandle) -> None:
        bad = _RefusingDevice(srv.url, name="refuser", offered=offered)
        await bad.join()
        await bad.until(lambda: offered == [0], what="version 0 offered and refused")
        # Reconnecting does not bring the same version again.
        await bad.disconnect()
        await bad.join()
        good = ScriptedDevice(srv.url, name="good")
        await good.join()
        await good.until(lambda: len(good.starts) == 1, what="a round started")
        start = good.starts[0]
        update = {k: v * np.float32(0.5) for k, v in good.weights[0].items()}
        ack = await good.submit(start["roundId"], 0, update, num_samples=5)
        assert ack["ok"] is True
        await good.until(lambda: 1 in good.weights, timeout=30, what="version 1")
        # The new version is offered once; refused again, never resent.
        await bad.until(lambda: offered == [0, 1], timeout=30, what="version 1 offered")
        out["status"] = srv.status()
        out["bad_starts"] = list(bad.starts)
        await bad.heartbeat()
        await bad.disconnect()
        await bad.join()
        await bad.heartbeat()

    with (
        caplog.at_level(logging.INFO, logger="server"),
        running_server(tmp_path, min_clients=1, clients_per_round=10, rounds=1) as srv,
    ):
        run_devices(scenario(srv))
        srv.wait_for(lambda st: st["phase"] == "finished", what="the federation finished")
    assert offered == [0, 1]
    assert out["bad_starts"] == []
    [refuser] = [d for d in out["status"]["devices"] if d["name"] == "refuser"]
    assert refuser["refusal"].startswith("global weights v1: layout_mismatch: ")
    lines = [r.getMessage() for r in caplog.records if "as unusable" in r.getMessage()]
    assert len(lines) == 2 and all("refuser" in line for line in lines), lines


@pytest.mark.slow
def test_a_held_package_gives_the_layout_of_its_weights(tmp_path: Path) -> None:
    from tests.taskpkg_packer import pack  # torch: the packer exports a model

    path = tmp_path / "task.fedtask"
    contents = pack(path)
    sha = sha256_hex(path.read_bytes())
    known = ExpectedLayouts(lambda s: path if s == sha else None)
    ref = FileRef(sha256=sha, size=path.stat().st_size).to_wire()
    found = known.of(_global("small-cnn", package=ref))
    assert found is not None and found[0] == layout_of(contents.weights)
    wrong = dict(contents.weights)
    wrong.pop(sorted(wrong)[0])
    with pytest.raises(LayoutMismatchError) as excinfo:
        decode(encode(wrong), expected=found[0])
    assert excinfo.value.problems == [f"missing {sorted(contents.weights)[0]!r}"]
