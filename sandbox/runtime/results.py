"""What one run produced and cost, and the verdict drawn from it."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from enum import StrEnum


class Status(StrEnum):
    OK = "ok"
    NONZERO_EXIT = "nonzero_exit"
    SIGNALED = "signaled"
    TIME_LIMIT = "time_limit"          # CPU time
    WALL_LIMIT = "wall_limit"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    SYSCALL_BLOCKED = "syscall_blocked"
    INTERNAL_ERROR = "internal_error"


@dataclass
class RunResult:
    id: str
    status: Status
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    cpu_ms: float | None               # user + sys of every process of the run
    user_ms: float | None
    sys_ms: float | None
    wall_ms: float                     # init's clock: just before the child is made to reap
    memory_peak_bytes: int | None
    setup_ms: float                    # the exec call until init starts making the child
    measured_by: dict[str, str | None]
    oom_killed: bool = False
    error: str | None = None            # why an exec failed before the program ran
    warnings: list[str] = field(default_factory=list)
    # How far its times can be trusted (see "Trusted timing" in docs/architecture.md):
    cpus: str | None = None             # the CPUs it was confined to, e.g. "1"
    host_load: float | None = None      # share of its window it (v2) or the host waited for CPU
    dedicated_cpu: bool = False         # a reserved CPU of its own, kept by its cpuset
    near_limit: bool = False            # cpu_ms or wall_ms in the last 10 % of its limit


@dataclass(frozen=True)
class Observed:
    """Everything the verdict is drawn from."""

    wait_status: int | None            # None when the run never started
    killed_for: Status | None          # the first limit the host enforced by killing
    cpu_ns: int | None
    cpu_limit_ms: int | None
    oom_kills: int
    exec_error: str | None             # "<code>:<stage>: <message>" from init's child


NEAR_LIMIT = 0.1   # a time this close to its limit may go either way on a rerun


def near_limit(cpu_ms: float | None, cpu_limit_ms: int | None, wall_ms: float,
               wall_limit_ms: int | None) -> bool:
    """Whether a time reached the last 10 % of its limit. A run killed at its limit is
    there too, whatever the watchdog's delay added: what it would have needed is unknown."""
    return any(t is not None and limit and t >= (1 - NEAR_LIMIT) * limit
               for t, limit in ((cpu_ms, cpu_limit_ms), (wall_ms, wall_limit_ms)))


def decode_wait(status: int) -> tuple[int | None, int | None]:
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


def verdict(o: Observed) -> tuple[Status, int | None, int | None]:
    """(status, exit_code, signal). The first limit enforced wins; then what the kernel did."""
    if o.wait_status is None:
        return Status.INTERNAL_ERROR, None, None
    code, sig = decode_wait(o.wait_status)
    if o.exec_error and o.exec_error.startswith("125:"):
        return Status.INTERNAL_ERROR, code, sig
    if o.killed_for is not None:
        return o.killed_for, code, sig
    if o.cpu_limit_ms is not None and o.cpu_ns is not None and o.cpu_ns >= o.cpu_limit_ms * 1e6:
        return Status.TIME_LIMIT, code, sig
    if sig == signal.SIGXCPU:
        return Status.TIME_LIMIT, code, sig
    if o.oom_kills > 0:
        return Status.MEMORY_LIMIT, code, sig
    if sig == signal.SIGSYS:
        return Status.SYSCALL_BLOCKED, code, sig
    if sig == signal.SIGXFSZ:
        return Status.OUTPUT_LIMIT, code, sig
    if sig is not None:
        return Status.SIGNALED, code, sig
    if code:
        return Status.NONZERO_EXIT, code, sig
    return Status.OK, code, sig
