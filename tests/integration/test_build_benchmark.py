"""The image benchmark runs end to end (--quick): its own registry and sandboxd serve. No
speed is checked: only that each figure is there, positive, and beside its baselines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_prints_the_commit_figure_beside_tar() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.build", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    fig = json.loads(lines[-1])
    assert fig["commits"] == 2 and fig["files"] == 20
    assert fig["commit_min_ms"] <= fig["commit_median_ms"] <= fig["commit_max_ms"]
    for key in ("commit_median_ms", "bare_tar_median_ms", "bare_tar_gzip1_median_ms",
                "bare_tar_gzip6_median_ms"):
        assert fig[key] > 0, key
    row = next(line for line in lines if line.startswith("commit of a session"))
    assert "tar " in row and "tar|gzip -1" in row and "tar|gzip -6" in row and "x)" in row
