"""Task package archives: a valid package reads back; each hostile package is refused
with its own code, before anything is built or run."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from client.errors import CODES
from client.taskpkg.archive import (
    DATA_MEMBERS,
    EVAL_PROGRAM,
    MANIFEST,
    TRAIN_PROGRAM,
    WEIGHTS,
    PackageLimits,
    read_package,
    read_package_bytes,
)
from client.weights import encode

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parent.parent


def test_importing_the_torch_free_modules_imports_no_torch() -> None:
    code = (
        "import sys, client.taskpkg.archive, client.taskpkg.localdata, "
        "client.taskpkg.graphcheck, client.taskpkg.task; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from tests.taskpkg_packer import pack

    path = tmp_path_factory.mktemp("pkg") / "tiny.fedtask"
    pack(path)
    return path.read_bytes()


def members(blob: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def rezip(
    parts: dict[str, bytes] | list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED
) -> bytes:
    out = io.BytesIO()
    items = parts.items() if isinstance(parts, dict) else parts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(out, "w", compression=method) as zf:
            for name, body in items:
                zf.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), body, method)
    return out.getvalue()


def with_member(name: str, body: bytes) -> Callable[[bytes], bytes]:
    return lambda blob: rezip({**members(blob), name: body})


def replace_json(member: str, change: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def mutate(blob: bytes) -> bytes:
        parts = members(blob)
        data = json.loads(parts[member])
        change(data)
        parts[member] = json.dumps(data).encode()
        return rezip(parts)

    return mutate


def set_target(target: str) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        data["graph_module"]["graph"]["nodes"][0]["target"] = target

    return change


def set_expr(expr: str) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        values = data["graph_module"]["graph"]["tensor_values"]
        meta = next(m for m in values.values() if m["sizes"] and "as_expr" in m["sizes"][0])
        meta["sizes"][0] = {"as_expr": {"expr_str": expr, "hint": None}}

    return change


def lying_size(blob: bytes) -> bytes:
    """A DEFLATED member whose headers declare 100 bytes of a much larger real body."""
    parts = members(blob)
    parts["program/train.json"] = parts[TRAIN_PROGRAM]
    raw = bytearray(rezip(parts))
    name = TRAIN_PROGRAM.encode()
    local = raw.find(b"PK\x03\x04" + raw[4:4])  # first local header
    while local >= 0:
        if raw[local + 30 : local + 30 + len(name)] == name:
            struct.pack_into("<L", raw, local + 22, 100)
        local = raw.find(b"PK\x03\x04", local + 4)
    central = raw.find(b"PK\x01\x02")
    while central >= 0:
        if raw[central + 46 : central + 46 + len(name)] == name:
            struct.pack_into("<L", raw, central + 24, 100)
        central = raw.find(b"PK\x01\x02", central + 4)
    return bytes(raw)


def flag_encrypted(blob: bytes) -> bytes:
    raw = bytearray(blob)
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = raw.find(sig)
        while pos >= 0:
            raw[pos + at] |= 0x1
            pos = raw.find(sig, pos + 4)
    return bytes(raw)


def recompress(method: int) -> Callable[[bytes], bytes]:
    return lambda blob: rezip(members(blob), method)


def wrong_data(blob: bytes) -> bytes:
    parts = members(blob)
    rng = np.random.default_rng(0)
    parts[DATA_MEMBERS["train"]] = encode(
        {"x": rng.random((70, 1, 8, 8)), "y": np.zeros(70, dtype=np.int64)}  # float64 x
    )
    return rezip(parts)


def too_few_samples(blob: bytes) -> bytes:
    parts = members(blob)
    parts[DATA_MEMBERS["test"]] = encode(
        {"x": np.zeros((29, 1, 8, 8), np.float32), "y": np.zeros(29, np.int64)}
    )
    return rezip(parts)


def lying_manifest(blob: bytes) -> bytes:
    parts = members(blob)
    data = json.loads(parts[MANIFEST])
    data["input"]["shape"] = [1, 8, 9]
    parts[MANIFEST] = json.dumps(data).encode()
    return rezip(parts)


def extra_weight(blob: bytes) -> bytes:
    from client.weights import decode

    parts = members(blob)
    weights = decode(parts[WEIGHTS])
    weights["extra"] = np.zeros(3, np.float32)
    parts[WEIGHTS] = encode(weights)
    return rezip(parts)


PICKLE = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."

HOSTILE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "pickle member": (with_member("model.pkl", PICKLE), "package_pickle"),
    "pickle as weights": (with_member(WEIGHTS, PICKLE), "package_pickle"),
    "torch.save archive as weights": (
        with_member(WEIGHTS, rezip({"a/data.txt": b"x"})),
        "package_pickle",
    ),
    "path traversal": (with_member("../evil.json", b"{}"), "package_member"),
    "absolute name": (with_member("/etc/evil.json", b"{}"), "package_member"),
    "backslash name": (with_member("data\\train.safetensors", b"{}"), "package_member"),
    "unknown extra member": (with_member("notes.txt", b"hello"), "package_member"),
    "duplicate member": (
        lambda blob: rezip([*members(blob).items(), (MANIFEST, members(blob)[MANIFEST])]),
        "package_member",
    ),
    "missing program": (
        lambda blob: rezip({k: v for k, v in members(blob).items() if k != EVAL_PROGRAM}),
        "package_member",
    ),
    "zip bomb with a lying header": (lying_size, "package_bomb"),
    "zip bomb by ratio": (with_member("data/test.safetensors", bytes(50_000_000)), "package_bomb"),
    "truncated archive": (lambda blob: blob[: len(blob) // 2], "package_truncated"),
    "not a zip": (lambda blob: b"hello" * 100, "package_truncated"),
    "encrypted": (flag_encrypted, "package_compression"),
    "bzip2 compression": (recompress(zipfile.ZIP_BZIP2), "package_compression"),
    "manifest not json": (with_member(MANIFEST, b"{nope"), "bad_package"),
    "manifest lies about shapes": (lying_manifest, "package_shape"),
    "data of another dtype": (wrong_data, "package_data_mismatch"),
    "data with fewer samples than the manifest": (too_few_samples, "package_data_mismatch"),
    "custom operator": (
        replace_json(TRAIN_PROGRAM, set_target("torch.ops.mylib.evil.default")),
        "package_operator",
    ),
    "higher-order operator": (
        replace_json(EVAL_PROGRAM, set_target("torch.ops.higher_order.cond")),
        "package_operator",
    ),
    "python builtin as operator": (
        replace_json(TRAIN_PROGRAM, set_target("builtins.exec")),
        "package_operator",
    ),
    "program not json": (with_member(TRAIN_PROGRAM, b"[1, 2"), "package_program"),
    "program of another schema": (
        replace_json(TRAIN_PROGRAM, lambda d: d.update(schema_version={"major": 99, "minor": 0})),
        "package_program",
    ),
    "guards code": (
        replace_json(TRAIN_PROGRAM, lambda d: d.update(guards_code=["__import__('os')"])),
        "package_program",
    ),
    "code in a symbolic expression": (
        replace_json(TRAIN_PROGRAM, set_expr("__import__('os').system('true')")),
        "package_program",
    ),
    "attribute access in a symbolic expression": (
        replace_json(TRAIN_PROGRAM, set_expr("Symbol('s1').func")),
        "package_program",
    ),
    "weights of another model": (extra_weight, "package_weights"),
    "weights not safetensors": (
        with_member(WEIGHTS, b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
        "package_weights",
    ),
}


def test_a_good_package_reads_back(good: bytes) -> None:
    contents = read_package_bytes(good)
    assert contents.manifest.name == "tiny-cnn"
    assert set(contents.weights) >= {"conv.weight", "bn.running_mean", "bn.num_batches_tracked"}
    assert contents.data is not None
    assert contents.data["train"][0].shape == (70, 1, 8, 8)
    assert contents.data["test"][1].dtype == np.int64
    assert "torch.ops.aten.batch_norm.default" in contents.operators
    assert len(contents.sha256) == 64 and contents.size == len(good)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_package_is_refused_with_its_code(good: bytes, case: str, tmp_path: Path) -> None:
    mutate, code = HOSTILE[case]
    path = tmp_path / "bad.fedtask"
    path.write_bytes(mutate(good))
    with pytest.raises(Exception) as info:
        read_package(path)
    assert getattr(info.value, "code", None) == code, info.value
    assert CODES[code].submit == "final"


def test_every_package_code_has_a_hostile_case() -> None:
    package_codes = {c for c in CODES if c.startswith("package_") or c == "bad_package"}
    covered = {code for _, code in HOSTILE.values()} | {"package_too_large"}  # test below
    assert package_codes == covered


def test_oversized_member_and_total_are_refused(good: bytes) -> None:
    with pytest.raises(Exception, match="package_too_large"):
        read_package_bytes(good, PackageLimits(max_member_bytes=10_000))
    with pytest.raises(Exception, match="package_too_large"):
        read_package_bytes(good, PackageLimits(max_total_bytes=20_000))
    with pytest.raises(Exception, match="package_too_large"):
        read_package_bytes(good, PackageLimits(max_archive_bytes=1000))


def test_a_server_data_package_without_data_is_accepted_only_when_asked(good: bytes) -> None:
    blob = rezip({k: v for k, v in members(good).items() if not k.startswith("data/")})
    with pytest.raises(Exception, match="package_member"):
        read_package_bytes(blob)
    assert read_package_bytes(blob, require_data=False).data is None


def test_the_doc_lists_every_allowed_operator_and_package_code() -> None:
    from client.taskpkg.operators import OPERATOR_GROUPS

    doc = (REPO / "docs" / "task-package.md").read_text()
    for ops in OPERATOR_GROUPS.values():
        for op in ops.split():
            assert f"`{op}`" in doc, op
    for code in CODES:
        if code.startswith("package_") or code == "bad_package":
            assert f"| `{code}` |" in doc, code


@pytest.mark.parametrize(
    ("data", "pickle"),
    [
        (PICKLE, True),
        # A safetensors file whose 1,408-byte header length opens with \x80\x05: not a pickle.
        ((0x0580).to_bytes(8, "little") + b"{" + b" " * 0x057F, False),
        # ...but a header length that runs past the file does not make a pickle one.
        (b"\x80\x05" + b"\x00" * 6 + b"{" + b"." * 4, True),
    ],
)
def test_a_safetensors_header_length_is_not_taken_for_a_pickle(data: bytes, pickle: bool) -> None:
    from client.taskpkg.archive import _looks_like_pickle

    assert _looks_like_pickle(data) is pickle
