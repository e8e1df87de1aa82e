"""Records of live containers in the state directory, so that an instance started after a
crash can remove what the crashed one left.

A container dies with its spawner (PDEATHSIG), and its mounts with its mount namespace;
what outlives a SIGKILLed service is its cgroups. Each container gets a record
`containers/<id>` naming the service's pid; at start, records of dead pids are swept: their
cgroups (`c-<id>`) are killed and removed, then the record.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sandbox import pids
from sandbox.errors import CgroupError
from sandbox.runtime.cgroups.base import CgroupDriver


class ContainerRecords:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "containers"
        self.dir.mkdir(parents=True, exist_ok=True)

    def add(self, cid: str) -> None:
        (self.dir / cid).write_text(str(os.getpid()))

    def remove(self, cid: str) -> None:
        (self.dir / cid).unlink(missing_ok=True)

    def sweep(self, driver: CgroupDriver | None) -> list[str]:
        """Remove what containers of dead instances left; returns their ids."""
        swept = []
        for record in self.dir.iterdir():
            try:
                owner = int(record.read_text() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and pids.alive(owner):
                continue
            if driver is not None:
                cgroup = driver.open(f"c-{record.name}")
                if cgroup is not None:
                    with contextlib.suppress(CgroupError):
                        cgroup.destroy()
            record.unlink(missing_ok=True)
            swept.append(record.name)
        return swept
