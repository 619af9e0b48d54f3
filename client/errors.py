"""The one vocabulary of machine-readable error codes, shared by client and server.

Every refusal on the wire (an ``ErrorAck``), every ``training:error`` and every
:class:`client.weights.WeightsError` carries one of these codes, so a peer can branch
on the code and show the message. Codes are stable strings; new ones may be added,
and a peer that meets an unknown code treats it as ``internal_error``.
"""

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
]

ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)

# Plain-words meaning of each code, shown in docs/protocol.md; a test checks that every
# code has one.
ERROR_DESCRIPTIONS: dict[str, str] = {
    "bad_request": "Payload failed validation (wrong type, missing field, out of range).",
    "unsupported_protocol": "Registration asked for a protocol version we do not speak.",
    "unauthorized": "Missing or invalid auth token.",
    "not_registered": "Event sent before a successful device:register.",
    "rate_limited": "Too many events in a short time.",
    "internal_error": "A bug on the answering side; the request may be retried.",
    "chunk_too_large": "One chunk is over the receiver's maxChunkBytes.",
    "blob_too_large": "The announced total is over the receiver's maxBlobBytes.",
    "offset_gap": "Chunk offset is past what the receiver holds; ask blob:status.",
    "blob_mismatch": "Total or sha256 differ from the first chunk of that blobId.",
    "blob_unknown": "A weights reference names a blob the receiver does not hold.",
    "blob_incomplete": "A weights reference names a blob that is not fully received.",
    "checksum_mismatch": "Bytes do not hash to the announced sha256.",
    "size_mismatch": "Bytes do not have the announced size.",
    "unsupported_format": "Weights format other than safetensors/json.",
    "malformed": "Not a valid safetensors/json weights document (e.g. a pickle).",
    "unknown_dtype": "A tensor dtype outside the supported set.",
    "bad_offsets": "Safetensors offsets overlap, leave gaps or disagree with shapes.",
    "truncated": "Data ends before the header says it should.",
    "oversized": "Document or a tensor is larger than the allowed maximum.",
    "non_finite": "A float tensor holds NaN or +/-Inf.",
    "layout_mismatch": "Tensor names differ from the expected model.",
    "shape_mismatch": "A tensor's shape differs from the expected model.",
    "dtype_mismatch": "A tensor's dtype differs from the expected model.",
    "unknown_task": "The task is not installed on this peer.",
    "round_closed": "Submission for a round that is over (late) or unknown.",
    "not_selected": "Submission from a device that was not selected for the round.",
    "duplicate": "This device already submitted for this round (already counted).",
    "stale_base": "The update was trained from another global version.",
    "busy": "The device is already training another round.",
    "paused": "The device is paused (see the pause reason).",
    "training_failed": "The local training crashed or ran out of memory.",
}


class FedtrayError(Exception):
    """An error that carries one of :data:`ErrorCode` and a plain-words message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message
