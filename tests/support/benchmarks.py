"""Running a benchmark the way the suite checks it: `python -m <module> --quick`, from the
repository's root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def quick_run(module: str, *args: str, timeout: float = 600
              ) -> tuple[list[str], dict[str, Any]]:
    """The table's lines and the last line's JSON figures of `python -m module --quick`."""
    done = subprocess.run([sys.executable, "-m", module, "--quick", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])
