"""Signalling a running exec through a RunControl: the exec still returns the run's result,
and only the run's processes are hit."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from sandbox.errors import PolicyError, SandboxError
from sandbox.runtime.container import Container
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import RunResult, Status
from sandbox.runtime.runcontrol import RunControl
from tests.conftest import Session

ENV = {"PATH": "/bin"}


def _signal_when(control: RunControl, marker: bytes, sig: int):  # type: ignore[no-untyped-def]
    """An output callback that sends `sig` once `marker` has been printed."""
    seen = bytearray()

    def on_output(name: str, data: bytes) -> None:
        if marker in seen:
            return
        seen.extend(data)
        if marker in seen:
            control.signal(sig)
    return on_output


def test_sigterm_keeps_the_result_and_its_figures(session: Session,
                                                  container: Container) -> None:
    control = RunControl()
    req = ExecRequest(argv=["sh", "-c", "echo up; exec sleep 60"], env=ENV)
    r = session.run(container.exec(req, control=control,
                                   on_output=_signal_when(control, b"up\n", signal.SIGTERM)))
    assert (r.status, r.signal, r.exit_code) == (Status.SIGNALED, signal.SIGTERM, None)
    assert r.stdout == b"up\n" and control.run_id == r.id
    assert r.cpu_ms is not None and r.wall_ms > 0 and r.memory_peak_bytes is not None
    # init was not hit: the container still runs things
    assert session.exec(container, ["true"]).status == Status.OK


def test_a_signal_before_the_run_starts_is_sent_when_it_starts(session: Session,
                                                               container: Container) -> None:
    async def go() -> RunResult:
        control = RunControl()
        control.signal("SIGKILL")
        return await container.exec(ExecRequest(argv=["sleep", "60"], env=ENV),
                                    control=control)
    r = session.run(go())
    assert (r.status, r.signal) == (Status.SIGNALED, signal.SIGKILL)


def test_a_trapped_sigint_lets_the_program_exit_its_way(session: Session,
                                                        container: Container) -> None:
    control = RunControl()
    script = 'trap "echo caught; exit 7" INT; echo ready; while :; do sleep 1; done'
    r = session.run(container.exec(
        ExecRequest(argv=["sh", "-c", script], env=ENV), control=control,
        on_output=_signal_when(control, b"ready\n", signal.SIGINT)))
    assert (r.status, r.exit_code, r.signal) == (Status.NONZERO_EXIT, 7, None)
    assert r.stdout == b"ready\ncaught\n"


def test_only_the_signalled_run_is_hit(session: Session, container: Container) -> None:
    async def go() -> tuple[RunResult, RunResult]:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            # `cat` runs until its stdin closes, which happens only after the other run ended
            bystander = asyncio.ensure_future(container.exec(
                ExecRequest(argv=["cat"], env=ENV, stdin=read_end)))
            control = RunControl()
            target = await container.exec(
                ExecRequest(argv=["sh", "-c", "echo up; sleep 60"], env=ENV), control=control,
                on_output=_signal_when(control, b"up\n", signal.SIGUSR1))
            os.write(write_end, b"still here\n")
        finally:
            os.close(write_end)
            os.close(read_end)
        return target, await bystander
    target, bystander = session.run(go())
    assert (target.status, target.signal) == (Status.SIGNALED, signal.SIGUSR1)
    assert (bystander.status, bystander.stdout) == (Status.OK, b"still here\n")


@pytest.mark.parametrize("sig", ["SIGSTOP", signal.SIGSEGV, 0, 999, "TERM", True, "sigterm"])
def test_only_the_allowed_signals_may_be_sent(sig: object) -> None:
    with pytest.raises(PolicyError, match="SIGINT, SIGTERM, SIGKILL, SIGHUP, SIGQUIT, SIGUSR1, "
                                          "SIGUSR2"):
        RunControl().signal(sig)  # type: ignore[arg-type]


def test_a_control_serves_one_run_and_is_quiet_after_it(session: Session,
                                                        container: Container) -> None:
    control = RunControl()
    r = session.run(container.exec(ExecRequest(argv=["true"], env=ENV), control=control))
    assert r.status == Status.OK
    control.signal(signal.SIGTERM)  # the run is over: nothing to signal, no error
    with pytest.raises(SandboxError, match="one per exec"):
        session.run(container.exec(ExecRequest(argv=["true"], env=ENV), control=control))
