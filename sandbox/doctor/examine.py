"""Every check, in the order a reader fixes things: the kernel first, then what builds on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sandbox.doctor import cgroups, disk, ids, kernel, limits, procfs, userns
from sandbox.doctor.findings import Finding, Report
from sandbox.doctor.host import Host, observe

CHECKS: tuple[Callable[[Host], Finding], ...] = (
    kernel.kernel,
    kernel.seccomp,
    userns.userns,
    ids.subids,
    ids.newuidmap,
    userns.overlay,
    procfs.proc,
    cgroups.cgroups,
    cgroups.favordynmods,
    limits.pids,
    disk.state_dir,
)


def examine(host: Host) -> Report:
    return Report(user=host.user, uid=host.uid, in_kubernetes=host.in_kubernetes,
                  findings=tuple(check(host) for check in CHECKS))


def diagnose(state_dir: Path | None = None) -> Report:
    """This host or pod, examined for the user running this process."""
    with observe(state_dir) as host:
        return examine(host)
