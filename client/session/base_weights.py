"""The held global weights: received from the server, verified, stored; the base of rounds.

Contract (a loop-only object; decoding and disk work run in worker threads, or on the loop
when the weights are small: :func:`client.session.offload.run_disk`):

* ``blob:chunk`` / ``blob:status`` feed a :class:`client.transfer.BlobStore` bounded by
  the limits this device advertises (:data:`CLIENT_MAX_CHUNK_BYTES`); ``weights:global``
  (inline or via a blob) is verified against its sha256, decoded with full validation
  (never unpickled) and stored by :class:`client.global_store.GlobalStore` (in
  safetensors, which the trainer reads) as :attr:`BaseWeights.held`.
* Before anything is stored, the tensors are checked against the layout of the model the
  message names when this process knows it without torch
  (:class:`client.session.expected_layout.ExpectedLayouts`: a built-in task with its
  ``modelParams``, or a task package the device holds). Weights that do not fit are
  refused with ``layout_mismatch`` (a name missing or unexpected), else ``dtype_mismatch``,
  else ``shape_mismatch``, the ErrorAck's message listing every difference
  (:func:`client.weights.check_layout_matches`); nothing is stored, the held version and
  the work built on it stay, and one warning line is logged. Where the layout is not
  known here, the worker checks the base before training, as before.
* The held version sent again (the same version, task and safetensors SHA-256, e.g. by
  both a ``weights:global`` and a ``training:start``'s ``baseWeights``) is acknowledged
  without storing it again, so the file a round trains from never changes under it.
* A newer version has the work folder's owner delete the work built on older bases
  (:meth:`client.workfiles.WorkDir.drop_older_than`), in the same step as the save,
  except the work ``busy_keys()`` names when the message is taken (the round being
  trained, results being kept).
* A disk error storing the weights is refused with ``internal_error`` (a
  :class:`client.errors.FedtrayError`, which the handler guard turns into an ErrorAck).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from client.errors import FedtrayError
from client.global_store import GlobalStore, GlobalWeights
from client.protocol import (
    DEFAULT_MAX_BLOB_BYTES,
    BlobChunk,
    BlobProgress,
    BlobStatus,
    OkAck,
    WeightsGlobal,
)
from client.session.expected_layout import Expected
from client.session.hub import SnapshotHub
from client.session.offload import run_disk
from client.transfer import REFERENCE_CHUNK_BYTES, BlobStore
from client.weights import WeightsError, decode, decode_views, encode
from client.workfiles import WorkDir

__all__ = ["CLIENT_MAX_CHUNK_BYTES", "BaseWeights"]

log = logging.getLogger(__name__)

#: Largest blob chunk this device accepts from a server (advertised at registration).
CLIENT_MAX_CHUNK_BYTES: Final = REFERENCE_CHUNK_BYTES
SERVER_PEER: Final = "server"


class BaseWeights:
    """Receives and holds the global weights (see the module docstring)."""

    def __init__(
        self,
        hub: SnapshotHub,
        store: GlobalStore,
        *,
        work: WorkDir,
        busy_keys: Callable[[], set[str]],
        expected: Callable[[WeightsGlobal], Expected | None] = lambda _message: None,
    ) -> None:
        """``expected``: the layout a message's weights must have, or None when unknown
        (called where the save runs; :meth:`ExpectedLayouts.of`)."""
        self._hub = hub
        self._expected = expected
        self._store = store
        self._work = work
        self._busy_keys = busy_keys
        self.blobs = BlobStore(
            max_chunk_bytes=CLIENT_MAX_CHUNK_BYTES, max_blob_bytes=DEFAULT_MAX_BLOB_BYTES
        )
        self.held: GlobalWeights | None = None
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Read the weights kept on disk (at session start; the caller publishes them)."""
        self.held = await asyncio.to_thread(self._store.current)

    def expire(self) -> None:
        """Drop transfers the server abandoned (called with every heartbeat)."""
        self.blobs.expire(time.monotonic())

    async def on_blob_chunk(self, chunk: BlobChunk) -> BlobProgress:
        return self.blobs.accept_chunk(SERVER_PEER, chunk, time.monotonic())

    async def on_blob_status(self, status: BlobStatus) -> BlobProgress:
        return self.blobs.status(SERVER_PEER, status.blob_id, time.monotonic())

    async def on_weights_global(self, message: WeightsGlobal) -> OkAck:
        data = self.blobs.take(SERVER_PEER, message.weights)
        fmt = message.weights.format
        async with self._lock:
            if _same(self.held, message):
                # Already held (a weights:global and a training:start's baseWeights may
                # both bring it): storing it again would change the file under a round.
                return OkAck()
            # The work rounds use now (the round being trained, results being kept) is
            # spared when the new version has the older work deleted, in the same hop.
            before = self.held.version if self.held is not None else None
            busy = self._busy_keys()
            try:
                # On the loop for small safetensors of a task that is not a package
                # (checked where they lie; a package's expected layout reads the
                # package); JSON is parsed and re-encoded, in a thread whatever its size.
                on_loop = fmt == "safetensors" and message.package is None
                small = len(data) if on_loop else None
                held, dropped = await run_disk(
                    small, self._save_and_drop, message, data, fmt, before, busy
                )
            except WeightsError as exc:
                log.warning(
                    "refused global weights v%d of %s (keeping v%s): %s: %s",
                    message.version,
                    message.task,
                    self.held.version if self.held is not None else "none",
                    exc.code,
                    exc.message,
                )
                raise
            self.held = held
        if isinstance(dropped, OSError):
            raise dropped  # the weights are held; the old work could not be deleted
        self._hub.publish(weights_version=held.version, task=held.task)
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in message.metrics.items())
        log.info(
            "received global weights v%d of %s%s",
            held.version,
            held.task,
            f" ({metrics})" if metrics else "",
        )
        return OkAck()

    def _save_and_drop(
        self,
        message: WeightsGlobal,
        data: bytes | bytearray,
        fmt: str,
        before: int | None,
        busy: set[str],
    ) -> tuple[GlobalWeights, OSError | None]:
        """:meth:`_save`, then (a newer version than ``before``) the work built on older
        bases deleted but ``busy``'s: rounds start only from the held version. Runs in a
        worker thread (on the loop when small); returns the held weights and the error
        deleting, if any."""
        held = self._save(message, data, fmt)
        if before is None or before >= held.version:
            return held, None
        try:
            self._work.drop_older_than(held.version, busy=busy)
        except OSError as exc:
            return held, exc
        return held, None

    def _save(self, message: WeightsGlobal, data: bytes | bytearray, fmt: str) -> GlobalWeights:
        """Decode (full validation, never unpickling) and store (see :meth:`_save_and_drop`).

        ``data`` was verified against ``message.weights.sha256`` by the transfer. Raises
        :class:`WeightsError` (before anything is stored) for a bad document or one that
        does not fit the expected layout.
        """
        expected = self._expected(message)
        layout = expected[0] if expected is not None else None
        digest: str | None = message.weights.sha256
        if fmt == "safetensors":
            # Every check of decode(), without copying the tensors out (stored as received).
            decode_views(data, expected=layout)
        else:
            state = decode(data, "json", expected=layout)
            data = encode(state, "safetensors")  # the trainer reads safetensors only
            digest = None
        try:
            return self._store.save(
                version=message.version, task=message.task, data=data, sha256=digest
            )
        except OSError as exc:
            raise FedtrayError(
                "internal_error", f"cannot store global weights v{message.version}: {exc}"
            ) from exc


def _same(held: GlobalWeights | None, message: WeightsGlobal) -> bool:
    """True when ``message`` brings exactly the held safetensors document again."""
    return (
        held is not None
        and message.weights.format == "safetensors"
        and (held.version, held.task, held.sha256)
        == (message.version, message.task, message.weights.sha256)
    )
