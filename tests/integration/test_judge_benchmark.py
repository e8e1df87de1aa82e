"""The judge benchmarks run end to end (loadtest.judge --quick, loadtest.timing with small
counts), each with its own registry and sandboxd serve. No speed is checked: only that each
figure is there, beside its bare baseline, and that every verdict is the one expected."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.benchmarks import quick_run

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.one_pass
def test_quick_judge_run_prints_each_figure_beside_its_bare_baseline() -> None:
    lines, fig = quick_run("loadtest.judge", timeout=900)
    for key in ("submission_median_ms", "submission_bare_median_ms", "batch_cases_per_s",
                "batch_bare_runs_per_s", "batch_case_p50_ms", "batch_case_p99_ms",
                "pipeline_median_ms", "pipeline_bare_median_ms"):
        assert fig[key] > 0, key
    assert fig["batch_cases"] == 40 and fig["batch_parallelism"] >= 1
    assert fig["pipeline_lines"] == 200 and fig["repeat_n"] == 3
    rep, bare = fig["repeat_cpu_ms"], fig["repeat_bare_cpu_ms"]
    assert rep["min"] <= rep["median"] <= rep["max"] and rep["spread"] >= 0
    assert rep["dedicated_cpu"] is True  # the benchmark's service reserves the CPUs
    assert bare["min"] <= bare["median"] <= bare["max"]
    table = "\n".join(lines)
    for row in ("submission: compile", "batch of 40 echo cases", "interactor <-> solution",
                "spin ~1 s, 3 repeats: CPU time stdev"):
        assert row in table, row
    assert "bare gcc + spawns" in table and "bare pipes, one CPU" in table and "x)" in table
    assert rep["cv"] >= 0 and bare["cv"] >= 0


def test_cpu_bound_runs_sent_at_once_all_end_at_their_cpu_limit_with_slots() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.timing", "--runs", "6", "--idle-runs", "2",
         "--repeats", "3", "--loop-ms", "100", "--phases", "idle,slots,repeat"],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    fig = json.loads(done.stdout.strip().splitlines()[-1])
    for phase, runs in (("idle", 2), ("slots", 6)):
        assert fig[phase]["statuses"] == {"time_limit": runs}, (phase, fig[phase])
    assert fig["slots"]["dedicated_cpu"] == 6, fig["slots"]
    assert fig["repeat"]["n"] == 3, fig["repeat"]
