"""Step time of a task package's rebuilt program against the same model run eagerly.

Run ``python -m benchmarks.exported_step`` (``--threads``, ``--batch-size``, ``--steps``,
``--repeats``; ``--help``). It packs ``docs/examples/digits_cnn.py`` with random
1x8x8 data into a temporary directory (:func:`server.pack.pack`), then in this one
process, with the same torch thread count, batch size, data and starting weights:

* eager: the operator's model (``make_model()``), train mode, SGD steps;
* exported: :func:`client.taskpkg.task.load_packaged_task` -> ``build_model`` (the train
  program rebuilt from JSON + safetensors, no ``torch.load``), the same SGD steps.

Each figure is the median over ``--repeats`` of the mean step time (zero_grad, forward,
cross-entropy, backward, step) across ``--steps`` steps after 5 warm-up steps, the two
sides alternating. Also measured: the package load time (``load_packaged_task`` plus
``build_model``, median of ``--repeats``). Prints one JSON object; goal: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RATIO_TARGET = 1.05
ROOT = Path(__file__).resolve().parent.parent


def _data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.random((n, 1, 8, 8), dtype=np.float32),
        "y_train": rng.integers(0, 10, n).astype(np.int64),
        "x_test": rng.random((n // 4, 1, 8, 8), dtype=np.float32),
        "y_test": rng.integers(0, 10, n // 4).astype(np.int64),
    }


def _steps(model: Any, x: Any, y: Any, steps: int, batch: int) -> float:
    import torch
    from torch.nn import functional

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n = len(y)

    def one(i: int) -> None:
        lo = (i * batch) % (n - batch + 1)
        opt.zero_grad(set_to_none=True)
        loss = functional.cross_entropy(model(x[lo : lo + batch]), y[lo : lo + batch])
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    for i in range(5):
        one(i)
    start = time.perf_counter()
    for i in range(steps):
        one(i)
    return (time.perf_counter() - start) / steps


def run(threads: int, batch_size: int, steps: int, repeats: int) -> dict[str, Any]:
    import torch

    from client.taskpkg import task as taskpkg_task
    from server.pack import load_factory, pack

    torch.set_num_threads(threads)
    factory = load_factory(f"{ROOT / 'docs/examples/digits_cnn.py'}:make_model")
    arrays = _data(max(1024, batch_size * 4))
    with tempfile.TemporaryDirectory(prefix="fedtray-bench-") as tmp:
        data = Path(tmp) / "data.npz"
        np.savez(data, **arrays)  # type: ignore[arg-type]
        package = pack(factory, data, Path(tmp) / "bench.fedtask", name="bench").path
        loads = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            task = taskpkg_task.load_packaged_task(package)
            task.build_model(task.params, 0)
            loads.append(time.perf_counter() - t0)
        x = torch.from_numpy(arrays["x_train"])
        y = torch.from_numpy(arrays["y_train"])
        eager_t, exported_t = [], []
        for _ in range(repeats):
            eager = torch.random.fork_rng(devices=[])
            with eager:
                torch.manual_seed(0)
                eager_model = factory()
            exported_model = task.build_model(task.params, 0)
            eager_t.append(_steps(eager_model, x, y, steps, batch_size))
            exported_t.append(_steps(exported_model, x, y, steps, batch_size))
        size = package.stat().st_size
    eager_s, exported_s = statistics.median(eager_t), statistics.median(exported_t)
    ratio = exported_s / eager_s
    return {
        "benchmark": "exported_step",
        "model": "docs/examples/digits_cnn.py (conv+batchnorm+dropout, 1x8x8)",
        "threads": threads,
        "batch_size": batch_size,
        "steps": steps,
        "repeats": repeats,
        "eager_step_ms": round(eager_s * 1e3, 3),
        "exported_step_ms": round(exported_s * 1e3, 3),
        "ratio": round(ratio, 3),
        "ratio_target": RATIO_TARGET,
        "meets_target": ratio <= RATIO_TARGET,
        "package_bytes": size,
        "package_load_ms": round(statistics.median(loads) * 1e3, 1),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(json.dumps(run(args.threads, args.batch_size, args.steps, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
