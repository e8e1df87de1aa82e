"""Signals a caller sends a run while its exec is awaited: which ones it may send, and the
RunControl that carries them to the run."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable

from sandbox.errors import PolicyError, SandboxError

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
    """

    def __init__(self) -> None:
        self.run_id: str | None = None     # the RunResult's id, once the run has started
        self._send: Callable[[int], None] | None = None
        self._pending: list[int] = []
        self._used = False
        self._ended = False

    def signal(self, sig: int | str) -> None:
        """Send `sig` (one of ALLOWED_SIGNALS, by number or name) to the run's processes."""
        signum = int(allowed_signal(sig))
        if self._ended:
            return
        if self._send is None:
            self._pending.append(signum)
        else:
            self._send(signum)

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
        self._send, self._ended = None, True
