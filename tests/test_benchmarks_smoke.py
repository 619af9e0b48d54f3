"""The headless client's benchmarks still run: each ``main`` with the tiniest sizes.

No measured figure is asserted (timings belong to the benchmark runs, not to tests); each
run must exit 0 and print its ratio line, and the facts a benchmark checks along the way
(same weights on both training sides, no torch in the idle client) must hold. The pure
arithmetic of ``benchmarks/round_figures.py`` is checked on hand-made records (fast tier).
"""

from __future__ import annotations

import re
import time

import psutil
import pytest

from benchmarks import (
    idle,
    politeness,
    robust_aggregation,
    round_figures,
    server_capacity,
    socketio_floor,
    training_overhead,
    transfer,
    vs_flower,
    wakeup_cost,
    worker_rounds,
)


# Slow: the benchmarks start servers and clients that import torch.
@pytest.mark.slow
def test_transfer_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert transfer.main(["--size-mb", "6", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ratio upload / raw TCP\s+\d+\.\d+x", out, re.M), out
    assert re.search(r"^ratio download / raw TCP\s+\d+\.\d+x", out, re.M), out


# Slow: the benchmarks start servers and clients that import torch.
@pytest.mark.slow
def test_training_overhead_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--samples", "2000", "--epochs", "1", "--hidden", "32", "--repeats", "1"]
    assert training_overhead.main([*argv, "--progress-interval", "0.01"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ratio worker / bare \(steady, ms/step\)\s+\d+\.\d+x", out, re.M), out
    assert "trained weights bit-identical: yes" in out, out


# Slow: the benchmarks start servers and clients that import torch.
@pytest.mark.slow
def test_idle_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert idle.main(["--seconds", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ratio client / bare RSS \(peak\)\s+\d+\.\d+x", out, re.M), out
    assert "torch loaded in the client: no" in out, out


# Slow: the benchmark trains with torch in the worker's child.
@pytest.mark.slow
def test_politeness_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert politeness.main(["--seconds", "0.5", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ratio foreground with light / alone\s+\d+\.\d+x", out, re.M), out
    for setting in ("1 core at 50 %", "1 core at 25 %", "full"):
        assert re.search(rf"^worker share {setting}.*: \d+\.\d % of its cores", out, re.M), out
    assert re.search(r"^out of the way after pause: \d+\.\d+ s", out, re.M), out
    assert "loadavg at the end" in out, out


# Slow: the benchmark starts a server and clients that import torch.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vs_flower_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--sizes", "0.01", "--rounds", "2", "--pairs", "1", "--skip-flower"]
    assert vs_flower.main([*argv, "--timeout", "300"]) == 0
    out = capsys.readouterr().out
    assert "== 0.01MB model" in out, out
    assert re.search(r"^steady s/round \(median of rounds 2\.\.\)\s+\d+\.\d+\s+-", out, re.M), out
    assert re.search(r"^client start -> first update s \(slowest\)\s+\d+\.\d+", out, re.M), out
    for part in ("global to clients", "worker", "upload and intake", "aggregate and publish"):
        assert re.search(rf"^  {part} .*\s\d+\.\d+$", out, re.M), out
    assert "loadavg at the end" in out, out


# -- the figures of vs_flower, from hand-made records (pure, fast) --------------------------

_T0 = round_figures.log_time("2026-01-02 03:04:05,000")


def _client_log(offsets: dict[str, float]) -> str:
    """A client log with the four lines the figures read, at _T0 + offset seconds."""
    lines = {
        "registered": "INFO client.session.link: connected to http://127.0.0.1:1 as c (id)",
        "started": "INFO client.session.rounds: round r2-1-x: training synthetic for 1 epoch(s)",
        "trained": "INFO client.session.rounds: round r2-1-x: trained on 3 samples (); sending",
        "accepted": "INFO client.session.uploader: round r2-1-x: update accepted (1 received)",
    }
    out = ["some other line", "2026-01-02 03:04:05,000 WARNING x: noise"]
    for event, offset in offsets.items():
        stamp = _T0 + offset
        ms = round((stamp % 1) * 1000)
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(stamp)))
        out.append(f"{text},{ms:03d} {lines[event]}")
    return "\n".join(out)


def test_client_events_reads_the_first_time_of_each_step() -> None:
    text = _client_log({"registered": 1.5, "started": 2.25, "trained": 3.0, "accepted": 3.5})
    events = round_figures.client_events(text + "\n" + _client_log({"registered": 9.0}))
    assert events.registered == pytest.approx(_T0 + 1.5)
    assert events.rounds == {
        "started": {"r2-1-x": pytest.approx(_T0 + 2.25)},
        "trained": {"r2-1-x": pytest.approx(_T0 + 3.0)},
        "accepted": {"r2-1-x": pytest.approx(_T0 + 3.5)},
    }


def _record(number: int, opened: float, collected: float, published: float) -> dict[str, object]:
    timing = {"openedAt": _T0 + opened, "collectedAt": _T0 + collected}
    return {
        "roundId": f"r{number}-1-x",
        "number": number,
        "outcome": "completed",
        "timing": {**timing, "aggregatedAt": _T0 + collected, "publishedAt": _T0 + published},
    }


def test_fedtray_trial_cuts_the_critical_path_of_each_round() -> None:
    # Round 1: opened at 10, published at 14; round 2: opened 14.5, every start acked by
    # 15.0 (slowest client), every worker done by 16.0, collected 16.75, published 17.0.
    history = [
        _record(2, 14.5, 16.75, 17.0),
        _record(1, 10.0, 13.0, 14.0),
        {"roundId": "r2-0-x", "number": 2, "outcome": "abandoned", "timing": None},
    ]
    logs = [
        _client_log({"registered": 2.0, "started": 14.75, "trained": 15.5, "accepted": 16.5}),
        _client_log({"registered": 3.0, "started": 15.0, "trained": 16.0, "accepted": 16.75}),
    ]
    # The first update counted is round 2's here (round 1 lines are not in these logs).
    trial = round_figures.fedtray_trial(history, logs, starts=[_T0, _T0 + 0.5])
    assert trial.first_round_s == pytest.approx(4.0)
    assert trial.steady_s == pytest.approx(3.0)
    assert trial.register_s == pytest.approx(2.5)
    assert trial.first_update_s == pytest.approx(16.5)
    assert trial.breakdown == pytest.approx(
        {"between": 0.5, "global": 0.5, "worker": 1.0, "upload": 0.75, "aggregate": 0.25}
    )
    assert sum(trial.breakdown.values()) == pytest.approx(trial.steady_s)


def test_flower_trial_matches_registrations_in_start_order() -> None:
    server = {
        "registered": [_T0 + 4.0, _T0 + 3.0],
        "opened": {"1": _T0 + 4.0, "2": _T0 + 4.5, "3": _T0 + 4.7},
        "aggregated": {"1": _T0 + 4.4, "2": _T0 + 4.6, "3": _T0 + 5.0},
    }
    fits = [[{"round": 1, "fitDone": _T0 + 4.2}], [{"round": 1, "fitDone": _T0 + 4.3}]]
    trial = round_figures.flower_trial(server, fits, starts=[_T0 + 1.0, _T0])
    assert trial.first_round_s == pytest.approx(0.4)
    assert trial.steady_s == pytest.approx(0.3)  # median of 0.2 and 0.4
    assert trial.register_s == pytest.approx(3.0)  # 3.0 - 0 and 4.0 - 1.0
    assert trial.first_update_s == pytest.approx(4.3)


@pytest.mark.parametrize(
    ("fedtray_s", "flower_s", "words"),
    [
        (0.2, 0.1, "ratio fedtray / Flower (steady s/round) 2.00x  MISSES goal <= 1.0x"),
        (0.05, 0.1, "ratio fedtray / Flower (steady s/round) 0.50x  meets goal <= 1.0x"),
        (0.1, 0.1, "ratio fedtray / Flower (steady s/round) 1.00x  meets goal <= 1.0x"),
    ],
)
def test_summary_lines_judge_the_ratio_against_the_goal(
    fedtray_s: float, flower_s: float, words: str
) -> None:
    ours = round_figures.Trial("fedtray", 1.0, fedtray_s, 1.0, 6.0, 200.0, 300.0, {"worker": 0.1})
    theirs = round_figures.Trial("Flower", 0.1, flower_s, 3.0, 3.0, 100.0, 100.0)
    text = "\n".join(round_figures.summary_lines("0.4MB", 100_000, [ours], [theirs]))
    assert words in text, text
    assert "fedtray register 1.00 s: meets goal <= 2 s; first update 6.00 s: MISSES" in text
    assert re.search(r"^peak RSS server MB\s+200\s+100\s+2\.00x$", text, re.M), text


# Samples every 1 s of a tree using 0.5 s of CPU per second after t=2 (start-up: 3 s of CPU
# by t=2); rounds ending each second from t=1.
_STEADY = [(float(t), 3.0 + 0.5 * max(0, t - 2)) for t in range(0, 13)]


@pytest.mark.parametrize(
    ("samples", "ends", "expected"),
    [
        # Round 2 ends at 2.0, the last round the samples reach past at 12.0: 10 rounds.
        (_STEADY, [1.0 + k for k in range(12)], 0.5),
        # Ends between samples are interpolated: 2.5 -> 12.5 is past the last sample, so
        # the window ends at the round ending 11.5 (9 rounds from 2.5).
        (_STEADY, [1.5 + k for k in range(12)], 0.5),
        # A start-up in the first round does not count: round 2 ends after it.
        (
            [(0.0, 0.0), (1.0, 9.0), *((float(t), 9.0 + (t - 1)) for t in range(2, 12))],
            [1.0 + k for k in range(11)],
            1.0,
        ),
        # Fewer than CPU_MIN_ROUNDS rounds spanned: no figure.
        (_STEADY, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], None),
        # Samples that start after round 2 ended cannot place it: no figure.
        (_STEADY[5:], [1.0 + k for k in range(12)], None),
        ([], [1.0, 2.0], None),
    ],
)
def test_cpu_per_round_interpolates_the_steady_rounds(
    samples: list[tuple[float, float]], ends: list[float], expected: float | None
) -> None:
    got = round_figures.cpu_per_round(samples, ends)
    assert got == (None if expected is None else pytest.approx(expected))


def test_summary_lines_show_cpu_per_round_per_role() -> None:
    ours = round_figures.Trial(
        "fedtray", 1.0, 0.1, 1.0, 1.0, cpu_ms={"server": 20.0, "total": 60.0}
    )
    theirs = round_figures.Trial(
        "Flower", 0.1, 0.1, 1.0, 1.0, cpu_ms={"server": 8.0, "total": 20.0}
    )
    text = "\n".join(round_figures.summary_lines("0.4MB", 100_000, [ours], [theirs]))
    assert re.search(r"^CPU ms per steady round: server\s+20\.0\s+8\.0\s+2\.50x$", text, re.M)
    assert re.search(r"^  all processes\s+60\.0\s+20\.0\s+3\.00x$", text, re.M), text
    assert re.search(r"^  client \(largest, with its worker\)\s+-\s+-\s+-$", text, re.M), text


def test_synthetic_sizes_match_the_issue() -> None:
    assert vs_flower.floats_of(vs_flower.shapes_for(100)) == pytest.approx(25_000_000, rel=1e-3)
    assert vs_flower.floats_of(vs_flower.shapes_for(0.4)) == pytest.approx(100_000, rel=0.01)


@pytest.mark.slow
def test_worker_rounds_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_rounds.main(["--size", "small", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "small     cold" in out and "small     warm" in out


def test_robust_aggregation_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    # No torch: the server's strategies over round-store files, tiny sizes.
    assert robust_aggregation.main(["--params", "5000", "--devices", "3,6"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^ratio robust / fedavg peak memory \d+\.\d+x", out, re.M)) == 2, out


# Slow: the benchmark starts a server (it imports torch) and generator processes.
@pytest.mark.slow
def test_server_capacity_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    # About 160 heartbeats in the window: enough server CPU to show in /proc's 10 ms ticks.
    argv = ["--sizes", "20", "--interval", "0.25", "--window", "2", "--generators", "2"]
    assert server_capacity.main(argv) == 0
    out = capsys.readouterr().out
    row = re.search(r"^\| 20 \| (\d+) \| .* \| (\d+\.\d+) \| (\d+\.\d+) / (\d+\.\d+) \|", out, re.M)
    assert row is not None, out
    assert int(row.group(1)) == 20  # every device held to the end
    assert float(row.group(2)) > 0 and float(row.group(4)) >= float(row.group(3)), out
    # The machine's wakeup baseline of the same run: the only size is its own densest rate.
    assert re.search(r"^\| 20 \| \d+ \| 0 \| (\d+\.\d{3}) \| \1 \|$", out, re.M), out


def test_wakeup_cost_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    # Pure computation in this process: the same work at two wakeup rates.
    assert wakeup_cost.main(["--rates", "50,200", "--seconds", "0.2", "--passes", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (-?\d+) \| (\d+\.\d\d)x \|$", out, re.M)
    assert [rate for rate, _, _, _ in rows] == ["50", "200"], out
    assert rows[1][2:] == ("0", "1.00") and all(int(cost) > 0 for _, cost, _, _ in rows), out


# Slow: the benchmark starts redis-server, PostgreSQL, the cluster's supervisor and workers
# (they import torch) and generator processes.
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_server_capacity_cluster_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--sizes", "6", "--interval", "0.5", "--window", "1", "--generators", "2"]
    before = {p.pid for p in psutil.Process().children()}
    assert server_capacity.main([*argv, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "server: cluster mode, 2 worker(s)" in out, out
    row = re.search(
        r"^\| 6 \| (\d+) \| .* \| (\d+\.\d+) \| (\d+\.\d+) / (\d+\.\d+) \| .* \|"
        r" (\d+\.\d+) \| (\d+\.\d+) \| (\d+\.\d+) \| (\d+\.\d+) \|$",
        out,
        re.M,
    )
    assert row is not None, out
    assert int(row.group(1)) == 6  # every device held to the end
    assert float(row.group(2)) > 0 and float(row.group(4)) >= float(row.group(3)), out
    redis_commands, pg_statements = map(float, row.group(7, 8))  # CPU may round to 0
    assert redis_commands > 0 and pg_statements > 0, out  # the workers used both engines
    assert "most frequent PostgreSQL statements at 6 devices" in out, out
    # Everything the benchmark started has stopped: no engine, server or generator left
    # (multiprocessing's resource tracker stays with this process by design).
    left = [
        p.cmdline()
        for p in psutil.Process().children()
        if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())
    ]
    assert not left, left


# Slow: two cluster deployments one after the other (engines, supervisor, workers).
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_server_capacity_scaling_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--scaling", "3", "--pairs", "1", "--interval", "0.5", "--window", "3"]
    assert server_capacity.main([*argv, "--generators", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| 1 \| (\d) \| (\d+) \| (\d+) \| (\d+\.\d+) \| (\d+\.\d) % \|", out, re.M)
    # One worker holding 3 devices, then two holding 6, every device held to the end.
    assert [(w, d, h) for w, d, h, _, _ in rows] == [("1", "3", "3"), ("2", "6", "6")], out
    assert all(float(cost) > 0 for _, _, _, cost, _ in rows), out
    assert re.search(r"^capacity --workers 2 / --workers 1: \d+\.\d\dx", out, re.M), out


# Slow: it spawns a server and client processes (no torch).
@pytest.mark.slow
def test_socketio_floor_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    # "durable" includes "worker"'s training processes: the two cover every code path.
    argv = ["--sizes", "0.01", "--rounds", "4", "--pairs", "1", "--skip-flower"]
    assert socketio_floor.main([*argv, "--variants", "bare,durable"]) == 0
    out = capsys.readouterr().out
    for variant in ("bare", "durable"):
        assert re.search(rf"^pair 1 0.01MB {variant} +steady \d+\.\d{{4}} s/round", out, re.M), out
    assert re.search(r"^\| steady s/round \| \d+\.\d{4} \| \d+\.\d{4} \|$", out, re.M), out


def test_socketio_floor_summary_is_a_ratio_to_flower() -> None:
    def trial(system: str, steady: float, server_ms: float) -> round_figures.Trial:
        return round_figures.Trial(
            system=system,
            first_round_s=1.0,
            steady_s=steady,
            register_s=None,
            first_update_s=None,
            cpu_ms={"server": server_ms, "client": 1.0, "total": 4 * server_ms},
        )

    trials = {
        "bare": [trial("bare", 0.003, 2.0), trial("bare", 0.005, 4.0), trial("bare", 0.004, 3.0)],
        "Flower": [trial("Flower", 0.010, 8.0), trial("Flower", 0.006, 4.0)],
    }
    lines = socketio_floor.summary("0.4MB", trials)
    assert lines[2] == "| figure (median) | bare | Flower |"
    # Medians: bare 0.004 s and 3.0 ms; Flower 0.008 s and 6.0 ms (the mean of the middle two).
    assert lines[4] == "| steady s/round | 0.0040 (0.50×) | 0.0080 |"
    assert lines[5] == "| CPU ms/round server | 3.0 (0.50×) | 6.0 |"
    # Without Flower's figures there is no ratio.
    alone = socketio_floor.summary("0.4MB", {"worker": [trial("worker", 0.004, 3.0)]})
    assert alone[4] == "| steady s/round | 0.0040 |"
