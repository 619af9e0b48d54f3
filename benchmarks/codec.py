"""Benchmark of the weight codec (client.weights) against a plain numpy copy and JSON.

Run ``python -m benchmarks.codec`` (or ``python benchmarks/codec.py``); ``--size-mb`` sets
the state-dict size (default 100). Every figure is the best of ``--repeats`` runs, measured
in this one process, and the ratios compare throughputs measured side by side:

* codec / copy: safetensors encode+decode vs ``np.copy`` of every tensor (the floor for
  moving the bytes once). Target >= 0.5x.
* codec / JSON: safetensors vs the JSON format on a ~1 MB slice, per byte. Target >= 100x.

Also printed for context: encode and decode alone, and the cost of merely producing one
fresh ``bytes`` object of the document's size (``b"".join`` of the tensors) — the least
any encoder that returns ``bytes`` can do. Prints a table; writes nothing; stops in seconds.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.weights import StateDict, decode, encode

MB = 1_000_000
CODEC_VS_COPY_TARGET = 0.5
CODEC_VS_JSON_TARGET = 100.0


def make_state(size_mb: float, seed: int = 0) -> StateDict:
    """A small-CNN-plus-MLP layout of float32 tensors totalling about ``size_mb`` MB."""
    fixed: dict[str, tuple[int, ...]] = {
        "conv1.weight": (32, 3, 3, 3),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 3, 3),
        "conv2.bias": (64,),
        "fc3.weight": (10, 512),
        "fc3.bias": (10,),
        "fc2.bias": (512,),
    }
    fixed_params = sum(int(np.prod(s)) for s in fixed.values())
    # fc1: (hidden, 4096) and fc2: (512, hidden) carry the rest of the budget.
    hidden = max(1, round((size_mb * MB / 4 - fixed_params) / (4096 + 1 + 512)))
    shapes = {
        **fixed,
        "fc1.weight": (hidden, 4096),
        "fc1.bias": (hidden,),
        "fc2.weight": (512, hidden),
    }
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def json_slice(state: StateDict, target_bytes: int) -> StateDict:
    """The same tensors cut down in proportion to about ``target_bytes`` in total."""
    total = sum(a.nbytes for a in state.values())
    frac = min(1.0, target_bytes / total)
    return {k: v.ravel()[: max(1, int(v.size * frac))].copy() for k, v in state.items()}


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    """Fastest wall time of ``fn`` over ``repeats`` runs; the result is dropped each time."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        del result
    return best


def run(size_mb: float, repeats: int, json_mb: float) -> dict[str, float]:
    state = make_state(size_mb)
    nbytes = sum(a.nbytes for a in state.values())
    blob = encode(state)
    small = json_slice(state, int(json_mb * MB))
    small_bytes = sum(a.nbytes for a in small.values())
    small_blob = encode(small, "json")
    views = [a.data.cast("B") for a in state.values()]

    t_copy = best_of(repeats, lambda: {k: np.copy(v) for k, v in state.items()})
    t_bytes = best_of(repeats, lambda: b"".join(views))
    t_enc = best_of(repeats, lambda: encode(state))
    t_dec = best_of(repeats, lambda: decode(blob))
    t_json_enc = best_of(repeats, lambda: encode(small, "json"))
    t_json_dec = best_of(repeats, lambda: decode(small_blob, "json"))

    def mbps(n: int, seconds: float) -> float:
        return n / seconds / MB

    return {
        "tensor_mb": nbytes / MB,
        "json_tensor_mb": small_bytes / MB,
        "copy": mbps(nbytes, t_copy),
        "bytes_floor": mbps(nbytes, t_bytes),
        "encode": mbps(nbytes, t_enc),
        "decode": mbps(nbytes, t_dec),
        "codec": mbps(nbytes, t_enc + t_dec),
        "json_encode": mbps(small_bytes, t_json_enc),
        "json_decode": mbps(small_bytes, t_json_dec),
        "json": mbps(small_bytes, t_json_enc + t_json_dec),
    }


def report(r: dict[str, float], repeats: int) -> str:
    lines = [
        f"weight codec benchmark — {r['tensor_mb']:.1f} MB float32 state dict "
        f"(JSON on {r['json_tensor_mb']:.2f} MB), best of {repeats}",
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"{platform.machine()}, {_cpus()} CPUs",
        "",
        f"{'operation':<40}{'MB/s':>10}{'x copy':>10}",
    ]
    rows = [
        ("np.copy of every tensor (floor)", "copy"),
        ("one fresh bytes object (b''.join)", "bytes_floor"),
        ("safetensors encode", "encode"),
        ("safetensors decode (validated)", "decode"),
        ("safetensors encode+decode (codec)", "codec"),
        ("json encode", "json_encode"),
        ("json decode", "json_decode"),
        ("json encode+decode", "json"),
    ]
    for label, key in rows:
        lines.append(f"{label:<40}{r[key]:>10.0f}{r[key] / r['copy']:>10.3f}")
    vs_copy = r["codec"] / r["copy"]
    vs_json = r["codec"] / r["json"]
    lines += [
        "",
        _verdict("codec / copy", vs_copy, CODEC_VS_COPY_TARGET),
        _verdict("codec / json", vs_json, CODEC_VS_JSON_TARGET),
    ]
    return "\n".join(lines)


def _verdict(label: str, ratio: float, target: float) -> str:
    status = "meets" if ratio >= target else "MISSES"
    return f"{label:<16}{ratio:>10.2f}x   {status} target >= {target:g}x"


def _cpus() -> str:
    import os

    return str(os.cpu_count() or "?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=float, default=100.0, help="state dict size (MB)")
    parser.add_argument("--json-mb", type=float, default=1.0, help="JSON slice size (MB)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.json_mb <= 0 or args.repeats < 1:
        parser.error("--size-mb and --json-mb must be positive, --repeats at least 1")
    print(report(run(args.size_mb, args.repeats, args.json_mb), args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
