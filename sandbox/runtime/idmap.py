"""Which host ids a container's user namespace maps, and writing that map.

Three ways, chosen by who runs the service and what the host offers:
- `single`: an ordinary user without subordinate ids; container root is that user and
  untrusted code runs as container root with no capabilities.
- `newuidmap`: an ordinary user with /etc/subuid and /etc/subgid ranges and the setuid
  helpers from the `uidmap` package; untrusted code runs as 65534.
- `direct`: host root writes a subordinate range itself; container root is never host root.

Where the map holds more than one id, the container's init moves to the highest one
(`init_uid`, `init_gid`), which no run may use: a process can change another's rlimits
(prlimit) or signal it when their ids match, and init's children inherit its state. With a
single id, init and runs share it and the seccomp policy refuses those calls instead.

With `newuidmap`, the setuid helpers run once per spawner, not once per container: they
map the user namespace of a `Mapper`, and every container's user namespace is made inside
that one, its map written by the mapper (native/mapper.c). A container's namespace maps
the same host ids either way; inside, /proc/self/uid_map shows them as the parent
namespace's ids ("0 0 1", "1 1 65535"), as in any nested user namespace.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import PolicyError, RuntimeSetupError

NOBODY = 65534
MAPPER_NAME = "sbx-mapper"   # the mapper's process name, for whoever lists processes


@dataclass(frozen=True)
class IdRange:
    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class IdMapping:
    method: str  # "single" | "newuidmap" | "direct"
    uids: tuple[IdRange, ...]
    gids: tuple[IdRange, ...]
    run_uid: int
    run_gid: int

    @property
    def root_uid(self) -> int:
        """The host uid that container root maps to (owns files the container writes as root)."""
        return self.uids[0].outside

    @property
    def root_gid(self) -> int:
        return self.gids[0].outside

    @property
    def init_uid(self) -> int:
        """The container init's own uid: the highest mapped, or 0 (shared) for a single id."""
        return _highest(self.uids)

    @property
    def init_gid(self) -> int:
        return _highest(self.gids)

    @property
    def shares_init_id(self) -> bool:
        """Whether runs and init have the same id (the map holds one id only)."""
        return self.init_uid == 0

    def check_run_id(self, field: str, value: int) -> None:
        """PolicyError (naming `field`, "uid" or "gid") unless a run may take this id: a
        mapped one, never init's own unless the map holds no other."""
        init_id, default = ((self.init_uid, self.run_uid) if field == "uid"
                            else (self.init_gid, self.run_gid))
        usable = max(init_id - 1, 0)
        if 0 <= value <= usable:
            return
        if value == init_id:
            raise PolicyError(f"{field}: {value} is the container init's own id, which no run "
                              "may share (a run under it could change what later runs "
                              f"inherit from init); run as another user, e.g. {default}")
        raise PolicyError(f"{field}: {value} is not mapped in this container; "
                          f"use 0 to {usable}")

    def host_uid(self, inside: int) -> int | None:
        for r in self.uids:
            if r.inside <= inside < r.inside + r.count:
                return r.outside + inside - r.inside
        return None

    def describe(self) -> dict[str, object]:
        return {
            "method": self.method,
            "uid_map": [[r.inside, r.outside, r.count] for r in self.uids],
            "gid_map": [[r.inside, r.outside, r.count] for r in self.gids],
            "run_uid": self.run_uid,
            "run_gid": self.run_gid,
            "init_uid": self.init_uid,
            "init_gid": self.init_gid,
        }


def _highest(ranges: tuple[IdRange, ...]) -> int:
    return max(r.inside + r.count for r in ranges) - 1


def _run_id(highest: int) -> int:
    """nobody where the map reaches past it, else the id below init's (the highest)."""
    return NOBODY if highest > NOBODY else max(highest - 1, 0)


def read_subordinate(path: Path, user: str, uid: int) -> tuple[int, int] | None:
    """The first range for `user` (by name or number) in an /etc/subuid-style file."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)):
            try:
                start, count = int(parts[1]), int(parts[2])
            except ValueError:
                continue
            if count > 0:
                return start, count
    return None


def plan(*, uid: int | None = None, gid: int | None = None, etc: Path = Path("/etc"),
         allow_single: bool = True) -> IdMapping:
    """Choose the mapping for a service running as `uid`/`gid` (default: this process)."""
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    sub_u = read_subordinate(etc / "subuid", user, uid)
    sub_g = read_subordinate(etc / "subgid", user, uid)

    if uid == 0:
        if not (sub_u and sub_g):
            raise RuntimeSetupError(
                "running as root needs a subordinate id range so that container root is not "
                "host root: add a line such as 'root:100000:65536' to /etc/subuid and "
                "/etc/subgid (or run the service as an ordinary user)")
        count = min(sub_u[1], sub_g[1], 65536)
        run = _run_id(count - 1)
        return IdMapping("direct", (IdRange(0, sub_u[0], count),),
                         (IdRange(0, sub_g[0], count),), run, run)

    helpers = shutil.which("newuidmap") and shutil.which("newgidmap")
    if sub_u and sub_g and helpers:
        count = min(sub_u[1], sub_g[1], 65535)
        run = _run_id(count)
        return IdMapping("newuidmap",
                         (IdRange(0, uid, 1), IdRange(1, sub_u[0], count)),
                         (IdRange(0, gid, 1), IdRange(1, sub_g[0], count)), run, run)
    if not allow_single:
        raise RuntimeSetupError(
            f"no subordinate ids for {user}: install the uidmap package and add ranges to "
            "/etc/subuid and /etc/subgid")
    return IdMapping("single", (IdRange(0, uid, 1),), (IdRange(0, gid, 1),), 0, 0)


def _fmt(ranges: tuple[IdRange, ...]) -> str:
    return "".join(f"{r.inside} {r.outside} {r.count}\n" for r in ranges)


def _fmt_nested(ranges: tuple[IdRange, ...]) -> str:
    """A child namespace's map of the same host ids as its parent's `ranges`: each of the
    parent's ranges onto itself (one line each: a line must lie within one of the parent's)."""
    return "".join(f"{r.inside} {r.inside} {r.count}\n" for r in ranges)


class Mapper:
    """A user namespace mapped once with newuidmap and newgidmap, and its owner, the
    process `sbx-init mapper` (native/mapper.c): a container's user namespace made inside
    it (`userns`, for setns) gets its map from the mapper, without a setuid exec.

    Made by the spawner, whose SIGCHLD handler must be held back meanwhile (see `apply`)."""

    def __init__(self, mapping: IdMapping, init_binary: str) -> None:
        self.mapping = mapping
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.set_inheritable(theirs.fileno(), True)
        try:
            self.pid = os.posix_spawn(init_binary, [
                MAPPER_NAME, "mapper", str(theirs.fileno()), _fmt_nested(mapping.uids),
                _fmt_nested(mapping.gids)], {})
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.userns = -1
        try:
            said, fds, _, _ = socket.recv_fds(self.sock, 256, 1)
            if fds:
                self.userns = fds[0]
            if said != b"u" or not fds:
                raise RuntimeSetupError("the id mapper did not start: "
                                        f"{said[1:].decode(errors='replace') or 'it died'}")
            apply(mapping, self.pid)
        except BaseException:
            self.close()
            raise

    def map(self, pid: int) -> None:
        """Write the maps of `pid`, which has just made its user namespace in `userns`."""
        try:
            self.sock.send(str(pid).encode())
            answer = self.sock.recv(256)
        except OSError as e:
            answer = f"E{e}".encode()
        if answer != b"ok":
            raise RuntimeSetupError(f"writing the id map of pid {pid} failed: "
                                    f"{answer[1:].decode(errors='replace') or 'the mapper died'}")

    def close(self) -> None:
        self.sock.close()
        if self.userns >= 0:
            os.close(self.userns)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def apply(mapping: IdMapping, pid: int) -> None:
    """Write the map of process `pid`, which has just unshared its user namespace."""
    proc = f"/proc/{pid}"
    if mapping.method == "newuidmap":
        # Both helpers at once: each is a setuid exec of ~1.5 ms on a container's cold path.
        helpers = []
        for tool, ranges in (("newuidmap", mapping.uids), ("newgidmap", mapping.gids)):
            args = [tool, str(pid)]
            for r in ranges:
                args += [str(r.inside), str(r.outside), str(r.count)]
            helpers.append((tool, subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.PIPE, text=True)))
        for tool, proc in helpers:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeSetupError(f"{tool} failed: {err.strip()}; check the "
                                        "ranges in /etc/subuid and /etc/subgid")
        return
    try:
        if mapping.method == "single":
            # An unprivileged writer may only map its own gid after giving up setgroups.
            with open(f"{proc}/setgroups", "w") as f:
                f.write("deny")
        with open(f"{proc}/uid_map", "w") as f:
            f.write(_fmt(mapping.uids))
        with open(f"{proc}/gid_map", "w") as f:
            f.write(_fmt(mapping.gids))
    except OSError as e:
        raise RuntimeSetupError(f"writing the id map of pid {pid} failed: {e}") from e
