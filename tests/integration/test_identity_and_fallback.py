"""Id mapping as each kind of user, the rlimit fallback without cgroups, the host report."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.runtime import hostinfo, idmap
from sandbox.runtime.cgroups import Detection
from sandbox.runtime.container import Container
from sandbox.runtime.profiles import Limits
from sandbox.runtime.requests import ContainerSpec, ExecRequest
from sandbox.runtime.results import Status
from sandbox.runtime.spawnerclient import Runtime
from tests.conftest import Session


def _uid_map(session: Session, c: Container) -> list[list[int]]:
    r = session.exec(c, ["cat", "/proc/self/uid_map"])
    return [[int(x) for x in line.split()] for line in r.stdout.decode().splitlines()]


def test_container_root_is_never_host_root(session: Session, container: Container) -> None:
    assert _uid_map(session, container), "no uid map inside the container"
    # As the host sees it: inside, a map shows the ids of the namespace above (a container's
    # is made inside the id mapper's, idmap.Mapper, whose root is container root).
    host_view = [[int(x) for x in line.split()] for line in
                 Path(f"/proc/{container.pid}/uid_map").read_text().splitlines()]
    assert host_view[0][:2] == [0, session.runtime.mapping.root_uid]
    assert all(outside != 0 for _, outside, _ in host_view)
    if os.geteuid() == 0:
        assert session.runtime.mapping.method == "direct"


def test_init_is_not_dumpable_and_holds_no_host_file(session: Session,
                                                     container: Container) -> None:
    r = ExecRequest(argv=["cat", "/proc/1/environ"], env={"PATH": "/bin"})
    res = session.run(container.exec(r))
    assert res.status == Status.NONZERO_EXIT and b"denied" in res.stderr
    if os.geteuid() != 0:
        # Non-dumpable: even its own host user may not look at its descriptors.
        with pytest.raises(PermissionError):
            os.listdir(f"/proc/{container.pid}/fd")
        return
    fds = sorted(os.listdir(f"/proc/{container.pid}/fd"), key=int)
    targets = [os.readlink(f"/proc/{container.pid}/fd/{fd}") for fd in fds]
    # fds 0-2 are the container's /dev/null (its root is /root of init's), then only
    # sockets and pipes.
    assert targets[:3] == ["/root/dev/null"] * 3
    assert all(t.startswith(("socket:", "pipe:", "anon_inode:")) for t in targets[3:]), targets


@pytest.fixture
def single_map_runtime(busybox_root: Path) -> Iterator[tuple[Session, Runtime]]:
    if os.geteuid() == 0:
        pytest.skip("a single-id map is the unprivileged user's mode; root always maps a range")
    s = Session.__new__(Session)
    import asyncio

    s.loop = asyncio.new_event_loop()
    s.runtime = s.run(Runtime.start(mapping=idmap.plan(etc=Path("/nonexistent"))))
    s.containers = []
    yield s, s.runtime
    s.close()


def test_single_id_map(single_map_runtime: tuple[Session, Runtime], busybox_root: Path) -> None:
    s, rt = single_map_runtime
    assert rt.mapping.method == "single"
    c = s.container(busybox_root, profile="judge")
    r = s.exec(c, ["sh", "-c", "id -u; grep Cap /proc/self/status; cat /proc/self/uid_map"])
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "0"
    assert all(line.endswith("0000000000000000") for line in lines[1:6]), lines
    assert lines[6].split() == ["0", str(os.geteuid()), "1"]


@pytest.fixture
def no_cgroup_session() -> Iterator[Session]:
    s = Session.__new__(Session)
    import asyncio

    s.loop = asyncio.new_event_loop()
    s.runtime = s.run(Runtime.start(cgroups=Detection(None, ("no writable cgroup (test)",))))
    s.containers = []
    yield s
    s.close()


def test_rlimit_fallback_says_so(no_cgroup_session: Session, busybox_root: Path) -> None:
    s = no_cgroup_session
    c = s.container(busybox_root, profile="judge")
    r = s.exec(c, ["sh", "-c", "while :; do :; done"], cpu_ms=500)
    assert r.status == Status.TIME_LIMIT
    assert r.signal in (signal.SIGXCPU, signal.SIGKILL)
    assert r.measured_by["cpu"] == "rusage"
    assert r.measured_by["memory"] == "rusage:ru_maxrss"
    assert "no writable cgroup (test)" in r.warnings
    from sandbox.runtime.run import FALLBACK_CPU, FALLBACK_MEMORY

    assert FALLBACK_CPU in r.warnings and FALLBACK_MEMORY in r.warnings
    # The run's leftovers are still swept without a cgroup.
    s.exec(c, ["sh", "-c", "(setsid sleep 1000 &); true"])
    listing = s.exec(c, ["sh", "-c", "for p in /proc/[0-9]*; do cat $p/comm; done"])
    assert b"sleep" not in listing.stdout
    # Memory falls back to RLIMIT_AS: the allocation fails instead of growing.
    r = s.run(c.exec(ExecRequest(argv=["sh", "-c", "x=a; while :; do x=$x$x; done"],
                                 env={"PATH": "/bin"}, limits=Limits(memory_bytes=32 << 20))))
    assert r.status != Status.OK
    assert r.memory_peak_bytes is not None and r.memory_peak_bytes < 64 << 20


def test_host_report(session: Session) -> None:
    rep = hostinfo.report(session.runtime.cgroups, session.runtime.mapping)
    assert rep["user_namespaces"] is True
    assert rep["id_mapping"]["method"] == session.runtime.mapping.method
    assert rep["seccomp"]["available"] is True
    assert set(rep) >= {"kernel", "cgroup", "measurement", "warnings", "overlay_in_userns"}
    # Both are tried for real; this machine has them (MACHINE.md), and so does CI.
    assert rep["overlay_in_userns"] is True
    if session.runtime.cgroups.driver is None:
        assert rep["measurement"]["memory"] == "rusage:ru_maxrss"


def test_container_spec_validation(session: Session, busybox_root: Path) -> None:
    from sandbox.errors import PolicyError

    with pytest.raises(PolicyError, match="profile 'nope' does not exist"):
        session.run(session.runtime.create_container(
            ContainerSpec(layers=(str(busybox_root),), policy="nope")))

