"""A partial FedAvg sum: one worker's share of a round, and how the shares combine.

Contract: :class:`PartialSum` is FedAvg's accumulator (:class:`server.aggregation.FedAvg`)
cut at the sum: for the model's :data:`~client.weights.Layout` it keeps, per tensor, the
float64 sum over the devices it covers of ``num_samples * update`` (the same arithmetic,
block by block, as ``FedAvg.add``), the total samples and the ids of the devices covered.
``add`` folds one update in (read only; its arrays may be read-only views over a mapped
document, any byte order; nothing of them is kept), ``merge`` folds another partial in,
``mean`` is the sample-weighted mean in the model's dtypes
(:func:`server.aggregation.cast_like`), ``means`` the same mean in float64 (what a server
optimizer steps from, as :meth:`server.aggregation.FedAvg.means`). So the mean of
partials merged in any grouping equals ``FedAvg`` over the same updates up to float64
rounding (exactly, when one partial adds the updates in FedAvg's order). :func:`combine`
is ``merge`` then ``mean``.
Memory: one float64 copy of the model, whatever the number of updates.

``to_bytes`` is a safetensors document of the float64 sums (tensor names as the model's)
whose ``__metadata__`` says what it is (``fedtray: partial-sum``, ``format``,
``deviceIds`` as a JSON list, ``totalSamples``); ``from_bytes`` reads one back, checked
against the model's layout (bounded in size; every structural check of the codec, finite
values, metadata present and consistent).

Raises ``ValueError`` (one line) for: an update or partial that does not fit the layout,
a device added twice or covered by two merged partials, ``num_samples < 1``, ``mean`` /
``means`` / ``to_bytes`` of an empty partial, and any bytes ``from_bytes`` refuses. Pure: numpy and
the codec only, no I/O, no torch.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from client.weights import Layout, StateDict, TensorSpec, WeightsError, decode, encode
from server.aggregation import BLOCK, cast_like

__all__ = ["FORMAT", "KIND", "PartialSum", "combine", "max_document_bytes"]

#: ``__metadata__`` values that mark a partial-sum document.
KIND: Final = "partial-sum"
FORMAT: Final = "1"
#: Header room beyond the tensor entries: the device ids (~100 bytes each) and the rest.
_HEADER_BYTES_PER_DEVICE: Final = 512
_HEADER_BASE_BYTES: Final = 64 * 1024
_LEN = struct.Struct("<Q")


def _sum_layout(layout: Layout) -> Layout:
    return {name: TensorSpec("float64", spec.shape) for name, spec in layout.items()}


def max_document_bytes(layout: Layout, devices: int) -> int:
    """The largest partial-sum document accepted for ``layout`` covering ``devices``."""
    tensors = sum(8 * math.prod(spec.shape) for spec in layout.values())
    per_entry = 256 * len(layout)
    return tensors + per_entry + _HEADER_BASE_BYTES + _HEADER_BYTES_PER_DEVICE * devices


class PartialSum:
    """The float64 sums of ``num_samples * update`` over some devices of one round."""

    def __init__(self, layout: Layout) -> None:
        if not layout:
            raise ValueError("a partial sum needs a model layout with at least one tensor")
        self.layout: Layout = dict(layout)
        self._dtypes = {name: np.dtype(spec.dtype) for name, spec in layout.items()}
        self._sums: dict[str, npt.NDArray[np.float64]] = {}
        self._devices: dict[str, None] = {}  # insertion-ordered set
        self._total = 0
        self._block = np.empty(BLOCK, dtype=np.float64)

    # --- queries ------------------------------------------------------------------

    @property
    def device_ids(self) -> tuple[str, ...]:
        """The devices covered, in the order they were added."""
        return tuple(self._devices)

    @property
    def total_samples(self) -> int:
        return self._total

    @property
    def count(self) -> int:
        """Devices covered."""
        return len(self._devices)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    @property
    def sums(self) -> dict[str, npt.NDArray[np.float64]]:
        """The float64 sums (the arrays themselves; empty before the first add)."""
        return self._sums

    # --- folding ------------------------------------------------------------------

    def _check_shapes(self, state: StateDict, what: str) -> None:
        if set(state) != set(self.layout):
            missing = sorted(set(self.layout) - set(state))
            extra = sorted(set(state) - set(self.layout))
            raise ValueError(
                f"the {what}'s tensor names differ from the model's "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for name, spec in self.layout.items():
            if tuple(state[name].shape) != spec.shape:
                raise ValueError(
                    f"tensor {name} of the {what} has shape {tuple(state[name].shape)}, "
                    f"not {spec.shape}"
                )

    def add(self, device_id: str, update: StateDict, num_samples: int) -> None:
        """Fold in ``device_id``'s update trained on ``num_samples`` samples."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if device_id in self._devices:
            raise ValueError(f"device {device_id} is already in this partial sum")
        self._check_shapes(update, "update")
        weight = float(num_samples)
        block = self._block
        for name, arr in update.items():
            acc = self._sums.get(name)
            first = acc is None
            if acc is None:
                acc = self._sums[name] = np.empty(self.layout[name].shape, dtype=np.float64)
            flat_acc = acc.reshape(-1)
            flat_in = arr.reshape(-1)
            # As FedAvg.add: weight * update in float64, block by block, added to the sum.
            for start in range(0, flat_acc.size, BLOCK):
                end = min(start + BLOCK, flat_acc.size)
                if first:
                    np.multiply(flat_in[start:end], weight, out=flat_acc[start:end])
                else:
                    tmp = block[: end - start]
                    np.multiply(flat_in[start:end], weight, out=tmp)
                    flat_acc[start:end] += tmp
        self._devices[device_id] = None
        self._total += num_samples

    def merge(self, other: PartialSum) -> None:
        """Fold in another partial sum of the same round (disjoint devices)."""
        if other.layout != self.layout:
            raise ValueError("the partial sums are of different model layouts")
        both = [d for d in other._devices if d in self._devices]
        if both:
            raise ValueError(f"device {both[0]} is covered by two partial sums")
        if not other._devices:
            return
        for name, theirs in other._sums.items():
            mine = self._sums.get(name)
            if mine is None:
                self._sums[name] = theirs.copy()
            else:
                mine += theirs
        self._devices.update(other._devices)
        self._total += other._total

    def mean(self) -> StateDict:
        """The sample-weighted mean, each tensor in the model's dtype."""
        if not self._devices:
            raise ValueError("no update was added in this round")
        weight = float(self._total)
        out: StateDict = {}
        for name, acc in self._sums.items():
            dtype = self._dtypes[name]
            result = np.empty(acc.shape, dtype=dtype)
            flat_out, flat_acc = result.reshape(-1), acc.reshape(-1)
            for start in range(0, flat_acc.size, BLOCK):
                flat_out[start : start + BLOCK] = cast_like(
                    flat_acc[start : start + BLOCK] / weight, dtype
                )
            out[name] = result
        return out

    def means(self) -> dict[str, npt.NDArray[np.float64]]:
        """The sample-weighted mean of each tensor in float64 (new arrays)."""
        if not self._devices:
            raise ValueError("no update was added in this round")
        weight = float(self._total)
        return {name: acc / weight for name, acc in self._sums.items()}

    # --- bytes --------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The sums as a float64 safetensors document with this partial's metadata."""
        if not self._devices:
            raise ValueError("an empty partial sum is not written (nothing was added)")
        try:
            plain = encode(dict(self._sums), "safetensors")
        except WeightsError as exc:
            raise ValueError(f"the partial sum cannot be written: {exc.message}") from None
        (header_len,) = _LEN.unpack_from(plain, 0)
        header = json.loads(plain[_LEN.size : _LEN.size + header_len])
        header["__metadata__"] = {
            "fedtray": KIND,
            "format": FORMAT,
            "deviceIds": json.dumps(list(self._devices), separators=(",", ":")),
            "totalSamples": str(self._total),
        }
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        body = memoryview(plain)[_LEN.size + header_len :]
        return b"".join([_LEN.pack(len(raw)), raw, body])

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, layout: Layout, *, max_devices: int = 100_000
    ) -> PartialSum:
        """A partial sum read back from :meth:`to_bytes`, checked against ``layout``."""
        view = memoryview(data).cast("B")
        limit = max_document_bytes(layout, max_devices)
        if view.nbytes > limit:
            raise ValueError(f"not a partial sum: {view.nbytes} bytes, the limit is {limit}")
        try:
            sums = decode(view, "safetensors", expected=_sum_layout(layout), max_bytes=limit)
        except WeightsError as exc:
            raise ValueError(f"not a partial sum of this model: {exc.message}") from None
        # The codec has checked the header (length, JSON, metadata strings); read the metadata.
        (header_len,) = _LEN.unpack_from(view, 0)
        header = json.loads(bytes(view[_LEN.size : _LEN.size + header_len]))
        device_ids, total = _metadata(header.get("__metadata__"), max_devices)
        out = cls(layout)
        out._sums = sums  # float64: the layout check says so
        out._devices = dict.fromkeys(device_ids)
        out._total = total
        return out


def _metadata(meta: object, max_devices: int) -> tuple[list[str], int]:
    if not isinstance(meta, dict):
        raise ValueError("not a partial sum: the document has no metadata")
    if meta.get("fedtray") != KIND:
        raise ValueError(f"not a partial sum: metadata fedtray is {meta.get('fedtray')!r}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"partial sum format {meta.get('format')!r} is not {FORMAT}")
    try:
        ids: Any = json.loads(meta.get("deviceIds", ""))
        total = int(meta.get("totalSamples", ""))
    except ValueError:
        raise ValueError("not a partial sum: deviceIds or totalSamples unreadable") from None
    if not (
        isinstance(ids, list)
        and 0 < len(ids) <= max_devices
        and all(isinstance(d, str) and d for d in ids)
    ):
        raise ValueError(f"not a partial sum: deviceIds must list 1-{max_devices} device ids")
    if len(set(ids)) != len(ids):
        raise ValueError("not a partial sum: a device id is listed twice")
    if total < len(ids):
        raise ValueError(
            f"not a partial sum: {total} samples for {len(ids)} devices (at least one each)"
        )
    return ids, total


def combine(partials: Iterable[PartialSum]) -> StateDict:
    """The FedAvg mean over every update the ``partials`` cover (disjoint devices)."""
    total: PartialSum | None = None
    for partial in partials:
        if total is None:
            total = PartialSum(partial.layout)
        total.merge(partial)
    if total is None:
        raise ValueError("no partial sum to combine")
    return total.mean()
