"""Generates ``docs/protocol.md`` from the wire models, so the document cannot drift.

``python -m server.protocol_doc`` rewrites the file; ``--check`` exits 1 when it is stale
(a test runs the check). The prose below is the part of the contract that types cannot
say (order of events, the blob rules, the formats); the schemas come from
:mod:`client.protocol` and :mod:`server.status`, the examples are validated against the
models by the tests.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from client import protocol as p
from client.errors import ERROR_DESCRIPTIONS

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

DEVICE_ID = "6f1c2a4e-8d3b-4c55-9a7e-2b9f0e1d3c47"
SHA = "3b5d5c3712955042212316173ccf37be800b3d6ae2bfa2d6e8f6e2f0b11aa8f4"
RESOURCES: dict[str, Any] = {
    "cpuPercent": 12.5,
    "ramUsedPercent": 61.0,
    "ramAvailableMb": 6144,
    "battery": {"percent": 87.0, "pluggedIn": False},
}

# One valid example per wire model, in wire form (camelCase). Tests parse each one.
EXAMPLES: dict[type[p.WireModel], dict[str, Any]] = {
    p.DeviceRegister: {
        "protocol": 1,
        "deviceId": DEVICE_ID,
        "name": "alice-laptop",
        "deviceType": "laptop",
        "platform": {"os": "Linux", "release": "6.1.0", "arch": "x86_64", "python": "3.11.7"},
        "hardware": {"cpuCores": 8, "ramTotalMb": 16000, "gpu": None, "batteryPresent": True},
        "resources": RESOURCES,
        "capabilities": {
            "torchVersion": "2.13.0",
            "simulation": False,
            "tasks": ["digits", "synthetic"],
            "weightFormats": ["safetensors", "json"],
            "maxChunkBytes": 1048576,
        },
        "clientVersion": "0.1.0",
        "weightsVersion": None,
        "state": "idle",
        "pauseReason": None,
        "pauseDetail": None,
    },
    p.DeviceRegistered: {
        "ok": True,
        "protocol": 1,
        "deviceId": DEVICE_ID,
        "heartbeatIntervalSec": 10.0,
        "serverVersion": "0.1.0",
        "limits": {"maxChunkBytes": 1048576, "maxBlobBytes": 536870912, "maxInflightChunks": 4},
        "task": "digits",
        "globalVersion": 3,
    },
    p.Heartbeat: {
        "state": "paused",
        "pauseReason": "battery_low",
        "pauseDetail": "On battery at 42 % — training resumes at 55 % or when plugged in",
        "roundId": "r12",
        "weightsVersion": 3,
        "resources": RESOURCES,
    },
    p.TrainingStart: {
        "roundId": "r12",
        "task": "digits",
        "modelParams": {"hidden": 64},
        "config": {
            "epochs": 2,
            "batchSize": 32,
            "learningRate": 0.05,
            "optimizer": "sgd",
            "momentum": 0.9,
            "seed": 12,
        },
        "partition": {"index": 0, "count": 3, "seed": 7, "scheme": "label_skew"},
        "baseVersion": 3,
        "deadline": 1796000000.0,
        "weightFormat": "safetensors",
    },
    p.TrainingStartAck: {
        "accepted": False,
        "reason": "battery_low",
        "detail": "On battery at 42 % — training resumes at 55 % or when plugged in",
    },
    p.TrainingProgress: {
        "roundId": "r12",
        "epoch": 1,
        "epochs": 2,
        "step": 10,
        "steps": 16,
        "fraction": 0.8125,
        "loss": 0.42,
        "samplesPerSec": 5120.0,
        "batchSize": 32,
        "state": "training",
        "pauseReason": None,
        "pauseDetail": None,
    },
    p.TrainingCancel: {"roundId": "r12", "reason": "round timed out"},
    p.TrainingError: {
        "roundId": "r12",
        "code": "layout_mismatch",
        "message": "weights for task digits lack tensor 'fc2.bias'",
    },
    p.WeightsRef: {"format": "safetensors", "size": 17802, "sha256": SHA, "blobId": SHA},
    p.WeightsSubmit: {
        "roundId": "r12",
        "baseVersion": 3,
        "numSamples": 480,
        "metrics": {"trainLoss": 0.31, "trainAccuracy": 0.91, "seconds": 2.4},
        "weights": {"format": "safetensors", "size": 17802, "sha256": SHA, "blobId": SHA},
    },
    p.SubmitAccepted: {"ok": True, "roundId": "r12", "received": 2},
    p.WeightsGlobal: {
        "version": 4,
        "task": "digits",
        "roundId": "r12",
        "metrics": {"evalLoss": 0.28, "evalAccuracy": 0.93},
        "weights": {"format": "safetensors", "size": 17802, "sha256": SHA, "blobId": SHA},
    },
    p.BlobChunk: {
        "blobId": SHA,
        "offset": 1048576,
        "total": 3145728,
        "sha256": SHA,
        "data": b"<1 MiB of bytes, sent as a binary attachment>",
    },
    p.BlobStatus: {"blobId": SHA},
    p.BlobProgress: {"ok": True, "received": 2097152, "complete": False},
    p.OkAck: {"ok": True},
    p.ErrorAck: {
        "ok": False,
        "code": "round_closed",
        "message": "round r11 closed at 12:04:10; this update was not counted",
    },
}

# (event, direction, payload model, answer, what it is for)
EVENTS: list[tuple[str, str, str, str, str]] = [
    (p.EV_REGISTER, "client → server", "DeviceRegister", "ack: DeviceRegistered or ErrorAck",
     "Announce the device; repeated after every reconnect with the same deviceId."),
    (p.EV_REGISTERED, "server → client", "DeviceRegistered", "—",
     "Registration confirmed (same payload as the ack, for clients that do not use acks)."),
    (p.EV_HEARTBEAT, "client → server", "Heartbeat", "ack: OkAck or ErrorAck",
     "State and resources every heartbeatIntervalSec; 3 missed intervals mark a device stale."),
    (p.EV_WEIGHTS_GLOBAL, "server → client", "WeightsGlobal", "ack: OkAck or ErrorAck",
     "New global model; the client stores it and trains the next round from it."),
    (p.EV_TRAINING_START, "server → client", "TrainingStart", "ack: TrainingStartAck",
     "Ask the device to train one round; a paused or busy device refuses with a reason."),
    (p.EV_TRAINING_PROGRESS, "client → server", "TrainingProgress", "—",
     "At most 2 per second, plus the last of the round; state 'paused' while paused."),
    (p.EV_WEIGHTS_SUBMIT, "client → server", "WeightsSubmit", "ack: SubmitAccepted or ErrorAck",
     "The trained update; counted exactly once per device and round."),
    (p.EV_TRAINING_CANCEL, "server → client", "TrainingCancel", "—",
     "Stop work on a round (it timed out or was abandoned)."),
    (p.EV_TRAINING_ERROR, "client → server", "TrainingError", "—",
     "The round failed on the device (bad weights, crash, out of memory)."),
    (p.EV_BLOB_CHUNK, "either way", "BlobChunk", "ack: BlobProgress or ErrorAck",
     "One chunk of a blob (see Transfers)."),
    (p.EV_BLOB_STATUS, "either way", "BlobStatus", "ack: BlobProgress",
     "How many bytes of a blob the receiver holds, to resume after a reconnect."),
]  # fmt: skip

PROSE_HEAD = """\
# fedtray wire protocol, version 1

This document is generated by `python -m server.protocol_doc` from the models in
`client/protocol.py` and `server/status.py`; do not edit it by hand. It is meant to be
enough to write a compatible server or client in another language.

## Transport

- **Socket.IO v5** (the protocol of socket.io 4.x; Engine.IO v4), default namespace `/`,
  default path `/socket.io/`. Clients should prefer the WebSocket transport.
- **Authentication**: when the server is configured with tokens, the client passes
  `auth: {"token": "<token>"}` in the Socket.IO CONNECT packet. A missing or wrong token
  is refused at connect time with a connect error whose message starts with
  `unauthorized:`. Clients must not retry a refused token in a tight loop.
- **TLS**: use `https://` / `wss://` URLs; certificates are verified.
- **Payloads** are one JSON object per event (the event's single argument). Field names are
  camelCase. `bytes` fields (`data`) are Socket.IO **binary attachments**, never base64.
- **Acks**: events marked *ack* use Socket.IO acknowledgements; the answer is one object,
  either the positive model (which has `ok: true`, except `TrainingStartAck`) or an
  `ErrorAck` `{"ok": false, "code": ..., "message": ...}`.
- **Validation**: unknown fields are ignored (newer peers may add optional fields). Missing
  fields, wrong JSON types (no coercion: `"5"` is not a number) and out-of-range values are
  refused with code `bad_request`. A peer never crashes or disconnects on bad input.
- **Protocol version**: `device:register` carries `protocol: 1` (the number; it may be
  omitted and then means 1). Any other value is refused with `unsupported_protocol`.
- **Timeouts**: the server waits up to 30 s (its `ack_timeout`) for a device's answer to
  `training:start`, `weights:global` and each `blob:chunk`; no answer counts as a refusal
  (the device is dropped from that round, not disconnected).

## A session, step by step

1. The client connects (with `auth` when it has a token).
2. Client → `device:register` (ack `DeviceRegistered`); the server also emits
   `device:registered`. The `deviceId` is a UUID generated once per installation and
   reused on every reconnect; the server keeps one entry per deviceId. A device that is
   paused says so in the registration (`state`, `pauseReason`, `pauseDetail`). A device
   that reconnects while a round it was training is still open is sent the same
   `training:start` again (same `roundId`, partition and deadline), so it can resume.
3. If the client does not hold the current global version (`weightsVersion` in the
   registration and heartbeats), the server sends `weights:global` (blob first when
   large). The client acks after storing it; the ack is how the server learns that the
   device holds that version. A device that answers with an `ErrorAck` is skipped until
   it reports the version. `weights:global` may arrive at any time after registration,
   even before the registration ack is processed.
4. Client → `device:heartbeat` every `heartbeatIntervalSec` (ack `OkAck`).
5. When the server starts a round it selects eligible devices (connected, registered, not
   paused, not stale, and listing the server's task in `capabilities.tasks` — a device
   lists every task it has installed; the server's task is in `DeviceRegistered.task` and
   in `GET /api/status`), makes sure each holds the base version (step 3), then sends
   `training:start`. The device acks `{accepted: true}` or refuses with a reason (a
   refusal frees its slot; a pause reason marks it paused until a heartbeat says
   otherwise). A malformed `training:start` is answered with an `ErrorAck`. The same
   `roundId` may be offered again (after a reconnect, or after the server restarted and
   restored the open round): a device still training that round, or holding its trained
   update unsent, acks `{accepted: true}` and carries on (sends the update) — refusing
   `busy` would free its slot, and the update would then be `not_selected`.
6. While training, the device sends `training:progress`; when paused it reports
   `state: "paused"` with a `pauseReason`, and heartbeats say `paused` with a plain-words
   `pauseDetail`.
7. When done, the device writes the update to disk, sends it as a blob (or inline when it
   fits in one chunk) and sends `weights:submit`. It deletes its copy only after the ack:
   `SubmitAccepted`, or the codes `duplicate` (already counted) or `round_closed` (too
   late; discarded). After a reconnect it resumes the blob from `blob:status`. The
   reference server writes an update to disk before it acks it, and keeps the open round
   and partial blobs on disk, so a server restart loses neither.
8. When enough devices reported before the deadline, the server averages the updates
   (FedAvg weighted by `numSamples`, accumulated in float64 and stored in each tensor's
   own dtype), evaluates, and broadcasts `weights:global` with the new version. Devices
   still training a closed round get `training:cancel`. There is no "federation over"
   message: when the server has run its rounds it simply starts no more.

## Events

| Event | Direction | Payload | Answer | Purpose |
|---|---|---|---|---|
"""

PROSE_TRANSFER = """
## Transfers (`blob:chunk`, `blob:status`)

The same sub-protocol carries weights in both directions.

- A blob is identified by `blobId` (1–128 characters `[A-Za-z0-9_.:-]`); senders use the
  document's SHA-256 hex, so the id is stable across restarts. Receivers scope blob ids
  by the sending device (the server by `deviceId`, not by connection), so a partial blob
  survives a reconnect for at least 10 minutes. Each direction has its own blobs: the
  same id may travel both ways (a one-device round's global can equal the update), so a
  peer keeps what it receives apart from what it sends.
- A sender always asks `blob:status` before sending a blob (new or resumed), so a
  receiver must answer it at any time (`received: 0` for an unknown blob).
- Chunks are at most the receiver's `maxChunkBytes` (the server's `limits`, the client's
  `capabilities.maxChunkBytes`; default 1 MiB), so heartbeats and Engine.IO pings keep
  flowing during big transfers. A sender may have up to `maxInflightChunks` chunks
  un-acknowledged at once; chunks of one blob are sent in order.
- Each chunk repeats the whole blob's `total` size and `sha256`. The receiver checks the
  size limits *before* buffering (`chunk_too_large`, `blob_too_large`), accepts a chunk
  only at `offset == received` (a repeat below it is acknowledged without effect; one
  above is refused with `offset_gap`), and answers `BlobProgress {received, complete}`.
- To resume, the sender asks `blob:status {blobId}` (answer `received`, 0 when unknown)
  and continues from there.
- A `WeightsRef` names either inline `data` (when the document fits in one chunk of the
  *receiver's* `maxChunkBytes`) or a `blobId` received before; a sender may use a blob
  for any size. The receiver verifies `size` and `sha256` before decoding
  (`size_mismatch`, `checksum_mismatch`; `blob_unknown`, `blob_incomplete`).

## Weight formats

- `safetensors` (default): the [safetensors](https://github.com/huggingface/safetensors)
  layout — 8-byte little-endian header length N, N bytes of JSON header
  `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?: {str: str}}`,
  then the tensor bytes, little-endian, C order. Offsets must be contiguous, start at 0,
  not overlap, and match `shape × itemsize`. Dtypes: `F16 F32 F64 I8 I16 I32 I64 U8 BOOL`.
  Never pickle.
- `json`: UTF-8 JSON `{name: {"dtype": "float32", "shape": [64, 10], "data": [...]}}` with
  the values flattened in C order; numpy dtype names `float16 float32 float64 int8 int16
  int32 int64 uint8 bool`; values are JSON numbers (`true`/`false` for `bool`), rounded
  to the dtype by the receiver; `__metadata__` is not used. For simple peers; accepted
  on receive, produced on request: the server sends `weights:global` in the first of
  `capabilities.weightFormats` it supports (preferring `safetensors`) and asks for the
  update's format with `weightFormat` in `training:start`.
- `size` and `sha256` always describe the exact bytes sent.
- Receivers refuse non-finite floats (`non_finite`), and the server refuses an update whose
  tensor names, shapes or dtypes differ from the global model (`layout_mismatch`,
  `shape_mismatch`, `dtype_mismatch`). Each kind of bad document has its own code (below).

## Error codes

| Code | Meaning |
|---|---|
"""


def _schema_block(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return "```json\n" + json.dumps(schema, indent=2, ensure_ascii=False) + "\n```\n"


def _example_block(example: dict[str, Any]) -> str:
    shown = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in example.items()}
    return "```json\n" + json.dumps(shown, indent=2, ensure_ascii=False) + "\n```\n"


def _status_models() -> list[type[BaseModel]]:
    """The HTTP status API models, when the server module defines them."""
    try:
        status = importlib.import_module("server.status")
    except ModuleNotFoundError:
        return []
    models: list[type[BaseModel]] = list(getattr(status, "STATUS_MODELS", []))
    return models


def render() -> str:
    """The whole document as a string."""
    out = [PROSE_HEAD]
    for event, direction, payload, answer, purpose in EVENTS:
        out.append(f"| `{event}` | {direction} | `{payload}` | {answer} | {purpose} |\n")
    out.append(PROSE_TRANSFER)
    for code, meaning in ERROR_DESCRIPTIONS.items():
        out.append(f"| `{code}` | {meaning} |\n")
    out.append("\n## Payloads\n\nEach model's JSON Schema (draft 2020-12) and an example.\n")
    for model, example in EXAMPLES.items():
        doc = (model.__doc__ or "").strip()
        out.append(f"\n### `{model.__name__}`\n\n{doc}\n\nExample:\n\n")
        out.append(_example_block(example))
        out.append("\nSchema:\n\n")
        out.append(_schema_block(model))
    status_models = _status_models()
    if status_models:
        out.append(
            "\n## HTTP status API\n\n`GET /api/status` on the server's port returns JSON "
            "(`ServerStatus`). `GET /` serves the dashboard, `GET /healthz` answers `ok`.\n"
        )
        for status_model in status_models:
            doc = (status_model.__doc__ or "").strip()
            out.append(f"\n### `{status_model.__name__}`\n\n{doc}\n\n")
            out.append(_schema_block(status_model))
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write or check docs/protocol.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--path", type=Path, default=DOC_PATH)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.path.read_text(encoding="utf-8") if args.path.exists() else ""
        if current != text:
            print(f"{args.path} is stale: run `python -m server.protocol_doc`", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(text, encoding="utf-8")
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
