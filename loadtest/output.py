"""How every benchmark ends: a table of its figures, then one JSON line (the last line)."""

from __future__ import annotations

import json
from typing import Any


def emit(figures: dict[str, Any], json_only: bool) -> None:
    if not json_only:
        for key, value in figures.items():
            print(f"{key:>24}  {value}")
    print(json.dumps(figures, separators=(",", ":")))
