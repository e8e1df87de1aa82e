"""Container records and the crash sweep, over a fake cgroup driver (the real one is
exercised by the SIGKILL tests in tests/integration/test_engine.py and tests/service)."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.engine.records import ContainerRecords
from sandbox.runtime.cgroups.base import ORPHAN_AGE_S


@dataclass
class FakeCgroup:
    procs: list[int]
    mtime: float
    destroyed: bool = False

    def pids(self, *, recursive: bool = False) -> list[int]:
        return self.procs

    def changed(self) -> float:
        return self.mtime

    def destroy(self) -> None:
        self.destroyed = True


@dataclass
class FakeDriver:
    groups: dict[str, FakeCgroup] = field(default_factory=dict)

    def list(self) -> list[str]:
        return list(self.groups)

    def open(self, name: str) -> FakeCgroup | None:
        return self.groups.get(name)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_records_of_dead_instances_are_swept_with_their_cgroups(tmp_path: Path) -> None:
    records = ContainerRecords(tmp_path)
    records.add("aaa")                                    # ours: this process lives
    (records.dir / "bbb").write_text(str(_dead_pid()))    # a crashed instance's
    old = time.time() - 10 * ORPHAN_AGE_S
    driver = FakeDriver({"c-aaa": FakeCgroup([], old), "c-bbb": FakeCgroup([42], old)})
    assert records.sweep(driver) == ["bbb"]  # type: ignore[arg-type]
    assert driver.groups["c-bbb"].destroyed and not driver.groups["c-aaa"].destroyed
    assert sorted(p.name for p in records.dir.iterdir()) == ["aaa"]


def test_orphan_cgroups_go_only_when_empty_and_old(tmp_path: Path) -> None:
    records = ContainerRecords(tmp_path)
    now, old = time.time(), time.time() - 10 * ORPHAN_AGE_S
    driver = FakeDriver({
        "c-orphan": FakeCgroup([], old),
        "c-busy": FakeCgroup([os.getpid()], old),       # another instance's live container
        "c-new": FakeCgroup([], now),                   # being set up by another instance
        "spare": FakeCgroup([], old),                   # not a container's
    })
    assert records.sweep(driver) == ["orphan"]  # type: ignore[arg-type]
    assert [n for n, g in driver.groups.items() if g.destroyed] == ["c-orphan"]
