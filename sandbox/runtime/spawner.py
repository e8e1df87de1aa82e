"""The spawner: a single-threaded process that forks containers for the host side.

Forking a threaded (asyncio) process is unsafe, so the service starts this process once,
with every module already imported, and asks it over a SOCK_SEQPACKET socket for
containers. For each one it forks a helper that joins the container's cgroup, starts the
native init's joiner (`sbx-init join`, native/init.c) while it is still in the host's
namespaces, unshares user, mount, ipc, uts, net (unless the profile's network is "host")
and cgroup namespaces, waits while the spawner writes the id map and makes the container's
filesystem (rootfs.execute). The joiner then joins those namespaces, makes the pid
namespace and forks init (its pid 1), and both exit, so init is re-parented here (this
process is a child subreaper) and dies with it (PDEATHSIG). Init mounts /proc, pivots into
its own root (the staging tmpfs, holding the container's root at rootfs.ROOT), moves to an
id of its own where the map has more than one (idmap.IdMapping.init_uid) and serves the
container.

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
from pathlib import Path
from typing import Any

import msgpack

from sandbox.errors import RuntimeSetupError
from sandbox.runtime import idmap, protocol, rootfs
from sandbox.runtime import syscalls as sc
from sandbox.runtime.network import FULL, PROXY, PROXY_PORT, routes, slirp

# Built with the package (setup.py). Opened once, when the spawner starts: after
# pivot_root a container sees nothing of the host, so its init execs the binary by fd.
INIT_BINARY = Path(__file__).with_name("sbx-init")

NAMESPACES = (sc.CLONE_NEWUSER | sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWIPC
              | sc.CLONE_NEWUTS | sc.CLONE_NEWNET | sc.CLONE_NEWCGROUP)


def _mapping(d: dict[str, Any]) -> idmap.IdMapping:
    return idmap.IdMapping(
        d["method"], tuple(idmap.IdRange(*r) for r in d["uid_map"]),
        tuple(idmap.IdRange(*r) for r in d["gid_map"]), d["run_uid"], d["run_gid"])


def _spec(d: dict[str, Any]) -> rootfs.RootfsSpec:
    return rootfs.RootfsSpec(**{**d, "layers": tuple(d["layers"]),
                                "tmpfs": tuple(rootfs.TmpfsMount(**m) for m in d["tmpfs"]),
                                "provided": tuple(tuple(f) for f in d["provided"])})


def _network(req: dict[str, Any], to_spawner_fds: socket.socket | None) -> None:
    """The container's network beyond lo (sandbox/runtime/network): for `proxy`, the
    listener its runs reach the proxy through, handed to the spawner; for `full`, the
    unreachable routes (slirp4netns is started by the spawner)."""
    if req.get("network") == PROXY:
        assert to_spawner_fds is not None
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("127.0.0.1", PROXY_PORT))
            listener.listen(128)
            socket.send_fds(to_spawner_fds, [b"l"], [listener.fileno()])
    elif req.get("network") == FULL:
        routes.add_unreachable(req["unreachable"])


def _helper(req: dict[str, Any], fds: list[int], ctl: socket.socket,
            to_spawner: int, from_spawner: int, init_binary: int,
            to_spawner_fds: socket.socket | None) -> None:
    """The forked helper: namespaces, the container's filesystem, then init. Never returns."""
    started = time.monotonic_ns()
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the spawner's reaper would take ours
        n_container = req["container_cgroup_fds"]
        for fd in fds[:n_container]:
            os.write(fd, b"0")  # before CLONE_NEWCGROUP, so the namespace is rooted there
        spec = _spec(req["rootfs"])
        joiner, join, config = _start_init(ctl, init_binary)
        # A profile with network "host" keeps the host's network: no namespace of its own.
        # The pid namespace is made by the joiner, for init.
        sc.unshare((NAMESPACES & ~sc.CLONE_NEWNET if req["host_network"] else NAMESPACES)
                   & ~sc.CLONE_NEWPID)
        # Opened in the new mount namespace (a bind source must be a mount of the caller's
        # namespace) but before the id map is used: the service's own host uid still owns
        # the lookup, where container root may be an id that cannot traverse its directories.
        sources = [os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                   for layer in spec.layers]
        files = (None if spec.files is None else
                 os.open(spec.files, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        os.write(to_spawner, b"u")
        if os.read(from_spawner, 1) != b"m":
            os._exit(1)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        plan = rootfs.plan(spec, [f"/proc/self/fd/{fd}" for fd in sources],
                           None if files is None else f"/proc/self/fd/{files}")
        init_mounts, writable = rootfs.execute(plan)
        sc.sethostname(req.get("hostname") or "sandbox")
        if not req["host_network"]:
            sc.loopback_up()
            _network(req, to_spawner_fds)
        join.send(b"j")
        answer = join.recv(256)
        if not answer.isdigit():
            raise RuntimeSetupError("the container's init did not start: "
                                    f"{answer[1:].decode(errors='replace') or 'it died'}")
        os.waitpid(joiner, 0)  # init is the spawner's child now (a subreaper)
        for fd in fds[n_container:]:
            os.write(fd, answer)  # init's own cgroup
            # And this helper too, for the moment it takes to exit (its address space is
            # the spawner's, and tearing it down is slow): the spawner answers without
            # waiting for that, and on cgroup v2 the container's own cgroup must hold no
            # process once runs' cgroups take its controllers.
            os.write(fd, b"0")
        mapping = _mapping(req["mapping"])
        os.write(config, msgpack.packb({
            "started_ns": started, "seccomp_bpf": req["seccomp_bpf"],
            "last_cap": sc.cap_last_cap(), "caps": int(req.get("caps") or 0),
            "set_groups": mapping.method != "single",
            "init_id": (None if mapping.shares_init_id
                        else [mapping.init_uid, mapping.init_gid]),
            "mounts": init_mounts, "root": rootfs.ROOT,
            "files": None if files is None else rootfs.FILES,
            "writable": writable.message() if writable is not None else None,
            "resettable": [{"target": op.target, "size": op.size, "mode": op.mode,
                            "inodes": op.inodes, "flags": op.flags}
                           for op in plan.resettable()]}))
        os.write(to_spawner, b"p" + answer)
        os._exit(0)
    except BaseException as e:
        try:
            os.write(to_spawner, f"E{e}".encode()[:4000])
        finally:
            os._exit(1)  # init, given no configuration, exits too


def _start_init(ctl: socket.socket, init_binary: int) -> tuple[int, socket.socket, int]:
    """Start `sbx-init join` (native/init.c) before this helper unshares anything, so that
    init's memory belongs to the host's user namespace (its /proc files are then never
    container root's). On "j" sent over the socket returned, it joins our namespaces (the
    container's filesystem made by then), makes the pid namespace, forks init (its pid 1)
    and answers with init's pid; init reads its configuration from the pipe returned until
    EOF. Returns the joiner's pid, our end of the socket and of the pipe."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cfg_r, cfg_w = os.pipe()
    for fd in (ctl.fileno(), theirs.fileno(), cfg_r):
        os.set_inheritable(fd, True)
    try:
        # posix_spawn: a vfork, where a fork of this process would copy its page tables.
        pid = os.posix_spawn(f"/proc/self/fd/{init_binary}",
                             ["sbx-init", "join", str(theirs.fileno()), str(ctl.fileno()),
                              str(cfg_r)], {})
    finally:
        theirs.close()
        os.close(cfg_r)
    return pid, ours, cfg_w


class Spawner:
    def __init__(self, sock: socket.socket, init_binary: int) -> None:
        self.sock = sock
        self.init_binary = init_binary   # an O_PATH descriptor of sbx-init
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
        # Descriptors the helper hands back (the proxy's listener): only for `proxy`.
        fds_ours, fds_theirs = (socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                                if req.get("network") == PROXY else (None, None))
        to_spawner_r, to_spawner_w = os.pipe2(os.O_CLOEXEC)
        from_spawner_r, from_spawner_w = os.pipe2(os.O_CLOEXEC)
        gc.freeze()  # keeps the collector from dirtying shared pages in the children
        pid = os.fork()
        if pid == 0:
            self.sock.close()
            host.close()
            os.close(to_spawner_r)
            os.close(from_spawner_w)
            if fds_ours is not None:
                fds_ours.close()
            _helper(req, fds, child, to_spawner_w, from_spawner_r, self.init_binary,
                    fds_theirs)
        child.close()
        if fds_theirs is not None:
            fds_theirs.close()
        os.close(to_spawner_w)
        os.close(from_spawner_r)
        for fd in fds:
            os.close(fd)
        extra: list[int] = []
        try:
            init_pid = self._finish(pid, mapping, to_spawner_r, from_spawner_w, req, extra)
            if fds_ours is not None:
                _, got, _, _ = socket.recv_fds(fds_ours, 1, 1)
                extra += got
                if not got:
                    raise RuntimeSetupError("the container's proxy listener did not arrive")
        except (RuntimeSetupError, OSError) as e:
            host.close()
            for fd in extra:
                os.close(fd)
            protocol.send(self.sock, {"ok": False, "error": str(e)})
            return
        finally:
            os.close(to_spawner_r)
            os.close(from_spawner_w)
            if fds_ours is not None:
                fds_ours.close()
        self.inits.add(init_pid)
        # The proxy's listener, or slirp4netns's exit pipe: the host's from now on.
        protocol.send(self.sock, {"ok": True, "pid": init_pid}, [host.fileno(), *extra])
        host.close()
        for fd in extra:
            os.close(fd)

    def _finish(self, helper: int, mapping: idmap.IdMapping, rd: int, wr: int,
                req: dict[str, Any], extra: list[int]) -> int:
        # Our SIGCHLD handler reaps any child; held back here so that it cannot take the
        # newuidmap helpers from under subprocess (which would then read their exit as 0).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            return self._finish_blocked(helper, mapping, rd, wr, req, extra)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

    def _finish_blocked(self, helper: int, mapping: idmap.IdMapping, rd: int, wr: int,
                        req: dict[str, Any], extra: list[int]) -> int:
        """Init's pid, once the helper has said it; the helper is reaped by `reap` once it
        has exited (SIGCHLD), or here when it failed. For `full`, slirp4netns's exit pipe
        is appended to `extra` once it is ready."""
        try:
            first = os.read(rd, 4096)
            if first != b"u":
                raise RuntimeSetupError(first[1:].decode(errors="replace") or "helper died")
            idmap.apply(mapping, helper)
            started = self._slirp(helper) if req.get("network") == FULL else None
            if started is not None:
                extra.append(started[1])
            os.write(wr, b"m")
            reply = os.read(rd, 4096)
            if started is not None and reply.startswith(b"p"):
                # On failure, init (running by now) ends when `create` closes its control
                # socket, as for any failure after the helper's answer.
                slirp.wait_ready(started[2], started[0])
            elif started is not None:
                os.close(started[2])
            if not reply.startswith(b"p"):
                raise RuntimeSetupError(reply[1:].decode(errors="replace") or "helper died")
            return int(reply[1:])
        except BaseException:
            # A helper still waiting for "m" (a step above failed) would never exit; one
            # that has exited is a zombie until reaped below, so its pid is still its own.
            with contextlib.suppress(ProcessLookupError):
                os.kill(helper, signal.SIGKILL)
            while True:
                try:
                    os.waitpid(helper, 0)
                    break
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
            raise

    @staticmethod
    def _slirp(helper: int) -> tuple[int, int, int]:
        """slirp4netns on the helper's new namespaces, once they are mapped (it needs
        CAP_NET_ADMIN there). Opened here, the namespaces outlive the helper's exit."""
        userns = os.open(f"/proc/{helper}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            netns = os.open(f"/proc/{helper}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                return slirp.start(userns, netns)
            finally:
                os.close(netns)
        finally:
            os.close(userns)

    def _answer(self, req: dict[str, Any], fds: list[int]) -> None:
        if req.get("op") == "ping":  # the supervisor's: started, and serving
            protocol.send(self.sock, {"ok": True})
        elif req.get("op") == "create":
            try:
                self.create(req, fds)
            except (KeyError, TypeError, ValueError) as e:
                protocol.send(self.sock, {"ok": False, "error": f"bad create request: {e}"})
        else:  # answered all the same: the host waits for an answer to each request
            for fd in fds:
                os.close(fd)
            protocol.send(self.sock, {"ok": False, "error": f"unknown op {req.get('op')!r}"})

    def serve(self) -> None:
        while True:
            got = protocol.recv(self.sock)
            if got is None:
                break
            try:
                self._answer(*got)
            except (BrokenPipeError, ConnectionResetError):
                # The host closed its socket before the answer (a service stopping while
                # it started this spawner): the same end as its EOF.
                break
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
    # What it makes for runs (init's root, mount points, the runtime's files) has the modes
    # it names, whatever the service's umask: under 0077 the container's root, a
    # subordinate id, could not enter its own root ("exec: Permission denied").
    os.umask(0o022)
    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        init_binary = os.open(INIT_BINARY, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SystemExit(f"{INIT_BINARY} is missing: build the package again "
                         "(pip install -e .), which compiles it") from None
    spawner = Spawner(sock, init_binary)
    signal.signal(signal.SIGCHLD, spawner.reap)
    # A signal meant for the service (Ctrl-C, or a service manager's SIGTERM to the whole
    # group) must not end this process first: its containers would die with it, mid-run,
    # and be left for pid 1 to reap. It ends when the host closes its socket, or dies.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    spawner.serve()


if __name__ == "__main__":
    main()
