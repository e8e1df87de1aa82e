"""cgroups: which version, whether this user may make limited cgroups (tried for real), and
the tuning `sandboxd setup` does."""

from __future__ import annotations

import os
from dataclasses import replace

from sandbox.doctor.findings import Finding, Level
from sandbox.doctor.host import Host
from sandbox.errors import CgroupError
from sandbox.runtime.cgroups import CgroupLimits, tuning

# What a run's limits need; cpuacct, cpuset and freezer only add figures and speed.
NEEDED = ("memory", "pids", "cpu")
# Small enough for any parent's limits; the trial cgroup never holds a process.
TRIAL = CgroupLimits(memory_bytes=64 << 20, pids=16, cpu_quota_us=50_000)
LIMIT_OF = {"memory": "memory_bytes", "pids": "pids", "cpu": "cpu_quota_us"}


def _delegation_fix(host: Host) -> str:
    if host.privileged:  # root may write every cgroup: the controller itself is missing
        return host.on_node("add cgroup_enable=memory swapaccount=1 to GRUB_CMDLINE_LINUX "
                            "in /etc/default/grub, update-grub and reboot")
    if host.in_kubernetes:
        return ("the container runtime must give the pod a writable cgroup (cgroup v2 with "
                "its subtree delegated to the pod's user); until then limits are rlimits")
    return (f"as root: sandboxd setup --user {host.user} (on a cgroup v2 host it prints the "
            "systemd recipe to run instead)")


def cgroups(host: Host) -> Finding:
    driver, warnings = host.cgroups.driver, list(host.cgroups.warnings)
    if driver is None:
        return Finding("cgroups", Level.WARN,
                       "no cgroup this user may write: memory, pids and CPU limits fall back "
                       "to rlimits and figures to rusage (" + "; ".join(warnings) + ")",
                       fix=_delegation_fix(host))
    name = f"doctor-{os.getpid()}"
    try:
        trial = driver.create(name)
    except CgroupError as e:
        return Finding("cgroups", Level.FAIL,
                       f"cgroup v{driver.version}: cannot make a container's cgroup ({e}); "
                       "every container would fail to start", fix=_delegation_fix(host))
    try:
        trial.apply(replace(TRIAL, **{f: None for c, f in LIMIT_OF.items()
                                      if c not in driver.controllers}))
        failure = None
    except CgroupError as e:
        failure = str(e)
    finally:
        trial.destroy(empty=True)
    if failure is not None:
        return Finding("cgroups", Level.FAIL,
                       f"cgroup v{driver.version}: cannot set limits on a new cgroup "
                       f"({failure}); every run would fail", fix=_delegation_fix(host))
    missing = [c for c in NEEDED if c not in driver.controllers]
    described = (f"cgroup v{driver.version}, controllers "
                 f"{' '.join(sorted(driver.controllers))}")
    if missing:
        return Finding("cgroups", Level.WARN,
                       f"{described}: no {', '.join(missing)} controller, so those limits "
                       "fall back to rlimits (" + "; ".join(warnings) + ")",
                       fix=_delegation_fix(host))
    if driver.describe().get("memsw") is False:
        return Finding("cgroups", Level.WARN,
                       f"{described}, but no swap accounting (memory.memsw.*): a run's "
                       "memory limit does not cover what it swaps out",
                       fix=host.on_node("add swapaccount=1 to GRUB_CMDLINE_LINUX in "
                                        "/etc/default/grub, update-grub and reboot (or "
                                        "swapoff -a)"))
    return Finding("cgroups", Level.OK,
                   f"{described}; made a limited cgroup and removed it")


def favordynmods(host: Host) -> Finding:
    try:
        favored = tuning.dynmods_favored(host.root)
    except CgroupError:
        favored = None  # no mountinfo: the cgroups finding says so
    if favored is None or host.cgroups.driver is None:
        return Finding("favordynmods", Level.SKIPPED, "no cgroup2 mount, or no cgroups in use")
    if favored:
        return Finding("favordynmods", Level.OK, "the cgroup2 mount has favordynmods")
    return Finding("favordynmods", Level.WARN,
                   "the cgroup2 mount lacks favordynmods: after an idle spell each run's "
                   "cgroup move waits for an RCU grace period (~7 ms)",
                   fix=host.on_node("sandboxd setup (Linux 6.0 or later)"))
