"""`python -m loadtest.tty` against the test service (sbx on a pty, a real run): every
figure is printed. Their values are not checked (speed belongs to the benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.service.conftest import MAIN_TOKEN, Service

REPO = Path(__file__).resolve().parents[2]
FIGURES = ("echoes", "sbx_median_ms", "sbx_p99_ms", "bare_median_ms", "bare_p99_ms",
           "median_ratio", "p99_ratio", "load_average")


def test_the_echo_benchmark_prints_every_figure(service: Service, images: Any) -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.tty", "--url", service.url,
                           "--token", MAIN_TOKEN, "--image", images.oci, "--echoes", "10"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert tuple(report) == FIGURES
    assert report["echoes"] == 10
    for key in FIGURES[1:-1]:
        assert isinstance(report[key], int | float) and report[key] > 0, (key, report)
    assert len(report["load_average"].split()) == 3
    # The table says the same, a line per figure.
    assert [line.split()[0] for line in lines[:-1]] == list(FIGURES)
