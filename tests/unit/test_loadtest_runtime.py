"""The runtime benchmark runs end to end (--quick) and its last line carries every figure.

No speed is checked: only that each required figure is there, numeric and sensible.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

POSITIVE = ("bare_exec_median_ms", "warm_exec_median_ms", "warm_exec_p99_ms",
            "cold_start_median_ms", "idle_container_uss_mib")
OVERHEADS = ("cpu_overhead_pct", "syscall_overhead_pct")


def test_quick_run_prints_every_figure_as_json() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.runtime", "--quick", "--json-only"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for key in (*POSITIVE, *OVERHEADS):
        value = figures.get(key)
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value), (key, value)
    for key in POSITIVE:
        assert figures[key] > 0, (key, figures[key])
    for key in OVERHEADS:
        assert figures[key] > -100, (key, figures[key])  # a ratio of two positive times
    assert figures["warm_exec_p99_ms"] >= figures["warm_exec_median_ms"]
