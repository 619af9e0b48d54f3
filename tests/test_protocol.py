"""Wire protocol v1: every model round-trips, bad payloads are refused, the doc is current."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from client import protocol as p
from client.errors import ERROR_CODES, ERROR_DESCRIPTIONS, FedtrayError
from server import protocol_doc

EXAMPLES = protocol_doc.EXAMPLES


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
    assert not missing, f"add examples to server/protocol_doc.py for {missing}"


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
    (p.DeviceRegister, "protocol", 2),
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
