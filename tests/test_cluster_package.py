"""A task package (``--task-file``) in cluster mode, on real Redis and PostgreSQL.

* A federation of real ``python -m client`` devices that have never seen the task, spread
  over two workers, completes a round on a package: version 0 in PostgreSQL is exactly the
  package's weights, every device was given the package (without its data members) and
  only its own share of the data (the shares together are the package's train split),
  and updates arrived through both workers, each recorded once.
* A bad package is one line and exit status 1 from the supervisor, before any worker
  starts (nothing is written to PostgreSQL).
* The worker's package checks (:mod:`server.cluster.package`): another manifest name, and
  a database whose versions have another layout, are refused with one line.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from client.errors import CODES
from client.weights import encode, layout_of
from server.serving import StartupError
from tests.cluster_harness import cluster, fetch, latest_version, update_rows
from tests.engines import RedisServer
from tests.server_harness import REPO_ROOT, server_args, subprocess_env
from tests.waiting import poll, scaled


def _bad_package(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", b"{}")
        zf.writestr("../evil.py", b"print('no')")
    return path


def _engine_flags(redis: str, database: str, tmp_path: Path) -> list[str]:
    return ["--workers", "2", "--redis", redis, "--database", database,
            "--shared-dir", str(tmp_path / "shared")]  # fmt: skip


def test_a_bad_package_is_one_line_and_exit_1_before_any_worker_starts(
    tmp_path: Path, redis_url: str, postgres_url: str
) -> None:
    bad = _bad_package(tmp_path / "bad.fedtask")
    argv = server_args(tmp_path, *_engine_flags(redis_url, postgres_url, tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "server", *argv, "--task-file", str(bad)],
        cwd=REPO_ROOT, env=subprocess_env(tmp_path), capture_output=True, text=True,
        timeout=scaled(120), check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("fedtray-server: error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"fedtray-server: error: bad task package {bad}: "), errors
    assert errors[0].split(": ")[3] in CODES, errors
    assert "worker" not in proc.stdout + proc.stderr  # no worker was started
    # No worker ever reached PostgreSQL: the cluster's tables were never created.
    tables = fetch(postgres_url, "SELECT tablename FROM pg_tables WHERE tablename LIKE 'fedtray%'")
    assert tables == []


def test_the_worker_refuses_another_name_and_another_models_versions(tmp_path: Path) -> None:
    import dataclasses

    from server.cluster.package import check_layout
    from server.config import ServerConfig
    from server.served_task import package_task
    from server.taskfile import open_package
    from tests.taskpkg_packer import pack

    path = tmp_path / "tiny.fedtask"
    pack(path)
    config = ServerConfig(state_dir=tmp_path / "state", task="tiny-cnn", task_file=path)
    task = package_task(config, None)  # opened here: the same checks as the CLI's
    assert task.package.sha256 == open_package(path).sha256
    check_layout(task, layout_of(task.package.weights))  # its own versions: fine
    with pytest.raises(StartupError, match="trains 'tiny-cnn', not 'digits'"):
        package_task(dataclasses.replace(config, task="digits"), task.package)
    other = {"w": np.zeros((2, 2), np.float32)}
    with pytest.raises(StartupError, match="versions of another model"):
        check_layout(task, layout_of(other))
    bad = dataclasses.replace(config, task_file=_bad_package(tmp_path / "bad.fedtask"))
    with pytest.raises(StartupError, match=r"^bad task package .*bad\.fedtask: "):
        package_task(bad, None)


@pytest.mark.slow
@pytest.mark.torch
def test_devices_that_never_saw_the_task_complete_a_round_on_a_package_in_a_cluster(
    tmp_path: Path, private_redis: RedisServer, postgres_url: str
) -> None:
    from server.taskfile import open_package
    from tests.taskpkg_packer import TRAIN_N, pack

    package = tmp_path / "tiny.fedtask"
    pack(package)
    served = open_package(package)
    redis = private_redis.url(0)
    flags = [*_engine_flags(redis, postgres_url, tmp_path), "--task-file", str(package),
             "--rounds", "1", "--min-clients", "3", "--clients-per-round", "3",
             "--min-completion", "1.0", "--round-timeout", "120"]  # fmt: skip
    with cluster(tmp_path, redis, postgres_url, *flags) as fed:
        where = fed.spread(3)
        assert len(set(where.values())) == 2, where
        latest = poll(
            lambda: latest_version(postgres_url),
            lambda v: v is not None and v["version"] >= 1,
            300,
            "a round on the package",
        )
        assert latest is not None and latest["version"] == 1
        versions = fetch(postgres_url, "SELECT version, sha256 FROM fedtray_versions")
    # Version 0 is the package's own weights, byte for byte as the coordinator encodes them.
    zero = next(v for v in versions if v["version"] == 0)
    expected = hashlib.sha256(encode(served.weights, "safetensors")).hexdigest()
    assert zero["sha256"] == expected
    updates = update_rows(postgres_url)
    assert len(updates) == 3, updates
    assert max(Counter(u["device_id"] for u in updates).values()) == 1
    assert len({u["worker_id"] for u in updates}) == 2, updates
    # The devices trained on the package's data: their shares together are its train split.
    assert sum(u["num_samples"] for u in updates) == TRAIN_N
    for name in ("d0", "d1", "d2"):
        cache = tmp_path / name / "xdg" / "xdg_data_home" / "fedtray" / "packages"
        held = sorted(p.name for p in cache.iterdir())
        assert f"{served.sha256}.fedtask" in held, (name, held)
        members = zipfile.ZipFile(cache / f"{served.sha256}.fedtask").namelist()
        assert not any(m.startswith("data/") for m in members), members
        assert len([n for n in held if n.endswith(".safetensors")]) == 1, held
