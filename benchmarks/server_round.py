"""Benchmark of the server's side of a round: intake of K updates, then aggregate and publish.

Run ``python -m benchmarks.server_round`` (defaults: 3 updates of a ~25 MB ``synthetic``
model, 3 repeats). Both paths run in this one process, interleaved, on the same update
documents, each round in a fresh state directory with the real blob store (spilled to
disk, as the server keeps it), round store, store and FedAvg:

* **before** (the path up to issue 15, rebuilt here from the same parts): take the blob
  (read back from its file and hashed again), decode it, encode it again, write it with
  fsync, ``round.json``, fold a full float64 copy per block; then average, evaluate a
  freshly built model, encode, save with fsync, hash again for the cache.
* **beside** (issue 15's intake, evaluation still on the path): move the verified blob
  file into the round store, check it through a read-only memory map, fsync, rename,
  ``round.json``, fold zero-copy views; then average, and evaluate with the one kept model
  *beside* the one encoding and the fsynced weights file; ``history.json``; publish.
* **after** (the server's path now): the same intake; then average, encode once, the
  fsynced weights file, ``history.json``, publish; the evaluation runs after that in the
  background (:class:`server.evaluation.EvaluationQueue`) and is recorded into
  ``history.json`` when ready (its own column: not on the round's path).

"aggregate+publish" is the time from the last update accepted to the new global published
(the next round could start). The upload itself (chunks into the blob store, hashed as
they arrive) is the same for every path and not timed. Figures are medians of
``--repeats``; the ratio lines compare paths measured side by side. Writes only in a
temporary directory; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.protocol import BlobChunk, WeightsRef
from client.tasks import get_task
from client.transfer import BlobStore
from client.weights import Layout, StateDict, decode, encode, layout_of, sha256_hex
from server.aggregation import BLOCK, FedAvg
from server.background import Background
from server.evaluation import EvaluationQueue
from server.globalmodel import GlobalModel
from server.model import Evaluator, evaluate_state, initial_state
from server.roundstore import RoundStore, SavedRound, SavedSlot
from server.status import RoundRecord
from server.store import Store

CHUNK = 1 << 20
Data = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


class _CopyingFedAvg(FedAvg):
    """FedAvg's ``add`` as it was: a contiguous copy, then a fresh float64 temporary per
    block (kept here only to measure the old path)."""

    def add(self, update: StateDict, num_samples: int) -> None:
        weight = float(num_samples)
        for name, arr in update.items():
            acc = self._sums.get(name)
            if acc is None:
                acc = self._sums[name] = np.zeros(arr.shape, dtype=np.float64)
            flat_acc, flat_in = acc.reshape(-1), np.ascontiguousarray(arr).reshape(-1)
            for start in range(0, flat_acc.size, BLOCK):
                end = start + BLOCK
                flat_acc[start:end] += flat_in[start:end].astype(np.float64) * weight
        self._weight += weight
        self._count += 1


def _upload(blobs: BlobStore, peer: str, data: bytes) -> WeightsRef:
    digest = sha256_hex(data)
    for offset in range(0, len(data), CHUNK):
        piece = data[offset : offset + CHUNK]
        chunk = BlobChunk(blob_id=digest, offset=offset, total=len(data), sha256=digest, data=piece)
        blobs.accept_chunk(peer, chunk, now=0)
    return WeightsRef(format="safetensors", size=len(data), sha256=digest, blob_id=digest)


def _saved_round(slots: dict[str, SavedSlot]) -> SavedRound:
    return SavedRound(
        task="synthetic",
        round_id="r1-1-bench",
        number=1,
        attempt=1,
        base_version=0,
        started_unix=time.time(),
        deadline_unix=time.time() + 600,
        required=len(slots),
        slots=slots,
    )


def _record(version: int, metrics: dict[str, float | None]) -> RoundRecord:
    return RoundRecord(
        round_id=f"r{version}-1-bench",
        number=version,
        outcome="completed",
        version=version,
        clients_selected=3,
        clients_reported=3,
        train_loss=None,
        eval_loss=metrics.get("loss"),
        eval_accuracy=metrics.get("accuracy"),
        seconds=0.0,
        finished_at=time.time(),
    )


def _before(
    state_dir: Path, docs: list[bytes], start: StateDict, layout: Layout, task: Any, data: Data
) -> tuple[float, float]:
    blobs = BlobStore(max_chunk_bytes=CHUNK, max_blob_bytes=1 << 30, spill_dir=state_dir / "b")
    refs = [_upload(blobs, f"dev{i}", doc) for i, doc in enumerate(docs)]
    rounds, store, strategy = RoundStore(state_dir), Store(state_dir), _CopyingFedAvg()
    strategy.begin(start)
    slots: dict[str, SavedSlot] = {}
    t0 = time.perf_counter()
    for i, ref in enumerate(refs):
        dev = f"dev{i}"
        update = decode(blobs.take(dev, ref), "safetensors", expected=layout, max_bytes=1 << 30)
        name = rounds.save_update(dev, encode(update, "safetensors"))
        slots[dev] = SavedSlot(index=i, reported=True, num_samples=10, update_file=name)
        rounds.save(_saved_round(slots))
        strategy.add(update, 10)
        del update
    t1 = time.perf_counter()
    new = strategy.result()
    scores = evaluate_state(task, task.params, new, *data)
    encoded = encode(new, "safetensors")
    store.save(
        task="synthetic",
        version=1,
        rounds_completed=1,
        state=new,
        history=[_record(1, scores)],
        encoded=encoded,
    )
    sha256_hex(encoded)  # the publish cache hashed it again
    rounds.clear()
    return t1 - t0, time.perf_counter() - t1


def _after(
    state_dir: Path,
    docs: list[bytes],
    start: StateDict,
    layout: Layout,
    evaluator: Evaluator,
    data: Data,
    *,
    background_eval: bool,
) -> tuple[float, float, float]:
    """(intake s, last update accepted -> published s, published -> evaluation recorded s)."""
    blobs = BlobStore(max_chunk_bytes=CHUNK, max_blob_bytes=1 << 30, spill_dir=state_dir / "b")
    refs = [_upload(blobs, f"dev{i}", doc) for i, doc in enumerate(docs)]
    rounds, strategy = RoundStore(state_dir), FedAvg()
    model = GlobalModel(Store(state_dir), "synthetic")
    model.adopt(start, layout, None)
    strategy.begin(start)
    slots: dict[str, SavedSlot] = {}

    async def evaluate(version: int, state: StateDict) -> dict[str, float]:
        scores = await asyncio.to_thread(evaluator.evaluate, state, *data)
        return {"evalLoss": scores["loss"], "evalAccuracy": scores["accuracy"]}

    async def record(version: int, metrics: dict[str, float]) -> None:
        await model.record_evaluation(version, metrics)

    async def run() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        for i, ref in enumerate(refs):
            dev = f"dev{i}"
            incoming = await asyncio.to_thread(rounds.incoming_path, dev)
            assert blobs.take_file(dev, ref, incoming), "the spilled blob was not handed over"
            await asyncio.to_thread(rounds.check_update, incoming, layout, 1 << 30)
            await asyncio.to_thread(rounds.sync, incoming)
            name = await asyncio.to_thread(rounds.commit_update, dev, incoming)
            slots[dev] = SavedSlot(index=i, reported=True, num_samples=10, update_file=name)
            await asyncio.to_thread(rounds.save, _saved_round(slots))
            await asyncio.to_thread(rounds.fold_update, name, layout, lambda u: strategy.add(u, 10))
        t1 = time.perf_counter()
        new = await asyncio.to_thread(strategy.result)
        if background_eval:
            prepared = await model.prepare(new, 1)
            scores: dict[str, float] = {}
        else:
            evaluation = asyncio.ensure_future(evaluate(1, new))
            prepared = await model.prepare(new, 1)
            scores = await evaluation
        record_ = _record(
            1, {"loss": scores.get("evalLoss"), "accuracy": scores.get("evalAccuracy")}
        )
        assert await model.persist(prepared, record_)
        await asyncio.to_thread(rounds.clear)
        model.publish(prepared, record_, scores)
        t2 = time.perf_counter()
        if not background_eval:
            return t1 - t0, t2 - t1, 0.0
        queue = EvaluationQueue(evaluate=evaluate, record=record, background=Background())
        queue.submit(1, new)
        await queue.drained()
        assert model.history[-1].eval_accuracy is not None, "the evaluation was not recorded"
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return asyncio.run(run())


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=6000, help="6000: a ~25 MB float32 model")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--updates", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    params = {"features": args.features, "hidden": args.hidden, "samples": args.samples}
    task = get_task("synthetic", params)
    start = initial_state(task, task.params, 0)
    layout = layout_of(start)
    x, y = task.load_data("test", None)
    rng = np.random.default_rng(0)
    docs = [
        encode(
            {k: v + rng.standard_normal(v.shape).astype(v.dtype) * 0.01 for k, v in start.items()}
        )
        for _ in range(args.updates)
    ]
    size_mb = len(docs[0]) / 1e6
    evaluator = Evaluator(task, task.params)
    evaluator.evaluate(start, x, y)  # steady state: the kept model exists after round 1
    paths = ("before", "beside", "after")
    results: dict[str, list[tuple[float, float, float]]] = {path: [] for path in paths}
    with tempfile.TemporaryDirectory(prefix="fedtray-server-round-") as tmp:
        for repeat in range(args.repeats):
            # Interleaved, the order rotated each repeat.
            for path in paths[repeat % 3 :] + paths[: repeat % 3]:
                state_dir = Path(tmp) / f"{path}-{repeat}"
                if path == "before":
                    got = (*_before(state_dir, docs, start, layout, task, (x, y)), 0.0)
                else:
                    got = _after(
                        state_dir,
                        docs,
                        start,
                        layout,
                        evaluator,
                        (x, y),
                        background_eval=path == "after",
                    )
                results[path].append(got)
    print(f"# server round: {args.updates} updates of {size_mb:.1f} MB, {args.repeats} repeats")
    print(f"loadavg {_loadavg()}")
    print(
        f"{'path':<8} {'intake s':>9} {'aggregate+publish s':>20} {'total s':>8} "
        f"{'eval after publish s':>21}"
    )
    totals: dict[str, float] = {}
    publish: dict[str, float] = {}
    for path, runs in results.items():
        intake = statistics.median(r[0] for r in runs)
        publish[path] = statistics.median(r[1] for r in runs)
        late = statistics.median(r[2] for r in runs)
        totals[path] = statistics.median(r[0] + r[1] for r in runs)
        late_text = f"{late:>21.3f}" if path == "after" else f"{'(on the path)':>21}"
        print(f"{path:<8} {intake:>9.3f} {publish[path]:>20.3f} {totals[path]:>8.3f} {late_text}")
    print(f"ratio after / before (total)  {totals['after'] / totals['before']:.2f}x")
    print(
        "ratio after / beside (last update accepted -> published)  "
        f"{publish['after'] / publish['beside']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
