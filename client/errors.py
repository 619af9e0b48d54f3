"""The one vocabulary of machine-readable error codes, shared by client and server.

Every refusal on the wire (an ``ErrorAck``), every ``training:error`` and every
:class:`client.weights.WeightsError` carries one of these codes, so a peer can branch
on the code and show the message. Codes are stable strings; new ones may be added,
and a peer that meets an unknown code treats it as ``internal_error``.

Each code is declared once, in :data:`CODES`, with its plain-words meaning and whether a
device retries an update refused with it or drops it (:func:`submit_outcome`); the other
tables (:data:`ERROR_DESCRIPTIONS`, :data:`FINAL_SUBMIT_CODES`, the doc's table) derive
from it. Pure data; no I/O.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

ErrorCode = Literal[
    # request shape and session
    "bad_request",
    "unsupported_protocol",
    "unauthorized",
    "not_registered",
    "rate_limited",
    "internal_error",
    # blob transfer sub-protocol
    "chunk_too_large",
    "blob_too_large",
    "offset_gap",
    "blob_mismatch",
    "blob_unknown",
    "blob_incomplete",
    "checksum_mismatch",
    "size_mismatch",
    "transfers_full",
    # weight codec
    "unsupported_format",
    "malformed",
    "unknown_dtype",
    "bad_offsets",
    "truncated",
    "oversized",
    "non_finite",
    "layout_mismatch",
    "shape_mismatch",
    "dtype_mismatch",
    # rounds
    "unknown_task",
    "round_closed",
    "not_selected",
    "duplicate",
    "stale_base",
    "busy",
    "paused",
    "training_failed",
    # task packages
    "bad_package",
    "no_local_data",
    "package_member",
    "package_pickle",
    "package_compression",
    "package_too_large",
    "package_bomb",
    "package_truncated",
    "package_weights",
    "package_data_mismatch",
    "package_shape",
    "package_program",
    "package_operator",
]

ERROR_CODES: tuple[ErrorCode, ...] = get_args(ErrorCode)

SubmitOutcome = Literal["retry", "final"]
"""What a device does with its trained update when ``weights:submit`` (or the blob
transfer before it) is refused with a code: ``retry`` keeps it and sends it again later
(after a backoff or the next reconnect); ``final`` deletes it, since no retry can
change the answer."""


@dataclass(frozen=True)
class CodeSpec:
    """Everything declared about one error code."""

    submit: SubmitOutcome
    """What a device does with an update refused with this code."""
    description: str
    """Plain-words meaning, shown in docs/protocol.md."""


#: Each code, declared once: its meaning and the retry-or-final class of a submit refused
#: with it. A test checks that every code of :data:`ErrorCode` is here.
CODES: Mapping[ErrorCode, CodeSpec] = MappingProxyType(
    {
        "bad_request": CodeSpec(
            "final", "Payload failed validation (wrong type, missing field, out of range)."
        ),
        "unsupported_protocol": CodeSpec(
            "retry", "Registration asked for a protocol version we do not speak."
        ),
        "unauthorized": CodeSpec("retry", "Missing or invalid auth token."),
        "not_registered": CodeSpec("retry", "Event sent before a successful device:register."),
        "rate_limited": CodeSpec("retry", "Too many events in a short time."),
        "internal_error": CodeSpec(
            "retry", "A bug on the answering side; the request may be retried."
        ),
        "chunk_too_large": CodeSpec("retry", "One chunk is over the receiver's maxChunkBytes."),
        "blob_too_large": CodeSpec(
            "final", "The announced total is over the receiver's maxBlobBytes."
        ),
        "offset_gap": CodeSpec(
            "retry", "Chunk offset is past what the receiver holds; ask blob:status."
        ),
        "blob_mismatch": CodeSpec(
            "retry", "Total or sha256 differ from the first chunk of that blobId."
        ),
        "blob_unknown": CodeSpec(
            "retry", "A weights reference names a blob the receiver does not hold."
        ),
        "blob_incomplete": CodeSpec(
            "retry", "A weights reference names a blob that is not fully received."
        ),
        "checksum_mismatch": CodeSpec(
            "retry",
            "Bytes do not hash to the announced sha256 (a blob failing at completion is dropped).",
        ),
        "size_mismatch": CodeSpec(
            "retry", "Bytes do not have the announced size (or a chunk runs past the blob's total)."
        ),
        "transfers_full": CodeSpec(
            "retry",
            "The receiver already holds as many partial blobs (count or bytes, from this "
            "peer or in all) as it allows; send again once one completes or expires.",
        ),
        "unsupported_format": CodeSpec("final", "Weights format other than safetensors/json."),
        "malformed": CodeSpec(
            "final", "Not a valid safetensors/json weights document (e.g. a pickle)."
        ),
        "unknown_dtype": CodeSpec("final", "A tensor dtype outside the supported set."),
        "bad_offsets": CodeSpec(
            "final", "Safetensors offsets overlap, leave gaps or disagree with shapes."
        ),
        "truncated": CodeSpec("final", "Data ends before the header says it should."),
        "oversized": CodeSpec("final", "Document or a tensor is larger than the allowed maximum."),
        "non_finite": CodeSpec("final", "A float tensor holds NaN or +/-Inf."),
        "layout_mismatch": CodeSpec("final", "Tensor names differ from the expected model."),
        "shape_mismatch": CodeSpec("final", "A tensor's shape differs from the expected model."),
        "dtype_mismatch": CodeSpec("final", "A tensor's dtype differs from the expected model."),
        "unknown_task": CodeSpec("final", "The task is not installed on this peer."),
        "round_closed": CodeSpec("final", "Submission for a round that is over (late) or unknown."),
        "not_selected": CodeSpec(
            "final", "Submission from a device that was not selected for the round."
        ),
        "duplicate": CodeSpec(
            "final", "This device already submitted for this round (already counted)."
        ),
        "stale_base": CodeSpec("final", "The update was trained from another global version."),
        "busy": CodeSpec("retry", "The device is already training another round."),
        "paused": CodeSpec("retry", "The device is paused (see the pause reason)."),
        "training_failed": CodeSpec("retry", "The local training crashed or ran out of memory."),
        "bad_package": CodeSpec("final", "A task package's manifest.json is invalid."),
        "no_local_data": CodeSpec(
            "final", "The device has no data of its own for a task whose data stays local."
        ),
        "package_member": CodeSpec(
            "final",
            "A task package holds a member it must not (unknown, duplicate, directory, "
            "absolute or '..' name, backslash) or lacks a required one.",
        ),
        "package_pickle": CodeSpec(
            "final", "A task package member is a pickle or a torch.save archive."
        ),
        "package_compression": CodeSpec(
            "final",
            "A task package member is encrypted or compressed other than STORED/DEFLATED.",
        ),
        "package_too_large": CodeSpec(
            "final", "A task package, or one of its members, is over the size limit."
        ),
        "package_bomb": CodeSpec(
            "final",
            "A task package member's real size differs from its declared size, or its "
            "compression ratio is over the limit (a zip bomb).",
        ),
        "package_truncated": CodeSpec(
            "final", "A task package is not a complete zip archive (truncated or damaged)."
        ),
        "package_weights": CodeSpec(
            "final",
            "A task package's weights or constants are not valid safetensors or do not "
            "match the program's parameters and buffers.",
        ),
        "package_data_mismatch": CodeSpec(
            "final",
            "A task package's data arrays do not match the manifest's specs or sample counts.",
        ),
        "package_shape": CodeSpec(
            "final",
            "A task package's manifest input/label specs disagree with its program.",
        ),
        "package_program": CodeSpec(
            "final",
            "A task package's program is not a valid torch.export program of the "
            "supported schema (or carries guards, custom objects or unsafe expressions).",
        ),
        "package_operator": CodeSpec(
            "final", "A task package's program calls an operator outside the allowlist."
        ),
    }
)

#: Plain-words meaning of each code (derived from :data:`CODES`).
ERROR_DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {code: spec.description for code, spec in CODES.items()}
)

#: Refusals of an update that no retry can change: the update is deleted after them
#: (derived from :data:`CODES`).
FINAL_SUBMIT_CODES: frozenset[str] = frozenset(
    code for code, spec in CODES.items() if spec.submit == "final"
)


def submit_outcome(code: str) -> SubmitOutcome:
    """Retry or final, for an update refused with ``code``.

    A code this peer does not know is treated as ``internal_error`` (retry), as the
    module promises for unknown codes.
    """
    known: ErrorCode = code if code in ERROR_CODES else "internal_error"
    return CODES[known].submit


class FedtrayError(Exception):
    """An error that carries one of :data:`ErrorCode` and a plain-words message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message
