"""A container's init: pid 1 of its namespaces, starting one child per exec.

Init is hostile ground: it is non-dumpable, holds no host file, only talks over its
control socket and, where the id map has more than one id, runs under an id of its own that
no run may take (so no run can change what init's later children inherit). Untrusted code
never runs in it; each exec vforks a child (in C, _spawn.c) that takes the run's cgroup, an
IPC namespace of its own, every rlimit and scheduling setting afresh, stdio, identity,
drops every capability, sets no_new_privs, loads the policy's ready BPF and execs. Init
reaps everything (orphans are re-parented to it) and reports each run's wait status and
rusage. For copies in and out it opens paths of the container for the host and sends the
descriptors (hostopen.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from sandbox.runtime import _spawn, protocol, rootfs
from sandbox.runtime.hostopen import open_for_host


@dataclass(frozen=True)
class InitConfig:
    seccomp_bpf: bytes
    last_cap: int
    set_groups: bool                 # false under a "single" id map (setgroups is denied there)
    resettable: tuple[rootfs.Tmpfs, ...]
    root: rootfs.WritableRoot | None     # a writable root, made anew by a reset that needs it
    baseline: bytes                  # _spawn.snapshot() before any run: what children start from


@dataclass
class _Run:
    id: int
    pid: int
    start_ns: int
    err_r: int
    what: dict[str, str]             # stage -> what it acted on, for error messages
    msg: dict[str, Any]              # the exec request


def _candidates(argv0: str, env: dict[str, str]) -> list[bytes]:
    """Where execvp would look, but with the run's PATH rather than init's."""
    if "/" in argv0:
        return [argv0.encode()]
    dirs = env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":")
    return [f"{d or '.'}/{argv0}".encode() for d in dirs]


def start_child(msg: dict[str, Any], fds: list[int], cfg: InitConfig, err_w: int,
                root: str) -> int:
    """vfork the run's child, which enters the container's `root` (see _spawn.c for
    everything it does before execve)."""
    env = msg["env"]
    return _spawn.spawn(
        paths=_candidates(msg["argv"][0], env),
        argv=[a.encode() for a in msg["argv"]],
        envp=[f"{k}={v}".encode() for k, v in env.items()],
        root=root, cwd=msg["cwd"].encode(), uid=msg["uid"], gid=msg["gid"],
        set_groups=cfg.set_groups,
        rlimits=[tuple(r) for r in msg["rlimits"]], stdio=tuple(fds[:3]),
        cgroup_fds=fds[3:], bpf=cfg.seccomp_bpf, last_cap=cfg.last_cap, err_fd=err_w,
        baseline=cfg.baseline, new_ipc=True)


def _rusage(ru: resource.struct_rusage) -> dict[str, int]:
    return {"utime_ns": int(ru.ru_utime * 1e9), "stime_ns": int(ru.ru_stime * 1e9),
            "maxrss_kb": ru.ru_maxrss}


def _read_error(fd: int, what: dict[str, str]) -> str | None:
    """The child's "<code>:<stage>:<errno>", made readable: "<code>:<stage>: <message>"."""
    try:
        data = os.read(fd, 4096)
    except OSError:
        data = b""
    os.close(fd)
    if not data:
        return None
    code, stage, err = data.decode(errors="replace").split(":", 2)
    subject = f"{stage} {what[stage]}" if stage in what else stage
    return f"{code}:{subject}: {os.strerror(int(err)) if err.isdigit() else err}"


def serve(ctl: socket.socket, cfg: InitConfig) -> None:
    """The init loop: exec, signal, reset; returns when the host closes the control socket."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _only_sigchld_handled()
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    runs: dict[int, _Run] = {}
    scratch = rootfs.Scratch(cfg.resettable, cfg.root)
    tidy_failed = False
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)

    def reset(remount: bool) -> str | None:
        """Kill every process but init and give the scratch mounts back empty and a
        writable root back as the image made it."""
        for run in runs.values():
            os.close(run.err_r)
        runs.clear()
        _kill_all_and_reap()
        try:
            if remount:
                scratch.reset()
        except OSError as e:
            return str(e)
        return None

    def reset_after(msg: dict[str, Any]) -> None:
        # Before init reads the host's next request, so that request finds the container
        # reset without waiting for a reply; only a failure is told (then it is not reused).
        if msg.get("reset_after") and (error := reset(True)) is not None:
            protocol.send(ctl, {"ev": "reset", "error": error})

    def reap() -> None:
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = runs.pop(pid, None)
            if run is not None:
                end = time.monotonic_ns()
                protocol.send(ctl, {"ev": "exited", "id": run.id, "status": status,
                                    "start_ns": run.start_ns, "end_ns": end,
                                    "rusage": _rusage(ru),
                                    "error": _read_error(run.err_r, run.what)})
                reset_after(run.msg)

    while True:
        # Idle work (a writable root's old mounts to detach, its spare to make) waits for a
        # moment with no request pending, so that it delays no run.
        # A failure is told once (the host then stops using the container).
        if scratch.untidy and not tidy_failed and not select.select([ctl], [], [], 0)[0]:
            try:
                scratch.tidy()
            except OSError as e:
                tidy_failed = True
                protocol.send(ctl, {"ev": "reset", "error": str(e)})
        # Children first: the processes of a killed run are reaped before a request that
        # came in the same wake-up starts the next run, which would see them in /proc.
        for fd, _ in sorted(poller.poll(), key=lambda event: event[0] != wake_r):
            if fd == wake_r:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                reap()
                continue
            got = protocol.recv(ctl)
            if got is None:
                _kill_all_and_reap()
                return
            msg, fds = got
            op = msg.get("op")
            if op != "exec":  # only an exec carries descriptors; any other would stay open
                for f in fds:
                    os.close(f)
            if op == "exec":
                scratch.touching()
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                start = time.monotonic_ns()
                try:
                    pid = start_child(msg, fds, cfg, err_w, scratch.path)
                except (OSError, ValueError, TypeError, KeyError) as e:
                    os.close(err_r)
                    protocol.send(ctl, {"ev": "exited", "id": msg.get("id"), "status": None,
                                        "start_ns": start, "end_ns": time.monotonic_ns(),
                                        "error": f"125:spawn: {e}"})
                    reset_after(msg)  # files copied in for the run may be there
                    continue
                finally:
                    os.close(err_w)
                    for f in fds:
                        os.close(f)
                runs[pid] = _Run(msg["id"], pid, start, err_r,
                                 {"chdir": msg["cwd"], "exec": msg["argv"][0]}, msg)
            elif op == "signal":
                for run in runs.values():
                    if run.id == msg["id"]:
                        _signal_run(run.pid, int(msg["signal"]))
            elif op == "reset":
                protocol.send(ctl, {"ev": "reset", "error": reset(msg.get("remount", True))})
            elif op == "open":
                scratch.touching()
                try:
                    fd = open_for_host(msg, scratch.path)
                except (OSError, ValueError, TypeError, KeyError) as e:
                    code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
                    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                    protocol.send(ctl, {"ev": "opened", "id": msg.get("id"), "errno": code,
                                        "error": why})
                else:
                    protocol.send(ctl, {"ev": "opened", "id": msg.get("id")}, [fd])
                    os.close(fd)


def _only_sigchld_handled() -> None:
    """As pid 1 of its namespace, init gets from inside only the signals it handles: any
    handler it inherited (Python's SIGINT one raises KeyboardInterrupt) would let a run
    sharing its id stop it. Ignored ones stay ignored (Python wants SIGPIPE, SIGXFSZ so)."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
            continue
        if signal.getsignal(sig) not in (signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(sig, signal.SIG_DFL)


def _signal_run(pid: int, sig: int) -> None:
    # The child called setsid, so its process group carries its id; members that left the
    # group are found through the run's cgroup on the host side.
    for target in (-pid, pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)


def _kill_all_and_reap() -> None:
    """As pid 1, kill(-1) reaches every other process of the pid namespace."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
