"""The spawner: a single-threaded process that forks containers for the host side.

Forking a threaded (asyncio) process is unsafe, so the service starts this process once,
with every module already imported, and asks it over a SOCK_SEQPACKET socket for
containers. For each one it forks a helper that joins the container's cgroup and unshares
user, mount, pid, ipc, uts, net (unless the profile's network is "host") and cgroup
namespaces; the spawner writes the id map; the helper forks the container's init (pid 1 of
the new pid namespace) and exits, so init is re-parented here (this process is a child
subreaper) and dies with it (PDEATHSIG). Once its mounts are made, init moves to an id of
its own where the map has more than one (idmap.IdMapping.init_uid).

Run as `python -m sandbox.runtime.spawner FD`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sys
import time
from typing import Any

from sandbox.errors import RuntimeSetupError
from sandbox.runtime import _spawn, idmap, init, protocol, rootfs
from sandbox.runtime import syscalls as sc

NAMESPACES = (sc.CLONE_NEWUSER | sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWIPC
              | sc.CLONE_NEWUTS | sc.CLONE_NEWNET | sc.CLONE_NEWCGROUP)


def _mapping(d: dict[str, Any]) -> idmap.IdMapping:
    return idmap.IdMapping(
        d["method"], tuple(idmap.IdRange(*r) for r in d["uid_map"]),
        tuple(idmap.IdRange(*r) for r in d["gid_map"]), d["run_uid"], d["run_gid"])


def _spec(d: dict[str, Any]) -> rootfs.RootfsSpec:
    return rootfs.RootfsSpec(**{**d, "layers": tuple(d["layers"]),
                                "tmpfs": tuple(rootfs.TmpfsMount(**m) for m in d["tmpfs"])})


def _helper(req: dict[str, Any], fds: list[int], ctl: socket.socket,
            to_spawner: int, from_spawner: int) -> None:
    """The forked helper: namespaces, then init. Never returns."""
    try:
        n_container = req["container_cgroup_fds"]
        for fd in fds[:n_container]:
            os.write(fd, b"0")  # before CLONE_NEWCGROUP, so the namespace is rooted there
        spec = _spec(req["rootfs"])
        # A profile with network "host" keeps the host's network: no namespace of its own.
        sc.unshare(NAMESPACES & ~sc.CLONE_NEWNET if req["host_network"] else NAMESPACES)
        # Opened in the new mount namespace (a bind source must be a mount of the caller's
        # namespace) but before the id map is used: the service's own host uid still owns
        # the lookup, where container root may be an id that cannot traverse its directories.
        sources = [os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                   for layer in spec.layers]
        os.write(to_spawner, b"u")
        if os.read(from_spawner, 1) != b"m":
            os._exit(1)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        pid = os.fork()
        if pid == 0:
            _init_main(req, fds[n_container:], ctl, from_spawner, spec,
                       [f"/proc/self/fd/{fd}" for fd in sources])
        os.write(to_spawner, f"p{pid}".encode())
        os._exit(0)
    except BaseException as e:
        try:
            os.write(to_spawner, f"E{e}".encode()[:4000])
        finally:
            os._exit(1)


def _init_main(req: dict[str, Any], init_cgroup_fds: list[int], ctl: socket.socket,
               from_spawner: int, spec: rootfs.RootfsSpec, sources: list[str]) -> None:
    started = time.monotonic_ns()
    try:
        if os.read(from_spawner, 1) != b"g":  # the helper is gone: re-parented to the spawner
            os._exit(1)
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        for fd in init_cgroup_fds:
            os.write(fd, b"0")
        last_cap = sc.cap_last_cap()  # while the host's /proc is still at /proc
        plan = rootfs.plan(spec, sources)
        writable_root = rootfs.execute(plan)
        sc.sethostname(req.get("hostname") or "sandbox")
        if not req["host_network"]:
            sc.loopback_up()
        sc.set_process_name("sbx-init")
        mapping = _mapping(req["mapping"])
        if not mapping.shares_init_id:
            # After the mounts, so that what setup made is container root's as before.
            _spawn.become(uid=mapping.init_uid, gid=mapping.init_gid, set_groups=True)
            # An identity change clears the parent-death signal: set again. Should the
            # spawner die in between, with the host, the host's end of the control socket
            # is closed and init exits on it; alone, the host still destroys this container.
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        # Nothing of the host stays open: only the control socket, and /dev/null (the
        # container's) on 0-2 so that received descriptors never land there.
        ctl_fd = ctl.fileno()
        os.closerange(0, ctl_fd)
        os.closerange(ctl_fd + 1, 1 << 16)
        for target in range(3):
            if os.open(rootfs.ROOT + "/dev/null", os.O_RDWR) != target:
                raise RuntimeSetupError("could not place /dev/null on fds 0-2")
        sc.prctl(sc.PR_SET_DUMPABLE, 0)
        cfg = init.InitConfig(
            seccomp_bpf=bytes.fromhex(req["seccomp_bpf"]), last_cap=last_cap,
            set_groups=mapping.method != "single", resettable=tuple(plan.resettable()),
            root=writable_root, baseline=_spawn.snapshot())
        gc.disable()
        protocol.send(ctl, {"ev": "ready", "setup_ns": time.monotonic_ns() - started})
    except BaseException as e:
        try:
            protocol.send(ctl, {"ev": "error", "message": f"container setup failed: {e}"})
        finally:
            os._exit(1)
    try:
        init.serve(ctl, cfg)
    finally:
        os._exit(0)


class Spawner:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inits: set[int] = set()

    def reap(self, *_: object) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.inits.discard(pid)

    def create(self, req: dict[str, Any], fds: list[int]) -> None:
        mapping = _mapping(req["mapping"])
        host, child = protocol.socketpair()
        to_spawner_r, to_spawner_w = os.pipe2(os.O_CLOEXEC)
        from_spawner_r, from_spawner_w = os.pipe2(os.O_CLOEXEC)
        gc.freeze()  # keeps the collector from dirtying shared pages in the children
        pid = os.fork()
        if pid == 0:
            self.sock.close()
            host.close()
            os.close(to_spawner_r)
            os.close(from_spawner_w)
            _helper(req, fds, child, to_spawner_w, from_spawner_r)
        child.close()
        os.close(to_spawner_w)
        os.close(from_spawner_r)
        for fd in fds:
            os.close(fd)
        try:
            init_pid = self._finish(pid, mapping, to_spawner_r, from_spawner_w)
        except (RuntimeSetupError, OSError) as e:
            host.close()
            protocol.send(self.sock, {"ok": False, "error": str(e)})
            return
        finally:
            os.close(to_spawner_r)
            os.close(from_spawner_w)
        self.inits.add(init_pid)
        protocol.send(self.sock, {"ok": True, "pid": init_pid}, [host.fileno()])
        host.close()

    def _finish(self, helper: int, mapping: idmap.IdMapping, rd: int, wr: int) -> int:
        # Our SIGCHLD handler reaps any child; held back here so that it cannot take the
        # newuidmap helpers from under subprocess (which would then read their exit as 0).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            return self._finish_blocked(helper, mapping, rd, wr)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

    def _finish_blocked(self, helper: int, mapping: idmap.IdMapping, rd: int, wr: int) -> int:
        try:
            first = os.read(rd, 4096)
            if first != b"u":
                raise RuntimeSetupError(first[1:].decode(errors="replace") or "helper died")
            idmap.apply(mapping, helper)
            os.write(wr, b"m")
            reply = os.read(rd, 4096)
            if not reply.startswith(b"p"):
                raise RuntimeSetupError(reply[1:].decode(errors="replace") or "helper died")
            init_pid = int(reply[1:])
        finally:
            while True:
                try:
                    os.waitpid(helper, 0)
                    break
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
        os.write(wr, b"g")
        return init_pid

    def serve(self) -> None:
        while True:
            got = protocol.recv(self.sock)
            if got is None:
                break
            req, fds = got
            if req.get("op") == "create":
                try:
                    self.create(req, fds)
                except (KeyError, TypeError, ValueError) as e:
                    protocol.send(self.sock, {"ok": False, "error": f"bad create request: {e}"})
            self.reap()
        for pid in list(self.inits):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    spawner = Spawner(sock)
    signal.signal(signal.SIGCHLD, spawner.reap)
    # A signal meant for the service (Ctrl-C, or a service manager's SIGTERM to the whole
    # group) must not end this process first: its containers would die with it, mid-run,
    # and be left for pid 1 to reap. It ends when the host closes its socket, or dies.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    spawner.serve()


if __name__ == "__main__":
    main()
