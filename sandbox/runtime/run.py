"""One exec in a container (Run): its cgroup lease, stdin and output pipes (or its
terminal), the limits' timers, why it was killed, and its result.

Limits that need a kill (wall time, CPU time, output) are enforced here through the run's
cgroup; the run's figures come from that cgroup, or from init's wait4 rusage when there is
none.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sandbox.errors import SandboxError
from sandbox.kept import KEPT
from sandbox.runtime import hostload
from sandbox.runtime.cgroups import UNLIMITED, Cgroup, CgroupLimits, CgroupStats, Lease
from sandbox.runtime.output import OutputCallback, PipeReader, drain, open_output, read_output
from sandbox.runtime.profiles import Limits, format_cpuset, host_cpus, parse_cpuset
from sandbox.runtime.pty import Terminal
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import Observed, RunResult, Status, near_limit, verdict
from sandbox.runtime.runcontrol import RunControl

if TYPE_CHECKING:
    from sandbox.runtime.container import Container, NextRun

_CPU_POLL_MIN_S = 0.005
_CPU_POLL_MAX_S = 0.1
_OUTPUTS = ((1, "stdout"), (2, "stderr"))   # a run's output descriptors, by number
# A run's output that nobody streams is watched only from this long after the exec (or read
# at its end): a run ended by then cost the event loop no wake-up for its output, and the
# most a run waits for it is this long once, should it fill a pipe (64 KiB) first.
_WATCH_OUTPUT_AFTER_S = 0.002

# What a result without cgroup figures cannot say; run `sandboxd setup` to get them.
FALLBACK_CPU = ("no cpu cgroup: the CPU limit is RLIMIT_CPU, per process and in whole "
                "seconds, and CPU time covers only the processes init reaped")
FALLBACK_MEMORY = ("no memory cgroup: peak memory is ru_maxrss, which also counts the "
                   "runtime's own pages at exec, and a memory limit (RLIMIT_AS) makes an "
                   "allocation fail rather than report memory_limit")
FALLBACK_CPUSET = ("no cpuset cgroup: the run's CPUs are only its affinity, which it may "
                   "widen with sched_setaffinity")
_HOST_CPUS = format_cpuset(host_cpus())   # the service's CPUs: a run's without a cpuset
# CPUs online, for the CPU-limit watchdog's pace: os.cpu_count() reads a sysfs file (an
# open, a read and a close) at every call, which was at every run with a CPU limit.
_NCPU = os.cpu_count() or 1
CGROUP_PSI = "psi:cgroup-v2:cpu.pressure"  # measured_by["host_load"]: the run's own waiting


# A run's limits repeat run after run (a judge's every case): what they make of them is
# made once per distinct limits (a few µs each time on a run's path), as many as Kept keeps.
@functools.lru_cache(maxsize=KEPT)
def run_cgroup_limits(limits: Limits, has: frozenset[str]) -> CgroupLimits:
    """What the cgroup enforces; the rest falls back to rlimits (see rlimits). A run
    without a cpuset gets every CPU written out, and one without a pids limit or a quota
    UNLIMITED: a recycled cgroup may come from a run that had one."""
    quota = int(limits.cpu_quota_cores * 100_000) if limits.cpu_quota_cores else UNLIMITED
    pids = UNLIMITED if limits.pids is None else limits.pids
    return CgroupLimits(memory_bytes=limits.memory_bytes if "memory" in has else None,
                        pids=pids if "pids" in has else None,
                        cpu_quota_us=quota if "cpu" in has else None,
                        cpuset_cpus=(limits.cpuset or _HOST_CPUS) if "cpuset" in has else None)


@functools.lru_cache(maxsize=KEPT)
def rlimits(limits: Limits, has: frozenset[str]) -> tuple[tuple[int, int, int], ...]:
    """The run's rlimits: backstops, and the limits no cgroup controller enforces here."""
    r: list[tuple[int, int, int]] = [(resource.RLIMIT_CORE, 0, 0)]
    if limits.cpu_ms:
        # A per-process backstop a little past the limit; the exact limit is enforced on
        # the run's cgroup (or this is all there is without one).
        secs = math.ceil(limits.cpu_ms / 1000) + (1 if "cpuacct" in has or "cpu" in has else 0)
        r.append((resource.RLIMIT_CPU, secs, secs + 1))
    for res, value in ((resource.RLIMIT_STACK, limits.stack_bytes),
                       (resource.RLIMIT_FSIZE, limits.file_size_bytes),
                       (resource.RLIMIT_NOFILE, limits.open_files),
                       (resource.RLIMIT_AS, limits.address_space_bytes)):
        if value:
            r.append((res, value, value))
    if limits.memory_bytes and "memory" not in has and not limits.address_space_bytes:
        r.append((resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes))
    if limits.pids and "pids" not in has:
        r.append((resource.RLIMIT_NPROC, limits.pids, limits.pids))
    return tuple(r)


class Run:
    """One exec, from the request to init until its result. Made by Container.exec, which
    counts it among the container's runs; it works the container's control channel and
    run cgroups (their spares) through the container's own methods."""

    def __init__(self, container: Container, run_id: int, req: ExecRequest, limits: Limits,
                 *, on_output: OutputCallback | None, reset_after: bool) -> None:
        self.container, self.id, self.req, self.limits = container, run_id, req, limits
        self.on_output, self.reset_after = on_output, reset_after
        driver = container.runtime.cgroups.driver
        self.has = driver.controllers if driver else frozenset()
        self.warnings = list(container.runtime.warnings)
        self.lease: Lease | None = None   # this run's use of its cgroup: its kills name it
        self.cgroup_limits = run_cgroup_limits(limits, self.has)
        self.readers: list[PipeReader] = []
        self.terminal: Terminal | None = None   # the pty's input side, for a run with tty
        self.over = False                        # execute() has returned or raised
        self.killed_for: Status | None = None   # the first limit enforced by a kill
        self.timers: list[asyncio.TimerHandle] = []
        self.host_load: float | None = None
        self.host_load_by = hostload.HOST

    def kill(self, reason: Status) -> None:
        if self.killed_for is None:
            self.killed_for = reason
        self.container._kill_run(self.lease, self.id)

    async def execute(self, control: RunControl | None) -> RunResult:
        c, limits = self.container, self.limits
        loop = asyncio.get_running_loop()
        t0 = time.monotonic_ns()
        finished = False          # the run ended and was measured: its cgroup may be reused
        # Descriptors to close once init has its copies: the request's own (ExecRequest.stdio)
        # among them.
        own: list[int] = list(self.req.stdio.values())
        exited = c._expect("exited", self.id)
        tty = self.req.tty
        # The cgroup init made this run's child in ahead, if the last exec gave it one.
        prepared = c._take_next()
        given: tuple[NextRun, list[int]] | None = None
        try:
            cg_fds: list[int] = []
            if prepared is not None:
                if prepared.cgroup is not None:
                    # Leased before its limits change: a failure retires it (its child too).
                    cg, applied = prepared.cgroup
                    self.lease = cg.lease()
                    if applied != self.cgroup_limits:
                        cg.apply(self.cgroup_limits)
            elif c.cgroup is not None:
                self.lease, cg_fds = c._take_run_cgroup(self.id, self.cgroup_limits)
            if tty is None:
                std_fds = self._stdio(own)
            else:
                # Init makes the run's 0-2 (a pty) and sends its master before the run's
                # end: the reader is attached when it comes.
                std_fds = []
                c._expect("pty", self.id).add_done_callback(
                    lambda got: self._open_terminal(got, control))
            mapping = c.runtime.mapping
            pressure_of, pressure = self._pressure_source()
            sent = time.monotonic_ns()
            msg: dict[str, Any] = {
                "op": "exec", "id": self.id, "argv": self.req.argv, "env": self.req.env,
                "cwd": self.req.cwd,
                "uid": mapping.run_uid if self.req.uid is None else self.req.uid,
                "gid": mapping.run_gid if self.req.gid is None else self.req.gid,
                "rlimits": rlimits(limits, self.has), "reset_after": self.reset_after,
                "cpus": self._affinity()}
            if tty is not None:
                msg["tty"] = [tty.rows, tty.cols]
            if prepared is not None:
                msg["prepared"] = True
            # After this run's reset, init makes the next run's child at once: in the
            # cgroup given for it here (the last descriptors), off that run's path.
            if self.reset_after and (given := c._give_next()) is not None:
                msg["prepare"] = len(given[1])
            try:
                c._send(msg, [*std_fds, *cg_fds, *(given[1] if given else ())])
            except BaseException:
                if given is not None:
                    c._forget_next(given[0], sent=False)
                raise
            if given is not None:
                c._next = given[0]
            for fd in own:
                os.close(fd)
            own.clear()
            if control is not None:
                # After the exec message on the same socket: init has started the child
                # (or reported why not) before it reads any signal for it.
                control._attach(f"{c.id}-{self.id}",
                                lambda signum: c._signal_run(self.id, signum))
            if not self.on_output:
                self.timers.append(loop.call_later(_WATCH_OUTPUT_AFTER_S, self._watch_output))
            # The limits' clocks start now, the child's setup in init included (init tells
            # only when the run ends, which saves a message and a wake-up per run).
            if limits.wall_ms:
                self.timers.append(loop.call_later(limits.wall_ms / 1000, self.kill,
                                                   Status.WALL_LIMIT))
            if limits.cpu_ms and self.lease is not None:
                self._watch_cpu(self.lease.cgroup, limits.cpu_ms)
            c._recycle_ended()   # while init starts the child
            done_msg = await exited
            self.host_load = hostload.share(pressure, pressure_of(),
                                            time.monotonic_ns() - sent)
            for t in self.timers:
                t.cancel()
            setup_ms = max(0.0, (int(done_msg.get("start_ns") or 0) - t0) / 1e6)
            c._counted(done_msg.get("prepared"))
            if tty is not None:  # no pty when init could not start the run
                self._forget_terminal()
            if done_msg.get("status") is None:  # init could not start the child
                if given is not None:   # nor kept the next run's cgroup
                    c._forget_next(given[0], sent=True)
                for r in self.readers:
                    r.finish()
                stats = None
            else:
                stats = await self._end()
            finished = True
        except BaseException:
            # Cancelled (a caller gave up) or failed: the run must not outlive its exec.
            with contextlib.suppress(SandboxError, OSError):
                c._kill_run(self.lease, self.id)
            for t in self.timers:
                t.cancel()
            for fd in own:
                os.close(fd)
            for reader in self.readers:
                reader.finish()
            c._waiters.pop(("exited", self.id), None)
            if tty is not None:
                self._forget_terminal()
            if not exited.done():
                exited.cancel()
            elif not exited.cancelled():
                exited.exception()  # seen: the exception being raised says it already
            raise
        finally:
            self.over = True
            if control is not None:
                control._detach()
            if self.terminal is not None:
                self.terminal.close()
            if self.lease is not None:
                # Handled at once rather than in batches: a batch of rmdirs holds the
                # kernel's cgroup lock long enough to stall the runs starting meanwhile.
                c._release(self.lease.cgroup, self.cgroup_limits, finished)
        return self._result(done_msg, stats, setup_ms)

    def _stdio(self, own: list[int]) -> list[int]:
        """The run's 0-2 for init: its stdin and the output pipes read here (or what the
        request gives instead); those to close once init has its copies go to `own`."""
        c, stdio = self.container, self.req.stdio
        if 0 in stdio:
            stdin_fd = stdio[0]
        else:
            stdin_fd = self._stdin_fd(self.req.stdin)
            if stdin_fd not in (self.req.stdin, c.runtime.devnull):
                own.append(stdin_fd)
        pipes = open_output(self.readers, self.limits.output_bytes, self.on_output,
                            lambda: self.kill(Status.OUTPUT_LIMIT),
                            tuple(name for n, name in _OUTPUTS if n not in stdio),
                            watch=bool(self.on_output))
        own += pipes
        made = iter(pipes)
        return [stdin_fd, *(stdio[n] if n in stdio else next(made) for n, _ in _OUTPUTS)]

    def _watch_output(self) -> None:
        for r in self.readers:
            r.watch()

    def _open_terminal(self, got: asyncio.Future[dict[str, Any]],
                       control: RunControl | None) -> None:
        """Init's pty event: its master is the run's stdout (stderr is merged into it by the
        terminal) and takes the run's input: `stdin` typed, then end-of-file unless a
        RunControl feeds it."""
        if got.cancelled() or got.exception() is not None:
            return
        fds = got.result().get("fds", [])
        # Init's answer can be taken in the same turn of the loop in which the run was
        # cancelled: a run that is over keeps nothing.
        for fd in fds[0 if self.over else 1:]:
            os.close(fd)
        if not fds or self.over:
            return
        self.terminal = Terminal(fds[0])
        read_output(self.readers, "stdout", fds[0], self.limits.output_bytes, self.on_output,
                    lambda: self.kill(Status.OUTPUT_LIMIT))
        if isinstance(self.req.stdin, bytes):
            self.terminal.write(self.req.stdin)
        if control is None:
            self.terminal.end_input()
        else:
            control._attach_terminal(self.terminal)

    def _forget_terminal(self) -> None:
        waiter = self.container._waiters.pop(("pty", self.id), None)
        if waiter is not None and not waiter.done():
            waiter.cancel()

    def _pressure_source(self) -> tuple[Callable[[], int | None], int | None]:
        """The run cgroup's own CPU pressure where it keeps one (v2), else the host's: what
        reads it, and its reading now (the probe is the first reading, not a read more)."""
        if self.lease is not None and (now := self.lease.cgroup.cpu_pressure_us()) is not None:
            self.host_load_by = CGROUP_PSI
            return self.lease.cgroup.cpu_pressure_us, now
        return hostload.cpu_pressure_us, hostload.cpu_pressure_us()

    def _affinity(self) -> list[int] | None:
        """The CPUs init's child sets as its affinity when no cpuset cgroup keeps the run
        on its cpuset (None: init's own, as before any run)."""
        if self.limits.cpuset is None or "cpuset" in self.has:
            return None
        self.warnings.append(FALLBACK_CPUSET)
        return sorted(parse_cpuset(self.limits.cpuset, "limits.cpuset"))

    def _stdin_fd(self, stdin: bytes | int | None) -> int:
        if isinstance(stdin, int):
            return stdin
        if stdin is None:
            return self.container.runtime.devnull
        # A memfd rather than a pipe: any size, no writer to keep alive, and seekable.
        fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
        view = memoryview(stdin)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _watch_cpu(self, cg: Cgroup, limit_ms: int) -> None:
        loop = asyncio.get_running_loop()
        ncpu = _NCPU
        limit_ns = limit_ms * 1_000_000

        def check() -> None:
            used = cg.cpu_ns() or 0
            if used >= limit_ns:
                self.kill(Status.TIME_LIMIT)
                return
            # CPU time grows at most ncpu seconds per second: no need to look sooner.
            delay = (limit_ns - used) / 1e9 / ncpu
            self.timers.append(loop.call_later(
                min(max(delay, _CPU_POLL_MIN_S), _CPU_POLL_MAX_S), check))

        self.timers.append(loop.call_later(
            min(max(limit_ms / 1000 / ncpu, _CPU_POLL_MIN_S), _CPU_POLL_MAX_S), check))

    async def _end(self) -> CgroupStats | None:
        """The run is over when its first process is: whatever it left behind goes too
        (init's own reset after the run already ends it, when asked for one); then its
        output is drained and its figures read."""
        c = self.container
        if self.lease is not None:
            if not self.lease.cgroup.is_empty():
                await asyncio.to_thread(self.lease.kill)
        elif c._active == 1 and not self.reset_after:
            # Without a cgroup, the processes a finished run left are found by killing all
            # but init, which is only right when no other run is active.
            await c.reset(remount=False)
        await drain(self.readers, self.warnings)
        return self.lease.cgroup.stats() if self.lease is not None else None

    def _result(self, msg: dict[str, Any], stats: CgroupStats | None,
                setup_ms: float) -> RunResult:
        limits, warnings = self.limits, self.warnings
        ru = msg.get("rusage") or {}
        if stats is not None and stats.cpu_total_ns is not None:
            user_ns, sys_ns, cpu_ns = stats.cpu_user_ns, stats.cpu_sys_ns, stats.cpu_total_ns
            cpu_source = stats.cpu_source
        else:
            user_ns, sys_ns = int(ru.get("utime_ns", 0)), int(ru.get("stime_ns", 0))
            cpu_ns, cpu_source = user_ns + sys_ns, "rusage"
            if limits.cpu_ms:
                warnings.append(FALLBACK_CPU)
        if stats is not None and stats.memory_peak_bytes is not None:
            peak, mem_source = stats.memory_peak_bytes, stats.memory_source
        else:
            peak, mem_source = int(ru.get("maxrss_kb", 0)) * 1024, "rusage:ru_maxrss"
            warnings.append(FALLBACK_MEMORY)
        oom = stats.oom_kills if stats is not None else 0
        status, code, sig = verdict(Observed(
            wait_status=msg.get("status"), killed_for=self.killed_for,
            cpu_ns=cpu_ns, cpu_limit_ms=limits.cpu_ms, oom_kills=oom,
            exec_error=msg.get("error")))
        error = msg.get("error")
        wall_ns = max(0, int(msg.get("end_ns", 0)) - int(msg.get("start_ns", 0)))
        # An output given to another run (ExecRequest.stdio) has no reader here: empty.
        got = {r.name: r for r in self.readers}
        out, err = got.get("stdout"), got.get("stderr")
        return RunResult(
            id=f"{self.container.id}-{self.id}", status=status, exit_code=code, signal=sig,
            stdout=bytes(out.buf) if out else b"", stderr=bytes(err.buf) if err else b"",
            stdout_truncated=bool(out and out.truncated),
            stderr_truncated=bool(err and err.truncated),
            cpu_ms=None if cpu_ns is None else cpu_ns / 1e6,
            user_ms=None if user_ns is None else user_ns / 1e6,
            sys_ms=None if sys_ns is None else sys_ns / 1e6,
            wall_ms=wall_ns / 1e6, memory_peak_bytes=peak, setup_ms=setup_ms,
            measured_by={"cpu": cpu_source, "memory": mem_source, "wall": "init:CLOCK_MONOTONIC",
                         "host_load": None if self.host_load is None else self.host_load_by},
            oom_killed=oom > 0, error=error.split(":", 1)[1] if error else None,
            warnings=warnings, cpus=limits.cpuset or _HOST_CPUS, host_load=self.host_load,
            near_limit=near_limit(None if cpu_ns is None else cpu_ns / 1e6, limits.cpu_ms,
                                  wall_ns / 1e6, limits.wall_ms))
