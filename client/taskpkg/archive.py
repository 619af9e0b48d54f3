"""Reading and writing ``.fedtask`` archives: every byte checked, nothing executed.

Contract (torch-free; importing this module never imports torch):

* :func:`read_package` opens a package file and returns :class:`PackageContents` only
  when every rule of ``docs/task-package.md`` holds: the exact member set, STORED or
  DEFLATED members without encryption, plain relative names, sizes within
  :class:`PackageLimits`, each member's real size equal to its declared size (read with
  a hard cap, never trusting the header), a valid manifest, program JSON of the
  supported schema calling only allowed operators (:mod:`client.taskpkg.graphcheck`),
  weights whose names are exactly the program's parameters and buffers, and data arrays
  matching the manifest's specs and sample counts. Each kind of refusal raises
  :class:`client.errors.FedtrayError` with its own code (``package_*`` and
  ``bad_package``), naming the member.
* Safetensors members are read by :func:`client.weights.decode` (no pickle, no
  ``numpy.load``); a member that is a pickle or a ``torch.save`` archive is refused as
  ``package_pickle``.
* :func:`write_package` is the one writer: it checks what it writes with the same rules
  (by reading the result back) and replaces the target atomically.

Never: unpickle, call ``numpy.load``, ``torch.load`` or ``torch.export.load``, extract
members to disk, or trust a size from a zip header.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import numpy as np
import numpy.typing as npt

from client.atomicfile import write_atomic
from client.errors import ErrorCode, FedtrayError
from client.taskpkg.graphcheck import (
    ProgramInfo,
    check_program,
    check_specs,
    parse_program_json,
)
from client.taskpkg.manifest import MAX_MANIFEST_BYTES, Manifest, ServerData, parse_manifest
from client.weights import decode, encode
from client.weights.spec import WeightsError

__all__ = [
    "CONSTANTS",
    "DATA_MEMBERS",
    "EVAL_PROGRAM",
    "MANIFEST",
    "PACKAGE_SUFFIX",
    "TRAIN_PROGRAM",
    "WEIGHTS",
    "Arrays",
    "PackageContents",
    "PackageLimits",
    "package_bytes",
    "read_package",
    "read_package_bytes",
    "write_package",
]

PACKAGE_SUFFIX: Final = ".fedtask"
MANIFEST: Final = "manifest.json"
TRAIN_PROGRAM: Final = "program/train.json"
EVAL_PROGRAM: Final = "program/eval.json"
WEIGHTS: Final = "weights.safetensors"
CONSTANTS: Final = "constants.safetensors"
DataSplit = Literal["train", "test"]
DATA_MEMBERS: Final[dict[DataSplit, str]] = {
    "train": "data/train.safetensors",
    "test": "data/test.safetensors",
}
_REQUIRED: Final = (MANIFEST, TRAIN_PROGRAM, EVAL_PROGRAM, WEIGHTS)
#: The order members are written in (and so the byte layout of a written package).
_ORDER: Final = (*_REQUIRED, CONSTANTS, *DATA_MEMBERS.values())

Arrays = tuple[npt.NDArray[Any], npt.NDArray[Any]]

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_SIG: Final = b"PK\x03\x04"
_PICKLE_NAMES: Final = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".pt2")


@dataclass(frozen=True)
class PackageLimits:
    """Size bounds a reader enforces (bytes unless said otherwise)."""

    max_archive_bytes: int = 2 * 1024**3
    max_total_bytes: int = 2 * 1024**3
    """Sum of the members' uncompressed sizes."""
    max_member_bytes: int = 1024**3
    max_program_bytes: int = 64 * 1024**2
    max_ratio: float = 200.0
    """Largest uncompressed / compressed size of one DEFLATED member."""


@dataclass(frozen=True)
class PackageContents:
    """A package that passed every check of :func:`read_package`."""

    manifest: Manifest
    train_program: bytes
    """``program/train.json`` as stored (UTF-8 JSON)."""
    eval_program: bytes
    weights: dict[str, npt.NDArray[Any]]
    """The initial global weights, named as the model's state dict."""
    constants: dict[str, npt.NDArray[Any]]
    data: dict[DataSplit, Arrays] | None
    """``{"train": (x, y), "test": (x, y)}`` when the manifest's data source is ``server``."""
    sha256: str
    """Hex SHA-256 of the package file."""
    size: int
    """Bytes of the package file."""
    operators: frozenset[str] = field(default_factory=frozenset)
    """The operators the two programs call."""


def _err(code: ErrorCode, message: str) -> FedtrayError:
    return FedtrayError(code, message)


# -- zip level --------------------------------------------------------------------------


def _check_name(name: str) -> None:
    lowered = name.lower()
    if lowered.endswith(_PICKLE_NAMES) or "data.pkl" in lowered:
        raise _err("package_pickle", f"member {name[:120]!r} is a pickle")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or (len(name) > 1 and name[1] == ":")
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise _err("package_member", f"member name {name[:120]!r} is not a plain relative path")


def _check_members(infos: list[zipfile.ZipInfo], limits: PackageLimits) -> None:
    seen: set[str] = set()
    total = 0
    for info in infos:
        _check_name(info.filename)
        if info.filename in seen:
            raise _err("package_member", f"member {info.filename!r} appears twice")
        seen.add(info.filename)
        if info.filename not in _ORDER:
            raise _err("package_member", f"unexpected member {info.filename[:120]!r}")
        if info.flag_bits & 0x1:
            raise _err("package_compression", f"member {info.filename!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _err(
                "package_compression",
                f"member {info.filename!r} uses compression method {info.compress_type}; "
                "only STORED and DEFLATED are allowed",
            )
        cap = limits.max_member_bytes
        if info.filename in (TRAIN_PROGRAM, EVAL_PROGRAM):
            cap = limits.max_program_bytes
        elif info.filename == MANIFEST:
            cap = MAX_MANIFEST_BYTES
        if info.file_size > cap:
            raise _err(
                "package_too_large",
                f"member {info.filename!r} is {info.file_size} bytes; at most {cap}",
            )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise _err(
                "package_too_large",
                f"the members hold more than {limits.max_total_bytes} bytes in all",
            )
        if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > limits.max_ratio * max(
            1, info.compress_size
        ):
            raise _err(
                "package_bomb",
                f"member {info.filename!r} declares a compression ratio over {limits.max_ratio:g}",
            )
    missing = [name for name in _REQUIRED if name not in seen]
    if missing:
        raise _err("package_member", f"required member(s) missing: {', '.join(missing)}")


def _read_member(fh: BinaryIO, info: zipfile.ZipInfo, archive_size: int) -> bytes:
    """The member's bytes, decompressed with a hard cap of its declared size."""
    name = info.filename
    fh.seek(info.header_offset)
    head = fh.read(_LOCAL_HEADER.size)
    if len(head) < _LOCAL_HEADER.size:
        raise _err("package_truncated", f"the archive ends inside member {name!r}")
    fields = _LOCAL_HEADER.unpack(head)
    if fields[0] != _LOCAL_SIG:
        raise _err("package_truncated", f"member {name!r} has no local header")
    flags, method = fields[2], fields[3]
    name_len, extra_len = fields[9], fields[10]
    if flags & 0x1 or method != info.compress_type:
        raise _err("package_compression", f"member {name!r}: local header disagrees")
    local_name = fh.read(name_len)
    if local_name.decode("utf-8", "replace") != name and local_name != name.encode(
        "cp437", "replace"
    ):
        raise _err("package_member", f"member {name!r}: local header names another file")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + info.compress_size > archive_size:
        raise _err("package_truncated", f"the archive ends inside member {name!r}")
    fh.seek(start)
    raw = fh.read(info.compress_size)
    if len(raw) != info.compress_size:
        raise _err("package_truncated", f"the archive ends inside member {name!r}")
    declared = info.file_size
    if method == zipfile.ZIP_STORED:
        if info.compress_size != declared:
            raise _err("package_bomb", f"member {name!r}: stored size differs from declared")
        data = raw
    else:
        inflater = zlib.decompressobj(-15)
        try:
            data = inflater.decompress(raw, declared + 1)
        except zlib.error as exc:
            raise _err("package_truncated", f"member {name!r} is damaged: {exc}") from None
        if len(data) > declared or inflater.unconsumed_tail:
            raise _err(
                "package_bomb", f"member {name!r} inflates past its declared {declared} bytes"
            )
        if not inflater.eof:
            raise _err("package_truncated", f"member {name!r}'s compressed data is cut short")
        if len(data) != declared:
            raise _err(
                "package_bomb",
                f"member {name!r} inflates to {len(data)} bytes, not the declared {declared}",
            )
    if zlib.crc32(data) != info.CRC:
        raise _err("package_truncated", f"member {name!r} fails its CRC check (damaged)")
    if _looks_like_pickle(data):
        raise _err("package_pickle", f"member {name!r} is a pickle")
    if data[:4] == _LOCAL_SIG:
        raise _err("package_pickle", f"member {name!r} is a zip archive (torch.save format)")
    return data


def _looks_like_pickle(data: bytes) -> bool:
    """A pickle of protocol 2+ opens with PROTO (``\\x80`` and the protocol). A safetensors
    file opens with its header length (8 bytes, little-endian) and then ``{``, and that
    length may start with ``\\x80`` too (0x0580 = 1,408 bytes): that is not a pickle."""
    proto = data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    safetensors = data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8
    return proto and not safetensors


# -- content level ----------------------------------------------------------------------


def _tensors(raw: bytes, member: str, code: ErrorCode, limit: int) -> dict[str, npt.NDArray[Any]]:
    try:
        return decode(raw, "safetensors", max_bytes=limit)
    except WeightsError as exc:
        raise _err(code, f"{member}: {exc.message}") from None


def _check_weights(
    weights: Mapping[str, npt.NDArray[Any]],
    constants: Mapping[str, npt.NDArray[Any]],
    programs: dict[str, ProgramInfo],
) -> None:
    for member, info in programs.items():
        if set(weights) != info.state_names:
            extra = sorted(set(weights) - info.state_names)[:5]
            lacking = sorted(info.state_names - set(weights))[:5]
            raise _err(
                "package_weights",
                f"{WEIGHTS} does not match {member}'s parameters and buffers "
                f"(not in the program: {extra}; missing: {lacking})",
            )
        if not info.constants <= set(constants):
            lacking = sorted(info.constants - set(constants))[:5]
            raise _err("package_weights", f"{CONSTANTS} lacks {member}'s constants {lacking}")


def _check_data(
    manifest: Manifest, split: DataSplit, arrays: dict[str, npt.NDArray[Any]]
) -> Arrays:
    member = DATA_MEMBERS[split]
    if set(arrays) != {"x", "y"}:
        raise _err(
            "package_data_mismatch", f"{member} must hold exactly 'x' and 'y', not {sorted(arrays)}"
        )
    x, y = arrays["x"], arrays["y"]
    data = manifest.data
    assert isinstance(data, ServerData)
    want = data.train_samples if split == "train" else data.test_samples
    for key, arr, spec in (("x", x, manifest.input), ("y", y, manifest.label)):
        if arr.dtype.name != spec.dtype:
            raise _err(
                "package_data_mismatch",
                f"{member}: '{key}' is {arr.dtype.name}; the manifest says {spec.dtype}",
            )
        if tuple(arr.shape) != (want, *spec.shape):
            raise _err(
                "package_data_mismatch",
                f"{member}: '{key}' has shape {list(arr.shape)}; the manifest says "
                f"{[want, *spec.shape]} ({want} samples)",
            )
    if (
        manifest.loss == "cross_entropy"
        and manifest.num_classes is not None
        and len(y)
        and (y.dtype.kind not in "iu" or int(y.min()) < 0 or int(y.max()) >= manifest.num_classes)
    ):
        raise _err(
            "package_data_mismatch",
            f"{member}: labels must be integers in [0, {manifest.num_classes})",
        )
    return x, y


def read_package(
    path: Path, limits: PackageLimits = PackageLimits(), *, require_data: bool = True
) -> PackageContents:
    """Open, check and return the package at ``path`` (module docstring).

    ``require_data=False`` accepts a ``server``-data package without its data members (a
    device that receives its partition separately); ``data`` is then ``None``.
    """
    try:
        size = path.stat().st_size
        if size > limits.max_archive_bytes:
            raise _err(
                "package_too_large",
                f"the package is {size} bytes; at most {limits.max_archive_bytes}",
            )
        blob = path.read_bytes()
    except OSError as exc:
        raise _err("bad_package", f"cannot read the package {path}: {exc}") from None
    return read_package_bytes(blob, limits, require_data=require_data)


def read_package_bytes(
    blob: bytes, limits: PackageLimits = PackageLimits(), *, require_data: bool = True
) -> PackageContents:
    """:func:`read_package` of a package held in memory."""
    if len(blob) > limits.max_archive_bytes:
        raise _err("package_too_large", f"the package is {len(blob)} bytes")
    fh = io.BytesIO(blob)
    try:
        with zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise _err("package_truncated", f"not a complete zip archive: {exc}") from None
    _check_members(infos, limits)
    raw = {info.filename: _read_member(fh, info, len(blob)) for info in infos}
    manifest = parse_manifest(raw[MANIFEST])
    programs = {
        member: check_program(parse_program_json(raw[member], member), member)
        for member in (TRAIN_PROGRAM, EVAL_PROGRAM)
    }
    for member, info in programs.items():
        check_specs(manifest, info, member)
    weights = _tensors(raw[WEIGHTS], WEIGHTS, "package_weights", limits.max_member_bytes)
    constants: dict[str, npt.NDArray[Any]] = {}
    if CONSTANTS in raw:
        constants = _tensors(raw[CONSTANTS], CONSTANTS, "package_weights", limits.max_member_bytes)
    _check_weights(weights, constants, programs)
    data: dict[DataSplit, Arrays] | None = None
    present = [split for split, member in DATA_MEMBERS.items() if member in raw]
    if manifest.data.source == "server" and (present or require_data):
        if len(present) != 2:
            raise _err(
                "package_member", "a package with server data needs data/train and data/test"
            )
        data = {
            split: _check_data(
                manifest,
                split,
                _tensors(raw[member], member, "package_data_mismatch", limits.max_member_bytes),
            )
            for split, member in DATA_MEMBERS.items()
        }
    elif present:
        raise _err("package_member", "a package with local data must not carry data members")
    return PackageContents(
        manifest=manifest,
        train_program=raw[TRAIN_PROGRAM],
        eval_program=raw[EVAL_PROGRAM],
        weights=weights,
        constants=constants,
        data=data,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        operators=frozenset().union(*(info.operators for info in programs.values())),
    )


# -- writing ----------------------------------------------------------------------------


def _tensor_member(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    try:
        return encode(dict(arrays), "safetensors")
    except WeightsError as exc:
        raise _err("package_weights", exc.message) from None


def package_bytes(
    manifest: Manifest,
    train_json: bytes,
    eval_json: bytes,
    weights: Mapping[str, npt.NDArray[Any]],
    constants: Mapping[str, npt.NDArray[Any]] | None = None,
    data: Mapping[DataSplit, Arrays] | None = None,
) -> bytes:
    """The bytes of a package (not checked; :func:`write_package` checks them)."""
    members: dict[str, tuple[bytes, int]] = {
        MANIFEST: (
            manifest.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8"),
            zipfile.ZIP_DEFLATED,
        ),
        TRAIN_PROGRAM: (train_json, zipfile.ZIP_DEFLATED),
        EVAL_PROGRAM: (eval_json, zipfile.ZIP_DEFLATED),
        WEIGHTS: (_tensor_member(weights), zipfile.ZIP_STORED),
    }
    if constants:
        members[CONSTANTS] = (_tensor_member(constants), zipfile.ZIP_STORED)
    for split, (x, y) in (data or {}).items():
        members[DATA_MEMBERS[split]] = (
            _tensor_member({"x": np.asarray(x), "y": np.asarray(y)}),
            zipfile.ZIP_STORED,
        )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name in _ORDER:
            if name in members:
                body, method = members[name]
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = method
                info.external_attr = 0o644 << 16
                zf.writestr(info, body)
    return out.getvalue()


def write_package(
    path: Path,
    manifest: Manifest,
    train_json: bytes,
    eval_json: bytes,
    weights: Mapping[str, npt.NDArray[Any]],
    constants: Mapping[str, npt.NDArray[Any]] | None = None,
    data: Mapping[DataSplit, Arrays] | None = None,
    *,
    limits: PackageLimits = PackageLimits(),
) -> PackageContents:
    """Write a package to ``path`` atomically, after checking it as a reader would.

    Raises the reader's codes when the parts do not form a valid package (e.g.
    ``package_data_mismatch`` for data that disagrees with the manifest); ``path`` is
    then untouched. Returns what a reader will read.
    """
    blob = package_bytes(manifest, train_json, eval_json, weights, constants, data)
    contents = read_package_bytes(blob, limits)
    write_atomic(path, blob, mode=0o644)
    return contents
