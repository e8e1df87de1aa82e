"""User-mode networking for a `full` container: slirp4netns (Debian's package) attached to
its network namespace by the spawner, in the host's namespaces. It makes `tap0` there with
10.0.2.100/24 and a default route through 10.0.2.2, and carries the container's TCP and UDP
out through the host's own sockets. `--disable-host-loopback` keeps 10.0.2.2 from reaching
the host's 127.0.0.1; the blocked ranges and the host's addresses are unreachable routes
(routes.py). It runs under its own seccomp filter (and, for root, in a mount namespace of its
own without capabilities) and exits when the host closes the write end of its exit pipe (the
container's destruction, or the service's death)."""

from __future__ import annotations

import os
import select
import shutil

from sandbox.errors import RuntimeSetupError
from sandbox.runtime.network import FULL, Traffic

TAP = "tap0"
# slirp4netns's largest MTU: fewer, larger segments between the container and slirp.
MTU = 65520
READY_TIMEOUT_S = 10.0


def program() -> str:
    found = shutil.which("slirp4netns")
    if found is None:
        raise RuntimeSetupError("network 'full' needs slirp4netns, which is not installed: "
                                "apt-get install slirp4netns (or turn [network] full off)")
    return found


def problem() -> str | None:
    """Why `full` cannot work here for this process's user, or None (for the operator's
    log at start, and for a failed container's error)."""
    if shutil.which("slirp4netns") is None:
        return "slirp4netns is not installed: apt-get install slirp4netns"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return (f"/dev/net/tun cannot be opened by this user ({e.strerror}); Debian's udev "
                "makes it 0666: chmod 0666 /dev/net/tun")
    return None


def start(userns: int, netns: int) -> tuple[int, int, int]:
    """Start slirp4netns on the namespaces open at `userns` and `netns` (descriptors of
    ours, inherited by it). Returns its pid, the write end of its exit pipe (closing it ends
    slirp4netns) and the read end of its ready pipe (see `wait_ready`)."""
    exit_r, exit_w = os.pipe2(os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    passed = (userns, netns, exit_r, ready_w)
    for fd in passed:
        os.set_inheritable(fd, True)
    try:
        # Its sandbox (a mount namespace, capabilities dropped) needs root: an ordinary
        # user's slirp4netns, started outside the container's user namespace, fails in it
        # (setegid); its seccomp filter works for both.
        sandbox = ["--enable-sandbox"] if os.geteuid() == 0 else []
        pid = os.posix_spawn(program(), [
            "slirp4netns", "--configure", f"--mtu={MTU}", "--disable-host-loopback",
            *sandbox, "--enable-seccomp", f"--exit-fd={exit_r}",
            f"--ready-fd={ready_w}", "--netns-type=path",
            f"--userns-path=/proc/self/fd/{userns}", f"/proc/self/fd/{netns}", TAP],
            {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            # It chats on both (the tap's descriptor, its seccomp being experimental) for
            # every container; a failure is told by the ready pipe (wait_ready).
            file_actions=[(os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_WRONLY, 0)
                          for fd in (1, 2)])
    except BaseException:
        for fd in (exit_w, ready_r):
            os.close(fd)
        raise
    finally:
        for fd in (exit_r, ready_w):
            os.close(fd)
        for fd in (userns, netns):
            os.set_inheritable(fd, False)
    return pid, exit_w, ready_r


def wait_ready(ready: int, pid: int) -> None:
    """Wait until slirp4netns has configured tap0 (it writes "1" to the ready pipe);
    RuntimeSetupError if it exits or takes longer than READY_TIMEOUT_S."""
    try:
        readable, _, _ = select.select([ready], [], [], READY_TIMEOUT_S)
        got = os.read(ready, 1) if readable else b""
    finally:
        os.close(ready)
    if got != b"1":
        why = "took too long" if not readable else "exited"
        cause = problem()
        raise RuntimeSetupError(f"network 'full': slirp4netns (pid {pid}) {why} before "
                                "the container's network was ready"
                                + (f": {cause}" if cause else ""))


class Link:
    """The host's side of a `full` container: slirp4netns's exit pipe, and the container's
    tap0 counters (read through init's /proc/PID/net/dev, which shows init's network
    namespace) at a run's start and end."""

    def __init__(self, exit_fd: int, init_pid: int) -> None:
        self._exit_fd = exit_fd
        self._dev = f"/proc/{init_pid}/net/dev"
        self._start = (0, 0)

    def _counters(self) -> tuple[int, int]:
        """(bytes the container sent, bytes it received) on tap0 so far."""
        try:
            with open(self._dev, "rb") as f:
                for line in f:
                    name, _, figures = line.partition(b":")
                    if name.strip() == TAP.encode():
                        fields = figures.split()
                        return int(fields[8]), int(fields[0])
        except OSError:
            pass
        return self._start

    def begin(self, allow: object = None) -> None:
        self._start = self._counters()

    def figures(self) -> Traffic:
        sent, received = self._counters()
        return Traffic(FULL, bytes_sent=sent - self._start[0],
                       bytes_received=received - self._start[1])

    def end(self) -> Traffic:
        return self.figures()

    def close(self) -> None:
        if self._exit_fd >= 0:
            os.close(self._exit_fd)  # slirp4netns sees it and exits
            self._exit_fd = -1
