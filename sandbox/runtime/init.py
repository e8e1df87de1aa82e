"""A container's init: pid 1 of its namespaces, forking one child per exec.

Init is hostile ground: it is non-dumpable, holds no host file, and only talks over its
control socket. Untrusted code never runs in it; each exec forks a child that takes the
run's cgroup, rlimits, stdio, identity, drops every capability, sets no_new_privs, loads the
policy's ready BPF and execs. Init reaps everything (orphans are re-parented to it) and
reports each run's wait status and rusage.
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

from sandbox.runtime import protocol, rootfs, seccomp
from sandbox.runtime import syscalls as sc

# Signals Python sets to SIG_IGN at start; an exec'd program must get the defaults back or
# `yes | head` never sees SIGPIPE and a file-size bomb never sees SIGXFSZ.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class InitConfig:
    seccomp_bpf: bytes
    last_cap: int
    set_groups: bool                 # false under a "single" id map (setgroups is denied there)
    resettable: tuple[rootfs.Tmpfs, ...]


@dataclass
class _Run:
    id: int
    pid: int
    start_ns: int
    err_r: int


def exec_child(msg: dict[str, Any], fds: list[int], cfg: InitConfig, ctl: int, err_w: int) -> None:
    """Runs in the forked child; never returns."""
    stage = "setup"
    try:
        for sig in _RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.close(ctl)
        os.setsid()
        stage = "cgroup"
        for fd in fds[3:]:
            os.write(fd, b"0")
        stage = "rlimits"
        for res, soft, hard in msg["rlimits"]:
            resource.setrlimit(res, (soft, hard))
        stage = "stdio"
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target, inheritable=True)
        stage = f"chdir {msg['cwd']}"
        os.chdir(msg["cwd"])
        os.umask(0o022)
        stage = "capabilities"
        sc.drop_bounding_and_ambient(cfg.last_cap)
        stage = "identity"
        if cfg.set_groups:
            os.setgroups([])
        os.setresgid(msg["gid"], msg["gid"], msg["gid"])
        os.setresuid(msg["uid"], msg["uid"], msg["uid"])
        stage = "capabilities"
        sc.clear_capabilities()
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        # Everything but stdio and the cloexec error pipe goes before the policy is loaded.
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 1 << 16)
        stage = "seccomp"
        if cfg.seccomp_bpf:
            seccomp.install(cfg.seccomp_bpf)
        stage = f"exec {msg['argv'][0]}"
        os.execvpe(msg["argv"][0], msg["argv"], msg["env"])
    except OSError as e:
        code = 126 if e.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR) else 127
        if stage.startswith(("setup", "cgroup", "rlimits", "stdio", "identity", "capab", "secc")):
            code = 125
        try:
            os.write(err_w, f"{code}:{stage}: {e.strerror or e}".encode()[:4000])
        finally:
            os._exit(code)
    except BaseException as e:
        try:
            os.write(err_w, f"125:{stage}: {e!r}".encode()[:4000])
        finally:
            os._exit(125)


def _rusage(ru: resource.struct_rusage) -> dict[str, int]:
    return {"utime_ns": int(ru.ru_utime * 1e9), "stime_ns": int(ru.ru_stime * 1e9),
            "maxrss_kb": ru.ru_maxrss}


def _read_error(fd: int) -> str | None:
    try:
        data = os.read(fd, 4096)
    except OSError:
        data = b""
    os.close(fd)
    return data.decode(errors="replace") if data else None


def serve(ctl: socket.socket, cfg: InitConfig) -> None:
    """The init loop: exec, signal, reset; returns when the host closes the control socket."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    runs: dict[int, _Run] = {}
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)

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
                protocol.send(ctl, {"ev": "exited", "id": run.id, "status": status,
                                    "start_ns": run.start_ns, "end_ns": time.monotonic_ns(),
                                    "rusage": _rusage(ru), "error": _read_error(run.err_r)})

    while True:
        for fd, _ in poller.poll():
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
            if op == "exec":
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                start = time.monotonic_ns()
                pid = os.fork()
                if pid == 0:
                    exec_child(msg, fds, cfg, ctl.fileno(), err_w)
                os.close(err_w)
                for f in fds:
                    os.close(f)
                runs[pid] = _Run(msg["id"], pid, start, err_r)
                protocol.send(ctl, {"ev": "started", "id": msg["id"], "pid": pid})
            elif op == "signal":
                for run in runs.values():
                    if run.id == msg["id"]:
                        _signal_run(run.pid, int(msg["signal"]))
            elif op == "reset":
                for run in runs.values():
                    os.close(run.err_r)
                runs.clear()
                _kill_all_and_reap()
                error = None
                try:
                    if msg.get("remount", True):
                        rootfs.reset(list(cfg.resettable))
                except OSError as e:
                    error = str(e)
                protocol.send(ctl, {"ev": "reset", "error": error})
            else:
                for f in fds:
                    os.close(f)


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
