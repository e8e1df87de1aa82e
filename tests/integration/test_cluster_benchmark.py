"""The cluster benchmark runs end to end (--quick): two nodes on a CPU each, HAProxy over
one and over both, the bare loops beside them.

No speed is checked (the goals are the benchmark's, on a quiet machine): only that every
figure is there and sensible, and that the two-node balancer sent runs to both nodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_prints_every_figure_and_uses_both_nodes() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.cluster", "--quick", "--json-only"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("one_node_runs_per_s", "two_nodes_runs_per_s", "scaling",
                "bare_spin_c1_runs_per_s", "bare_spin_c2_runs_per_s", "direct_median_ms",
                "haproxy_median_ms", "bare_true_median_ms"):
        value = figures[key]
        assert isinstance(value, int | float) and value > 0, (key, value)
    assert isinstance(figures["balancer_cost_ms"], float)
    assert figures["scaling"] == pytest.approx(
        figures["two_nodes_runs_per_s"] / figures["one_node_runs_per_s"], rel=0.01)
    assert set(figures["two_nodes_served"]) == {"a", "b"}
    assert sum(figures["two_nodes_served"].values()) == figures["runs"] * figures["rounds"]
