"""The host side of containers: the Runtime (spawner, id map, cgroups, compiled policies)
and Container (exec, reset, destroy), on asyncio.

Output pipes belong to this process and are read by its event loop as bytes arrive, so the
output limit is exact and the partial output is kept. Limits that need a kill (wall time,
CPU time, output) are enforced here through the run's cgroup; the run's figures come from
that cgroup, or from init's wait4 rusage when there is none.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import math
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sandbox.errors import ContainerGoneError, PolicyError, RuntimeSetupError, SandboxError
from sandbox.runtime import idmap, protocol, seccomp
from sandbox.runtime.cgroups import Cgroup, CgroupLimits, CgroupStats, Detection, Lease, detect
from sandbox.runtime.profiles import HOST_NETWORK, UNCONFINED, Limits, Profile, load_profile
from sandbox.runtime.protocol import Entry
from sandbox.runtime.results import Observed, RunResult, Status, verdict
from sandbox.runtime.rootfs import RootfsSpec, Tmpfs
from sandbox.runtime.rootfs import plan as mount_plan

# Called with each chunk of a run's output as it is read. An awaitable answered means "no
# more for now": that pipe is not read again until it completes, so the run blocks writing
# to its full pipe (its wall limit keeps running): a slow consumer slows its own run.
OutputCallback = Callable[[str, bytes], Awaitable[object] | None]


class Streamed:
    """An output callback that takes the output for good (e.g. to a client's stream): the
    run's result then holds none of it (stdout and stderr empty; the truncation flags still
    tell), so a streamed run's output is not also kept in memory until it ends."""

    def __init__(self, callback: OutputCallback) -> None:
        self.callback = callback

    def __call__(self, name: str, data: bytes) -> Awaitable[object] | None:
        return self.callback(name, data)


_CPU_POLL_MIN_S = 0.005
_CPU_POLL_MAX_S = 0.1
_DRAIN_TIMEOUT_S = 2.0
_SPARES = 2
_EXIT_WAIT_S = 2.0  # for init to end after SIGKILL; a task stuck in the kernel may take long


@dataclass(frozen=True)
class ContainerSpec:
    """A container: its layers (lowest first; one directory = a plain root) and profile."""

    layers: tuple[str, ...]
    profile: str = "default"
    writable: bool | None = None     # None: as the profile says
    hostname: str = "sandbox"


@dataclass(frozen=True)
class ExecRequest:
    argv: list[str]
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    cwd: str = "/"
    stdin: bytes | int | None = None   # bytes, a readable fd (not consumed), or /dev/null
    limits: Limits | None = None
    uid: int | None = None             # inside the container; default: the mapping's run id
    gid: int | None = None


# What a result without cgroup figures cannot say; run `sandboxd setup` to get them.
FALLBACK_CPU = ("no cpu cgroup: the CPU limit is RLIMIT_CPU, per process and in whole "
                "seconds, and CPU time covers only the processes init reaped")
FALLBACK_MEMORY = ("no memory cgroup: peak memory is ru_maxrss, which also counts the "
                   "runtime's own pages at exec, and a memory limit (RLIMIT_AS) makes an "
                   "allocation fail rather than report memory_limit")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _cgroup_limits(limits: Limits, has: frozenset[str]) -> CgroupLimits:
    """What the cgroup enforces; the rest falls back to rlimits (see Container._rlimits)."""
    quota = int(limits.cpu_quota_cores * 100_000) if limits.cpu_quota_cores else None
    return CgroupLimits(memory_bytes=limits.memory_bytes if "memory" in has else None,
                        pids=limits.pids if "pids" in has else None,
                        cpu_quota_us=quota if "cpu" in has else None,
                        cpuset_cpus=limits.cpuset if "cpuset" in has else None)


# What a container's cgroup holds besides its runs: init (~2 MiB charged, measured), the
# kernel's objects for its namespaces and mounts, and headroom; the vfork child of each exec
# counts in init's cgroup until it joins its run's.
CONTAINER_OVERHEAD_BYTES = 32 << 20
CONTAINER_OVERHEAD_PIDS = 8


def container_limits(profile: Profile, spec: RootfsSpec, has: frozenset[str]) -> CgroupLimits:
    """The container's own cgroup limits, so that what is charged to it outside its runs'
    cgroups is bounded too: what a run wrote to a tmpfs, and the inodes of its files (even
    empty ones, which no size limit counts), stay charged to the container once the run's
    memory cgroup is renewed or removed, and a session's /tmp keeps them from run to run.
    Room for one run at the profile's maximum, every tmpfs of the container full, and
    init: a session's runs at once share it. Where the profile sets no maximum for runs,
    the container has none either."""
    run_memory, run_pids = profile.maxima.memory_bytes, profile.maxima.pids
    mounts = sum(op.size for op in mount_plan(spec, list(spec.layers)).ops
                 if isinstance(op, Tmpfs))
    return CgroupLimits(
        memory_bytes=(run_memory + mounts + CONTAINER_OVERHEAD_BYTES
                      if run_memory and "memory" in has else None),
        pids=run_pids + CONTAINER_OVERHEAD_PIDS if run_pids and "pids" in has else None)


# The kernel's own bounds (MAX_ARG_STRLEN; ARG_MAX on a default 8 MiB stack is 2 MiB): a
# request past them would only fail at execve, so it is refused before anything is made.
MAX_ARG_BYTES = 128 << 10
MAX_ARGV_ENV_BYTES = 1 << 20


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


def _validate(req: ExecRequest, mapping: idmap.IdMapping) -> None:
    if not req.argv or not all(isinstance(a, str) for a in req.argv):
        raise PolicyError("argv: give at least the program, as a list of strings")
    if any("\0" in a for a in req.argv):
        raise PolicyError("argv: an argument contains a NUL byte")
    for k, v in req.env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise PolicyError("env: names and values must be strings")
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise PolicyError(f"env: {k!r} is not a valid variable (no '=', no NUL, not empty)")
    strings = [a.encode() for a in req.argv] + [f"{k}={v}".encode() for k, v in req.env.items()]
    if any(len(b) > MAX_ARG_BYTES for b in strings):
        raise PolicyError(f"argv/env: one string is over {MAX_ARG_BYTES} bytes; pass large "
                          "data through stdin or a file")
    if sum(len(b) + 1 for b in strings) > MAX_ARGV_ENV_BYTES:
        raise PolicyError(f"argv/env: over {MAX_ARGV_ENV_BYTES} bytes in all; pass large "
                          "data through stdin or a file")
    if not req.cwd.startswith("/") or "\0" in req.cwd:
        raise PolicyError("cwd: must be an absolute path inside the container")
    for name, value in (("uid", req.uid), ("gid", req.gid)):
        if value is not None:
            mapping.check_run_id(name, value)


class _Reader:
    """Collects one output pipe, up to a cap, as the event loop sees data, and pauses while
    the consumer asks it to (see OutputCallback)."""

    def __init__(self, name: str, fd: int, cap: int | None, on_data: OutputCallback | None,
                 on_overflow: Callable[[], None], done: asyncio.Future[None]) -> None:
        self.name, self.fd, self.cap = name, fd, cap
        self.buf = bytearray()
        self.size = 0    # bytes read (the cap counts these; `buf` may keep none)
        self.truncated = False
        self.on_data, self.on_overflow, self.done = on_data, on_overflow, done
        self._keep = not isinstance(on_data, Streamed)
        self._paused = False
        self._free = 0   # bytes that may be read whatever the consumer says

    def readable(self) -> None:
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.finish()
            return
        if self.cap is not None and self.size + len(chunk) > self.cap:
            chunk = chunk[: self.cap - self.size]
            self.truncated = True
        if chunk:
            self.size += len(chunk)
            if self._keep:
                self.buf += chunk
            if self.on_data:
                wait = self.on_data(self.name, chunk)
                if wait is not None:
                    self._hold(wait, len(chunk))
        if self.truncated:
            self.on_overflow()
            self.finish()

    def _hold(self, wait: Awaitable[object], size: int) -> None:
        later = asyncio.ensure_future(wait)
        if later.done() or self.done.done():
            return
        if self._free >= size:
            self._free -= size
            return
        self._paused = True
        asyncio.get_running_loop().remove_reader(self.fd)
        later.add_done_callback(lambda _: self._resume())

    def _resume(self) -> None:
        if self._paused and not self.done.done():
            self._paused = False
            asyncio.get_running_loop().add_reader(self.fd, self.readable)

    def writers_gone(self) -> None:
        """The run is over: what its pipe still holds (at most the pipe's size) is read to
        EOF whatever the consumer says, so a slow one still gets the end of the output."""
        if not self.done.done():
            self._free = fcntl.fcntl(self.fd, fcntl.F_GETPIPE_SZ)
            self._resume()

    def finish(self) -> None:
        if not self.done.done():
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.done.set_result(None)


class Runtime:
    """One per service: the spawner process, the id map, cgroups, compiled policies."""

    def __init__(self, spawner: subprocess.Popen[bytes], sock: socket.socket,
                 mapping: idmap.IdMapping, cgroups: Detection) -> None:
        self._spawner, self._sock = spawner, sock
        self.mapping, self.cgroups = mapping, cgroups
        self._lock = asyncio.Lock()
        self._programs: dict[str, seccomp.SeccompProgram] = {}
        self._profiles: dict[str, Profile] = {}
        self.containers: dict[str, Container] = {}
        self._undoing: set[asyncio.Task[None]] = set()  # creations cancelled by callers
        # The stdin of every run without one: init receives its own copy with each run.
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    _end_spawner: weakref.finalize  # set by start(): see _end_spawner()

    @classmethod
    async def start(cls, *, mapping: idmap.IdMapping | None = None,
                    cgroups: Detection | None = None) -> Runtime:
        mapping = mapping or idmap.plan()
        cgroups = cgroups if cgroups is not None else detect()
        ours, theirs = protocol.socketpair()
        # The spawner is exec'd fresh (not forked from this threaded process).
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox.runtime.spawner", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            cwd=str(Path(__file__).resolve().parents[2]))
        theirs.close()
        runtime = cls(proc, ours, mapping, cgroups)
        # close() ends and reaps the spawner; so does this if the owner never calls it (an
        # engine that failed to start), when the runtime is collected or at exit. A spawner
        # outliving this process dies of PDEATHSIG, a zombie for pid 1 with its inits.
        runtime._end_spawner = weakref.finalize(runtime, _end_spawner, proc, ours)
        return runtime

    def register_profile(self, profile: Profile) -> None:
        """Add (or replace) a profile beside the built-in ones, e.g. from the config."""
        self._profiles[profile.name] = profile

    def profile(self, name: str) -> Profile:
        if name not in self._profiles:
            self._profiles[name] = load_profile(name)
        return self._profiles[name]

    def program(self, name: str) -> seccomp.SeccompProgram:
        """Each policy is compiled once; children load the ready BPF (none: unconfined)."""
        if name not in self._programs:
            # Runs that share init's id (a single-id map) must not reach init's limits and
            # scheduling through the calls that name another process.
            self._programs[name] = (
                seccomp.SeccompProgram(name, b"", ()) if name == UNCONFINED else
                seccomp.compile_profile(
                    seccomp.load_profile(seccomp.builtin_profile_path(name), name=name),
                    own_process_only=self.mapping.shares_init_id))
        return self._programs[name]

    @property
    def warnings(self) -> list[str]:
        return list(self.cgroups.warnings)

    async def _ask_spawner(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any],
                                                                               list[int]]:
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                protocol.send(self._sock, req, fds)
            except OSError as e:
                raise RuntimeSetupError(f"the spawner process died ({e.strerror}); "
                                        "restart the runtime") from e
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self._sock, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(self._sock)
            got = protocol.recv(self._sock)
        if got is None:
            raise RuntimeSetupError("the spawner process died; restart the runtime")
        return got

    async def create_container(self, spec: ContainerSpec) -> Container:
        """A new container, ready for execs. Cancelling the caller does not cut the
        exchange with the spawner short (its reply would be read by the next request):
        the creation completes in the background and the container is destroyed."""
        task = asyncio.ensure_future(self._create(spec))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            undo = asyncio.ensure_future(self._undo_create(task))
            self._undoing.add(undo)
            undo.add_done_callback(self._undoing.discard)
            raise

    @staticmethod
    async def _undo_create(task: asyncio.Task[Container]) -> None:
        try:
            container = await task
        except Exception:
            return  # it failed on its own; nobody is left to tell
        await container.destroy()

    async def _create(self, spec: ContainerSpec) -> Container:
        started = time.monotonic()
        profile = self.profile(spec.profile)
        program = self.program(profile.seccomp)
        for layer in spec.layers:
            if not Path(layer).is_dir():
                raise RuntimeSetupError(f"layer {layer!r} is not a directory")
        shape = profile.rootfs
        rootfs = RootfsSpec(
            layers=tuple(str(Path(p).resolve()) for p in spec.layers),
            writable=shape.writable if spec.writable is None else spec.writable,
            upper_size=shape.upper_size, tmpfs=shape.tmpfs, sys=shape.sys)
        cid = secrets.token_hex(6)
        cgroup: Cgroup | None = None
        fds: list[int] = []
        n_container = 0
        try:
            if self.cgroups.driver is not None:
                cgroup = self.cgroups.driver.create(f"c-{cid}")
                cgroup.apply(container_limits(profile, rootfs, self.cgroups.driver.controllers))
                fds = cgroup.open_procs_fds()
                n_container = len(fds)
                # The helper joins the container's cgroup (rooting the cgroup namespace
                # there) and init moves on to this leaf; on v2 the container's cgroup hands
                # controllers down only later, to runs, once no process is left in it.
                fds += cgroup.child("init", limitable=False).open_procs_fds()
            reply, got = await self._ask_spawner(
                {"op": "create", "id": cid, "rootfs": asdict(rootfs),
                 "mapping": self.mapping.describe(), "seccomp_bpf": program.bpf,
                 "host_network": profile.network == HOST_NETWORK,
                 "hostname": spec.hostname, "container_cgroup_fds": n_container}, fds)
        except BaseException:
            if cgroup is not None:
                cgroup.destroy()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        if not reply.get("ok") or len(got) != 1:
            for fd in got:
                os.close(fd)
            if cgroup is not None:
                cgroup.destroy()
            raise RuntimeSetupError(f"container setup failed: {reply.get('error')}")
        container = Container(self, cid, int(reply["pid"]), socket.socket(fileno=got[0]),
                              profile, rootfs, cgroup)
        try:
            await container._wait_ready()
        except BaseException:
            await container.destroy()
            raise
        container.setup_ms = (time.monotonic() - started) * 1000
        self.containers[cid] = container
        if cgroup is not None:  # the first run's cgroup, made while the container waits
            container._chore(lambda: container._make_spares(1))
        return container

    async def close(self) -> None:
        try:
            while self._undoing:
                await asyncio.gather(*self._undoing, return_exceptions=True)
            for c in list(self.containers.values()):
                await c.destroy()
        finally:
            # Whatever failed above: the spawner kills what is left and exits, reaped here.
            await asyncio.to_thread(self._end_spawner)
        if self.cgroups.driver is not None:
            self.cgroups.driver.close()
        os.close(self.devnull)


_SPAWNER_EXIT_S = 10.0


def _end_spawner(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    """Close the spawner's socket (it then kills its containers' inits, reaps them and
    exits) and reap it; killed if it takes longer than _SPAWNER_EXIT_S."""
    sock.close()
    try:
        proc.wait(_SPAWNER_EXIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Container:
    """A running container: an init waiting on its control socket."""

    def __init__(self, runtime: Runtime, cid: str, pid: int, ctl: socket.socket,
                 profile: Profile, rootfs: RootfsSpec, cgroup: Cgroup | None) -> None:
        self.runtime, self.id, self.pid, self.profile = runtime, cid, pid, profile
        self.rootfs, self.cgroup = rootfs, cgroup
        self.setup_ms = 0.0
        self.alive = True
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            # Init failed during setup and the spawner reaped it already: its reason is
            # waiting on the control socket, and _wait_ready reports it.
            self._pidfd = -1
        self._ctl = ctl
        self._ids = itertools.count(1)
        self._waiters: dict[tuple[str, int], asyncio.Future[dict[str, Any]]] = {}
        self._active = 0
        self._runs = 0
        # The next runs' cgroups are ready (the profile's default limits applied) before
        # anyone waits, two ahead so that back-to-back runs always find one: a finished
        # run's is reset and kept when it can be, else removed and a new one made, in a
        # worker thread after the run.
        self._spares: list[tuple[Cgroup, CgroupLimits, list[int]]] = []
        self._chores: set[asyncio.Future[None]] = set()
        self._spares_lock = threading.Lock()  # one chore at a time makes new ones
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(ctl, self._on_message)

    @property
    def reusable(self) -> bool:
        """A read-only root can be reset and reused; a writable one is used once."""
        return not self.rootfs.writable

    def _on_message(self) -> None:
        try:
            got = protocol.recv(self._ctl)
        except (protocol.ProtocolError, OSError):
            got = None
        if got is None:
            self._gone("the container's init exited")
            return
        msg, fds = got
        ev = msg.get("ev")
        if ev == "opened":
            msg["fds"] = fds
        else:
            for fd in fds:  # only an "opened" reply carries a descriptor; drop any other
                os.close(fd)
        if ev in ("ready", "error"):
            if not self._ready.done():
                self._ready.set_result(msg)
            return
        key = (str(ev), msg.get("id", 0) if ev != "reset" else 0)
        waiter = self._waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)
        elif ev == "reset" and msg.get("error"):
            # The reset init does by itself after a run (exec's reset_after) failed.
            self._gone(f"its reset after a run failed ({msg['error']})")
        else:
            for fd in msg.get("fds", ()):
                os.close(fd)

    def _gone(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        asyncio.get_running_loop().remove_reader(self._ctl)
        err = ContainerGoneError(f"container {self.id}: {why}")
        if not self._ready.done():
            self._ready.set_exception(err)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(err)
        self._waiters.clear()

    async def _wait_ready(self) -> None:
        msg = await self._ready
        if msg.get("ev") != "ready":
            raise RuntimeSetupError(str(msg.get("message")))

    def _expect(self, ev: str, run_id: int = 0) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[(ev, run_id)] = fut
        return fut

    def _send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        if self.alive:
            try:
                protocol.send(self._ctl, msg, fds or [])
                return
            except (BrokenPipeError, ConnectionResetError) as e:
                # init died before its end of the socket was seen
                self._gone(f"its init is gone ({e.strerror})")
        raise ContainerGoneError(f"container {self.id} is gone; create a new one")

    def _rlimits(self, limits: Limits, has: frozenset[str]) -> list[tuple[int, int, int]]:
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
        return r

    async def exec(self, req: ExecRequest, *, on_output: OutputCallback | None = None,
                   control: RunControl | None = None, reset_after: bool = False) -> RunResult:
        """Run one command to its end and return its result; many may run at once. With
        `control`, the caller may signal the run meanwhile (see RunControl). With
        `reset_after` (the only run at the time), init resets the container as the run
        ends, before it reads another request: the container can be given its next run at
        once. If that reset fails, the container is gone (`alive` false)."""
        if control is not None:
            control._claim()
        _validate(req, self.runtime.mapping)
        limits = self.profile.resolve(req.limits)
        loop = asyncio.get_running_loop()
        t0 = time.monotonic_ns()
        run_id = next(self._ids)
        driver = self.runtime.cgroups.driver
        has = driver.controllers if driver else frozenset()
        warnings = list(self.runtime.warnings)
        run_cg: Lease | None = None   # this run's use of its cgroup: its kills name it
        cg_limits = _cgroup_limits(limits, has)
        finished = False          # the run ended and was measured: its cgroup may be reused
        own: list[int] = []       # descriptors to close once init has its copies
        readers: list[_Reader] = []
        killed_for: list[Status] = []
        timers: list[asyncio.TimerHandle] = []
        exited = self._expect("exited", run_id)
        self._active += 1
        self._runs += 1
        try:
            if self.cgroup is not None:
                run_cg, cg_fds = self._take_run_cgroup(run_id, cg_limits)
                own += cg_fds
            else:
                cg_fds = []
            stdin_fd = self._stdin_fd(req.stdin)
            if stdin_fd not in (req.stdin, self.runtime.devnull):
                own.append(stdin_fd)

            def kill(reason: Status) -> None:
                if not killed_for:
                    killed_for.append(reason)
                self._kill_run(run_cg, run_id)

            pipes = self._open_output(readers, limits.output_bytes, on_output,
                                      lambda: kill(Status.OUTPUT_LIMIT))
            own += pipes
            uid = self.runtime.mapping.run_uid if req.uid is None else req.uid
            gid = self.runtime.mapping.run_gid if req.gid is None else req.gid
            self._send({"op": "exec", "id": run_id, "argv": req.argv, "env": req.env,
                        "cwd": req.cwd, "uid": uid, "gid": gid,
                        "rlimits": self._rlimits(limits, has), "reset_after": reset_after},
                       [stdin_fd, *pipes, *cg_fds])
            for fd in own:
                os.close(fd)
            own.clear()
            if control is not None:
                # After the exec message on the same socket: init has started the child
                # (or reported why not) before it reads any signal for it.
                control._attach(f"{self.id}-{run_id}",
                                lambda signum: self._signal_run(run_id, signum))
            # The limits' clocks start now, the child's setup in init included (init tells
            # only when the run ends, which saves a message and a wake-up per run).
            if limits.wall_ms:
                timers.append(loop.call_later(limits.wall_ms / 1000, kill, Status.WALL_LIMIT))
            if limits.cpu_ms and run_cg is not None:
                self._watch_cpu(run_cg.cgroup, limits.cpu_ms, lambda: kill(Status.TIME_LIMIT),
                                timers)
            done_msg = await exited
            for t in timers:
                t.cancel()
            setup_ms = max(0.0, (int(done_msg.get("start_ns") or 0) - t0) / 1e6)
            if done_msg.get("status") is None:  # init could not start the child
                for r in readers:
                    r.finish()
                stats = None
            else:
                stats = await self._end_run(run_cg, readers, warnings, reset_after)
            finished = True
        except BaseException:
            # Cancelled (a caller gave up) or failed: the run must not outlive its exec.
            with contextlib.suppress(SandboxError, OSError):
                self._kill_run(run_cg, run_id)
            for t in timers:
                t.cancel()
            for fd in own:
                os.close(fd)
            for reader in readers:
                reader.finish()
            self._waiters.pop(("exited", run_id), None)
            if not exited.done():
                exited.cancel()
            elif not exited.cancelled():
                exited.exception()  # seen: the exception being raised says it already
            raise
        finally:
            if control is not None:
                control._detach()
            self._active -= 1
            if run_cg is not None:
                # Handled at once rather than in batches: a batch of rmdirs holds the
                # kernel's cgroup lock long enough to stall the runs starting meanwhile.
                cg, reusable = run_cg.cgroup, finished
                self._chore(lambda: self._retire(cg, cg_limits, reusable))
        return self._result(run_id, done_msg, stats, limits, killed_for, readers, setup_ms,
                            warnings)

    @staticmethod
    def _open_output(readers: list[_Reader], cap: int | None,
                     on_output: OutputCallback | None,
                     on_overflow: Callable[[], None]) -> list[int]:
        """Pipes for stdout and stderr, read by the event loop; returns the write ends."""
        loop = asyncio.get_running_loop()
        ends = []
        for name in ("stdout", "stderr"):
            r, w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(r, False)
            ends.append(w)
            reader = _Reader(name, r, cap, on_output, on_overflow, loop.create_future())
            readers.append(reader)
            loop.add_reader(r, reader.readable)
        return ends

    async def _end_run(self, run_cg: Lease | None, readers: list[_Reader],
                       warnings: list[str], init_resets: bool) -> CgroupStats | None:
        """The run is over when its first process is: whatever it left behind goes too
        (init's own reset after the run already ends it, when asked for one); then its
        output is drained and its figures read."""
        if run_cg is not None:
            if not run_cg.cgroup.is_empty():
                await asyncio.to_thread(run_cg.kill)
        elif self._active == 1 and not init_resets:
            await self._sweep()
        await self._drain(readers, warnings)
        return run_cg.cgroup.stats() if run_cg is not None else None

    def _result(self, run_id: int, msg: dict[str, Any], stats: CgroupStats | None,
                limits: Limits,
                killed_for: list[Status], readers: list[_Reader], setup_ms: float,
                warnings: list[str]) -> RunResult:
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
            wait_status=msg.get("status"), killed_for=killed_for[0] if killed_for else None,
            cpu_ns=cpu_ns, cpu_limit_ms=limits.cpu_ms, oom_kills=oom,
            exec_error=msg.get("error")))
        error = msg.get("error")
        wall_ns = max(0, int(msg.get("end_ns", 0)) - int(msg.get("start_ns", 0)))
        out, err = readers
        return RunResult(
            id=f"{self.id}-{run_id}", status=status, exit_code=code, signal=sig,
            stdout=bytes(out.buf), stderr=bytes(err.buf),
            stdout_truncated=out.truncated, stderr_truncated=err.truncated,
            cpu_ms=None if cpu_ns is None else cpu_ns / 1e6,
            user_ms=None if user_ns is None else user_ns / 1e6,
            sys_ms=None if sys_ns is None else sys_ns / 1e6,
            wall_ms=wall_ns / 1e6, memory_peak_bytes=peak, setup_ms=setup_ms,
            measured_by={"cpu": cpu_source, "memory": mem_source, "wall": "init:CLOCK_MONOTONIC"},
            oom_killed=oom > 0, error=error.split(":", 1)[1] if error else None,
            warnings=warnings)

    def _take_run_cgroup(self, run_id: int, limits: CgroupLimits) -> tuple[Lease, list[int]]:
        """The run's use of a cgroup, limits applied, and the cgroup.procs fds its child
        joins by. A spare is past its recycling, so the lease names this run's use only."""
        assert self.cgroup is not None
        if not self._spares:
            cg = self.cgroup.child(f"r-{run_id}")
            cg.apply(limits)
            return cg.lease(), cg.open_procs_fds()
        cg, applied, fds = self._spares.pop()
        if applied != limits:
            cg.apply(limits)
        return cg.lease(), fds

    def _make_spares(self, target: int = _SPARES) -> None:
        assert self.cgroup is not None and self.runtime.cgroups.driver is not None
        if not self._spares_lock.acquire(blocking=False):
            return  # another chore is at it
        limits = _cgroup_limits(self.profile.defaults, self.runtime.cgroups.driver.controllers)
        try:
            # The cgroups of runs under way come back when they end: counted, so that a
            # run starting before the last one's cgroup is back makes no new one (to be
            # removed again when both are back).
            while self.alive and len(self._spares) + self._active < target:
                cg = self.cgroup.child(f"s-{secrets.token_hex(4)}")
                cg.apply(limits)
                self._spares.append((cg, limits, cg.open_procs_fds()))
        finally:
            self._spares_lock.release()

    def _retire(self, cg: Cgroup, applied: CgroupLimits, reusable: bool) -> None:
        """A run's cgroup once the run is over: a spare again when the run ended cleanly and
        the cgroup can be reset exactly, else removed; then the spares are topped up."""
        kept = False
        try:
            if reusable and self.alive and len(self._spares) < _SPARES \
                    and cg.recycle(applied):
                self._spares.append((cg, applied, cg.open_procs_fds()))
                kept = True
        except (SandboxError, OSError):
            pass  # removed below, as one that cannot be recycled
        if not kept:
            cg.destroy()
        # A container that runs again (a reused one, a session) keeps two; one used once
        # (a writable root's, destroyed after its run) would only remove what it made.
        self._make_spares(_SPARES if self._runs > 1 else 1)

    def _drop_spares(self) -> None:
        spares, self._spares = self._spares, []
        for _cg, _limits, fds in spares:
            for fd in fds:
                os.close(fd)

    def _chore(self, work: Callable[[], None]) -> None:
        """Cgroup housekeeping in a worker thread, off the path of any run."""
        async def run() -> None:
            with contextlib.suppress(SandboxError, OSError):
                await asyncio.to_thread(work)

        task = asyncio.ensure_future(run())
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _stdin_fd(self, stdin: bytes | int | None) -> int:
        if isinstance(stdin, int):
            return stdin
        if stdin is None:
            return self.runtime.devnull
        # A memfd rather than a pipe: any size, no writer to keep alive, and seekable.
        fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
        view = memoryview(stdin)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _kill_run(self, run_cg: Lease | None, run_id: int) -> None:
        """Kill every process of a run without blocking the event loop (a v1 kill freezes
        the cgroup and waits for it, which must not stall every other run meanwhile). Both
        ways name the run, so however late they act they reach its processes or none: its
        lease kills what is in its cgroup while the run still uses it, and init signals
        the run's process group by the run's id. Init reads this after the exec, so the
        latter also reaches a run that a loaded init starts only after the former found
        its cgroup still empty; once the first process is dead, the run's end kills the
        rest of the cgroup."""
        self._signal_run(run_id, signal.SIGKILL)
        if run_cg is not None:
            self._chore(run_cg.kill)

    def _signal_run(self, run_id: int, signum: int) -> None:
        """A caller's signal: init sends it to the run's process group (never to itself).
        A container that is gone has no run left to signal; its exec reports why."""
        with contextlib.suppress(ContainerGoneError):
            self._send({"op": "signal", "id": run_id, "signal": signum})

    async def _sweep(self) -> None:
        """Without a cgroup, the processes a finished run left are found by killing all but
        init, which is only right when no other run is active."""
        await self.reset(remount=False)

    def _watch_cpu(self, cg: Cgroup, limit_ms: int, on_over: Callable[[], None],
                   timers: list[asyncio.TimerHandle]) -> None:
        loop = asyncio.get_running_loop()
        ncpu = os.cpu_count() or 1
        limit_ns = limit_ms * 1_000_000

        def check() -> None:
            used = cg.cpu_ns() or 0
            if used >= limit_ns:
                on_over()
                return
            # CPU time grows at most ncpu seconds per second: no need to look sooner.
            delay = (limit_ns - used) / 1e9 / ncpu
            timers.append(loop.call_later(min(max(delay, _CPU_POLL_MIN_S), _CPU_POLL_MAX_S),
                                          check))

        timers.append(loop.call_later(min(max(limit_ms / 1000 / ncpu, _CPU_POLL_MIN_S),
                                          _CPU_POLL_MAX_S), check))

    async def _drain(self, readers: list[_Reader], warnings: list[str]) -> None:
        """Wait for both pipes to reach EOF; every writer is dead by now, unless one handed
        its descriptor to a process outside the run."""
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the pipes close.
            async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                for r in readers:
                    r.writers_gone()
                await asyncio.gather(*(r.done for r in readers))
        except TimeoutError:
            warnings.append("output pipes stayed open after the run ended; output cut there")
            for r in readers:
                r.finish()

    async def open_path(self, path: str, flags: int, *, owner: tuple[int, int] | None = None,
                        mode: int = 0o644, entry: Entry | None = None) -> int:
        """A descriptor of `path` as this container's processes see it, opened by its init as
        container root (see native/hostopen.c): /proc/<pid>/root of a non-dumpable init is
        closed to a service that is not host root. With `entry`, that entry of a directory
        the host holds open (`path` only names it in errors). Raises OSError with init's
        errno."""
        op_id = next(self._ids)
        fut = self._expect("opened", op_id)
        self._send({"op": "open", "id": op_id, "path": None if entry else path, "flags": flags,
                    "owner": list(owner) if owner is not None else None, "mode": mode,
                    "entry": entry.message() if entry is not None else None})
        try:
            msg = await fut
        except BaseException:
            self._waiters.pop(("opened", op_id), None)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                for fd in fut.result().get("fds", ()):
                    os.close(fd)
            raise
        fds: list[int] = msg.get("fds", [])
        if msg.get("errno") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            code = int(msg.get("errno") or errno.EIO)
            raise OSError(code, str(msg.get("error") or os.strerror(code)), path)
        return fds[0]

    async def reset(self, *, remount: bool = True) -> None:
        """Kill every process but init and give /tmp and /dev/shm back empty."""
        if self._active > (0 if remount else 1):
            raise SandboxError(f"container {self.id} has runs in progress; wait for them first")
        fut = self._expect("reset")
        self._send({"op": "reset", "remount": remount})
        msg = await fut
        if msg.get("error"):
            raise SandboxError(f"container {self.id} reset failed: {msg['error']}")

    async def destroy(self) -> None:
        """Kill init (and so every process of the container), then remove its cgroups."""
        self.runtime.containers.pop(self.id, None)
        if self.alive:
            self._gone("destroyed")
        with contextlib.suppress(OSError):
            self._ctl.close()
        ended = False
        if self._pidfd >= 0:
            # Through a pidfd: a pid the spawner has already reaped may name another process.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            try:
                ended = await self._init_exited()
            finally:
                os.close(self._pidfd)
                self._pidfd = -1
        while self._chores:
            await asyncio.gather(*self._chores)
        self._drop_spares()
        if self.cgroup is not None:
            # An init that has exited took every process of its pid namespace with it (the
            # kernel kills them and waits for them first): its cgroups only need removing,
            # without freezing and killing, which took ~10 ms per container.
            await asyncio.to_thread(self.cgroup.destroy, empty=ended)

    async def _init_exited(self) -> bool:
        """Whether init exited within _EXIT_WAIT_S of its SIGKILL (its pidfd reads ready)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._pidfd, lambda: done.done() or done.set_result(None))
        try:
            async with asyncio.timeout(_EXIT_WAIT_S):
                await done
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self._pidfd)
