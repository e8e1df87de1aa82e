"""Runs with a terminal (ExecRequest.tty) against the real kernel: a pty of the container's
own devpts instance as the run's 0-2, its size and resize, the output limit on a flood, the
end of input, and nothing of it left once the run is over."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from sandbox.runtime.container import Container
from sandbox.runtime.profiles import Limits
from sandbox.runtime.pty import TtySize
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import RunResult, Status
from sandbox.runtime.runcontrol import RunControl
from tests.conftest import Session

ENV = {"PATH": "/bin"}


def tty_run(session: Session, c: Container, script: str, *, stdin: bytes | None = None,
            size: TtySize | None = None, **limits: object) -> RunResult:
    req = ExecRequest(argv=["sh", "-c", script], env=ENV, stdin=stdin, tty=size or TtySize(),
                      limits=Limits(**limits) if limits else None)  # type: ignore[arg-type]
    return session.run(c.exec(req))


async def interact(c: Container, argv: list[str], steps: list[tuple[bytes, object]],
                   wall_ms: int = 10_000) -> tuple[RunResult, bytes]:
    """Run `argv` on a terminal; for each (wait_for, action) wait until the output holds
    `wait_for` past the previous step's match, then write bytes, resize to a TtySize, or
    end the input (None)."""
    out = bytearray()
    seen = asyncio.Event()

    def on_output(name: str, data: bytes) -> None:
        out.extend(data)
        seen.set()

    control = RunControl()
    task = asyncio.ensure_future(c.exec(
        ExecRequest(argv=argv, env=ENV, tty=TtySize(), limits=Limits(wall_ms=wall_ms)),
        on_output=on_output, control=control))
    at = 0
    for wait_for, action in steps:
        while (found := out.find(wait_for, at)) < 0 and not task.done():
            seen.clear()
            await asyncio.wait([asyncio.ensure_future(seen.wait()), task],
                               return_when=asyncio.FIRST_COMPLETED)
        at = found + len(wait_for)
        if isinstance(action, TtySize):
            control.resize(action)
        elif action is None:
            control.end_input()
        else:
            assert isinstance(action, bytes)
            control.write(action)
    return await task, bytes(out)


def test_the_run_has_a_terminal_of_its_size(session: Session, container: Container) -> None:
    r = tty_run(session, container, "test -t 0 && test -t 1 && test -t 2 && echo T; "
                "stty size; tty; echo err >&2", size=TtySize(30, 100))
    assert r.status == Status.OK, r
    # Output as a terminal gives it: CRLF line ends, stderr merged into stdout.
    assert r.stdout == b"T\r\n30 100\r\n/dev/pts/0\r\nerr\r\n"
    assert r.stderr == b""


def test_without_tty_nothing_is_a_terminal(session: Session, container: Container) -> None:
    r = session.exec(container, ["sh", "-c", "test -t 0 || test -t 1 || echo none; ls /dev/pts"])
    assert r.stdout == b"none\nptmx\n"


def test_stdin_is_typed_then_end_of_file(session: Session, container: Container) -> None:
    r = tty_run(session, container, "cat; echo done:$?", stdin=b"hello\n")
    assert r.status == Status.OK
    # The terminal echoes what is typed; cat prints the line; ^D ends its input.
    assert r.stdout == b"hello\r\nhello\r\ndone:0\r\n"


def test_a_shell_sets_its_terminal(session: Session, container: Container) -> None:
    # What a shell on a terminal does (TCGETS/TCSETS, TIOCGWINSZ) passes the policy.
    r = tty_run(session, container, "stty -echo raw && stty -g >/dev/null && stty sane "
                "&& echo ok")
    assert (r.status, r.stdout) == (Status.OK, b"ok\r\n")


def test_resize_sends_sigwinch(session: Session, container: Container) -> None:
    script = "trap 'stty size; exit 4' WINCH; echo ready; while :; do sleep 0.05; done"
    r, out = session.run(interact(container, ["sh", "-c", script],
                                  [(b"ready", TtySize(40, 120))]))
    assert (r.status, r.exit_code) == (Status.NONZERO_EXIT, 4), out
    assert out.endswith(b"40 120\r\n")


def test_typed_commands_ctrl_c_and_exit_code(session: Session, container: Container) -> None:
    # Each step waits for what only the program prints (the terminal echoes what is typed
    # as soon as it is typed): the marker comes from the process that is in the foreground.
    r, out = session.run(interact(container, ["sh"], [
        (b"$ ", b"echo h''i\n"), (b"hi\r\n", b"sh -c 'echo sl\"\"eeping; exec sleep 100'\n"),
        (b"sleeping\r\n", b"\x03"), (b"$ ", b"exit 3\n")]))
    assert (r.status, r.exit_code) == (Status.NONZERO_EXIT, 3), out
    assert b"hi\r\n" in out and b"^C" in out


def test_end_of_input_on_a_terminal(session: Session, container: Container) -> None:
    r, out = session.run(interact(container, ["sh", "-c", "echo go; cat; echo done:$?"],
                                  [(b"go\r\n", b"line\n"), (b"line\r\nline\r\n", None)]))
    assert (r.status, out) == (Status.OK, b"go\r\nline\r\nline\r\ndone:0\r\n"), out


def test_input_given_before_the_terminal_exists(session: Session,
                                               container: Container) -> None:
    # Written as the exec starts, before init has made the pty: held, then typed.
    r, out = session.run(interact(container, ["cat"], [(b"", b"early\n"),
                                                       (b"early\r\nearly\r\n", None)]))
    assert (r.status, out) == (Status.OK, b"early\r\nearly\r\n"), out


def test_ctrl_c_reaches_the_foreground_program(session: Session, container: Container) -> None:
    r, out = session.run(interact(container, ["sh", "-c", "echo go; exec sleep 100"],
                                  [(b"go", b"\x03")]))
    assert (r.status, r.signal) == (Status.SIGNALED, signal.SIGINT), out


def test_output_limit_on_a_terminal_flood(session: Session, container: Container) -> None:
    r = tty_run(session, container, "yes", output_bytes=100_000)
    assert r.status == Status.OUTPUT_LIMIT
    assert len(r.stdout) == 100_000 and r.stdout_truncated
    assert r.stdout.startswith(b"y\r\ny\r\n")


def masters() -> list[str]:
    """This process's descriptors of a pty master (of any devpts instance)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own descriptor, closed
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [link for link in links if link.endswith("ptmx")]


def test_nothing_of_a_terminal_is_left(session: Session, container: Container) -> None:
    before = masters()
    # A process that keeps the pty open past the run's end, and one that is its own
    # session holding it by path.
    r = tty_run(session, container, "sleep 1000 & setsid sleep 1000 </dev/pts/0 & echo up")
    assert r.status == Status.OK and r.stdout == b"up\r\n"
    assert masters() == before  # the master is closed
    r = session.exec(container, ["sh", "-c", "ls /dev/pts; ps -o args | grep -c '^sleep'"])
    assert r.stdout == b"ptmx\n0\n"


def test_the_next_run_has_its_own_first_pty(session: Session, container: Container) -> None:
    for _ in range(2):
        r = tty_run(session, container, "tty; ls /dev/pts")
        assert r.stdout == b"/dev/pts/0\r\n0     ptmx\r\n" or r.stdout.split() == [
            b"/dev/pts/0", b"0", b"ptmx"], r.stdout


def test_a_program_that_is_missing(session: Session, container: Container) -> None:
    r = session.run(container.exec(ExecRequest(argv=["/no/such"], env=ENV, tty=TtySize())))
    assert (r.status, r.exit_code) == (Status.NONZERO_EXIT, 127)
    assert r.error and "No such file" in r.error
