"""The spawner: a single-threaded process that starts containers for the host side.

Forking a threaded (asyncio) process is unsafe, so the service starts this process once,
with every module already imported, and asks it over a SOCK_SEQPACKET socket for
containers. For each one a helper (`sbx-init helper`, native/helper.c), started ahead (two
wait, made like the last container), has unshared user, mount, ipc, uts and net (unless the
profile's network is "host") namespaces and waited while the spawner wrote its id map (with
newuidmap's ranges, through idmap.Mapper). The create request goes on to it as the host
planned it: it joins the container's cgroup, unshares the cgroup namespace, makes the
container's filesystem (the host's plan: rootfs.message), makes the pid namespace and clones
init (its pid 1) as this process's child, and exits. Init (a child of this process, a child
subreaper, dying with it: PDEATHSIG) mounts /proc, pivots into its own root (the staging
tmpfs, holding the container's root at rootfs.ROOT), moves to an id of its own where the map
has more than one (idmap.IdMapping.init_uid) and serves the container.

Run as `python -m sandbox.runtime.spawner FD`.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.errors import RuntimeSetupError
from sandbox.runtime import idmap, protocol
from sandbox.runtime import syscalls as sc
from sandbox.runtime.network import FULL, PROXY, slirp

# Built with the package (setup.py). Opened once, when the spawner starts, and exec'd by
# descriptor: helpers and the id mapper are this binary.
INIT_BINARY = Path(__file__).with_name("sbx-init")

# A helper's process name, for whoever lists processes.
HELPER_NAME = "sbx-helper"
# Helpers made ahead: two, so that containers asked for back to back find one ready.
SPARES = 2


def _mapping(d: dict[str, Any]) -> idmap.IdMapping:
    return idmap.IdMapping(
        d["method"], tuple(idmap.IdRange(*r) for r in d["uid_map"]),
        tuple(idmap.IdRange(*r) for r in d["gid_map"]), d["run_uid"], d["run_gid"])


def _readable(sock: socket.socket) -> bool:
    """Whether a helper's or the mapper's socket has something to read: from one that only
    answers, that is its end (EOF)."""
    return bool(select.select([sock], [], [], 0)[0])


@contextlib.contextmanager
def _sigchld_held() -> Iterator[None]:
    """Our SIGCHLD handler reaps any child; held back while subprocess runs the newuidmap
    helpers, so that it cannot take them from under subprocess (which would then read their
    exit as 0)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


@dataclass
class Helper:
    """A helper (`sbx-init helper`, native/helper.c), as the spawner holds it."""

    pid: int
    link: socket.socket            # requests to it, its answers
    host: socket.socket            # the host's end of the container's control socket
    mapping: dict[str, Any]        # the id map it was made for (a request's "mapping")
    host_network: bool
    mapper: idmap.Mapper | None    # whose namespace it made its own in, which maps it
    mapped: bool = False           # its namespaces made and their id map written

    def fits(self, req: dict[str, Any]) -> bool:
        return req["mapping"] == self.mapping and req["host_network"] == self.host_network

    def close(self) -> None:
        self.link.close()
        self.host.close()


class Spawner:
    def __init__(self, sock: socket.socket, init_binary: int) -> None:
        self.sock = sock
        self.init_binary = init_binary   # an O_PATH descriptor of sbx-init
        self.inits: set[int] = set()
        # Made like the last container, for the next ones: namespaces and id map ready.
        self.spares: list[Helper] = []
        self.mapper: idmap.Mapper | None = None

    def reap(self, *_: object) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.inits.discard(pid)

    def _mapper(self, mapping: idmap.IdMapping) -> idmap.Mapper | None:
        """The mapper of `mapping`, made on first need (and again if it died); None where
        a map is one write (`direct`, `single`)."""
        if mapping.method != "newuidmap":
            return None
        if self.mapper is not None and (self.mapper.mapping != mapping
                                        or _readable(self.mapper.sock)):
            self.mapper.close()
            self.mapper = None
        if self.mapper is None:
            with _sigchld_held():
                self.mapper = idmap.Mapper(mapping, f"/proc/self/fd/{self.init_binary}")
        return self.mapper

    def _start(self, req: dict[str, Any]) -> Helper:
        mapper = self._mapper(_mapping(req["mapping"]))
        host, child = protocol.socketpair()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        userns = -1 if mapper is None else mapper.userns
        try:
            # posix_spawn: a vfork, where a fork of this process would copy its page tables.
            # Exec'd in the host's user namespace, the helper's memory (and init's, a clone
            # of it) stays that namespace's. A dup2 onto itself clears close-on-exec.
            pid = os.posix_spawn(
                f"/proc/self/fd/{self.init_binary}",
                [HELPER_NAME, "helper", str(theirs.fileno()), str(child.fileno()), str(userns),
                 str(int(req["host_network"]))], {},
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, fd)
                              for fd in (theirs.fileno(), child.fileno(), userns) if fd >= 0])
        except BaseException:
            host.close()
            ours.close()
            raise
        finally:
            child.close()
            theirs.close()
        return Helper(pid, ours, host, req["mapping"], req["host_network"], mapper)

    def _map(self, helper: Helper) -> None:
        """Write the id map of `helper` once it has made its namespaces."""
        got = protocol.recv(helper.link)
        if got is None or got[0].get("ev") != "unshared":
            raise RuntimeSetupError((got and got[0].get("error")) or "helper died")
        if helper.mapper is not None:
            try:
                helper.mapper.map(helper.pid)
            except RuntimeSetupError:
                if self.mapper is helper.mapper:  # made anew for the next helper
                    self.mapper.close()
                    self.mapper = None
                raise
        else:  # a write or two of our own (direct, single): no helper to reap
            idmap.apply(_mapping(helper.mapping), helper.pid)
        helper.mapped = True

    def _end(self, helper: Helper) -> None:
        """Kill a helper that will not finish, and reap it. One that exited is a zombie
        until reaped here or by `reap`, so its pid is still its own."""
        helper.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(helper.pid, 0)

    def _take(self, req: dict[str, Any]) -> Helper:
        """A helper mapped and waiting for `req`: a spare made for such a request, else
        one made now. A spare that died meanwhile (or whose map cannot be written: its
        mapper died) is passed over; spares made for another kind of request are ended, as
        the next ones are made like this one."""
        for spare in [s for s in self.spares if not s.fits(req)]:
            self.spares.remove(spare)
            self._end(spare)
        while self.spares:
            spare = self.spares.pop(0)
            try:
                if spare.mapped and _readable(spare.link):
                    raise RuntimeSetupError("a spare helper died")  # it says nothing else
                if not spare.mapped:
                    self._map(spare)
                return spare
            except (RuntimeSetupError, OSError, protocol.ProtocolError):
                self._end(spare)
        helper = self._start(req)
        try:
            self._map(helper)
        except BaseException:
            self._end(helper)
            raise
        return helper

    def refill(self, req: dict[str, Any]) -> None:
        """Spares made like `req`, after it was answered. One that cannot be made now is
        made when a container asks for it, which then says why it failed."""
        with contextlib.suppress(RuntimeSetupError, OSError, protocol.ProtocolError):
            while len(self.spares) < SPARES:
                self.spares.append(self._start(req))

    def prepare(self, spare: Helper) -> None:
        """Write the id map of a spare that has made its namespaces (between requests)."""
        try:
            self._map(spare)
        except (RuntimeSetupError, OSError, protocol.ProtocolError):
            # Made again, and its failure reported, when a container asks for one.
            self.spares.remove(spare)
            self._end(spare)

    def create(self, req: dict[str, Any], fds: list[int]) -> None:
        req["init"]["started_ns"] = time.monotonic_ns()
        helper: Helper | None = None
        extra: list[int] = []
        try:
            try:
                helper = self._take(req)
                init_pid = self._finish(helper, req, fds, extra)
            finally:
                for fd in fds:
                    os.close(fd)
        except (RuntimeSetupError, OSError, protocol.ProtocolError) as e:
            if helper is not None:
                self._end(helper)
            for fd in extra:
                os.close(fd)
            protocol.send(self.sock, {"ok": False, "error": str(e)})
            return
        helper.link.close()  # it has exited, or is about to: `reap` takes it
        self.inits.add(init_pid)
        # The proxy's listener, or slirp4netns's exit pipe: the host's from now on.
        protocol.send(self.sock, {"ok": True, "pid": init_pid},
                      [helper.host.fileno(), *extra])
        helper.host.close()
        for fd in extra:
            os.close(fd)

    def _finish(self, helper: Helper, req: dict[str, Any], fds: list[int],
                extra: list[int]) -> int:
        """Init's pid, once the helper has said it. For `proxy`, the listener the helper
        hands over, and for `full` slirp4netns's exit pipe once it is ready, are appended
        to `extra`."""
        started = self._slirp(helper.pid) if req.get("network") == FULL else None
        if started is not None:
            extra.append(started[1])
        try:
            protocol.send(helper.link, req, fds)
            if req.get("network") == PROXY:
                got = protocol.recv(helper.link)
                if got is not None:
                    extra += got[1]
                    if got[0].get("ev") == "listener" and len(got[1]) == 1:
                        got = protocol.recv(helper.link)
                    elif got[0].get("ev") == "started":
                        raise RuntimeSetupError("the container's proxy listener did not "
                                                "arrive")
            else:
                got = protocol.recv(helper.link)
            if got is None or got[0].get("ev") != "started":
                raise RuntimeSetupError((got and got[0].get("error")) or "helper died")
            if started is not None:
                # On failure, init (running by now) ends when `create` closes its control
                # socket, as for any failure after the helper's answer.
                slirp.wait_ready(started[2], started[0])
                started = None
            return int(got[0]["pid"])
        finally:
            if started is not None:
                os.close(started[2])

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
                return
            self.refill(req)
        else:  # answered all the same: the host waits for an answer to each request
            for fd in fds:
                os.close(fd)
            protocol.send(self.sock, {"ok": False, "error": f"unknown op {req.get('op')!r}"})

    def serve(self) -> None:
        while True:
            # A spare that has made its namespaces gets its id map while no request waits.
            unmapped = {s.link.fileno(): s for s in self.spares if not s.mapped}
            poller = select.poll()
            for fd in (self.sock.fileno(), *unmapped):
                poller.register(fd, select.POLLIN)
            ready = {fd for fd, _ in poller.poll()}
            if self.sock.fileno() not in ready:
                self.prepare(unmapped[ready.pop()])
                continue
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
        for spare in self.spares:
            self._end(spare)
        if self.mapper is not None:
            self.mapper.close()
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
    os.set_inheritable(sock.fileno(), False)  # passed to us inheritable; not to helpers
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
