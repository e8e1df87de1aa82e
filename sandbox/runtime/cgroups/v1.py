"""cgroup v1 driver: one directory per hierarchy (memory, pids, cpu, cpuacct, cpuset, freezer).

A hierarchy may carry several controllers (cpu,cpuacct co-mounted), so a cgroup is a set of
distinct directories plus a map from controller to the directory that holds it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from typing import Any

from sandbox.errors import CgroupError
from sandbox.runtime.cgroups import base
from sandbox.runtime.cgroups.base import Cgroup, CgroupDriver, CgroupLimits, CgroupStats

CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "cpuset", "freezer")
_FREEZE_TIMEOUT_S = 1.0
# The most a run may leave charged to its memory cgroup for the next run to get it as it is
# (watermark reset) rather than made anew: the kernel's per-CPU charge stock (64 pages on
# each CPU the run charged on), slab freed after the run's end, a page it read first. It
# counts in the next run's peak and against its limit, as a new memory cgroup's first
# 64-page charge already rounds a peak up.
KEEP_MEMORY_RESIDUE_MAX = 512 << 10


class V1Cgroup(Cgroup):
    def __init__(self, driver: V1Driver, path: str) -> None:
        super().__init__()
        self.path = path
        self._driver = driver
        self._dirs = {c: f"{b}/{path}" for c, b in driver.bases.items()}
        self._hier = tuple(dict.fromkeys(self._dirs.values()))
        # Where the cpu and cpuset hierarchies are in _hier when each holds its controller
        # alone (not co-mounted with cpuacct, say): see join_fds.
        self._cpu_alone, self._cpuset_alone = (
            self._hier.index(d) if d is not None and list(self._dirs.values()).count(d) == 1
            else None for d in (self._dirs.get("cpu"), self._dirs.get("cpuset")))
        self._parent_cpus: str | None = None   # _container_cpus, once read
        self._parent_no_swap: bool | None = None   # _parent_never_swaps, once read
        self._memory_limit: int | None = None   # in the memory cgroup, by apply or _renew

    def _dir(self, controller: str) -> str:
        d = self._dirs.get(controller)
        if d is None:
            raise CgroupError(
                f"the {controller} cgroup controller is not available to sandboxd "
                f"(v1 hierarchies in use: {', '.join(sorted(self._dirs))})")
        return d

    def child(self, name: str, *, limitable: bool = True) -> V1Cgroup:
        return self._driver._make(f"{self.path}/{base.check_name(name)}")

    def apply(self, limits: CgroupLimits) -> None:
        if limits.memory_bytes is not None:
            self._apply_memory(self._dir("memory"), limits.memory_bytes)
            self._memory_limit = limits.memory_bytes
        if limits.pids is not None:
            base.write(f"{self._dir('pids')}/pids.max", base.max_or(limits.pids))
        if limits.cpu_quota_us is not None:
            d = self._dir("cpu")
            base.write(f"{d}/cpu.cfs_period_us", str(limits.cpu_period_us))
            base.write(f"{d}/cpu.cfs_quota_us", str(limits.cpu_quota_us))
        if limits.cpuset_cpus is not None:
            d = self._dir("cpuset")
            mems = base.read_bytes(f"{os.path.dirname(d)}/cpuset.mems").decode().strip()
            base.write(f"{d}/cpuset.mems", mems)
            base.write(f"{d}/cpuset.cpus", limits.cpuset_cpus)

    def _apply_memory(self, d: str, limit: int, *, swappiness: bool = True) -> None:
        value = str(limit)
        if not self._driver.memsw:
            base.write(f"{d}/memory.limit_in_bytes", value)
        else:
            # The kernel keeps limit <= memsw.limit at every step, so the order depends on
            # whether the limit goes up or down from what is there now.
            try:
                base.write_raw(f"{d}/memory.limit_in_bytes", value)
                base.write(f"{d}/memory.memsw.limit_in_bytes", value)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise CgroupError(
                        f"cannot write {value!r} to {d}/memory.limit_in_bytes: {e.strerror}"
                    ) from e
                base.write(f"{d}/memory.memsw.limit_in_bytes", value)
                base.write(f"{d}/memory.limit_in_bytes", value)
        if swappiness:
            base.write(f"{d}/memory.swappiness", "0")

    def open_procs_fds(self) -> list[int]:
        fds: list[int] = []
        try:
            for d in self._hier:
                fds.append(self._open_procs(d))
        except CgroupError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def join_fds(self, limits: CgroupLimits) -> list[int]:
        """Every hierarchy's but those whose limits the run's container already has: the
        cpu hierarchy's for a run without a quota, and the cpuset hierarchy's for a run on
        its container's CPUs (no cpuset of its own). The run stays in the container's
        cgroup there, which limits exactly that, and cpuacct counts its CPU time all the
        same. Each join of a v1 hierarchy takes the kernel's cgroup mutex on the run's path
        (~12 µs here, more when a recycle holds it)."""
        fds = self.procs_fds()
        skip = set()
        if self._cpu_alone is not None and limits.cpu_quota_us == base.UNLIMITED:
            skip.add(self._cpu_alone)
        if self._cpuset_alone is not None and limits.cpuset_cpus is not None \
                and limits.cpuset_cpus == self._container_cpus():
            skip.add(self._cpuset_alone)
        return [fd for i, fd in enumerate(fds) if i not in skip] if skip else fds

    def _container_cpus(self) -> str:
        """The cpuset.cpus of the cgroup above this one (a run's container: its init's,
        copied from it at mkdir by cgroup.clone_children), read once."""
        if self._parent_cpus is None:
            try:
                self._parent_cpus = base.read_bytes(
                    f"{os.path.dirname(self._dir('cpuset'))}/cpuset.cpus").decode().strip()
            except OSError:
                self._parent_cpus = ""   # unknown: joined
        return self._parent_cpus

    def _open_procs(self, d: str) -> int:
        try:
            return os.open(f"{d}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CgroupError(f"cannot open cgroup.procs of {self.path}: {e.strerror}") from e

    def add_pid(self, pid: int) -> None:
        for d in self._hier:
            base.write(f"{d}/cgroup.procs", str(pid))

    def pids(self, *, recursive: bool = False) -> list[int]:
        found: set[int] = set()
        for d in self._hier:
            dirs = base.subtree_dirs(d) if recursive else (d,)
            for sub in dirs:
                found.update(base.read_pids(f"{sub}/cgroup.procs"))
        return sorted(found)

    def changed(self) -> float:
        return os.stat(self._hier[0]).st_mtime

    def is_empty(self) -> bool:
        # Every process of a run joins every hierarchy, so one hierarchy tells. pids.current
        # is a counter (of this cgroup and its children); reading cgroup.procs makes v1
        # build a sorted pid list, freed later by a kernel worker, at every run's end.
        if (p := self._dirs.get("pids")) is not None:
            try:
                return int(self.read_kept(f"{p}/pids.current")) == 0
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENODEV):  # removed (ENODEV: when kept)
                    return True
                raise
        return not base.read_pids(f"{self._hier[0]}/cgroup.procs")

    def stats(self) -> CgroupStats:
        user = sys_ = total = peak = None
        cpu_source = memory_source = None
        oom = 0
        try:
            read = self.read_kept
            if (d := self._dirs.get("cpuacct")) is not None:
                total = int(read(f"{d}/cpuacct.usage"))
                if self._driver.cpuacct_split:
                    user = int(read(f"{d}/cpuacct.usage_user"))
                    sys_ = int(read(f"{d}/cpuacct.usage_sys"))
                    cpu_source = "cgroup-v1:cpuacct.usage_user+usage_sys"
                else:  # older kernels: only clock ticks for the split
                    ticks = base.parse_keyed(read(f"{d}/cpuacct.stat"))
                    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
                    user, sys_ = ticks["user"] * tick_ns, ticks["system"] * tick_ns
                    cpu_source = "cgroup-v1:cpuacct.stat+usage"
            if (d := self._dirs.get("memory")) is not None:
                # Kept too: the recycle that makes the memory cgroup anew opens them again.
                peak = int(read(f"{d}/memory.max_usage_in_bytes"))
                memory_source = "cgroup-v1:memory.max_usage_in_bytes"
                oom = self._oom_kills(d)
        except (OSError, ValueError, KeyError) as e:
            raise CgroupError(f"cannot read the figures of cgroup {self.path}: {e}") from e
        return CgroupStats(user, sys_, total, peak, oom, cpu_source, memory_source)

    def _oom_kills(self, d: str) -> int:
        # v1 counts an OOM kill only in the victim's own cgroup, so add the descendants'.
        if not base.has_children(d):
            return self._own_oom_kills(d)
        return sum(self._oom_kills_of(sub, base.read_keyed(f"{sub}/memory.oom_control"))
                   for sub in base.subtree_dirs(d))

    def _own_oom_kills(self, d: str) -> int:
        """The OOM kills counted in memory cgroup d itself, through its kept oom_control."""
        return self._oom_kills_of(d, base.parse_keyed(self.read_kept(f"{d}/memory.oom_control")))

    @staticmethod
    def _oom_kills_of(d: str, ctl: dict[str, int]) -> int:
        if "oom_kill" in ctl:
            return ctl["oom_kill"]
        # kernel < 4.13: hitting the limit is the best hint there is
        return 1 if base.read_int(f"{d}/memory.failcnt") > 0 else 0

    def cpu_ns(self) -> int | None:
        d = self._dirs.get("cpuacct")
        if d is None:
            return None
        try:
            return int(self.read_kept(f"{d}/cpuacct.usage"))
        except OSError as e:
            raise CgroupError(f"cannot read {d}/cpuacct.usage: {e.strerror}") from e

    def kill(self) -> None:
        # The usual case at the end of a run: nothing in it and no child cgroups (every
        # process is in every hierarchy, so one of them tells).
        if self.is_empty() and (not base.has_children(self._hier[0])
                                or not self.pids(recursive=True)):
            return
        freezer = self._dirs.get("freezer")
        if freezer is not None and os.path.isdir(freezer):
            self._frozen_kill(freezer)
        # Without a freezer a fork can outrun one pass; with it, stragglers outside the
        # freezer hierarchy are still possible. Kill again until every hierarchy is empty.
        base.wait_until(lambda: not self.pids(recursive=True),
                        lambda: base.kill_pids(self.pids(recursive=True)),
                        f"killing the processes of cgroup {self.path}")

    def _frozen_kill(self, freezer: str) -> None:
        state = f"{freezer}/freezer.state"
        base.write(state, "FROZEN")
        try:
            # A task stuck in D state can hold FREEZING: kill what is there anyway.
            with contextlib.suppress(CgroupError):
                base.wait_until(lambda: base.read_bytes(state).strip() == b"FROZEN",
                                lambda: None, "freezing", _FREEZE_TIMEOUT_S)
            base.kill_pids(self.pids(recursive=True))
        finally:
            # A frozen task does not act on SIGKILL until thawed.
            base.write(state, "THAWED")

    def _destroy(self, *, empty: bool) -> None:
        if not empty:
            self.kill()
        try:
            for d in self._hier:
                base.remove_tree(d)
        except CgroupError:
            if not empty:
                raise
            self._destroy(empty=False)

    def _renew(self, limits: CgroupLimits) -> bool:
        if not self.is_empty() or base.has_children(self._hier[0]):
            return False
        if (acct := self._dirs.get("cpuacct")) is not None:
            self.write_kept(f"{acct}/cpuacct.usage", "0")  # resets usage_user and _sys too
        if (mem := self._dirs.get("memory")) is not None and not self._keep_memory(mem, limits):
            self._remake_memory(mem, limits)
        return True

    def _keep_memory(self, mem: str, limits: CgroupLimits) -> bool:
        """Ready the memory cgroup for the next run as it is, if the run left it as a new
        one but for at most KEEP_MEMORY_RESIDUE_MAX bytes charged, no limit hit and no OOM
        kill (its count cannot be reset): its watermark goes back to that usage and its
        limit is written if another. A rmdir and mkdir cost the service ~0.15 ms a run and
        a kernel worker ~0.1 ms more to offline the old one, and hold the cgroup mutex that
        the next run's joins wait for."""
        read = self.read_kept
        try:
            if (int(read(f"{mem}/memory.usage_in_bytes")) > KEEP_MEMORY_RESIDUE_MAX
                    or int(read(f"{mem}/memory.failcnt")) or self._own_oom_kills(mem)):
                return False
        except (OSError, ValueError, CgroupError):   # a kernel without one: made anew
            return False
        if limits.memory_bytes != self._memory_limit:
            # A limit to lift, or one whose swappiness was never written: made anew.
            if limits.memory_bytes is None or self._memory_limit is None:
                return False
            try:
                self._apply_memory(mem, limits.memory_bytes, swappiness=False)
            except CgroupError:   # the residue above the lower limit and not reclaimable
                return False
            self._memory_limit = limits.memory_bytes
        self.write_kept(f"{mem}/memory.max_usage_in_bytes", "0")   # now: the usage
        return True

    def _remake_memory(self, mem: str, limits: CgroupLimits) -> None:
        """Make the memory cgroup anew, its limit written again; the name is free again as
        soon as rmdir returns. What the run left charged stays with the removed one."""
        try:
            base.rmdir(mem)
            os.mkdir(mem)
        except OSError as e:
            raise CgroupError(f"cannot renew memory cgroup {mem}: {e.strerror}") from e
        if self._procs is not None:  # the kept one names the removed directory's file
            i = self._hier.index(mem)
            old, self._procs[i] = self._procs[i], self._open_procs(mem)
            os.close(old)
        # So are the figures' files: opened here, off the path of the next run's end.
        self._forget_kept(mem)
        for name in ("memory.max_usage_in_bytes", "memory.oom_control"):
            self._kept_fd(f"{mem}/{name}", os.O_RDONLY)
        self._memory_limit = None
        if limits.memory_bytes is not None:
            self._apply_memory(mem, limits.memory_bytes,
                               swappiness=not self._parent_never_swaps(mem))
            self._memory_limit = limits.memory_bytes

    def _parent_never_swaps(self, mem: str) -> bool:
        """Whether the parent's memory.swappiness is 0, which v1 copies into a memory
        cgroup at its mkdir (so a renewed one needs no write of it). Read once: only the
        runtime writes it, and a container's is written before any run's."""
        if self._parent_no_swap is None:
            try:
                parent = base.read_bytes(f"{os.path.dirname(mem)}/memory.swappiness")
            except OSError:
                parent = b""   # unknown: written, as for a new run cgroup
            self._parent_no_swap = parent.strip() == b"0"
        return self._parent_no_swap

class V1Driver(CgroupDriver):
    version = 1

    def __init__(self, bases: Mapping[str, str], *, owns_base: bool, memsw: bool,
                 cpuacct_split: bool) -> None:
        """bases: controller -> base directory (co-mounted controllers share one)."""
        self.bases = dict(bases)
        self.controllers = frozenset(self.bases)
        self.owns_base = owns_base
        self.memsw = memsw
        self.cpuacct_split = cpuacct_split
        self._hier = tuple(dict.fromkeys(self.bases.values()))

    @classmethod
    def at(cls, mounts: Mapping[str, str], base_name: str, *, may_create: bool,
           setup_hint: str) -> tuple[V1Driver | None, list[str]]:
        """Set up the base directory in each hierarchy (controller -> mount directory).

        may_create: root makes the base dirs; others need them made by `sandboxd setup`.
        """
        warnings: list[str] = []
        bases: dict[str, str] = {}
        by_mount: dict[str, list[str]] = {}
        for c in CONTROLLERS:
            if c in mounts:
                by_mount.setdefault(mounts[c], []).append(c)
        for mount, ctls in by_mount.items():
            b = f"{mount}/{base_name}"
            problem = _prepare_base(b, ctls, may_create)
            if problem is None:
                bases.update(dict.fromkeys(ctls, b))
            elif "memory" in ctls:
                return None, [f"no writable cgroup ({problem}): memory and pids limits fall "
                              f"back to rlimits; {setup_hint}"]
            else:
                warnings.append(f"cgroup v1 {','.join(ctls)} not usable ({problem}); "
                                f"{setup_hint}")
        if "memory" not in bases:
            return None, ["no cgroup v1 memory hierarchy: memory limits fall back to rlimits"]
        if "pids" not in mounts:
            warnings.append("no cgroup v1 pids hierarchy: pids limits fall back to rlimits")
        if "cpuacct" not in mounts:
            warnings.append("no cgroup v1 cpuacct hierarchy: CPU time comes from rusage")
        memsw = os.path.exists(f"{mounts['memory']}/memory.memsw.limit_in_bytes")
        if not memsw:
            warnings.append("no memory.memsw.* (swap accounting off): a memory limit does "
                            "not cover swap; boot with swapaccount=1 or disable swap")
        split = "cpuacct" in mounts and os.path.exists(
            f"{mounts['cpuacct']}/cpuacct.usage_user")
        driver = cls(bases, owns_base=may_create, memsw=memsw, cpuacct_split=split)
        return driver, warnings

    def _make(self, path: str) -> V1Cgroup:
        made: list[str] = []
        try:
            for b in self._hier:
                os.mkdir(f"{b}/{path}")
                made.append(f"{b}/{path}")
        except OSError as e:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    base.rmdir(d)
            what = "already exists" if e.errno == errno.EEXIST else e.strerror
            raise CgroupError(f"cannot create cgroup {b}/{path}: {what}") from e
        return V1Cgroup(self, path)

    def create(self, name: str) -> V1Cgroup:
        name = base.check_name(name)
        for _ in range(3):
            try:
                return self._make(name)
            except CgroupError as e:
                # Another runtime's close() removed the shared base while it was empty.
                if not (self.owns_base and isinstance(e.__cause__, FileNotFoundError)):
                    raise
                for b in self._hier:
                    ctls = [c for c, d in self.bases.items() if d == b]
                    _prepare_base(b, ctls, may_create=True)
        return self._make(name)

    def open(self, path: str) -> V1Cgroup | None:
        base.check_path(path)
        if any(os.path.isdir(f"{b}/{path}") for b in self._hier):
            return V1Cgroup(self, path)
        return None

    def list(self) -> list[str]:
        names: set[str] = set()
        for b in self._hier:
            try:
                with os.scandir(b) as it:
                    names.update(e.name for e in it if e.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                continue
        return sorted(names)

    def close(self) -> None:
        if not self.owns_base:
            return  # made by `sandboxd setup`, which also removes it
        for b in self._hier:
            try:
                base.rmdir(b)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                    raise CgroupError(f"cannot remove cgroup base {b}: {e.strerror}") from e

    def describe(self) -> dict[str, Any]:
        return {
            "version": 1,
            "base": dict(sorted(self.bases.items())),
            "controllers": sorted(self.controllers),
            "memsw": self.memsw,
            "cpu_split": "cpuacct.usage_user" if self.cpuacct_split else "cpuacct.stat",
        }


def _prepare_base(b: str, ctls: list[str], may_create: bool) -> str | None:
    """Make (or check) one hierarchy's base; return what is wrong, or None."""
    try:
        if may_create:
            os.makedirs(b, exist_ok=True)
        elif not os.path.isdir(b):
            return f"{b} does not exist"
        elif not (os.access(b, os.W_OK) and os.access(f"{b}/cgroup.procs", os.W_OK)):
            return f"{b} is not writable"
        if "cpuset" in ctls:
            base.cpuset_copy_parent(b)
    except (OSError, CgroupError) as e:
        return str(e)
    return None
