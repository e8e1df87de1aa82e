"""Small helpers for the throwaway servers the tests and benchmarks start: a free port, a
child that dies with its parent, and stopping one."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess

PR_SET_PDEATHSIG = 1


def free_port(address: str = "127.0.0.1") -> int:
    """A port free on `address` now; another program may take it before the caller binds
    it, so callers retry or fail saying so."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """As a Popen preexec_fn: the child gets SIGTERM when its parent dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
