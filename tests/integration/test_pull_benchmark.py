"""The pull benchmark runs end to end (--quick) against its own registry and skopeo.

No speed is checked: only that each required figure is there and sensible, and that a
cached re-pull downloaded no blob at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_prints_every_figure_and_a_cached_pull_downloads_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.pull", "--quick", "--json-only"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("cold_pull_s", "skopeo_s", "cached_pull_ms", "cold_vs_skopeo"):
        value = figures[key]
        assert isinstance(value, int | float) and value > 0, (key, value)
    assert figures["cached_pull_blob_bytes"] == 0
    assert figures["cached_pull_p99_ms"] >= figures["cached_pull_ms"]
    assert figures["layers"] == 2 and figures["files"] > 0
    # The machine's speed in the same run: both tight bare loops, and the ratio.
    assert figures["bare_exec_fork_exec_median_ms"] > 0
    assert figures["bare_exec_posix_spawn_median_ms"] > 0
    assert figures["cached_pull_vs_bare_exec"] == pytest.approx(
        figures["cached_pull_ms"] / figures["bare_exec_median_ms"], abs=0.01)
