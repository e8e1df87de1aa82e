"""A run's terminal reaches nothing outside the run: its pty belongs to its container's own
devpts instance, is gone for the next run of the same container, is never visible in
another container, and terminal input injection (TIOCSTI) fails on it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.runtime.container import Container
from sandbox.runtime.profiles import Limits
from sandbox.runtime.pty import TtySize
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import RunResult
from sandbox.runtime.rootfs import PTYS_PER_CONTAINER
from sandbox.runtime.runcontrol import RunControl
from tests.conftest import Session

ENV = {"PATH": "/bin"}
# Looks at the terminal of the run before: listed, and opened by path (read or write).
PEEK = ("ls -1 /dev/pts; (: </dev/pts/0) 2>/dev/null && echo OPENED-r; "
        "(: >/dev/pts/0) 2>/dev/null && echo OPENED-w; echo end")


@pytest.fixture(params=["judge", "default"])
def probe_container(request: pytest.FixtureRequest, session: Session,
                    probe_root: Path) -> Iterator[Container]:
    c = session.container(probe_root, profile=request.param)
    yield c
    session.run(c.destroy())


def run(session: Session, c: Container, argv: list[str], *, tty: bool) -> RunResult:
    return session.run(c.exec(ExecRequest(argv=argv, env=ENV, tty=TtySize() if tty else None,
                                          limits=Limits(wall_ms=10_000))))


def test_tiocsti_on_the_runs_own_terminal_fails(session: Session,
                                                probe_container: Container) -> None:
    # On its own controlling terminal the kernel would let a run push input (here
    # dev.tty.legacy_tiocsti=1): the policy's filter refuses it, with bit 32 set too.
    r = run(session, probe_container, ["/probes/tiocsti"], tty=True)
    assert r.status == "ok" and r.stdout.startswith(b"SAFE"), r


def test_the_next_run_cannot_reach_the_terminal_of_the_run_before(
        session: Session, probe_container: Container) -> None:
    # A run that leaves a process holding its terminal (its own session, SIGHUP ignored).
    r = run(session, probe_container, ["sh", "-c", "trap '' HUP; setsid sleep 1000 "
                                       "</dev/pts/0 >/dev/pts/0 2>&1 & echo left"], tty=True)
    assert r.stdout == b"left\r\n"
    session.run(probe_container.reset())  # as the warm pools do between runs
    for tty in (False, True):
        r = run(session, probe_container, ["sh", "-c", PEEK], tty=tty)
        listed = r.stdout.replace(b"\r\n", b"\n")
        # The second run's own terminal is pts/0 again: it opens its own, nothing else.
        expected = b"0\nptmx\nOPENED-r\nOPENED-w\nend\n" if tty else b"ptmx\nend\n"
        assert listed == expected, r


def test_another_container_never_sees_a_running_terminal(
        session: Session, probe_container: Container, probe_root: Path) -> None:
    other = session.container(probe_root, profile="judge")
    try:
        async def both() -> tuple[RunResult, RunResult]:
            seen = asyncio.Event()
            control = RunControl()
            held = asyncio.ensure_future(probe_container.exec(
                ExecRequest(argv=["sh", "-c", "echo up; exec sleep 100"], env=ENV,
                            tty=TtySize(), limits=Limits(wall_ms=10_000)),
                on_output=lambda name, data: seen.set(), control=control))
            await asyncio.wait_for(seen.wait(), 10)
            peek = await other.exec(ExecRequest(argv=["sh", "-c", PEEK], env=ENV))
            control.signal("SIGKILL")
            return await held, peek

        held, peek = session.run(both())
    finally:
        session.run(other.destroy())
    assert held.stdout == b"up\r\n"
    assert peek.stdout == b"ptmx\nend\n", peek


def test_a_run_cannot_take_every_pty_of_the_host(session: Session,
                                                 probe_container: Container) -> None:
    # Every devpts instance but the host's own draws on one pool (kernel.pty.max less the
    # reserve: 3072): without a cap per container, one run could open them all and every
    # other tenant's terminal would fail. Three nested shells hold 7 each: 21 asked (the
    # `:` keeps a shell from exec'ing its last subshell, which would close its seven;
    # `command` keeps a refused open from ending the shell).
    hold = "; ".join(f"command exec {fd}<>/dev/ptmx 2>/dev/null" for fd in range(3, 10))
    script = f"({hold}; ({hold}; ({hold}; ls /dev/pts | grep -c '^[0-9]'); :); :)"
    r = run(session, probe_container, ["sh", "-c", script], tty=False)
    assert r.stdout.strip() == str(PTYS_PER_CONTAINER).encode(), r
