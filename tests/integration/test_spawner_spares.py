"""The helpers the spawner makes ahead (spawner.Spawner.spares) and, for an unprivileged
service with subordinate ids, the id mapper whose user namespace holds every container's
(idmap.Mapper): killed from outside, as the OOM killer would, they cost no container; a
closed runtime leaves none of them; and a container made from a spare has its cgroup
namespace rooted at its own cgroup, as one made on demand has."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sandbox.runtime.container import Container
from sandbox.runtime.idmap import MAPPER_NAME
from sandbox.runtime.results import Status
from sandbox.runtime.spawner import HELPER_NAME
from tests.conftest import Session

WAIT_S = 60  # only so that a hung spawner fails the test: not a figure


@pytest.fixture
def own() -> Iterator[Session]:
    """A runtime of its own: these tests kill its spawner's children."""
    s = Session()
    yield s
    s.close()


def _spawner(s: Session) -> psutil.Process:
    pid = s.runtime.spawner.pid
    assert pid is not None
    return psutil.Process(pid)


def _spares(s: Session) -> list[psutil.Process]:
    """The spawner's helpers waiting for a container."""
    return [p for p in _spawner(s).children() if p.name() == HELPER_NAME]


def _mapper(s: Session) -> psutil.Process | None:
    found = [p for p in _spawner(s).children() if p.name() == MAPPER_NAME]
    assert len(found) <= 1, found
    return found[0] if found else None


def _until_spares(s: Session) -> list[psutil.Process]:
    deadline = time.monotonic() + WAIT_S
    while not (spares := _spares(s)):
        assert time.monotonic() < deadline, "no spare helper made after a container"
        time.sleep(0.01)
    return spares


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=WAIT_S)


def _echo(s: Session, c: Container, text: str) -> None:
    r = s.exec(c, ["echo", text])
    assert (r.status, r.stdout) == (Status.OK, f"{text}\n".encode())


def test_killed_spares_cost_no_container(own: Session, busybox_root: Path) -> None:
    _echo(own, own.container(busybox_root), "first")
    spares = _until_spares(own)
    _kill(spares)
    # Each killed spare is passed over; the container is made by a helper made now.
    _echo(own, own.container(busybox_root), "after the spares died")
    assert {p.pid for p in _until_spares(own)}.isdisjoint(p.pid for p in spares)


def test_a_killed_mapper_is_made_again(own: Session, busybox_root: Path) -> None:
    if own.runtime.mapping.method != "newuidmap":
        pytest.skip("only newuidmap's map is written by a mapper")
    _echo(own, own.container(busybox_root), "first")
    mapper = _mapper(own)
    assert mapper is not None
    _until_spares(own)
    # With the spares too: theirs are made in the dead mapper's namespace, or mapped by it.
    _kill([mapper, *_spares(own)])
    _echo(own, own.container(busybox_root), "after the mapper died")
    again = _mapper(own)
    assert again is not None and again.pid != mapper.pid
    _echo(own, own.container(busybox_root), "and once more")


def test_a_closed_runtime_leaves_no_helper_or_mapper(busybox_root: Path) -> None:
    s = Session()
    try:
        _echo(s, s.container(busybox_root), "made")
        _until_spares(s)
        tree = _spawner(s).children(recursive=True)
        assert len(tree) > 1, tree
    finally:
        s.close()
    # Orphans would be re-parented away from the test's process tree: each is looked for.
    _, alive = psutil.wait_procs(tree, timeout=WAIT_S)
    assert alive == []


def test_containers_from_spares_share_no_namespace(own: Session, busybox_root: Path) -> None:
    """Each container's namespaces are its own, its user namespace too: made inside the id
    mapper's, never that one shared (as rootless podman shares one)."""
    own.container(busybox_root)
    _until_spares(own)
    kinds = ("user", "mnt", "ipc", "uts", "net", "cgroup")
    script = "; ".join(f"readlink /proc/self/ns/{k}" for k in kinds)
    seen = []
    for c in (own.container(busybox_root), own.container(busybox_root)):
        r = own.exec(c, ["sh", "-c", script])
        assert r.status == Status.OK, r.stderr
        seen.append(r.stdout.decode().split())
    assert all(a != b for a, b in zip(*seen, strict=True)), seen
    assert os.readlink("/proc/self/ns/user") not in seen[0] + seen[1]


def test_a_container_from_a_spare_sees_its_own_cgroup_as_root(
        own: Session, busybox_root: Path) -> None:
    if own.runtime.cgroups.driver is None:
        pytest.skip("no cgroup delegated to this user")
    own.container(busybox_root)
    _until_spares(own)
    c = own.container(busybox_root)
    r = own.exec(c, ["cat", "/proc/self/cgroup"])
    assert r.status == Status.OK
    # A cgroup namespace made before the helper joined the container's cgroup would be
    # rooted at the spawner's, and show the container's as "/../c-...".
    lines = r.stdout.decode().splitlines()
    assert lines and all(".." not in line and c.id not in line for line in lines), lines


def test_an_init_shows_itself_as_sbx_init_not_as_its_helper(own: Session,
                                                             busybox_root: Path) -> None:
    """Init is cloned from the helper without an exec: `ps` shows it by its own name and
    command line, not as a helper (an operator counting helpers, or inits, counts right)."""
    c = own.container(busybox_root)
    init = psutil.Process(c.pid)
    assert init.name() == "sbx-init"
    assert init.cmdline() == ["sbx-init"]
    _until_spares(own)
    helpers = [p for p in _spawner(own).children() if p.name() == HELPER_NAME]
    assert helpers and all(p.cmdline()[:2] == [HELPER_NAME, "helper"] for p in helpers)
