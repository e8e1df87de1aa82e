"""The API benchmark runs end to end (--quick): its own registry and sandboxd serve.

No speed is checked: only that each required figure is there and sensible.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_prints_every_figure() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.api", "--quick", "--json-only"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    fig = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("warm_run_median_ms", "warm_run_p99_ms", "runs_per_s", "bare_exec_median_ms",
                "bare_runs_per_s", "idle_rss_mib_4"):
        assert isinstance(fig[key], int | float) and fig[key] > 0, (key, fig[key])
    assert fig["warm_run_errors"] == 0
    assert fig["idle_containers"] >= 4
    assert fig["warm_run_p99_ms"] >= fig["warm_run_median_ms"]
