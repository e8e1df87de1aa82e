"""The bare baseline every benchmark prints (loadtest/baseline.py): both loops run the
command as asked, count every run, and run in a session of their own. No speed is checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loadtest.baseline import (
    METHODS,
    BenchError,
    Command,
    fastest,
    flat,
    measure,
    ratios,
)
from testbed.busybox import find_busybox

BUSYBOX = str(find_busybox())


def test_both_loops_count_every_run_at_the_concurrency_asked() -> None:
    loops = measure(Command(BUSYBOX, ("true",)), runs=9, concurrency=2, warmup=1)
    assert list(loops) == list(METHODS)
    for loop in loops.values():
        assert (loop.runs, loop.concurrency) == (9, 2)
        lat = [loop.latency_ms[k] for k in ("p50", "p90", "p99", "p99_9")]
        assert lat == sorted(lat) and lat[0] > 0
        assert loop.runs_per_s > 0
    fig = flat("bare", loops)
    assert fig["bare_median_ms"] == min(loop.median_ms for loop in loops.values())
    assert fig["bare_runs_per_s"] == round(max(loop.runs_per_s for loop in loops.values()), 1)
    assert fastest(loops).median_ms == fig["bare_median_ms"]
    assert ratios(2 * fig["bare_median_ms"], {"x": fastest(loops)}) == {"x": 2.0}


def test_the_loops_run_in_a_session_of_their_own() -> None:
    # Exits 0 only when its session is not the caller's: the loops are one scheduling group
    # of their own, as sandboxd's runs are in its cpu cgroup.
    script = (f'read -r pid comm state ppid pgrp sid rest < /proc/$$/stat; '
              f'[ "$sid" != "{os.getsid(0)}" ]')
    measure(Command(BUSYBOX, ("sh", "-c", script)), runs=2, warmup=0)


def test_stdin_files_are_taken_in_turn(tmp_path: Path) -> None:
    files = []
    for i in range(2):
        (tmp_path / f"in{i}").write_text(f"{i}\n")
        files.append(str(tmp_path / f"in{i}"))
    # Each run sees one of the files whole (the offset is not shared between runs).
    script = 'read -r n; [ "$n" = 0 ] || [ "$n" = 1 ]'
    measure(Command(BUSYBOX, ("sh", "-c", script), stdin=tuple(files)), runs=4, warmup=1)


def test_a_failing_command_is_an_error_not_a_figure() -> None:
    with pytest.raises(BenchError, match="exited 3"):
        measure(Command(BUSYBOX, ("sh", "-c", "exit 3")), runs=2, warmup=0)
    with pytest.raises(BenchError, match="cannot keep"):
        measure(Command(BUSYBOX, ("true",)), runs=1, concurrency=2)


def test_a_gap_comes_before_each_timed_run_and_only_then() -> None:
    # The spaced baseline: each worker sleeps gap_s before each timed run, none before the
    # warm-up ones, so the loop lasts at least runs x gap_s (a lower bound, not a speed).
    runs, gap = 4, 0.25
    for loop in measure(Command(BUSYBOX, ("true",)), runs=runs, warmup=2, gap_s=gap).values():
        assert loop.runs == runs
        assert loop.elapsed_s >= runs * gap
