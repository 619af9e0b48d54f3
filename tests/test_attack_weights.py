"""Weights crafted to attack, sent to the real server as ``weights:submit`` in an open round.

A scripted device that was selected for a round submits each hostile document inline;
the server must refuse each with its own code in the ErrorAck, count none of them, and
still accept a good update afterwards, whose aggregate is exactly that good update. The
same bytes are decoded by the client's codec (what a device does with ``weights:global``)
and must be refused with the same code. Nothing is ever unpickled: the pickle cases are
real pickles of the model's state dict.

``tests/test_weights.py`` holds the codec's exhaustive byte-level tables; this module
checks that those refusals survive the trip through the server's handler, with the real
model layout as the expected one.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.errors import FedtrayError
from client.protocol import EV_WEIGHTS_SUBMIT
from client.transfer import send_blob
from client.weights import (
    StateDict,
    WeightsError,
    decode,
    encode,
    layout_of,
    sha256_hex,
    verify_blob,
)
from tests.server_harness import ScriptedDevice, ServerHandle, run_devices, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

_DT = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}


def _st_doc(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _hand_made(state: StateDict, **override: dict[str, Any]) -> bytes:
    """A safetensors document written by hand, with per-tensor header overrides."""
    header: dict[str, Any] = {}
    body = b""
    for name in sorted(state):
        arr = np.ascontiguousarray(state[name])
        start = len(body)
        body += arr.tobytes()
        header[name] = {
            "dtype": _DT[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [start, len(body)],
        }
        header[name].update(override.get(name, {}))
    return _st_doc(header, body)


def _cases(base: StateDict) -> list[tuple[str, bytes, str, str]]:
    """(label, data, wire format, expected code)."""
    names = sorted(base)
    first, second = names[0], names[1]
    with_inf = {k: v.copy() for k, v in base.items()}
    with_inf[first].flat[0] = np.inf
    good = encode(base)
    size0 = base[first].nbytes
    return [
        ("pickle as safetensors", pickle.dumps(base), "safetensors", "malformed"),
        ("pickle as json", pickle.dumps(base), "json", "malformed"),
        (
            "huge shape",
            _hand_made(base, **{first: {"shape": [10**12, 10**6]}}),
            "safetensors",
            "oversized",
        ),
        (
            "overlapping offsets",
            _hand_made(base, **{second: {"data_offsets": [0, base[second].nbytes]}}),
            "safetensors",
            "bad_offsets",
        ),
        ("Inf", _hand_made(with_inf), "safetensors", "non_finite"),
        ("NaN in json", _json_with_nan(base, second), "json", "non_finite"),
        (
            "integer dtype",
            encode({k: v.astype(np.int64) for k, v in base.items()}),
            "safetensors",
            "dtype_mismatch",
        ),
        (
            "unknown dtype",
            _hand_made(base, **{first: {"dtype": "C64"}}),
            "safetensors",
            "unknown_dtype",
        ),
        (
            "missing tensor",
            encode({k: v for k, v in base.items() if k != first}),
            "safetensors",
            "layout_mismatch",
        ),
        (
            "extra tensor",
            encode({**base, "evil": np.zeros(2, np.float32)}),
            "safetensors",
            "layout_mismatch",
        ),
        (
            "wrong shape",
            encode({k: v.reshape(-1) if v.ndim > 1 else v for k, v in base.items()}),
            "safetensors",
            "shape_mismatch",
        ),
        ("truncated", good[: len(good) - size0 // 2], "safetensors", "truncated"),
    ]


def _json_with_nan(base: StateDict, name: str) -> bytes:
    """The json document of ``base`` with a bare ``NaN`` token in tensor ``name``."""
    doc = json.loads(encode(base, "json"))
    doc[name]["data"][0] = float("nan")
    return json.dumps(doc).encode("utf-8")  # json.dumps writes NaN (not strict JSON)


def _inline(round_id: str, data: bytes, fmt: str, **weights: Any) -> dict[str, Any]:
    return {
        "roundId": round_id,
        "baseVersion": 0,
        "numSamples": 5,
        "weights": {
            "format": fmt,
            "size": len(data),
            "sha256": sha256_hex(data),
            "data": data,
            **weights,
        },
    }


def test_hostile_weights_are_refused_with_their_codes_and_never_counted(tmp_path: Path) -> None:
    results: dict[str, Any] = {}

    async def scenario(srv: ServerHandle) -> None:
        a, b = ScriptedDevice(srv.url, name="a"), ScriptedDevice(srv.url, name="b")
        for dev in (a, b):
            await dev.join()
        await a.until(lambda: len(a.starts) == 1 and len(b.starts) == 1, what="round start")
        round_id = a.starts[0]["roundId"]
        base = a.weights[0]
        layout = layout_of(base)
        refused: dict[str, str] = {}
        for label, data, fmt, code in _cases(base):
            # The client's codec refuses the same bytes with the same code.
            with pytest.raises(WeightsError) as excinfo:
                decode(data, fmt, expected=layout)  # type: ignore[arg-type]
            assert excinfo.value.code == code, (label, excinfo.value.message)
            ack = await a.call(EV_WEIGHTS_SUBMIT, _inline(round_id, data, fmt))
            assert ack["ok"] is False and ack["message"], (label, ack)
            refused[label] = ack["code"]
        good_update = {k: v * np.float32(0.5) for k, v in base.items()}
        good = encode(good_update)
        transport = [
            (
                "sha256 mismatch",
                _inline(round_id, good, "safetensors", sha256="0" * 64),
                "checksum_mismatch",
            ),
            # Inline: the message itself does not validate (size != len(data)).
            (
                "inline size mismatch",
                _inline(round_id, good, "safetensors", size=len(good) + 1),
                "bad_request",
            ),
            ("pickle format", _inline(round_id, good, "pickle"), "bad_request"),
        ]
        for label, payload, _code in transport:
            ack = await a.call(EV_WEIGHTS_SUBMIT, payload)
            refused[label] = ack["code"]
        # Via a blob: complete bytes, but the reference claims another size.
        await send_blob(a.call, good, blob_id="sized", chunk_bytes=1 << 16)
        lying = _inline(round_id, good, "safetensors", size=len(good) + 1)
        del lying["weights"]["data"]
        lying["weights"]["blobId"] = "sized"
        refused["blob size mismatch"] = (await a.call(EV_WEIGHTS_SUBMIT, lying))["code"]
        transport.append(("blob size mismatch", lying, "size_mismatch"))
        with pytest.raises(FedtrayError) as transport_error:
            verify_blob(good, size=len(good), sha256="0" * 64)
        assert transport_error.value.code == "checksum_mismatch"
        results["refused"] = refused
        results["expected"] = {c[0]: c[3] for c in _cases(base)} | {t[0]: t[2] for t in transport}
        # None of those counted: the good update is the first of this round...
        ok = await a.call(EV_WEIGHTS_SUBMIT, _inline(round_id, good, "safetensors"))
        assert ok == {"ok": True, "roundId": round_id, "received": 1}
        # ...and the only one: b leaves, the round closes with a's update alone.
        await b.disconnect()
        await a.until(lambda: 1 in a.weights, timeout=30, what="global version 1")
        results["aggregate"] = a.weights[1]
        results["good"] = good_update

    with running_server(tmp_path, min_clients=2, clients_per_round=2, round_timeout=30) as srv:
        run_devices(scenario(srv))
        status = srv.wait_for(lambda st: bool(st["history"]), what="the round")
    assert results["refused"] == results["expected"]
    [record] = status["history"]
    assert record["outcome"] == "completed" and record["clientsReported"] == 1
    for name, value in results["good"].items():
        np.testing.assert_allclose(results["aggregate"][name], value, rtol=1e-6)
