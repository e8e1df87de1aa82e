"""Records of live containers in the state directory, so that an instance started after a
crash can remove what the crashed one left.

A container dies with its spawner (PDEATHSIG), and its mounts with its mount namespace;
what outlives a SIGKILLed service is its cgroups. Each container gets a record
`containers/<id>` naming the service's pid (so do the cgroups the runtime makes ahead of a
container: Runtime.claims); at start, records of dead pids are swept: their cgroups
(`c-<id>`) are killed and removed, then the record. Container cgroups that no
record names any more (an instance whose state directory was removed) are removed too,
once they are empty and old.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from sandbox import pids
from sandbox.errors import CgroupError
from sandbox.runtime.cgroups.base import ORPHAN_AGE_S, CgroupDriver


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
        if driver is not None:
            swept += self._sweep_orphans(driver)
        return swept

    def _sweep_orphans(self, driver: CgroupDriver) -> list[str]:
        """Container cgroups no record names (their instance's state directory is gone):
        empty, and unchanged for ORPHAN_AGE_S, so that a container another live instance
        is setting up right now (its cgroup made, its helper not in yet) is never taken."""
        ours = {p.name for p in self.dir.iterdir()}
        swept = []
        for name in driver.list():
            if not name.startswith("c-") or name[2:] in ours:
                continue
            cgroup = driver.open(name)
            with contextlib.suppress(CgroupError, OSError):
                if (cgroup is not None and not cgroup.pids(recursive=True)
                        and time.time() - cgroup.changed() > ORPHAN_AGE_S):
                    cgroup.destroy()
                    swept.append(name[2:])
        return swept
