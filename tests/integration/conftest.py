"""Fixtures shared by the integration suites."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.runtime.cgroups import V2Driver
from sandbox.runtime.cgroups.base import CgroupDriver
from sandbox.runtime.cgroups.detect import parse_mountinfo


def cleanup_driver(drv: CgroupDriver) -> None:
    """Remove every cgroup a test driver made, then its base."""
    try:
        for name in drv.list():
            cg = drv.open(name)
            if cg is not None:
                cg.destroy()
    finally:
        drv.close()


@pytest.fixture
def v2() -> Iterator[V2Driver]:
    """A v2 driver on this host's cgroup2 mount, under a base of this test run's own."""
    if os.geteuid() != 0:
        pytest.skip("creating cgroups on this host's cgroup2 mount needs root")
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if unified is None:
        pytest.skip("no cgroup2 mount on this host")
    drv, warnings = V2Driver.at(str(unified.path), f"sbx-test2-{os.getpid()}",
                                move_self=False, setup_hint="")
    if drv is None:
        pytest.skip(f"cannot use {unified.path}: {warnings}")
    try:
        yield drv
    finally:
        cleanup_driver(drv)
