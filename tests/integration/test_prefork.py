"""The next run's child made ahead (native/init.c, prepare): once a container is reset after
a run, its init forks the next run's child into the cgroup the host gave for that run, and
the next exec releases it, while the host leaves time between runs (init measures it).
Each test takes a container as the pools do (runs exec'd with `reset_after`, paced as
sparse traffic) until init holds such a child, then checks that a run through it is a run
like any other: its result, its limits, its terminal, what it leaves, and that the child
goes with its container. Isolation from the waiting child: tests/security/test_prefork.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sandbox.runtime.container import Container
from sandbox.runtime.profiles import Limits
from sandbox.runtime.pty import TtySize
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import RunResult, Status
from tests.conftest import Session

ENV = {"PATH": "/bin"}
POLICIES = ("judge", "default")
_WAIT_S = 5.0   # for init to fork its child once the run's answer is in (not a figure)
# For it after one run: init forks it right after that run's reset, before the answer.
_AFTER_RUN_S = 1.0
# Between runs: longer than init's PREPARE_MIN_GAP_NS (native/init.c), so that it makes
# the next run's child (back to back it does not).
PACE_S = 0.05


def run(session: Session, c: Container, argv: list[str], **kw: object) -> RunResult:
    time.sleep(PACE_S)
    req = ExecRequest(argv=argv, env=ENV, **kw)  # type: ignore[arg-type]
    return session.run(c.exec(req, reset_after=True))


def waiting_child(c: Container) -> psutil.Process | None:
    """Init's child between runs: the next run's, made ahead (there is at most one)."""
    kids = psutil.Process(c.pid).children()
    assert len(kids) <= 1, kids
    return kids[0] if kids else None


def child_within(c: Container, seconds: float) -> psutil.Process | None:
    deadline = time.monotonic() + seconds
    while (child := waiting_child(c)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return child


def wait_for_child(c: Container) -> psutil.Process:
    child = child_within(c, _WAIT_S)
    assert child is not None, "init made no child ahead"
    return child


def prepared(session: Session, c: Container) -> psutil.Process:
    """Runs `true` as a pool does until init holds the next run's child; that child. Init
    makes one only once the container's runs have lately come far enough apart (a moving
    average), so a run that gave it the next run's cgroup may not be that run yet."""
    for _ in range(8):
        assert run(session, c, ["true"]).status == Status.OK
        session.run(c._settle())
        if c._next is not None and (child := child_within(c, _AFTER_RUN_S)) is not None:
            return child
    raise AssertionError("init made no child ahead")


@pytest.fixture(params=POLICIES)
def warm(request: pytest.FixtureRequest, session: Session,
         busybox_root: Path) -> Iterator[Container]:
    c = session.container(busybox_root, profile=request.param)
    prepared(session, c)
    yield c
    session.run(c.destroy())


SIGNAL_MASKS = ["grep", "-E", "^Sig(Blk|Ign|Cgt):", "/proc/self/status"]
ALL_DEFAULT = b"SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\nSigCgt:\t0000000000000000\n"


@pytest.mark.parametrize("policy", POLICIES)
def test_a_run_starts_with_every_signal_at_its_default_on_either_path(
        session: Session, busybox_root: Path, policy: str) -> None:
    # The spawner is Python, which ignores SIGPIPE, SIGXFSZ and more, and exec keeps what
    # is ignored: init makes every disposition default at its start, and its children
    # reset only the one it catches. A new container's first run takes the vfork path;
    # a paced one, the child made ahead.
    c = session.container(busybox_root, profile=policy)
    try:
        first = run(session, c, SIGNAL_MASKS)
        assert (first.status, first.stdout) == (Status.OK, ALL_DEFAULT), first
        prepared(session, c)
        before = c.prepared_runs
        ahead = run(session, c, SIGNAL_MASKS)
        assert c.prepared_runs == before + 1
        assert (ahead.status, ahead.stdout) == (Status.OK, ALL_DEFAULT), ahead
    finally:
        session.run(c.destroy())


def test_the_next_run_goes_through_the_child_made_ahead(session: Session,
                                                        warm: Container) -> None:
    before = (warm.prepared_runs, warm.prepare_fallbacks)
    r = run(session, warm, ["sh", "-c", "echo hi; id -u; echo err >&2; exit 3"], uid=1000)
    assert (r.status, r.exit_code, r.stdout, r.stderr) == (
        Status.NONZERO_EXIT, 3, b"hi\n1000\n", b"err\n")
    assert (warm.prepared_runs, warm.prepare_fallbacks) == (before[0] + 1, before[1])
    assert warm.filter_ahead  # both built-in policies let the child load its filter ahead


def test_wall_time_starts_at_release(session: Session, warm: Container) -> None:
    idle_ms = 300
    time.sleep(idle_ms / 1000)  # the child waits meanwhile, its setup long done
    r = run(session, warm, ["true"])
    assert r.status == Status.OK
    assert r.wall_ms < idle_ms, r.wall_ms


def test_a_request_too_big_for_the_child_takes_the_vfork_path(session: Session,
                                                              warm: Container) -> None:
    before = warm.prepare_fallbacks
    big = ["x" * (100 << 10)] * 3   # past the region init shares with the child (256 KiB)
    r = run(session, warm, ["sh", "-c", 'echo $# ${#1}', "sh", *big], uid=0)
    assert (r.status, r.stdout) == (Status.OK, f"3 {len(big[0])}\n".encode())
    assert warm.prepare_fallbacks == before + 1
    wait_for_child(warm)      # and the next run's child is made again
    before_prepared = warm.prepared_runs
    assert run(session, warm, ["true"]).status == Status.OK
    assert warm.prepared_runs == before_prepared + 1


@pytest.mark.parametrize("case", ["wall", "memory", "pids", "leaves"])
def test_limits_and_leftovers_of_a_prepared_run(session: Session, warm: Container,
                                                case: str) -> None:
    before = warm.prepared_runs
    if case == "wall":
        r = run(session, warm, ["sleep", "10"], limits=Limits(wall_ms=200))
        assert r.status == Status.WALL_LIMIT, r
    elif case == "memory":
        # CPU and wall time out of reach: at its limit, reclaim (no swap here) may burn
        # the judge's default 2 s of CPU before the OOM kill comes, and the first limit
        # enforced would then be time (seen once in CI, with oom_killed set too).
        r = run(session, warm, ["sh", "-c", "x=$(head -c 64000000 /dev/zero | tr '\\0' a)"],
                limits=Limits(memory_bytes=16 << 20, cpu_ms=30_000, wall_ms=60_000))
        assert r.status == Status.MEMORY_LIMIT, r
    elif case == "pids":
        r = run(session, warm, ["sh", "-c", "for i in 1 2 3 4 5 6; do sleep 5 & done; wait"],
                limits=Limits(pids=3, wall_ms=3000))
        assert b"fork" in r.stderr or b"resource" in r.stderr.lower(), r
    else:
        r = run(session, warm, ["sh", "-c", "sleep 30 & echo started"])
        assert (r.status, r.stdout) == (Status.OK, b"started\n")
    assert warm.prepared_runs == before + 1
    # The next run, prepared again, sees no process of this one and has its own limits.
    wait_for_child(warm)
    after = run(session, warm, ["sh", "-c", "echo /proc/[0-9]*"])
    assert after.status == Status.OK
    assert len(after.stdout.split()) == 2, after.stdout  # init and itself
    assert warm.prepared_runs == before + 2


def test_a_prepared_run_with_a_terminal(session: Session, warm: Container) -> None:
    before = warm.prepared_runs
    r = run(session, warm, ["sh", "-c", "tty; echo $$"], tty=TtySize())
    assert r.status == Status.OK, r
    lines = r.stdout.split()
    assert lines[0] == b"/dev/pts/0", r.stdout
    assert warm.prepared_runs == before + 1


def test_reset_replaces_the_waiting_child(session: Session, warm: Container) -> None:
    old = waiting_child(warm)
    assert old is not None
    session.run(warm.reset())
    assert psutil.wait_procs([old], timeout=_WAIT_S)[1] == []
    assert wait_for_child(warm).pid != old.pid
    assert run(session, warm, ["true"]).status == Status.OK


def test_destroy_while_a_child_waits_leaves_no_process(session: Session,
                                                       busybox_root: Path) -> None:
    c = session.container(busybox_root, profile="judge")
    child = prepared(session, c)
    init = psutil.Process(c.pid)
    session.run(c.destroy())
    assert psutil.wait_procs([init, child], timeout=_WAIT_S)[1] == []
