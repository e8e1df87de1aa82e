"""cgroup v2 driver: one directory per cgroup in the unified hierarchy."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Any

from sandbox.errors import CgroupError
from sandbox.runtime import hostload
from sandbox.runtime.cgroups import base
from sandbox.runtime.cgroups.base import Cgroup, CgroupDriver, CgroupLimits, CgroupStats

# Controllers enabled through cgroup.subtree_control; CPU accounting (cpu.stat), freezing
# (cgroup.freeze) and cgroup.kill are part of the v2 core and need no enabling.
DELEGATED = ("memory", "pids", "cpu", "cpuset")
_FREEZE_TIMEOUT_S = 1.0


class V2Cgroup(Cgroup):
    def __init__(self, driver: V2Driver, path: str) -> None:
        super().__init__()
        self.path = path
        self._driver = driver
        self._dir = f"{driver.base}/{path}"
        self._delegating = False

    def _need(self, controller: str) -> None:
        if controller not in self._driver.controllers:
            raise CgroupError(
                f"the {controller} cgroup controller is not enabled for sandboxd's cgroup "
                f"{self._driver.base} (enabled: {', '.join(sorted(self._driver.subtree))})")

    def child(self, name: str, *, limitable: bool = True) -> V2Cgroup:
        base.check_name(name)
        if limitable and not self._delegating and self._driver.subtree:
            # A v2 cgroup hands controllers to its children only while it holds no process
            # itself; enabling an already enabled controller is a no-op.
            try:
                base.write_raw(f"{self._dir}/cgroup.subtree_control",
                               " ".join(f"+{c}" for c in sorted(self._driver.subtree)))
            except OSError as e:
                why = (": it already holds processes; create children before moving any in"
                       if e.errno == errno.EBUSY else f": {e.strerror}")
                raise CgroupError(
                    f"cannot enable controllers for the children of {self._dir}{why}") from e
            self._delegating = True
        return self._driver._make(f"{self.path}/{name}")

    def apply(self, limits: CgroupLimits) -> None:
        d = self._dir
        if limits.memory_bytes is not None:
            self._need("memory")
            base.write(f"{d}/memory.max", str(limits.memory_bytes))
            try:
                base.write_raw(f"{d}/memory.swap.max", "0")
            except FileNotFoundError:
                pass  # no swap accounting in this kernel: nothing to turn off
            except OSError as e:
                raise CgroupError(f"cannot write '0' to {d}/memory.swap.max: {e.strerror}") from e
        if limits.pids is not None:
            self._need("pids")
            base.write(f"{d}/pids.max", base.max_or(limits.pids))
        if limits.cpu_quota_us is not None:
            self._need("cpu")
            base.write(f"{d}/cpu.max",
                       f"{base.max_or(limits.cpu_quota_us)} {limits.cpu_period_us}")
        if limits.cpuset_cpus is not None:
            self._need("cpuset")
            base.write(f"{d}/cpuset.cpus", limits.cpuset_cpus)

    def open_procs_fds(self) -> list[int]:
        try:
            return [os.open(f"{self._dir}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)]
        except OSError as e:
            raise CgroupError(f"cannot open {self._dir}/cgroup.procs: {e.strerror}") from e

    def add_pid(self, pid: int) -> None:
        base.write(f"{self._dir}/cgroup.procs", str(pid))

    def changed(self) -> float:
        return os.stat(self._dir).st_mtime

    def pids(self, *, recursive: bool = False) -> list[int]:
        dirs = base.subtree_dirs(self._dir) if recursive else (self._dir,)
        found: set[int] = set()
        for d in dirs:
            found.update(base.read_pids(f"{d}/cgroup.procs"))
        return sorted(found)

    def is_empty(self) -> bool:
        return not base.read_pids(f"{self._dir}/cgroup.procs")

    def stats(self) -> CgroupStats:
        d = self._dir
        peak = memory_source = None
        oom = 0
        try:
            cpu = base.read_keyed(f"{d}/cpu.stat")
            if "memory" in self._driver.controllers:
                try:
                    peak = base.read_int(f"{d}/memory.peak")
                    memory_source = "cgroup-v2:memory.peak"
                except FileNotFoundError:
                    pass  # kernel < 5.19 keeps no peak
                oom = base.read_keyed(f"{d}/memory.events").get("oom_kill", 0)
        except (OSError, ValueError) as e:
            raise CgroupError(f"cannot read the figures of cgroup {self.path}: {e}") from e

        def ns(key: str) -> int | None:
            return cpu[key] * 1000 if key in cpu else None

        return CgroupStats(ns("user_usec"), ns("system_usec"), ns("usage_usec"), peak, oom,
                           "cgroup-v2:cpu.stat", memory_source)

    def cpu_ns(self) -> int | None:
        try:
            usec = base.read_keyed(f"{self._dir}/cpu.stat").get("usage_usec")
        except OSError as e:
            raise CgroupError(f"cannot read {self._dir}/cpu.stat: {e.strerror}") from e
        return None if usec is None else usec * 1000

    def cpu_pressure_us(self) -> int | None:
        try:
            return hostload.some_total(base.read_bytes(f"{self._dir}/cpu.pressure"))
        except OSError:
            return None  # a kernel without PSI

    def _populated(self) -> bool:
        try:
            return base.read_keyed(f"{self._dir}/cgroup.events").get("populated", 0) != 0
        except FileNotFoundError:
            return False

    def kill(self) -> None:
        if not os.path.isdir(self._dir):
            return
        if self._driver.has_kill:
            # Race-free in the kernel, forks included; repeat for anything that joined later.
            def again() -> None:
                base.write(f"{self._dir}/cgroup.kill", "1")
        else:
            self._frozen_kill()

            def again() -> None:
                base.kill_pids(self.pids(recursive=True))
        again()
        base.wait_until(lambda: not self._populated(), again,
                        f"killing the processes of cgroup {self.path}")

    def _frozen_kill(self) -> None:
        freeze = f"{self._dir}/cgroup.freeze"
        if not os.path.exists(freeze):
            return
        base.write(freeze, "1")
        try:
            # A task stuck in D state can delay freezing: kill what is there anyway.
            with contextlib.suppress(CgroupError):
                base.wait_until(
                    lambda: base.read_keyed(f"{self._dir}/cgroup.events").get("frozen") == 1,
                    lambda: None, "freezing", _FREEZE_TIMEOUT_S)
            base.kill_pids(self.pids(recursive=True))
        finally:
            base.write(freeze, "0")

    def _destroy(self, *, empty: bool) -> None:
        if not empty:
            self.kill()
        try:
            base.remove_tree(self._dir)
        except CgroupError:
            if not empty:
                raise
            self._destroy(empty=False)


class V2Driver(CgroupDriver):
    version = 2

    def __init__(self, base_dir: str, subtree: frozenset[str], *, has_kill: bool,
                 has_freeze: bool) -> None:
        """subtree: controllers enabled for the base's children (among DELEGATED)."""
        self.base = base_dir
        self.subtree = subtree
        self.has_kill = has_kill
        self.controllers = subtree | {"cpuacct"} | ({"freezer"} if has_freeze else set())

    @classmethod
    def at(cls, parent: str, base_name: str, *, move_self: bool,
           setup_hint: str) -> tuple[V2Driver | None, list[str]]:
        """Make <parent>/<base_name> and hand it every controller the parent can give.

        move_self: when the parent holds processes (the service's own systemd unit), move
        this process into a leaf so the parent may enable controllers for its children.
        """
        warnings: list[str] = []
        b = f"{parent}/{base_name}"
        try:
            available = base.read_bytes(f"{parent}/cgroup.controllers").decode().split()
            os.makedirs(b, exist_ok=True)
        except OSError as e:
            return None, [f"no writable cgroup v2 subtree at {parent} ({e.strerror}): memory "
                          f"and pids limits fall back to rlimits; {setup_hint}"]
        wanted = [c for c in DELEGATED if c in available]
        missing = [c for c in DELEGATED if c not in available]
        if missing:
            warnings.append(f"cgroup v2 controllers not delegated to {parent}: "
                            f"{' '.join(missing)}; {setup_hint}")
        enabled = _enable(parent, wanted, warnings,
                          leaf=f"{parent}/{base_name}-supervisor" if move_self else None)
        enabled = _enable(b, enabled, warnings, leaf=None)
        driver = cls(b, frozenset(enabled), has_kill=os.path.exists(f"{b}/cgroup.kill"),
                     has_freeze=os.path.exists(f"{b}/cgroup.freeze"))
        return driver, warnings

    def _make(self, path: str) -> V2Cgroup:
        d = f"{self.base}/{path}"
        try:
            os.mkdir(d)
        except OSError as e:
            what = "already exists" if e.errno == errno.EEXIST else e.strerror
            raise CgroupError(f"cannot create cgroup {d}: {what}") from e
        return V2Cgroup(self, path)

    def create(self, name: str) -> V2Cgroup:
        return self._make(base.check_name(name))

    def open(self, path: str) -> V2Cgroup | None:
        base.check_path(path)
        return V2Cgroup(self, path) if os.path.isdir(f"{self.base}/{path}") else None

    def list(self) -> list[str]:
        try:
            with os.scandir(self.base) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def close(self) -> None:
        try:
            base.rmdir(self.base)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                raise CgroupError(f"cannot remove cgroup base {self.base}: {e.strerror}") from e

    def describe(self) -> dict[str, Any]:
        return {
            "version": 2,
            "base": self.base,
            "controllers": sorted(self.controllers),
            "cgroup_kill": self.has_kill,
        }


def _enable(d: str, controllers: list[str] | frozenset[str], warnings: list[str],
            leaf: str | None) -> list[str]:
    """Enable controllers in d/cgroup.subtree_control one by one; return those that are on."""
    path = f"{d}/cgroup.subtree_control"
    try:
        on = set(base.read_bytes(path).decode().split())
    except OSError as e:
        warnings.append(f"cannot read {path} ({e.strerror}): no cgroup v2 controllers")
        return []
    enabled: list[str] = []
    for c in sorted(controllers, key=DELEGATED.index):
        if c in on:
            enabled.append(c)
            continue
        err = _try_write(path, f"+{c}")
        if err is not None and err.errno == errno.EBUSY and leaf is not None:
            if _move_to_leaf(d, leaf, warnings):
                err = _try_write(path, f"+{c}")
            leaf = None
        if err is None:
            enabled.append(c)
        else:
            warnings.append(f"cannot enable the {c} controller in {path} ({err.strerror}): "
                            f"{c} limits fall back to rlimits or are not enforced")
    return enabled


def _try_write(path: str, data: str) -> OSError | None:
    try:
        base.write_raw(path, data)
    except OSError as e:
        return e
    return None


def _move_to_leaf(d: str, leaf: str, warnings: list[str]) -> bool:
    # v2's "no internal processes" rule: a cgroup holding processes cannot enable
    # controllers for its children. Under a systemd unit with Delegate=yes the service is
    # alone in its cgroup, so moving itself into a leaf next to the base frees it. Other
    # processes are never moved: they are not ours.
    try:
        os.makedirs(leaf, exist_ok=True)
        base.write_raw(f"{leaf}/cgroup.procs", str(os.getpid()))
    except OSError as e:
        warnings.append(f"cannot move the service into {leaf}: {e.strerror}")
        return False
    warnings.append(f"moved the service into {leaf} so that {d} can delegate controllers "
                    "(cgroup v2 allows no processes in a cgroup that gives controllers)")
    return True
