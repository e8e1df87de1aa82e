"""Signals a caller sends a run while its exec is awaited: which ones it may send, and the
RunControl that carries them to the run (and, to a run with a terminal, its input and
size)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

from sandbox.errors import PolicyError, SandboxError
from sandbox.runtime.pty import Terminal, TtySize

# Input for a terminal the run has not opened yet held before writers must wait.
_PENDING_INPUT = 64 << 10

# Signals a caller may send a running exec: the ones a terminal or a supervisor sends. Others
# (SIGSTOP, SIGSEGV, real-time ones...) would stop a run with no way to resume it, or fake a
# crash the verdict would misread.
ALLOWED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGHUP, signal.SIGQUIT,
                   signal.SIGUSR1, signal.SIGUSR2)


def allowed_signal(sig: int | str) -> signal.Signals:
    """`sig` (a number or a name such as "SIGTERM") if a caller may send it to a run."""
    found: signal.Signals | None = None
    if isinstance(sig, str):
        found = signal.Signals.__members__.get(sig)
    elif isinstance(sig, int) and not isinstance(sig, bool):
        with contextlib.suppress(ValueError):
            found = signal.Signals(sig)
    if found is None or found not in ALLOWED_SIGNALS:
        names = ", ".join(s.name for s in ALLOWED_SIGNALS)
        raise PolicyError(f"signal: {sig!r} may not be sent to a run; use one of {names}")
    return found


class RunControl:
    """Signals one run while its exec is awaited; the exec still returns the run's result.

    Made by the caller and passed to Container.exec, which attaches the run to it. A signal
    given before the run has started is sent as soon as it starts; one given after it ended
    goes nowhere. Only the run's processes are signalled (its process group, through init).
    The same holds for a terminal's input, end of input and size (`write`, `end_input`,
    `resize`), which reach a run with `tty` and go nowhere for one without.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None     # the RunResult's id, once the run has started
        self._send: Callable[[int], None] | None = None
        self._pending: list[int] = []
        self._used = False
        self._ended = False
        self._terminal: Terminal | None = None
        self._to_terminal: list[Callable[[Terminal], None]] = []
        self._held = 0                      # bytes of input in _to_terminal
        self._opened: asyncio.Future[None] | None = None

    def signal(self, sig: int | str) -> None:
        """Send `sig` (one of ALLOWED_SIGNALS, by number or name) to the run's processes."""
        signum = int(allowed_signal(sig))
        if self._ended:
            return
        if self._send is None:
            self._pending.append(signum)
        else:
            self._send(signum)

    def write(self, data: bytes) -> None:
        """Input for the run's terminal, as typed (a run with `tty`)."""
        if self._terminal is not None:
            self._terminal.write(data)
        elif not self._ended:
            self._held += len(data)
            self._to_terminal.append(lambda t: t.write(data))

    def end_input(self) -> None:
        """The terminal's end-of-file character (see Terminal.end_input)."""
        self._to_terminal_or_later(Terminal.end_input)

    def resize(self, size: TtySize) -> None:
        """The terminal's new size: the run's foreground processes get SIGWINCH."""
        self._to_terminal_or_later(lambda t: t.resize(size))

    @property
    def input_full(self) -> asyncio.Future[None] | None:
        """While set, the run is not taking its terminal's input: wait before writing."""
        if self._terminal is not None:
            return self._terminal.full
        if self._held > _PENDING_INPUT and not self._ended:
            if self._opened is None:
                self._opened = asyncio.get_running_loop().create_future()
            return self._opened
        return None

    def _to_terminal_or_later(self, op: Callable[[Terminal], None]) -> None:
        if self._terminal is not None:
            op(self._terminal)
        elif not self._ended:
            self._to_terminal.append(op)

    def _attach_terminal(self, terminal: Terminal) -> None:
        self._terminal = terminal
        ops, self._to_terminal, self._held = self._to_terminal, [], 0
        for op in ops:
            op(terminal)
        self._wake()

    def _wake(self) -> None:
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(None)
        self._opened = None

    def _claim(self) -> None:
        if self._used:
            raise SandboxError("this RunControl already served a run; make one per exec")
        self._used = True

    def _attach(self, run_id: str, send: Callable[[int], None]) -> None:
        self.run_id, self._send = run_id, send
        pending, self._pending = self._pending, []
        for signum in pending:
            send(signum)

    def _detach(self) -> None:
        self._send, self._ended, self._terminal = None, True, None
        self._to_terminal.clear()
        self._wake()
