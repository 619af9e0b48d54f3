"""Generates ``docs/protocol.md`` from the wire models, so the document cannot drift.

``python -m server.protocol_doc`` rewrites the file; ``--check`` exits 1 when it is stale
(a test runs the check). The prose below is the part of the contract that types cannot
say (order of events, the blob rules, the formats); the event table comes from
:data:`client.protocol.events.EVENTS`, the error codes (with their retry-or-final class)
from :data:`client.errors.CODES`, the schemas from :mod:`client.protocol` and
:mod:`server.status`; the examples are validated against the models by the tests.
Pure: :func:`render` does no I/O; only :func:`main` reads or writes the file.
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
from client.errors import CODES
from client.protocol.events import EVENTS, EventSpec

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
            "maxChunkBytes": 524288,
            "maxBlobBytes": 536870912,
            "maxInflightChunks": 4,
            "taskPackages": True,
            "packageCacheBytes": 1073741824,
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
        "limits": {"maxChunkBytes": 524288, "maxBlobBytes": 536870912, "maxInflightChunks": 4},
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
        "budget": {
            "cores": 1,
            "cpuPercent": 50,
            "why": "you are using the computer",
            "applied": False,
        },
    },
    p.CpuBudget: {
        "cores": 3,
        "cpuPercent": 100,
        "why": "the computer is idle",
        "applied": True,
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
            "proximalMu": 0.0,
        },
        "partition": {"index": 0, "count": 3, "seed": 7, "scheme": "label_skew", "alpha": 0.5},
        "baseVersion": 3,
        "deadline": 1796000000.0,
        "weightFormat": "safetensors",
        "package": None,
        "data": None,
    },
    p.FileRef: {"size": 48213, "sha256": SHA},
    p.TaskFile: {"kind": "package", "sha256": SHA, "size": 48213, "blobId": SHA},
    p.TaskFileHeld: {"ok": True, "held": True},
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
    p.EvaluationStart: {
        "version": 4,
        "task": "digits",
        "modelParams": {"hidden": 64},
        "partition": {"index": 0, "count": 3, "seed": 0, "scheme": "label_skew", "alpha": 0.5},
        "deadline": 1767225900.0,
    },
    p.EvaluationStartAck: {"accepted": False, "reason": "busy", "detail": "training r5-1-ab12"},
    p.EvaluationResult: {
        "version": 4,
        "task": "digits",
        "loss": 0.27,
        "accuracy": 0.93,
        "numSamples": 120,
    },
    p.EvaluationFailed: {
        "version": 4,
        "task": "digits",
        "code": "package_member",
        "message": "a package with server data needs data/train and data/test",
    },
    p.TrainingError: {
        "roundId": "r12",
        "code": "layout_mismatch",
        "message": "weights for task digits lack tensor '2.bias'",
    },
    p.WeightsRef: {"format": "safetensors", "size": 19520, "sha256": SHA, "blobId": SHA},
    p.WeightsSubmit: {
        "roundId": "r12",
        "baseVersion": 3,
        "numSamples": 480,
        "metrics": {"trainLoss": 0.31, "trainAccuracy": 0.91, "seconds": 2.4},
        "weights": {"format": "safetensors", "size": 19520, "sha256": SHA, "blobId": SHA},
    },
    p.SubmitAccepted: {"ok": True, "roundId": "r12", "received": 2},
    p.WeightsGlobal: {
        "version": 4,
        "task": "digits",
        "roundId": "r12",
        "metrics": {"trainLoss": 0.31},
        "weights": {"format": "safetensors", "size": 19520, "sha256": SHA, "blobId": SHA},
        "modelParams": {"hidden": 64},
    },
    p.FederationFinished: {
        "task": "digits",
        "roundsCompleted": 10,
        "version": 10,
        "metrics": {"evalLoss": 0.17, "evalAccuracy": 0.953},
    },
    p.BlobChunk: {
        "blobId": SHA,
        "offset": 524288,
        "total": 1572864,
        "sha256": SHA,
        "data": b"<512 KiB of bytes, sent as a binary attachment>",
    },
    p.BlobStatus: {"blobId": SHA},
    p.BlobProgress: {"ok": True, "received": 1048576, "complete": False},
    p.OkAck: {"ok": True},
    p.ErrorAck: {
        "ok": False,
        "code": "round_closed",
        "message": "round r11 closed at 12:04:10; this update was not counted",
    },
}

ARROWS = {"device→server": "device → server", "server→device": "server → device"}


def _event_row(spec: EventSpec[Any, Any]) -> str:
    """One row of the events table, from the event table of :mod:`client.protocol.events`."""
    direction = ARROWS.get(spec.direction, "either way")
    answer = f"ack: `{spec.ack.__name__}` or `ErrorAck`" if spec.ack is not None else "none"
    payload = spec.payload.__name__
    return f"| `{spec.name}` | {direction} | `{payload}` | {answer} | {spec.description} |\n"


PROSE_HEAD = """\
# fedtray wire protocol, version 1

This document is generated by `python -m server.protocol_doc` from the models in
`client/protocol/` (the payload models, and the event table in
`client/protocol/events.py`), the error codes in `client/errors.py` and the status models
in `server/status.py`; do not edit it by hand. It is meant to be enough to write a
compatible server or client in another language.

## Transport

- **Socket.IO v5** (the protocol of socket.io 4.x; Engine.IO v4), default namespace `/`,
  default path `/socket.io/`. Clients should prefer the WebSocket transport.
- **Message size**: a Socket.IO library cuts an Engine.IO message larger than its limit
  (`maxHttpBufferSize`; socket.io's and python-engineio's default: 1,000,000 bytes) by
  closing the connection: such a message is never read, so it cannot be answered, and
  the sender sees a disconnect. The largest messages of this protocol are blob chunks:
  the chunk's bytes travel as one binary message of at most `maxChunkBytes` (base64-encoded,
  4/3 of that, over HTTP long-polling), and the JSON part is a separate small message;
  inline weights fit one chunk. The default `maxChunkBytes` is **512 KiB** (524,288
  bytes; 699,052 base64-encoded), so a peer built with the library defaults takes default
  chunks with room to spare. A peer that announces a larger `maxChunkBytes` must raise its
  limit to match. Over long-polling one HTTP request may carry several messages and must
  stay under the limit as a whole; the reference device uses WebSocket only. The
  reference peers' limits, and what happens at each:
  - the **server** reads messages up to its `maxChunkBytes` + 64 KiB (589,824 bytes by
    default). A `blob:chunk` over `maxChunkBytes` but under that is refused
    `chunk_too_large`; a bigger message closes that device's connection (the device
    reconnects and resumes its transfer from `blob:status`).
  - the **device** reads messages up to 16 MiB (its WebSocket `max_msg_size`; aiohttp's
    default, 4 MiB, is raised), far more than a conforming server sends it. A larger but
    readable event is answered like any other bad input (a 6 MiB `blob:chunk` is
    refused `chunk_too_large`, the connection stays); over 16 MiB the transport closes
    the connection and the device reconnects with its usual backoff.
  - a message the device's Socket.IO decoder cannot decode (broken JSON, an unknown
    packet type) is dropped, counted and logged as one warning; the connection stays.
- **Authentication**: when the server is configured with tokens, the client passes
  `auth: {"token": "<token>"}` in the Socket.IO CONNECT packet. A missing or wrong token
  is refused at connect time with a connect error whose message starts with
  `unauthorized:`. Clients must not retry a refused token in a tight loop.
- **TLS**: use `https://` / `wss://` URLs; certificates are verified.
- **Payloads** are exactly one JSON object per event (the event's single argument); an
  event with no argument, or with more than one, is refused with `bad_request`. Field
  names are camelCase. `bytes` fields (`data`) are Socket.IO **binary attachments**,
  never base64.
- **Acks**: events whose Answer (below) is *ack* use Socket.IO acknowledgements; the
  answer is one object, either the event's positive model (which has `ok: true`, except
  `TrainingStartAck`) or an `ErrorAck` `{"ok": false, "code": ..., "message": ...}`. Any
  acknowledged event may be answered with an `ErrorAck` (a malformed `training:start`
  too). Events whose Answer is *none* are never answered: a receiver that refuses one
  (malformed, or sent before registration) logs it and otherwise ignores it.
- **Validation**: unknown fields are ignored (newer peers may add optional fields). Missing
  fields, wrong JSON types (no coercion: `"5"` is not a number) and out-of-range values are
  refused with code `bad_request`. A peer never crashes or disconnects on bad input it
  can read (a message over the transport's size limit is not read: see Message size).
- **Protocol version**: `device:register` (and its answer `DeviceRegistered`) carries
  `protocol: 1`. The field may be omitted and then means 1; when present it must be the
  JSON number 1 (`1` or `1.0`). Any other value — `2`, the string `"1"`, `true`, `null` —
  is refused with `unsupported_protocol` (not `bad_request`), with a message naming the
  value, e.g. `DeviceRegister says protocol "1"; this peer speaks protocol 1 (the JSON
  number 1)`. The device stays connected but unregistered. A device that gets a
  `DeviceRegistered` with another `protocol` treats the registration as refused: the
  reference device shows the refusal, disconnects and tries again later with backoff.
- **Registration first**: the server answers every event a device sends before a
  successful `device:register` — `blob:status` and `blob:chunk` included — with
  `ErrorAck` code `not_registered` (unacknowledged ones are ignored), checked before the
  payload is validated. Devices answer the server's events, `blob:status` included, at
  any time, even before the registration ack has arrived.
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
   large), naming the model the weights are for as `training:start` does (`modelParams`,
   `package`). The client acks after storing it; the ack is how the server learns that
   the device holds that version. A device that knows that model's layout checks the
   tensors first and refuses weights that do not fit with `layout_mismatch` (a name
   missing or unexpected), else `dtype_mismatch`, else `shape_mismatch`, the message
   listing every difference; it stores nothing and keeps its previous version. The
   reference server then records the refusal (the dashboard shows it), does not send
   that version to the device again, even after a reconnect, and does not select it for
   rounds until it holds a newer version; other refusals are logged and the version is
   offered again later. `weights:global` may arrive at any time after registration,
   even before the registration ack is processed.
4. Client → `device:heartbeat` every `heartbeatIntervalSec` (ack `OkAck`).
   **Updating the registration**: a device registers at once, before it knows
   everything about itself (the reference device does not wait seconds for its GPU
   probe: it registers with `hardware.gpu` null, or with the answer cached from an
   earlier start). When it learns more, it sends a heartbeat at once with `hardware`
   set; the server replaces the device's registered hardware with it (idempotently:
   the same hardware again changes nothing) and shows it in `GET /api/status`
   (`devices[].gpu`). The device repeats `hardware` in its heartbeats until one is
   acknowledged; a heartbeat without `hardware` leaves the registered hardware as it
   is. A new `device:register` (after a reconnect) carries the hardware as known then
   and replaces it too. A `device:register` is not repeated on a live connection for
   this: a registration resets the device's round state.
5. When the server starts a round it selects eligible devices (connected, registered,
   not paused, not stale, and listing the server's task in `capabilities.tasks` — a
   device lists every task it has installed; the server's task is in
   `DeviceRegistered.task` and in `GET /api/status`), makes sure each holds the base
   version (step 3), then sends `training:start`. **Small globals ride along**: when the
   device does not hold the base version and its document fits one chunk, the server may
   instead put that version's whole `weights:global` message (weights inline) in
   `training:start` as `baseWeights`, saving a round trip. The device takes it exactly
   as a `weights:global` (verified, checked, stored; nothing when it holds that version
   already) before it decides on the round; weights it refuses make it answer
   `training:start` with that `ErrorAck` (the server records it as a refusal of
   `weights:global`), and any `TrainingStartAck` tells the server it now holds the
   version. The device acks `{accepted: true}` or refuses with a reason (a refusal frees
   its slot; a pause reason marks it paused until a heartbeat says otherwise). A
   malformed `training:start` is answered with an `ErrorAck`. The same `roundId` may be
   offered again (after a reconnect, or after the server restarted and restored the open
   round): a device still training that round, or holding its trained update unsent,
   acks `{accepted: true}` and carries on (sends the update) — refusing `busy` would
   free its slot, and the update would then be `not_selected`.
6. While training, the device sends `training:progress`; when paused it reports
   `state: "paused"` with a `pauseReason`, and heartbeats say `paused` with a plain-words
   `pauseDetail`.
7. When done, the device writes the update to disk, sends it as a blob (or inline when it
   fits in one chunk) and sends `weights:submit`. It deletes its copy only after the ack
   (`SubmitAccepted`) or a *final* refusal; after a *retry* refusal, a timeout or a lost
   connection it keeps the update and sends it again later (the error codes table says
   which codes are which; `duplicate` means already counted, `round_closed` too late).
   After a reconnect it resumes the blob from `blob:status`. The reference server writes
   an update to disk before it acks it, and keeps the open round and partial blobs on
   disk, so a server restart loses neither. Restarted, it restores the open round under
   its id and waits for the devices that had not reported as long as a device in its
   longest reconnect backoff needs to come back: the reference client's ceiling (60 s)
   plus one connection attempt (10 s), both in `client/backoff.py`, plus three heartbeat
   intervals, never past the round's deadline. Such a device is offered its part again,
   resumes its upload from the server's offset and does not train again.
8. When enough devices reported before the deadline, the server averages the updates
   (FedAvg weighted by `numSamples`, accumulated in float64 and stored in each tensor's
   own dtype), saves and sends `weights:global` with the new version to every
   connected device (as the next round starts, the devices it starts get it in step 5's
   way). Devices
   still training a closed round get `training:cancel`. The reference server evaluates
   the new version afterwards, off the round's path: its `metrics` carry the round's
   `trainLoss` at first, and the evaluation (`evalLoss`, `evalAccuracy`) once recorded.
   **Federated evaluation** (every `--evaluate-every` N-th version, default every one):
   right after the broadcast the server sends `evaluation:start` (the version, the task,
   a partition as `training:start` names one, a deadline) to up to `clientsPerRound`
   eligible devices that hold (or are then given) that version. A device answers at
   once (`EvaluationStartAck`: accepted, or refused with its pause reason, `busy` while
   it trains a round, `missing_base`, ...), evaluates the version on its own test split
   (the task's test split of that partition, the package's test set, or its own data;
   no weights are sent back) and then sends `evaluation:result` (loss, accuracy,
   numSamples), or `evaluation:failed` (code, message) when an evaluation it accepted
   ends without a result (no test data, a crash, a pause abandons it). The next round
   opens once every device asked has answered one way or the other (or the deadline
   passed): fit, then evaluate, as in Flower's rounds. The server
   records the sample-weighted means in that version's history record
   (`federatedEvalLoss`, `federatedEvalAccuracy`, `federatedEvalSamples`,
   `federatedEvalDevices` in `GET /api/status`), updated as results arrive, also late
   ones; a result for a version it did not ask for is dropped. A `training:start` that
   arrives while the reference client evaluates waits for the evaluation to end.
9. **The end.** When the server has completed its configured number of rounds, the
   federation is finished: a state, not a disconnect. The server sends every connected
   device the final `weights:global` (unless it holds it already) and then
   `federation:finished` (`FederationFinished`: task, rounds completed, the final
   version and its evaluation), once per connection. It then starts no more rounds but
   keeps serving until it is stopped: devices stay connected, heartbeats are still
   acked, `GET /api/status` reports phase `finished` and the dashboard stays up (the
   reference server's `--exit-when-done` makes it exit instead, for scripts). A device
   that registers after the end — a new one, one that reconnects, or any device after
   a restart of a finished server — gets the same: the final `weights:global` when it
   does not hold that version, then `federation:finished`, and never a
   `training:start`; a late `weights:submit` is refused (`round_closed`, or `duplicate`
   for an update already counted). A device tells "finished" (this event) from "kicked"
   (a disconnect without it).

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
  receiver must answer it whenever it answers events at all (`received: 0` for an
  unknown blob; the server answers `not_registered` before registration, see
  Transport).
- **Limits.** Each receiver announces its limits: the server in
  `DeviceRegistered.limits`, the device in `DeviceRegister.capabilities`
  (`maxChunkBytes`, required; `maxBlobBytes` and `maxInflightChunks`, optional, default
  512 MiB and 4). A sender keeps to the receiver's: chunks of at most `maxChunkBytes`
  (default 512 KiB, see Transport; small chunks also keep heartbeats and Engine.IO pings
  flowing during big transfers), at most `maxInflightChunks` chunks un-acknowledged at
  once, chunks of one blob in order, and no blob over `maxBlobBytes`.
- **What a receiver holds.** A receiver bounds what a sender can make it hold in
  partial blobs, counting the totals *announced* by its open blobs (not the bytes received
  so far, so no number of barely started blobs can later grow past the bound). At the
  first chunk of a new blob it refuses, before buffering anything: a `total` that could
  never fit its budgets with `blob_too_large` (final), and with `transfers_full` (retry:
  send again once a transfer completes or expires) a blob when the sender already has
  as many blobs open as allowed, or when its `total` added to the totals of that
  sender's open blobs, or of all senders' together, would pass the budget. A blob counts
  until the message that uses it takes it, or until it expires.
- **Current behaviour of the reference peers.** The device announces
  `maxChunkBytes` 512 KiB, `maxBlobBytes` 512 MiB and `maxInflightChunks` 4. It holds
  partial blobs from the server in memory: at most 8 open, announcing at most
  `maxBlobBytes` (512 MiB) in all, and drops one untouched for 10 minutes (checked at
  each heartbeat). The server keeps partial uploads on disk (so they survive a
  restart): per device at most 4 open and two updates' worth, where an update is at most
  min(`maxBlobBytes`, 8 × the model's tensor bytes + 64 KiB), and for all devices
  together `clients_per_round` devices' worth (`--max-transfer-bytes` sets it); it drops
  one untouched for 10 minutes. The server keeps, towards each device, to the smaller of
  its own limits and the device's:
  it sends `weights:global` inline when the document fits one chunk, else as a blob of
  chunks of at most that `maxChunkBytes`, with at most that `maxInflightChunks`
  un-acknowledged. A global larger than the device's `maxBlobBytes` is not sent at all:
  the server logs that it skips the device, and the device gets no `training:start`
  (it cannot hold the base version) until it registers with a `maxBlobBytes` the global
  fits. A device that refuses a blob with `blob_too_large` anyway is skipped until it
  reports the version.
- Each chunk repeats the whole blob's `total` size and `sha256`. The receiver checks, in
  this order and *before* buffering anything: the chunk size (`chunk_too_large`), the
  total (`blob_too_large`), for an unknown blob that the chunk starts at 0 (`offset_gap`)
  and is not larger than `total` (`size_mismatch`) and that it fits the budgets above
  (`blob_too_large`, `transfers_full`), for a known one that `total` and
  `sha256` equal those of its first chunk (`blob_mismatch`). It then accepts a chunk only
  at `offset == received`: a chunk below it is a repeat and is acknowledged without
  effect (its bytes are not compared); one above is refused with `offset_gap`; one that
  would run past `total` is refused with `size_mismatch` and changes nothing (the bytes
  held stay as they were, so the sender may follow with a correct chunk). Each accepted
  chunk is answered `BlobProgress {received, complete}`.
- **Completion.** The chunk that brings `received` to `total` is checked: the receiver
  hashes the whole blob, and answers `complete: true` only when it hashes to the
  announced `sha256`. Otherwise it drops the blob at once (its bytes are freed; a later
  `blob:status` answers `received: 0`) and refuses that chunk with
  `checksum_mismatch`; the sender may send the blob again from offset 0. A sender thus
  never sees `complete: true` for a blob that would fail the check.
- A refused chunk is not counted; a `blob:chunk` answered with an `ErrorAck` ends the
  sender's transfer attempt (the reference sender retries the whole upload later, starting
  with `blob:status`).
- To resume, the sender asks `blob:status {blobId}` (answer `received`, 0 when unknown)
  and continues from there.
- A `WeightsRef` names either inline `data` (when the document fits in one chunk of the
  *receiver's* `maxChunkBytes`) or a `blobId` received before; a sender may use a blob
  for any size. The receiver verifies `size` and `sha256` of the bytes against the
  reference before decoding (`size_mismatch`, `checksum_mismatch`; `blob_unknown`,
  `blob_incomplete`) and forgets the blob once it has taken it.

## Task packages (`task:file`)

A server may train a *task package* (a `.fedtask` file, `docs/task-package.md`) instead
of a task installed on the devices. All of it is optional on the wire; a peer that knows
nothing of packages keeps working with installed tasks.

- **Who may train one.** A device that can train packages says `taskPackages: true` in
  its capabilities, with `packageCacheBytes`, the bytes of task files it keeps. A server
  selects for a packaged round only such devices, and only when the package fits that
  cache and the device's `maxBlobBytes` (a data share that does not fit is refused, and
  that device's part of the round fails); the others are simply not selected
  (`capabilities.tasks` does not matter for a packaged task, whose name is the package
  manifest's `name`). The package a device is sent carries no data members: each device
  downloads only its own share of the data, never the whole set.
- **Getting the files there.** Before `training:start` the server offers each file the
  round needs with `task:file {kind, sha256, size}` (no `blobId`): the package
  (`kind: package`) and, when the server holds the data, the device's share of the
  training data (`kind: data`: safetensors with exactly two tensors, `x` and `y`, the
  rows of this device's partition). The device answers `TaskFileHeld {held}` from its
  cache. When it does not hold the file, the server sends it as a blob (see Transfers;
  `blobId` is the file's SHA-256) and then `task:file` again with `blobId`; the device
  takes the blob, checks its `size` and `sha256` (`size_mismatch`,
  `checksum_mismatch`, `blob_unknown`, `blob_incomplete`), keeps it and answers
  `held: true`. A device refuses a file that cannot fit its cache with
  `blob_too_large`.
- **Caching.** Files are kept by SHA-256 under the device's data folder, at most
  `packageCacheBytes` in all, the least recently used evicted first (never a file of
  the round being trained); the cache survives restarts, so a file crosses the network
  once per device. The reference server encodes each data share once per partition, so
  the same share has the same SHA-256 across rounds and restarts.
- **The round.** `training:start` then names the package (`package {sha256, size}`) and
  the share (`data`, absent when devices read their own data). A device that does not
  hold both refuses with reason `missing_package`. The `task` field is the manifest's
  name; `modelParams` is empty. The global weights (`weights:global`) are the model's
  parameters and buffers, named as in the package's `weights.safetensors`; version 0 is
  that file.

## Weight formats

- `safetensors` (default): the [safetensors](https://github.com/huggingface/safetensors)
  layout — 8-byte little-endian header length N, N bytes of JSON header
  `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?: {str: str}}`,
  then the tensor bytes, little-endian, C order. Offsets must be contiguous, start at 0,
  not overlap, and match `shape × itemsize`. Dtypes: `F16 F32 F64 I8 I16 I32 I64 U8 BOOL`.
  Never pickle.
- `json`: UTF-8 JSON `{name: {"dtype": "float32", "shape": [10, 64], "data": [...]}}`
  (e.g. the tensor `2.weight` of the built-in `digits` task) with the values flattened in
  C order; numpy dtype names `float16 float32 float64 int8 int16 int32 int64 uint8
  bool`; values are JSON numbers (`true`/`false` for `bool`), rounded to the dtype by the
  receiver; `__metadata__` is not used. For simple peers.
- Tensor names are the task model's PyTorch `state_dict` keys; the built-in `digits`
  task's are `0.weight` `[hidden, 64]`, `0.bias` `[hidden]`, `2.weight` `[10, hidden]`,
  `2.bias` `[10]` (`hidden` is 64 by default).
- **Which format is used.** `capabilities.weightFormats` lists the formats a device
  decodes; its order is not a preference. The reference server sends `weights:global`
  in `safetensors` when the list contains it, and in `json` only when the list is
  `["json"]`; it asks for the update in the same format with `weightFormat` in
  `training:start`. Every peer accepts both formats on receive.
- `size` and `sha256` always describe the exact bytes sent.
- Receivers refuse non-finite floats (`non_finite`), the server refuses an update whose
  tensor names, shapes or dtypes differ from the global model, and a device refuses a
  global that does not fit the model it names (`layout_mismatch`, `shape_mismatch`,
  `dtype_mismatch`, listing every difference). Each kind of bad document has its own code
  (below).

## Error codes

*Submit* says what a device does with its trained update when `weights:submit`, or the
blob transfer before it, is refused with the code: **retry** keeps the update and sends it
again later; **final** deletes it, since no retry can change the answer. A code a peer
does not know is treated as `internal_error`.

| Code | Meaning | Submit |
|---|---|---|
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
    out.extend(_event_row(spec) for spec in EVENTS)
    out.append(PROSE_TRANSFER)
    for code, spec in CODES.items():
        out.append(f"| `{code}` | {spec.description} | {spec.submit} |\n")
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
