"""How many processes this service may have: the kernel's pid and thread limits, the pids.max
of the cgroups it is in (a pod's, a systemd unit's), and its RLIMIT_NPROC."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.doctor.findings import Finding, Level
from sandbox.doctor.host import Host
from sandbox.runtime.cgroups.detect import parse_mountinfo, parse_proc_cgroup
from sandbox.runtime.container import CONTAINER_OVERHEAD_PIDS
from sandbox.runtime.profiles import load_profile


@dataclass(frozen=True)
class PidLimit:
    name: str
    value: int
    fix: str


def _cgroup_pids_max(host: Host) -> tuple[int, str] | None:
    """The lowest pids.max on the way from this process's cgroup up to its mount's root
    (in a cgroup namespace, a pod's: the pod-level limit above it is out of sight)."""
    mountinfo, own = host.read("proc/self/mountinfo"), host.read("proc/self/cgroup")
    if mountinfo is None or own is None:
        return None
    paths = parse_proc_cgroup(own)
    lowest: tuple[int, str] | None = None
    for m in parse_mountinfo(mountinfo, host.root):
        key = "pids" if "pids" in m.controllers else "" if m.fstype == "cgroup2" else None
        if key is None or key not in paths:
            continue
        rel = paths[key]
        if m.root != "/" and (rel == m.root or rel.startswith(m.root + "/")):
            rel = rel[len(m.root):]
        d = m.path / rel.lstrip("/")
        while True:
            where = d.relative_to(host.root)
            text = host.read(f"{where}/pids.max") or ""
            if text.isdigit() and (lowest is None or int(text) < lowest[0]):
                lowest = (int(text), f"/{where}")
            if d == m.path:
                break
            d = d.parent
    return lowest


def _limits(host: Host) -> list[PidLimit]:
    found = []
    for name in ("kernel.pid_max", "kernel.threads-max"):
        if (value := host.sysctl(name)) is not None:
            found.append(PidLimit(name, value, host.on_node(f"sysctl -w {name}=4194304")))
    if (cgroup := _cgroup_pids_max(host)) is not None:
        value, path = cgroup
        raise_it = host.as_root(f"echo max > {path}/pids.max")
        found.append(PidLimit(
            f"pids.max of {path}", value,
            "the kubelet's podPidsLimit (--pod-max-pids), on each node" if host.in_kubernetes
            else f"TasksMax=infinity in sandboxd's systemd unit, or {raise_it}"))
    if host.nproc is not None and not host.privileged:
        found.append(PidLimit(
            "ulimit -u", host.nproc,
            f"LimitNPROC=infinity in sandboxd's systemd unit, or the line '{host.user} - "
            "nproc unlimited' in /etc/security/limits.d/sandboxd.conf"))
    return found


def pids(host: Host) -> Finding:
    policy = load_profile("default")
    # A container whose run has the default policy's default pids; one at its maximum.
    one = (policy.defaults.pids or 0) + CONTAINER_OVERHEAD_PIDS
    most = (policy.maxima.pids or 0) + CONTAINER_OVERHEAD_PIDS
    limits = _limits(host)
    shown = ", ".join(f"{lim.name} {lim.value}" for lim in limits)
    tight = [lim for lim in limits if lim.value < one]
    if tight:
        return Finding("pids", Level.FAIL,
                       f"{shown}: fewer processes than one container of the default policy "
                       f"may use ({one})", fix="; ".join(lim.fix for lim in tight))
    low = [lim for lim in limits if lim.value < most]
    if low:
        return Finding("pids", Level.WARN,
                       f"{shown}: below what one run may ask under the default policy "
                       f"({most}), and every container and run shares them",
                       fix="; ".join(lim.fix for lim in low))
    return Finding("pids", Level.OK, shown)
