"""The child init makes ahead for the next run (native/init.c, prepare) is nobody's before
its release: between runs it holds nothing of init's a program could use, and a run it was
not made for (here: the host forgot it had given init the next run's cgroup, so the exec
does not ask for it) never finds it alive. Under both policies and both id maps, the
single one included (init shares its id with the runs there, so only its absence keeps a
run from signalling it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.runtime.container import Container
from sandbox.runtime.requests import ContainerSpec, ExecRequest
from sandbox.runtime.results import RunResult, Status
from sandbox.runtime.spawnerclient import Runtime
from tests.conftest import Session
from tests.integration.test_prefork import PACE_S, prepared, run, wait_for_child
from tests.security.test_state_between_runs import ENV, MAPPINGS, POLICIES, _lines


@pytest.fixture(params=[(p, m) for p in POLICIES for m in MAPPINGS],
                ids=[f"{p}-{m}" for p in POLICIES for m in MAPPINGS])
def warm(request: pytest.FixtureRequest, session: Session, runtimes: dict[str, Runtime],
         busybox_root: os.PathLike[str]) -> Iterator[Container]:
    policy, mapping = request.param
    c = session.run(runtimes[mapping].create_container(
        ContainerSpec(layers=(str(busybox_root),), policy=policy)))
    try:
        prepared(session, c)
        yield c
    finally:
        session.run(c.destroy())


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _holds_only_its_own_descriptors(c: Container, pid: int) -> None:
    fds = {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
    # 0-2 on init's /dev/null, its end of the socket it waits on, its error pipe: not
    # init's control socket, cgroup descriptors or mounts held for binds.
    kinds = sorted("socket" if t.startswith("socket:") else "pipe" if t.startswith("pipe:")
                   else "null" if t.endswith("/dev/null") else t for t in fds.values())
    assert kinds == ["null"] * 3 + ["pipe", "socket"], fds
    assert all(fds[n].endswith("/dev/null") for n in (0, 1, 2)), fds
    # Its socket is its own end of the pair it waits on, not init's control socket (init
    # holds the other end; the pipe is the error pipe, whose read end is init's).
    inits = {os.readlink(f"/proc/{c.pid}/fd/{n}") for n in os.listdir(f"/proc/{c.pid}/fd")}
    assert not {t for t in fds.values() if t.startswith("socket:")} & inits, (fds, inits)


def test_the_waiting_child_holds_nothing_of_init(session: Session, warm: Container) -> None:
    child = wait_for_child(warm)
    nxt = warm._next
    assert nxt is not None
    # Waiting once in the next run's cgroup (the join is the last step of its setup; it
    # closes what it does not keep right after).
    deadline = time.monotonic() + 5
    while nxt.cgroup is not None and os.path.basename(nxt.cgroup[0].path) not in Path(
            f"/proc/{child.pid}/cgroup").read_text():
        assert time.monotonic() < deadline, "the child never joined the next run's cgroup"
        time.sleep(0.01)
    if os.geteuid() == 0:  # else the descriptors of a non-dumpable process are not ours to list
        while len(os.listdir(f"/proc/{child.pid}/fd")) > 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        _holds_only_its_own_descriptors(warm, child.pid)
    # Still under init's ids until its release.
    # Real and effective ids are init's; the saved uid is container root's, taken for the
    # cgroup v1 join (giving it back would clear the capabilities the release needs).
    mine, init = _status(child.pid), _status(warm.pid)
    assert mine["Uid"].split()[:2] == init["Uid"].split()[:2]
    assert mine["Gid"] == init["Gid"]
    assert mine["NoNewPrivs"].strip() == "0"
    if warm.filter_ahead:
        assert mine["Seccomp"].strip() == "2"
    # Its bounding set is already the run's.
    r = run(session, warm, ["grep", "CapBnd", "/proc/self/status"])
    assert r.status == Status.OK
    assert r.stdout.split()[1].decode() == mine["CapBnd"].strip()


def test_a_run_never_finds_a_child_made_for_another(session: Session,
                                                    warm: Container) -> None:
    old = wait_for_child(warm)
    counts = (warm.prepared_runs, warm.prepare_fallbacks)
    # The host forgets the next run's cgroup: this exec does not ask for the child.
    nxt = warm._take_next()
    assert nxt is not None
    try:
        r = run(session, warm, ["sh", "-c", "echo /proc/[0-9]*"])
    finally:
        if nxt.cgroup is not None:
            nxt.cgroup[0].close_procs_fds()
    assert r.status == Status.OK, r
    assert len(r.stdout.split()) == 2, r.stdout  # init and itself: no waiting child
    assert not old.is_running() or old.status() == "zombie"
    assert (warm.prepared_runs, warm.prepare_fallbacks) == counts


@pytest.mark.parametrize("policy", POLICIES)
def test_a_prepared_run_starts_as_a_fresh_one(session: Session, probe_root: Path,
                                              policy: str) -> None:
    """Everything the state probe reads of its own process and container (signals,
    limits, capabilities, ids, namespaces, descriptors, what it can see) is the same in a
    run through the child made ahead as in a new container's first run (the vfork path)."""
    c = session.container(probe_root, profile=policy)

    def check() -> RunResult:
        time.sleep(PACE_S)
        return session.run(c.exec(ExecRequest(argv=["/probes/state", "check"], env=dict(ENV)),
                                  reset_after=True))

    try:
        fresh = check()
        assert fresh.status == Status.OK and fresh.stdout, fresh
        prepared(session, c)
        counted = c.prepared_runs
        after = check()
        assert c.prepared_runs == counted + 1
    finally:
        session.run(c.destroy())
    assert after.status == Status.OK, after
    assert _lines(after, "LEAK") == [], after.stdout.decode()
    changed = sorted(set(_lines(after, "STATE")) ^ set(_lines(fresh, "STATE")))
    assert changed == [], changed
