"""Wire protocol v1: every model round-trips, bad payloads are refused, the doc is current."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from client import protocol as p
from client.errors import (
    CODES,
    ERROR_CODES,
    ERROR_DESCRIPTIONS,
    FINAL_SUBMIT_CODES,
    FedtrayError,
    submit_outcome,
)
from client.protocol import events
from server import protocol_doc, protocol_examples

EXAMPLES = protocol_examples.EXAMPLES


def wire_models() -> list[type[p.WireModel]]:
    return [
        obj
        for obj in vars(p).values()
        if isinstance(obj, type) and issubclass(obj, p.WireModel) and obj is not p.WireModel
    ]


def test_every_wire_model_has_an_example() -> None:
    # Nested-only models are covered through their parents' examples.
    nested = {p.BatteryStatus, p.ResourceSnapshot, p.GpuInfo, p.PlatformInfo, p.HardwareInfo}
    nested |= {p.Capabilities, p.Limits, p.TrainingConfig, p.Partition}
    missing = set(wire_models()) - set(EXAMPLES) - nested
    assert not missing, f"add examples to server/protocol_examples.py for {missing}"


@pytest.mark.parametrize("model", list(EXAMPLES), ids=lambda m: m.__name__)
def test_example_round_trips(model: type[p.WireModel]) -> None:
    example = EXAMPLES[model]
    parsed = p.parse(model, example)
    wire = parsed.to_wire()
    # Every field given comes back unchanged and camelCase (optional fields may come back
    # as explicit nulls).
    assert without_nulls(wire) == without_nulls(example)
    assert p.parse(model, wire) == parsed


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return value


def mutate(example: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(example)
    *parents, leaf = path.split(".")
    target = out
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[leaf]
    else:
        target[leaf] = value
    return out


DELETE = object()

BAD = [
    (p.DeviceRegister, "deviceId", "not-a-uuid"),
    (p.DeviceRegister, "deviceId", DELETE),
    (p.DeviceRegister, "name", ""),
    (p.DeviceRegister, "name", "x" * 65),
    (p.DeviceRegister, "deviceType", "phone"),
    (p.DeviceRegister, "resources.cpuPercent", 101),
    (p.DeviceRegister, "resources.cpuPercent", float("nan")),
    (p.DeviceRegister, "resources.battery.percent", "50"),
    (p.DeviceRegister, "hardware.cpuCores", 0),
    (p.DeviceRegister, "capabilities.weightFormats", []),
    (p.DeviceRegister, "capabilities.weightFormats", ["pickle"]),
    (p.DeviceRegister, "capabilities.tasks", ["bad name with spaces"]),
    (p.DeviceRegister, "capabilities.maxBlobBytes", 0),
    (p.DeviceRegister, "capabilities.maxInflightChunks", "4"),
    (p.DeviceRegistered, "heartbeatIntervalSec", 0),
    (p.DeviceRegistered, "limits.maxChunkBytes", 0),
    (p.Heartbeat, "state", "sleeping"),
    (p.Heartbeat, "pauseReason", "tired"),
    (p.Heartbeat, "resources", None),
    (p.TrainingStart, "config.epochs", 0),
    (p.TrainingStart, "config.learningRate", -1.0),
    (p.TrainingStart, "config.learningRate", float("inf")),
    (p.TrainingStart, "config.optimizer", "lbfgs"),
    (p.TrainingStart, "partition.index", 3),
    (p.TrainingStart, "roundId", "../../etc/passwd"),
    (p.TrainingStart, "baseVersion", -1),
    (p.TrainingStart, "modelParams", "not an object"),
    (p.TrainingStartAck, "accepted", "yes"),
    (p.TrainingProgress, "fraction", 1.5),
    (p.TrainingProgress, "loss", float("nan")),
    (p.TrainingError, "code", "no_such_code"),
    (p.WeightsSubmit, "numSamples", 0),
    (p.WeightsSubmit, "metrics", {"trainLoss": float("inf")}),
    (p.WeightsSubmit, "weights.sha256", "XYZ"),
    (p.WeightsSubmit, "weights.format", "pickle"),
    (p.WeightsSubmit, "weights.blobId", DELETE),  # neither data nor blobId
    (p.WeightsRef, "data", b"abc"),  # both data and blobId
    (p.BlobChunk, "data", "a string, not bytes"),
    (p.BlobChunk, "offset", -1),
    (p.BlobChunk, "total", 0),
    (p.BlobStatus, "blobId", ""),
    (p.ErrorAck, "ok", True),
]


@pytest.mark.parametrize(
    ("model", "path", "value"), BAD, ids=[f"{m.__name__}-{path}" for m, path, _ in BAD]
)
def test_bad_payload_is_refused_with_bad_request(
    model: type[p.WireModel], path: str, value: Any
) -> None:
    bad = mutate(EXAMPLES[model], path, value)
    with pytest.raises(FedtrayError) as info:
        p.parse(model, bad)
    assert info.value.code == "bad_request"
    assert model.__name__ in info.value.message


@pytest.mark.parametrize("payload", [None, [], "text", 42, b"\x00\x01"])
def test_non_object_payload_is_refused(payload: object) -> None:
    with pytest.raises(FedtrayError, match="must be an object"):
        p.parse(p.Heartbeat, payload)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    example = dict(EXAMPLES[p.Heartbeat], futureField={"x": 1})
    assert "futureField" not in p.parse(p.Heartbeat, example).to_wire()


def test_inline_data_must_match_size() -> None:
    ref = {"format": "json", "size": 4, "sha256": "0" * 64, "data": b"abc"}
    with pytest.raises(FedtrayError, match="size says 4"):
        p.parse(p.WeightsRef, ref)


def test_error_ack_helper() -> None:
    ack = p.error_ack("duplicate", "already counted")
    assert ack == {"ok": False, "code": "duplicate", "message": "already counted"}


def test_every_error_code_is_described() -> None:
    assert set(ERROR_DESCRIPTIONS) == set(ERROR_CODES)


def test_protocol_doc_is_current() -> None:
    assert protocol_doc.DOC_PATH.read_text(encoding="utf-8") == protocol_doc.render(), (
        "docs/protocol.md is stale: run `python -m server.protocol_doc`"
    )


# ------------------------------------------------------------------ protocol version


@pytest.mark.parametrize("model", [p.DeviceRegister, p.DeviceRegistered], ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    ("value", "code"),
    [
        (1, None),
        (1.0, None),
        (DELETE, None),
        (2, "unsupported_protocol"),
        ("1", "unsupported_protocol"),
        (True, "unsupported_protocol"),
        (None, "unsupported_protocol"),
        ([1], "unsupported_protocol"),
    ],
)
def test_protocol_value(model: type[p.WireModel], value: Any, code: str | None) -> None:
    payload = mutate(EXAMPLES[model], "protocol", value)
    if code is None:
        assert p.parse(model, payload).to_wire()["protocol"] == 1
        return
    with pytest.raises(FedtrayError) as info:
        p.parse(model, payload)
    assert info.value.code == code
    assert "speaks protocol 1" in info.value.message


def test_device_limits_are_optional_and_default() -> None:
    register = copy.deepcopy(EXAMPLES[p.DeviceRegister])
    del register["capabilities"]["maxBlobBytes"], register["capabilities"]["maxInflightChunks"]
    caps = p.parse(p.DeviceRegister, register).capabilities
    assert (caps.max_blob_bytes, caps.max_inflight_chunks) == (
        p.DEFAULT_MAX_BLOB_BYTES,
        p.DEFAULT_INFLIGHT_CHUNKS,
    )


def test_default_chunk_fits_socketio_default_buffer_even_base64_encoded() -> None:
    base64_len = 4 * -(-p.DEFAULT_CHUNK_BYTES // 3)
    envelope = 64 * 1024  # generous room for the packet prefix and a batched JSON part
    assert base64_len + envelope <= p.SOCKETIO_DEFAULT_MAX_BUFFER_BYTES
    assert p.Limits().max_chunk_bytes == p.DEFAULT_CHUNK_BYTES


# ------------------------------------------------------------------ the event table

# Declared here a second time on purpose: the table must say exactly this.
EXPECTED_EVENTS = [
    ("device:register", "device→server", "DeviceRegister", "DeviceRegistered"),
    ("device:registered", "server→device", "DeviceRegistered", None),
    ("device:heartbeat", "device→server", "Heartbeat", "OkAck"),
    ("weights:global", "server→device", "WeightsGlobal", "OkAck"),
    ("task:file", "server→device", "TaskFile", "TaskFileHeld"),
    ("training:start", "server→device", "TrainingStart", "TrainingStartAck"),
    ("training:progress", "device→server", "TrainingProgress", None),
    ("weights:submit", "device→server", "WeightsSubmit", "SubmitAccepted"),
    ("training:cancel", "server→device", "TrainingCancel", None),
    ("training:error", "device→server", "TrainingError", None),
    ("evaluation:start", "server→device", "EvaluationStart", "EvaluationStartAck"),
    ("evaluation:result", "device→server", "EvaluationResult", None),
    ("evaluation:failed", "device→server", "EvaluationFailed", None),
    ("blob:chunk", "both", "BlobChunk", "BlobProgress"),
    ("blob:status", "both", "BlobStatus", "BlobProgress"),
    ("federation:finished", "server→device", "FederationFinished", None),
]


def test_event_table() -> None:
    got = [
        (e.name, e.direction, e.payload.__name__, e.ack.__name__ if e.ack else None)
        for e in events.EVENTS
    ]
    assert got == EXPECTED_EVENTS
    assert all(e.description and "\n" not in e.description for e in events.EVENTS)


def test_every_event_name_constant_is_in_the_table() -> None:
    names = {v for k, v in vars(p).items() if k.startswith("EV_")}
    assert names == set(events.BY_NAME)


def test_every_model_of_the_table_has_an_example() -> None:
    for spec in events.EVENTS:
        assert spec.payload in EXAMPLES
        assert spec.ack is None or spec.ack in EXAMPLES


@pytest.mark.parametrize(
    ("peer", "handled"),
    [
        (
            "device",
            {"device:registered", "weights:global", "training:start", "training:cancel"}
            | {"blob:chunk", "blob:status", "federation:finished", "task:file"}
            | {"evaluation:start"},
        ),
        (
            "server",
            {"device:register", "device:heartbeat", "training:progress", "weights:submit"}
            | {
                "training:error",
                "blob:chunk",
                "blob:status",
                "evaluation:result",
                "evaluation:failed",
            },
        ),
    ],
)
def test_handled_by(peer: events.Peer, handled: set[str]) -> None:
    assert {e.name for e in events.handled_by(peer)} == handled
    other: events.Peer = "server" if peer == "device" else "device"
    assert all(e.sent_by(other) for e in events.handled_by(peer))


def test_the_doc_lists_every_event_with_its_answer() -> None:
    text = protocol_doc.render()
    for spec in events.EVENTS:
        answer = f"ack: `{spec.ack.__name__}` or `ErrorAck`" if spec.ack else "none"
        assert f"| `{spec.name}` |" in text and f"| {answer} | {spec.description} |" in text


# ------------------------------------------------------------------ error codes


SUBMIT_FINAL = {
    "duplicate", "round_closed", "not_selected", "stale_base", "bad_request",
    "unsupported_format", "malformed", "unknown_dtype", "bad_offsets", "truncated",
    "oversized", "non_finite", "layout_mismatch", "shape_mismatch", "dtype_mismatch",
    "unknown_task", "blob_too_large",
    # task packages: no retry changes a package
    "bad_package", "no_local_data", "package_member", "package_pickle", "package_compression",
    "package_too_large", "package_bomb", "package_truncated", "package_weights",
    "package_data_mismatch", "package_shape", "package_program", "package_operator",
}  # fmt: skip


@pytest.mark.parametrize("code", ERROR_CODES)
def test_each_code_is_declared_once_with_its_submit_outcome(code: str) -> None:
    expected = "final" if code in SUBMIT_FINAL else "retry"
    assert CODES[code].submit == submit_outcome(code) == expected  # type: ignore[index]
    assert (code in FINAL_SUBMIT_CODES) == (expected == "final")
    assert ERROR_DESCRIPTIONS[code] == CODES[code].description  # type: ignore[index]


def test_an_unknown_code_is_retried_like_internal_error() -> None:
    assert submit_outcome("some_future_code") == "retry"


def test_the_doc_gives_each_code_its_submit_outcome() -> None:
    text = protocol_doc.render()
    for code, spec in CODES.items():
        assert f"| `{code}` | {spec.description} | {spec.submit} |" in text


def test_the_doc_says_how_a_federation_ends() -> None:
    text = protocol_doc.render()
    assert 'There is no "federation over"' not in text
    for phrase in ("keeps serving until it is stopped", "registers after the end"):
        assert phrase in text
    assert "does not read the device's" not in text  # the server keeps to device limits
