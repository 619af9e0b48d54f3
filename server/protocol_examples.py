"""One valid example of every wire model, in wire form (camelCase), for docs/protocol.md.

Contract: :data:`EXAMPLES` maps each :class:`client.protocol.WireModel` to a payload that
validates against it (the tests parse each one and check that every model of the event
table has one); :mod:`server.protocol_doc` prints them. Pure data: no I/O.
"""

from __future__ import annotations

from typing import Any

from client import protocol as p

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
