"""The runtime on the cgroup v2 driver, as far as this host's cgroup2 mount goes (on the
hybrid layout it has no memory or pids controller: those fall back, and say so)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.runtime.cgroups import Detection, V2Driver
from sandbox.runtime.results import Status
from sandbox.runtime.spawnerclient import Runtime
from tests.conftest import Session


@pytest.fixture
def v2_session(v2: V2Driver) -> Iterator[Session]:
    s = Session.__new__(Session)
    s.loop = asyncio.new_event_loop()
    s.runtime = s.run(Runtime.start(cgroups=Detection(v2, ())))
    s.containers = []
    yield s
    s.close()
    assert not Path(v2.base).exists(), "the v2 base was left behind"


def test_runs_are_measured_and_killed_through_cgroup_v2(v2_session: Session,
                                                        busybox_root: Path) -> None:
    s = v2_session
    c = s.container(busybox_root, profile="judge")
    r = s.exec(c, ["sh", "-c", "while :; do :; done"], cpu_ms=300)
    assert r.status == Status.TIME_LIMIT
    assert r.measured_by["cpu"] == "cgroup-v2:cpu.stat"
    assert r.cpu_ms is not None and r.cpu_ms >= 300
    # cgroup.kill takes the whole run, the double-forked daemon included.
    r = s.exec(c, ["sh", "-c", "(setsid sleep 1000 &); sleep 1000"], wall_ms=300)
    assert r.status == Status.WALL_LIMIT
    listing = s.exec(c, ["sh", "-c", "for p in /proc/[0-9]*; do cat $p/comm; done"])
    assert b"sleep" not in listing.stdout
    driver = s.runtime.cgroups.driver
    assert driver is not None
    if "memory" not in driver.controllers:
        assert r.measured_by["memory"] == "rusage:ru_maxrss"
