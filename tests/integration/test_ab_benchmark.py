"""The side-by-side benchmark (`python -m loadtest.ab`) runs end to end on two trees: its
services, the alternated runs, every figure beside its baselines. No speed is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def ab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest.ab", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.one_pass
def test_two_trees_are_served_side_by_side(tmp_path: Path) -> None:
    # The same checkout under two names: two services, each started from its own.
    for name in ("before", "after"):
        (tmp_path / name).symlink_to(REPO)
    done = ab(str(tmp_path / "before"), str(tmp_path / "after"), "--requests", "20",
              "--rounds", "2", "--burst", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert len(figures["rounds"]) == 2
    for r in figures["rounds"]:
        assert set(r) == {"before", "after"}
        for side in r.values():
            assert side["runs"] == 20   # six bursts of 3, then one of 2
            assert 0 < side["median_ms"] <= side["p99_ms"]
            assert side["service_cpu_us_per_run"] > 0 and side["run_cpu_ms_median"] > 0
    assert set(figures["bare"]) == {"fork_exec", "posix_spawn"}
    # Each of "after"'s rows stands beside "before"'s figure of the same round.
    after = [line for line in lines[:-1] if ", after: " in line]
    assert len(after) == 8 and all(" base " in line for line in after)
    latency = [line for line in lines[:-1] if "median (ms)" in line or "p99 (ms)" in line]
    assert latency and all("fork+exec" in line and "posix_spawn" in line for line in latency)


def test_a_tree_without_its_native_parts_is_refused(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "cli.py").touch()
    done = ab(str(tmp_path), str(REPO))
    assert done.returncode == 2
    assert "build_ext --inplace" in done.stderr
    done = ab(str(tmp_path / "nothing"), str(REPO))
    assert done.returncode == 2 and "not a sandboxd checkout" in done.stderr
    done = ab(str(REPO), str(tmp_path), "--requests", "10", "--burst", "6")
    assert done.returncode == 2 and "--burst" in done.stderr
