"""A new version's save (``Store.place_weights`` + ``Store.commit_version``): the fsyncs
side by side, ``history.json`` renamed only after every file and name it points to is
durable, failures leave the previous state; and the per-hop benchmark of the path."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from client.weights import encode, layout_of, sha256_hex
from server.globalmodel import GlobalModel
from server.status import RoundRecord, RoundTiming
from server.store import HISTORY_FILE, HistoryJson, Store


def _record(version: int, **extra: Any) -> RoundRecord:
    if isinstance(extra.get("timing"), RoundTiming):  # each record its own (set in place)
        extra["timing"] = extra["timing"].model_copy()
    return RoundRecord(
        round_id=f"r{version}",
        number=version,
        outcome="completed",
        version=version,
        clients_selected=2,
        clients_reported=2,
        train_loss=0.5,
        seconds=1.0,
        finished_at=1.0,
        **extra,
    )


STATE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}


class _Trace:
    """Every fsync (by the path of its descriptor) and rename, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: str | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if fail is not None and Path(path).name.startswith(fail):
                raise OSError(5, "injected fsync failure", path)
            real_fsync(fd)
            self.events.append(("fsync", path))

        def replace(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            self.events.append(("rename", str(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, kind: str, path: Path) -> int:
        return self.events.index((kind, str(path)))


def _commit(store: Store, version: int, history: list[RoundRecord]) -> None:
    data = encode(STATE, "safetensors")
    name = store.place_weights(version, data)
    opt = store.place_optimizer(version, encode({"m": np.zeros(3)}, "safetensors"))
    store.commit_version(
        task="digits",
        version=version,
        rounds_completed=version,
        weights_name=name,
        weights_sha256=sha256_hex(data),
        history=history,
        optimizer_name=opt,
        optimizer_sha256=sha256_hex((store.state_dir / opt).read_bytes()),
    )


def test_history_is_renamed_only_after_every_file_and_name_it_points_to_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    trace = _Trace(monkeypatch)
    _commit(store, 1, [_record(1)])
    weights, opt = tmp_path / "global-v1.safetensors", tmp_path / "optimizer-v1.safetensors"
    # Placed under their names without fsync; made durable by the commit.
    placed = [trace.index("rename", weights), trace.index("rename", opt)]
    history_renamed = trace.index("rename", tmp_path / HISTORY_FILE)
    staged = [
        p for kind, p in trace.events if kind == "fsync" and Path(p).name.startswith(".history")
    ]
    assert len(staged) == 1, trace.events
    before_rename = [
        trace.index("fsync", weights),
        trace.index("fsync", opt),
        trace.index("fsync", Path(staged[0])),
        trace.index("fsync", tmp_path),  # the placed files' names
    ]
    assert max(placed) < min(before_rename) and max(before_rename) < history_renamed
    # The rename itself made durable after.
    assert ("fsync", str(tmp_path)) in trace.events[history_renamed:]
    fsyncs = [e for e in trace.events if e[0] == "fsync"]
    assert len(fsyncs) == 5, "one per placed file, the staged history, the directory twice"
    saved = store.load("digits", layout_of(STATE))
    assert saved is not None and saved.version == 1 and saved.history == [_record(1)]
    np.testing.assert_array_equal(saved.state["w"], STATE["w"])
    assert set(saved.optimizer) == {"m"}


@pytest.mark.parametrize("fail", ["global-v2", "optimizer-v2", ".history.json", ""])
def test_a_failed_commit_leaves_the_previous_version_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    store = Store(tmp_path)
    _commit(store, 1, [_record(1)])
    _Trace(monkeypatch, fail=fail or tmp_path.name)  # "": the directory's fsync fails
    with pytest.raises(OSError, match="injected"):
        _commit(store, 2, [_record(1), _record(2)])
    monkeypatch.undo()
    saved = store.load("digits", layout_of(STATE))
    assert saved is not None and saved.version == 1 and saved.history == [_record(1)]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_version_whose_commit_fails_is_not_saved_by_the_global_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        model = GlobalModel(Store(tmp_path), "digits")
        model.adopt(STATE, layout_of(STATE), None)
        ok = await model.prepare(STATE, 1)
        assert await model.persist(ok, _record(1))
        prepared = await model.prepare(STATE, 2)
        assert prepared.weights_file == "global-v2.safetensors"
        _Trace(monkeypatch, fail="global-v2")
        assert not await model.persist(prepared, _record(2))
        monkeypatch.undo()

    asyncio.run(scenario())
    saved = Store(tmp_path).load("digits", layout_of(STATE))
    assert saved is not None and saved.version == 1


@pytest.mark.parametrize(
    "history",
    [
        [],
        [_record(1)],
        [_record(1, eval_loss=0.25, eval_accuracy=None), _record(2, detail='a "quoted" ü')],
        [_record(3, timing=RoundTiming(opened_at=1.0, collected_at=2.0, aggregated_at=3.5))],
    ],
)
def test_history_json_holds_what_model_dump_gives(tmp_path: Path, history: list[Any]) -> None:
    store = Store(tmp_path)
    _commit(store, 1, history)
    meta = json.loads((tmp_path / HISTORY_FILE).read_text(encoding="utf-8"))
    assert meta["history"] == [r.model_dump(by_alias=True, mode="json") for r in history]
    assert (meta["format"], meta["task"], meta["version"], meta["roundsCompleted"]) == (
        1,
        "digits",
        1,
        1,
    )
    assert meta["weightsFile"] == "global-v1.safetensors"
    assert meta["optimizerFile"] == "optimizer-v1.safetensors"


_LIST = TypeAdapter(list[RoundRecord])
_TIMED = RoundTiming(opened_at=1.0, collected_at=2.0, aggregated_at=3.5)


def _grown(history: list[RoundRecord]) -> list[RoundRecord]:
    return [*history, _record(len(history) + 1)]


def _evaluated(history: list[RoundRecord]) -> list[RoundRecord]:
    return [history[0].model_copy(update={"eval_loss": 0.125}), *history[1:]]


def _published(history: list[RoundRecord]) -> list[RoundRecord]:
    timing = history[-1].timing
    assert timing is not None
    timing.published_at = 9.5  # as the coordinator does, after the record's first save
    return history


def _published_second(history: list[RoundRecord]) -> list[RoundRecord]:
    return [history[0], *_published(history[1:2]), *history[2:]]


# Each case: a history, then the changes made to it between two dumps (the same cache).
@pytest.mark.parametrize(
    ("history", "changes"),
    [
        ([], [_grown, _grown]),
        ([_record(1)], [lambda h: h, _grown]),
        ([_record(1), _record(2, detail='a "quoted" ü\nline')], [_evaluated, _grown]),
        # Saved, then published (timing set in place), then the next round's record.
        ([_record(1), _record(2), _record(3, timing=_TIMED)], [lambda h: _grown(_published(h))]),
        ([_record(i) for i in range(1, 6)], [_grown, _evaluated, lambda h: h[2:], _grown]),
        # Saved, then records after it (abandoned attempts), then published: no longer
        # among the newest, its publishedAt still reaches the file.
        ([_record(1), _record(2, timing=_TIMED)], [_grown, _grown, _grown, _published_second]),
    ],
)
def test_history_json_is_what_pydantic_writes_for_the_list_after_every_change(
    history: list[RoundRecord], changes: list[Any]
) -> None:
    records = HistoryJson()
    assert records.dump(history) == _LIST.dump_json(history, by_alias=True, indent=1)
    for change in changes:
        history = change(history)
        assert records.dump(history) == _LIST.dump_json(history, by_alias=True, indent=1)


def test_history_json_matches_pydantic_through_a_long_run_of_changes() -> None:
    """Replacing records anywhere (an evaluation recorded late), publishing in place,
    growing and shrinking: every dump is what pydantic writes for the list."""
    rng = random.Random(15)
    records = HistoryJson()
    history: list[RoundRecord] = [_record(1)]
    for step in range(400):
        op = rng.random()
        if op < 0.5:
            history = [*history, _record(len(history) + 1, timing=_published_at(None))]
        elif op < 0.65 and history:
            timing = history[-1].timing
            if timing is not None:
                timing.published_at = float(step)  # as the coordinator does
        elif op < 0.9 and history:
            i = rng.randrange(len(history))
            changed = history[i].model_copy(update={"eval_loss": step / 7})
            history = [*history[:i], changed, *history[i + 1 :]]
        elif op < 0.95:
            history = history[: rng.randrange(len(history) + 1)]
        else:
            history = list(history)  # a new list of the same records
        assert records.dump(history) == _LIST.dump_json(history, by_alias=True, indent=1), step


def test_history_json_matches_pydantic_with_records_moved_repeated_and_published_anywhere() -> None:
    """The joined prefix is checked by position and identity: records inserted or removed
    in the middle, the same record object twice, a reordered list, and a record published
    in place wherever it stands (never one whose bytes are joined)."""
    rng = random.Random(8)
    records = HistoryJson()
    made: list[RoundRecord] = [_record(1)]
    history = list(made)
    for step in range(600):
        op = rng.random()
        if op < 0.3:
            at = None if rng.random() < 0.5 else 1.0
            made.append(_record(len(made) + 1, timing=_published_at(at)))
            history = [*history, made[-1]]
        elif op < 0.4:
            unpublished = [r for r in history if r.timing and r.timing.published_at is None]
            if unpublished:
                timing = rng.choice(unpublished).timing
                assert timing is not None
                timing.published_at = float(step)
        elif op < 0.55:
            i = rng.randrange(len(history) + 1)
            history = [*history[:i], rng.choice(made), *history[i:]]  # maybe a repeat
        elif op < 0.7 and history:
            i = rng.randrange(len(history))
            history = [*history[:i], *history[i + 1 :]]
        elif op < 0.8 and history:
            i = rng.randrange(len(history))
            history = [
                *history[:i],
                history[i].model_copy(update={"eval_loss": step}),
                *history[i + 1 :],
            ]
        elif op < 0.85:
            history = rng.sample(history, len(history))
        elif op < 0.9:
            history = history[: rng.randrange(len(history) + 1)]
        else:
            history = list(history)
        want = _LIST.dump_json(history, by_alias=True, indent=1) if history else b"[]"
        assert records.dump(history) == want, step


def _published_at(at: float | None) -> RoundTiming:
    return RoundTiming(opened_at=1.0, collected_at=2.0, aggregated_at=3.5, published_at=at)


def test_publish_hops_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import publish_hops

    argv = ["--hidden", "4", "--features", "8", "--history", "3", "--repeats", "1"]
    assert publish_hops.main(argv) == 0
    out = capsys.readouterr().out
    # Four fsyncs on the path either way; the after path's run side by side.
    assert re.search(r"^path +before( +\d+\.\d+){2} +4 ", out, re.M), out
    assert re.search(r"^path +after( +\d+\.\d+){2} +4 ", out, re.M), out
    assert re.search(r"^ratio after / before, path: wall \d+\.\d+x", out, re.M), out


def test_union_seconds_counts_overlapping_fsyncs_once() -> None:
    from benchmarks.publish_hops import union_seconds

    table = [
        ([], 0.0),
        ([(0.0, 1.0)], 1.0),
        ([(0.0, 1.0), (0.5, 2.0)], 2.0),
        ([(0.0, 3.0), (1.0, 2.0)], 3.0),
        ([(0.0, 1.0), (2.0, 3.0)], 2.0),
    ]
    for spans, expected in table:
        assert union_seconds(spans) == pytest.approx(expected)


def test_an_evaluation_already_saved_is_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        model = GlobalModel(Store(tmp_path), "digits")
        model.adopt(STATE, layout_of(STATE), None)
        prepared = await model.prepare(STATE, 1)
        assert await model.persist(prepared, _record(1))
        model.publish(prepared, _record(1), {})
        assert await model.record_evaluation(1, {"evalLoss": 0.25, "evalAccuracy": 0.5})
        trace = _Trace(monkeypatch)
        assert await model.record_evaluation(1, {"evalLoss": 0.25, "evalAccuracy": 0.5})
        assert await model.record_fields(1, {"eval_loss": 0.25})
        assert trace.events == [], "nothing new to save"
        assert await model.record_fields(1, {"federated_eval_loss": 0.5})
        assert ("rename", str(tmp_path / HISTORY_FILE)) in trace.events
        monkeypatch.undo()

    asyncio.run(scenario())
    saved = Store(tmp_path).load("digits", layout_of(STATE))
    assert saved is not None and saved.history[-1].eval_accuracy == 0.5
    assert saved.history[-1].federated_eval_loss == 0.5


@pytest.mark.parametrize(
    ("prune", "left"), [(True, ["global-v2"]), (False, ["global-v1", "global-v2"])]
)
def test_a_history_rewrite_without_prune_lists_and_removes_nothing(
    tmp_path: Path, prune: bool, left: list[str]
) -> None:
    store = Store(tmp_path)
    for version in (1, 2):
        store.save_weights(version, b"w")
    store.save_history(
        task="t",
        version=2,
        rounds_completed=2,
        weights_name="global-v2.safetensors",
        weights_sha256="x",
        history=[_record(2)],
        prune=prune,
    )
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == left
    assert json.loads((tmp_path / HISTORY_FILE).read_text())["version"] == 2


def test_an_evaluation_recorded_later_leaves_only_the_saved_versions_files(tmp_path: Path) -> None:
    async def scenario() -> None:
        model = GlobalModel(Store(tmp_path), "synthetic")
        model.adopt(STATE, layout_of(STATE), None)
        for version in (1, 2):
            prepared = await model.prepare(STATE, version)
            assert await model.persist(prepared, _record(version))
            model.publish(prepared, _record(version), {})
        assert await model.record_evaluation(2, {"evalLoss": 0.1, "evalAccuracy": 0.9})
        assert await model.record_evaluation(1, {"evalLoss": 0.2, "evalAccuracy": 0.8})

    asyncio.run(scenario())
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["global-v2.safetensors"]
    history = json.loads((tmp_path / HISTORY_FILE).read_text())["history"]
    assert [r["evalAccuracy"] for r in history] == [0.8, 0.9]
