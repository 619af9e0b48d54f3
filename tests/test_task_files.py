"""Task files on devices and servers: the LRU cache, eligibility, shares, work keys (fast)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import uuid
from pathlib import Path

import numpy as np
import pytest

from client.errors import FedtrayError
from client.protocol import (
    Capabilities,
    DeviceRegister,
    FileRef,
    Partition,
    TaskFile,
    TrainingConfig,
    TrainingStart,
    parse,
)
from client.session.decisions import refuse_round
from client.session.filecache import FileCache
from client.session.package_cache import TaskFiles
from client.snapshot import ALLOW
from client.transfer import BlobStore
from client.weights import decode
from client.workfiles import work_key
from server.protocol_examples import EXAMPLES
from server.registry import DeviceRecord, Registry
from server.taskfile import DataShares


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 10
        return self.now


def test_cache_evicts_least_recently_used_and_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    cache = FileCache(tmp_path / "c", 250, clock=clock)
    a, b, c = b"a" * 100, b"b" * 100, b"c" * 100
    cache.put(sha(a), a, ".fedtask")
    cache.put(sha(b), b, ".safetensors")
    assert cache.path(sha(a), ".fedtask") is not None  # a is now more recent than b
    cache.put(sha(c), c, ".fedtask")  # 300 > 250: the least recently used (b) goes
    assert cache.path(sha(b), ".safetensors") is None
    assert cache.total_bytes() == 200
    # A new process finds the same files in the same order of use.
    again = FileCache(tmp_path / "c", 250, clock=clock)
    assert {e.sha256 for e in again.entries()} == {sha(a), sha(c)}
    assert [e.sha256 for e in again.entries()] == [sha(a), sha(c)]
    d = b"d" * 100
    again.put(sha(d), d, ".fedtask")
    assert again.path(sha(a), ".fedtask") is None  # a was the least recently used now
    assert again.path(sha(c), ".fedtask") is not None


def test_cache_never_evicts_files_in_use_and_refuses_what_cannot_fit(tmp_path: Path) -> None:
    cache = FileCache(tmp_path, 150, clock=Clock())
    a, b = b"a" * 100, b"b" * 100
    cache.put(sha(a), a, ".fedtask")
    with pytest.raises(FedtrayError) as exc:
        cache.put(sha(b), b, ".fedtask", keep={sha(a)})
    assert exc.value.code == "blob_too_large"
    assert cache.path(sha(a), ".fedtask") is not None
    with pytest.raises(FedtrayError) as exc:
        cache.put(sha(b"x" * 200), b"x" * 200, ".fedtask")
    assert exc.value.code == "blob_too_large"


def test_cache_refuses_bytes_that_do_not_match_their_sha256(tmp_path: Path) -> None:
    cache = FileCache(tmp_path, 1000)
    with pytest.raises(FedtrayError) as exc:
        cache.put(sha(b"good"), b"evil", ".fedtask")
    assert exc.value.code == "checksum_mismatch"
    with pytest.raises(FedtrayError) as exc:
        cache.put(sha(b"good"), b"good", ".fedtask", size=5)
    assert exc.value.code == "size_mismatch"
    assert cache.entries() == []
    # A file changed on disk behind the cache's back is dropped when verified.
    path = cache.put(sha(b"good"), b"good", ".fedtask")
    path.write_bytes(b"evil")
    assert cache.path(sha(b"good"), ".fedtask", verify=True) is None


def test_task_file_over_the_transfer_is_checked_and_kept(tmp_path: Path) -> None:
    from client.protocol import BlobChunk

    data = b"package bytes" * 10
    digest = sha(data)

    async def scenario() -> None:
        blobs = BlobStore(max_chunk_bytes=1 << 20, max_blob_bytes=1 << 20)
        files = TaskFiles(blobs, FileCache(tmp_path, 1 << 20), in_use=set)
        held = await files.on_task_file(TaskFile(kind="package", sha256=digest, size=len(data)))
        assert not held.held
        blobs.accept_chunk(
            "server",
            BlobChunk(blob_id=digest, offset=0, total=len(data), sha256=digest, data=data),
            0.0,
        )
        message = TaskFile(kind="package", sha256=digest, size=len(data), blob_id=digest)
        assert (await files.on_task_file(message)).held
        assert (await files.on_task_file(message.model_copy(update={"blob_id": None}))).held
        # A blob announced as another file is refused: the transfer checks size and sha256.
        other = b"other" * 10
        blobs.accept_chunk(
            "server",
            BlobChunk(blob_id="x", offset=0, total=len(other), sha256=sha(other), data=other),
            0.0,
        )
        with pytest.raises(FedtrayError) as exc:
            await files.on_task_file(
                TaskFile(kind="data", sha256=digest, size=len(other), blob_id="x")
            )
        assert exc.value.code == "checksum_mismatch"

    asyncio.run(scenario())
    assert (tmp_path / f"{digest}.fedtask").read_bytes() == data


def _start(package: FileRef | None, data: FileRef | None = None) -> TrainingStart:
    return TrainingStart(
        round_id="r1",
        task="tiny-cnn",
        config=TrainingConfig(epochs=1, batch_size=8, learning_rate=0.1),
        partition=Partition(index=0, count=2),
        base_version=0,
        deadline=2e9,
        package=package,
        data=data,
    )


def test_locate_refuses_a_round_whose_files_are_missing(tmp_path: Path) -> None:
    pkg = b"pkg" * 10
    ref = FileRef(sha256=sha(pkg), size=len(pkg))

    async def scenario() -> None:
        cache = FileCache(tmp_path, 1 << 20)
        files = TaskFiles(BlobStore(max_chunk_bytes=10, max_blob_bytes=10), cache, in_use=set)
        refused = await files.locate(_start(ref))
        assert getattr(refused, "reason", None) == "missing_package"
        cache.put(ref.sha256, pkg, ".fedtask")
        share = FileRef(sha256="0" * 64, size=5)
        refused = await files.locate(_start(ref, share))
        assert "data" in (getattr(refused, "detail", "") or "")
        data = b"x" * 5
        share = FileRef(sha256=sha(data), size=len(data))
        cache.put(share.sha256, data, ".safetensors")
        located = await files.locate(_start(ref, share))
        assert getattr(located, "package", None) == tmp_path / f"{ref.sha256}.fedtask"
        assert getattr(located, "data", None) == tmp_path / f"{share.sha256}.safetensors"
        # Without a data share the package says where its data is; one it cannot read
        # is refused, never trained.
        unreadable = await files.locate(_start(ref))
        assert getattr(unreadable, "reason", None) == "missing_package"

    asyncio.run(scenario())


def test_a_packaged_round_needs_no_installed_task() -> None:
    ref = FileRef(sha256="0" * 64, size=5)
    common = {"pause": ALLOW, "training": None, "worker_busy": False, "tasks": ["digits"]}
    assert refuse_round(_start(None), held=None, now=0.0, **common).reason == "unknown_task"  # type: ignore[union-attr,arg-type]
    assert refuse_round(_start(ref), held=None, now=0.0, **common).reason == "missing_base"  # type: ignore[union-attr,arg-type]


def _record(registry: Registry, caps: dict[str, object]) -> DeviceRecord:
    payload = copy.deepcopy(EXAMPLES[DeviceRegister])
    payload["deviceId"] = str(uuid.uuid4())
    base = {k: v for k, v in payload["capabilities"].items() if k != "taskPackages"}
    payload["capabilities"] = {**base, **caps}
    record, _ = registry.register(parse(DeviceRegister, payload), f"sid-{payload['deviceId']}", 0)
    return record


def test_only_devices_that_take_packages_are_eligible_for_a_packaged_task() -> None:
    registry = Registry(stale_after=100)
    old = _record(registry, {})  # a device that predates packages
    small = _record(registry, {"taskPackages": True, "packageCacheBytes": 10})
    able = _record(registry, {"taskPackages": True, "packageCacheBytes": 10_000})
    assert (
        Capabilities.model_validate(
            {k: v for k, v in old.capabilities.to_wire().items() if k != "taskPackages"}
        ).task_packages
        is False
    )
    eligible = registry.eligible("tiny-cnn", 1.0, package_bytes=1000)
    assert [d.device_id for d in eligible] == [able.device_id]
    assert registry.ineligibility(old, "tiny-cnn", 1.0, 1000) == "cannot take task packages"
    assert registry.ineligibility(small, "tiny-cnn", 1.0, 1000) == "package too large for it"
    # Installed tasks are unchanged: the name decides.
    assert len(registry.eligible("digits", 1.0)) == 3
    summary = registry.waiting_summary("tiny-cnn", 1.0, 2, 1000)
    assert "1 cannot take task packages" in summary


def test_data_shares_are_encoded_once_per_partition_and_stable() -> None:
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.repeat(np.arange(4, dtype=np.int64), 5)
    shares = DataShares(x, y)
    parts = [Partition(index=i, count=2, seed=3, scheme="label_skew") for i in range(2)]
    first = [shares.share(p) for p in parts]
    assert shares.share(parts[0]) is first[0]
    assert DataShares(x, y).share(parts[0]).sha256 == first[0].sha256  # same after a restart
    rows = [decode(s.content, "safetensors") for s in first]
    assert all(set(r) == {"x", "y"} for r in rows)
    assert sorted(np.concatenate([r["y"] for r in rows]).tolist()) == sorted(y.tolist())


def test_work_key_includes_the_package_and_data_digests() -> None:
    base = {
        "task": "t",
        "model_params": {},
        "config": TrainingConfig(epochs=1, batch_size=8, learning_rate=0.1),
        "partition": Partition(index=0, count=1),
        "base_version": 1,
        "base_sha256": "b" * 64,
    }
    plain = work_key(**base)  # type: ignore[arg-type]
    assert plain == work_key(**base, package_sha256=None)  # type: ignore[arg-type]
    one = work_key(**base, package_sha256="1" * 64)  # type: ignore[arg-type]
    two = work_key(**base, package_sha256="2" * 64)  # type: ignore[arg-type]
    share = work_key(**base, package_sha256="1" * 64, data_sha256="3" * 64)  # type: ignore[arg-type]
    assert len({plain, one, two, share}) == 4
