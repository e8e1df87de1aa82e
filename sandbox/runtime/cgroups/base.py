"""The cgroup interface the runtime uses, and small cgroupfs helpers shared by both drivers.

Every call is a handful of plain syscalls on cgroupfs: these run on the hot path of each run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sandbox.errors import CgroupError

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")

# How long kill() and destroy() wait for the kernel: a SIGKILLed process needs a moment to
# exit and a just-emptied cgroup may briefly refuse rmdir with EBUSY.
KILL_TIMEOUT_S = 5.0
RMDIR_TIMEOUT_S = 2.0
_READ_SIZE = 65536
_KEPT_READ_SIZE = 4096  # a counter or a few keyed lines; a longer text is read again whole
# The most control files read_kept and write_kept keep open in one cgroup (v1: pids.current
# and cpuacct's usage, usage_user and usage_sys; cpuacct.usage again, for its reset; the
# memory cgroup's max_usage_in_bytes, oom_control, usage_in_bytes and failcnt, and
# max_usage_in_bytes again, for its reset): with a cgroup.procs per hierarchy, all a run
# cgroup holds (a leak check's bound, loadtest/soakcheck.py).
KEPT_FILES_MAX = 10
# An empty container cgroup unchanged this long belongs to no live instance: another
# instance's start removes it (engine/records.py). Cgroups made ahead of a container
# (spawnerclient) are used only while well younger than that.
ORPHAN_AGE_S = 60.0


# A limit to lift (pids, cpu_quota_us; None leaves the cgroup's as it is): a recycled run
# cgroup must not keep a limit of the run before.
UNLIMITED = -1


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int | None = None  # hard limit, swap off
    pids: int | None = None          # UNLIMITED: none
    cpu_quota_us: int | None = None  # CPU time per cpu_period_us; UNLIMITED: none
    cpu_period_us: int = 100_000
    cpuset_cpus: str | None = None


@dataclass(frozen=True)
class CgroupStats:
    cpu_user_ns: int | None
    cpu_sys_ns: int | None
    cpu_total_ns: int | None
    memory_peak_bytes: int | None
    oom_kills: int
    cpu_source: str | None
    memory_source: str | None


class Cgroup(ABC):
    """One logical cgroup; on v1 it spans one directory per hierarchy.

    A run's cgroup serves one run at a time and, recycled, several in turn: each of those
    uses is a Lease, and a kill meant for a run goes through its lease (see Lease.kill).
    """

    path: str  # relative to the driver's base, e.g. "c-1a2b/r-3"

    def __init__(self) -> None:
        # Held by a lease's kill for as long as it acts, and by recycle and destroy, which
        # end the current use: a kill either finishes before its use ends or finds it over.
        self._guard = threading.Lock()
        self._use = 0
        self._procs: list[int] | None = None
        # Control files read or written at every run's end, kept open (read_kept,
        # write_kept): (path, open flags) -> descriptor.
        self._kept: dict[tuple[str, int], int] = {}

    def lease(self) -> Lease:
        """The current use of this cgroup, for the run it is handed to; call it when handing
        the cgroup out (after any recycle), so that the lease names that run's use."""
        return Lease(self, self._use)

    def _kill_use(self, use: int) -> bool:
        with self._guard:
            if use != self._use:
                return False
            self.kill()
            return True

    @abstractmethod
    def child(self, name: str, *, limitable: bool = True) -> Cgroup:
        """Create a sub-cgroup (in every hierarchy). limitable=False: one that needs no
        controller of its own (a container's init), so on v2 the parent need not hand
        controllers down yet and a process may still join the parent meanwhile."""

    @abstractmethod
    def apply(self, limits: CgroupLimits) -> None:
        """Write the limits that are set; a missing controller raises CgroupError naming it."""

    @abstractmethod
    def open_procs_fds(self) -> list[int]:
        """Write-only cgroup.procs fds, one per hierarchy; a process joins by writing b"0"."""

    def procs_fds(self) -> list[int]:
        """This cgroup's own open_procs_fds, opened once and kept for every use (each run's
        child joins through them) until destroy or close_procs_fds: opening and closing
        them at every run cost a dozen system calls of the run's path."""
        if self._procs is None:
            self._procs = self.open_procs_fds()
        return self._procs

    def join_fds(self, limits: CgroupLimits) -> list[int]:
        """Of procs_fds, those a run under `limits` joins by: all of them, but where a
        driver knows one to leave out."""
        return self.procs_fds()

    def close_procs_fds(self) -> None:
        """Close what is kept open for this cgroup: its cgroup.procs descriptors and the
        control files read_kept keeps."""
        procs, self._procs = self._procs, None
        kept, self._kept = self._kept, {}
        for fd in [*(procs or ()), *kept.values()]:
            os.close(fd)

    def read_kept(self, path: str) -> bytes:
        """The text of control file `path`, through a descriptor kept open from its first
        read until close_procs_fds. cgroupfs (kernfs) makes a file's text anew at every
        read from offset 0, so a pread there reads what a new open would (the value now),
        in one system call rather than an open, a read and a close: a run's end reads four
        of them in a cgroup that serves run after run (v1's pids, cpuacct and memory; a
        memory cgroup made anew has its files opened by the recycle that makes it). A
        removed cgroup's file reads ENODEV.

        Kept files are closed only by destroy and close_procs_fds, once no run uses the
        cgroup any more: a descriptor is never closed under a reader."""
        data = os.pread(self._kept_fd(path, os.O_RDONLY), _KEPT_READ_SIZE, 0)
        return data if len(data) < _KEPT_READ_SIZE else read_bytes(path)

    def write_kept(self, path: str, data: str) -> None:
        """write() through a descriptor kept as read_kept keeps its own: for a control
        file written at every run's end (cgroupfs takes each write whole, at any offset)."""
        try:
            os.pwrite(self._kept_fd(path, os.O_WRONLY), data.encode(), 0)
        except OSError as e:
            raise CgroupError(f"cannot write {data!r} to {path}: {e.strerror}") from e

    def _forget_kept(self, directory: str) -> None:
        """Close what is kept of the files of `directory` (removed: made anew)."""
        prefix = directory + "/"
        for key in [k for k in self._kept if k[0].startswith(prefix)]:
            os.close(self._kept.pop(key))

    def _kept_fd(self, path: str, flags: int) -> int:
        fd = self._kept.get((path, flags))
        if fd is None:
            opened = os.open(path, flags | os.O_CLOEXEC)
            fd = self._kept.setdefault((path, flags), opened)
            if fd != opened:  # another thread (a kill of the run's lease) kept one first
                os.close(opened)
        return fd

    @abstractmethod
    def add_pid(self, pid: int) -> None: ...

    @abstractmethod
    def changed(self) -> float:
        """When its directory last changed (st_mtime): how long an orphan has been one."""

    @abstractmethod
    def pids(self, *, recursive: bool = False) -> list[int]:
        """Processes in this cgroup (and its descendants if recursive), over all hierarchies."""

    @abstractmethod
    def is_empty(self) -> bool:
        """No process in it: one read, for the end of every run (runs cannot make children)."""

    @abstractmethod
    def stats(self) -> CgroupStats: ...

    @abstractmethod
    def cpu_ns(self) -> int | None:
        """The cheapest current CPU total, for watchdogs."""

    def cpu_pressure_us(self) -> int | None:
        """µs during which some process of this cgroup waited for a CPU (PSI's some
        total), where the cgroup keeps it (v2); None on v1, which keeps none per cgroup."""
        return None

    @abstractmethod
    def kill(self) -> None:
        """SIGKILL everything in this cgroup and its children; return once it is empty.
        Whatever is in it now: a kill for a run goes through the run's Lease."""

    def destroy(self, *, empty: bool = False) -> None:
        """kill(), then remove this cgroup and its children everywhere. Idempotent. With
        `empty`, the caller knows no process is left (their pid namespace ended): no kill,
        unless removing finds one after all. Ends the current use: its lease kills no more."""
        with self._guard:
            self._use += 1
            self._destroy(empty=empty)
        self.close_procs_fds()

    @abstractmethod
    def _destroy(self, *, empty: bool) -> None: ...

    def recycle(self, limits: CgroupLimits, *, wait: bool = True) -> bool | None:
        """Make a finished run's emptied cgroup (with `limits` applied) fit for the next
        run, its figures starting from zero as a new one's would and `limits` in force;
        False when it cannot be (destroy it then). Making and removing a cgroup in every
        hierarchy costs more than resetting a few counters, and runs follow each other in
        a container. Ends the current use, even when it fails: its lease kills no more, and
        a kill it is doing finishes first. Without `wait`, a kill under way (which may wait
        for a freezer) is not waited for: None, having done nothing."""
        if not self._guard.acquire(blocking=wait):
            return None
        try:
            self._use += 1
            return self._renew(limits)
        finally:
            self._guard.release()

    def _renew(self, limits: CgroupLimits) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"


@dataclass(frozen=True, eq=False)
class Lease:
    """One use of a cgroup: the run it was handed to. A run's limits are enforced by kills
    issued from timers, output readers and worker threads, any of which may act after the
    run has ended; its cgroup by then may serve the next run. So a run's kill names its
    lease, and acts only under the cgroup's guard while this use is current: one that comes
    late does nothing, and recycling waits for one under way. By construction, a kill meant
    for one run cannot reach the next run in the same cgroup."""

    cgroup: Cgroup
    use: int

    def kill(self) -> bool:
        """SIGKILL every process of this use and wait until they are gone; False, having
        done nothing, once the use is over (the cgroup recycled or destroyed)."""
        return self.cgroup._kill_use(self.use)

    @property
    def current(self) -> bool:
        return self.use == self.cgroup._use


class CgroupDriver(ABC):
    version: int
    controllers: frozenset[str]

    @abstractmethod
    def create(self, name: str) -> Cgroup: ...

    @abstractmethod
    def open(self, path: str) -> Cgroup | None:
        """An existing cgroup under the base (crash cleanup); None if absent."""

    @abstractmethod
    def list(self) -> list[str]:
        """Names of the direct children of the base."""

    @abstractmethod
    def close(self) -> None:
        """Remove the base directories this driver owns, if empty."""

    @abstractmethod
    def describe(self) -> dict[str, Any]: ...


# --- cgroupfs helpers ---------------------------------------------------------------------


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise CgroupError(f"invalid cgroup name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def check_path(path: str) -> str:
    for part in path.split("/"):
        check_name(part)
    return path


def read_bytes(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunk = os.read(fd, _READ_SIZE)
        # cgroupfs fills a read as far as the file goes, and so do regular files (test
        # trees): a short read is the end, no second read to see it. Figures are read at
        # every run's end, and each read lets the housekeeping thread take the GIL.
        if len(chunk) < _READ_SIZE:
            return chunk
        chunks = [chunk]
        while chunk := os.read(fd, _READ_SIZE):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_raw(path: str, data: str) -> None:
    # O_TRUNC is ignored by cgroupfs but keeps plain files (test trees) exact.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def max_or(limit: int) -> str:
    """A pids or v2 cpu limit as cgroupfs takes it: "max" for UNLIMITED."""
    return "max" if limit == UNLIMITED else str(limit)


def write(path: str, data: str) -> None:
    try:
        write_raw(path, data)
    except OSError as e:
        raise CgroupError(f"cannot write {data!r} to {path}: {e.strerror}") from e


def read_int(path: str) -> int:
    return int(read_bytes(path))


def read_keyed(path: str) -> dict[str, int]:
    """Parse 'key value' lines (cpu.stat, memory.events, memory.oom_control, cpuacct.stat)."""
    return parse_keyed(read_bytes(path))


def parse_keyed(text: bytes) -> dict[str, int]:
    """read_keyed's parse of a text read otherwise."""
    out: dict[str, int] = {}
    for line in text.split(b"\n"):
        key, _, value = line.partition(b" ")
        if value:
            try:
                out[key.decode()] = int(value)
            except ValueError:
                continue
    return out


def read_pids(path: str) -> list[int]:
    """cgroup.procs as ints; a directory that is gone counts as empty."""
    try:
        return [int(p) for p in read_bytes(path).split()]
    except FileNotFoundError:
        return []


def subtree_dirs(top: str) -> Iterator[str]:
    """Descendant directories of top, deepest first, then top itself (if it exists)."""
    if not os.path.isdir(top):
        return
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        yield dirpath


def has_children(top: str) -> bool:
    """cgroupfs (kernfs) keeps a directory's link count at 2 + its subdirectories: one stat,
    where listing a cgroup reads dozens of control files' entries on every run's end. A
    file system that does not count them (link count 1, btrfs) is listed instead."""
    try:
        links = os.stat(top).st_nlink
        if links != 1:
            return links > 2
        with os.scandir(top) as it:
            return any(e.is_dir(follow_symlinks=False) for e in it)
    except FileNotFoundError:
        return False


def rmdir(path: str) -> None:
    """Remove one cgroup directory. A module attribute so tests with plain trees can swap it."""
    os.rmdir(path)


def remove_tree(top: str, timeout: float = RMDIR_TIMEOUT_S) -> None:
    """rmdir top's descendants bottom-up, then top; retry EBUSY briefly; gone is fine."""
    try:  # the usual case (a finished run's cgroup): no children, nothing left in it
        rmdir(top)
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise CgroupError(f"cannot remove cgroup {top}: {e.strerror}") from e
    deadline = time.monotonic() + timeout
    for d in list(subtree_dirs(top)):
        delay = 0.001
        while True:
            try:
                rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove cgroup {d}: {e.strerror}") from e
                time.sleep(delay)
                delay = min(delay * 2, 0.05)


def wait_until(done: Callable[[], bool], on_retry: Callable[[], object], what: str,
               timeout: float = KILL_TIMEOUT_S) -> None:
    """Poll done() with a short backoff, calling on_retry() between polls."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not done():
        if time.monotonic() > deadline:
            raise CgroupError(f"{what} did not finish within {timeout:.0f}s")
        on_retry()
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        if pid <= 0:  # a process outside our pid namespace reads as 0
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def cpuset_copy_parent(directory: str) -> None:
    """v1: a new cpuset cgroup starts with empty cpus/mems and refuses processes; copy the
    parent's and let the kernel do it for every later child (cgroup.clone_children)."""
    parent = os.path.dirname(directory)
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not read_bytes(f"{directory}/{name}").strip():
            write(f"{directory}/{name}", read_bytes(f"{parent}/{name}").decode().strip())
    write(f"{directory}/cgroup.clone_children", "1")
