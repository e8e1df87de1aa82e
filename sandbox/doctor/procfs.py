"""/proc: every container's init mounts a proc of its own, which the kernel allows in a user
namespace only where the /proc it can see is fully visible (not masked, not read-only)."""

from __future__ import annotations

from sandbox.doctor import podspec
from sandbox.doctor.findings import Finding, Level
from sandbox.doctor.host import Host

SHOWN = 4  # masked paths named in a message; the rest are counted


def _proc_mounts(mountinfo: str) -> tuple[set[str] | None, list[str]]:
    """The options of the mount at /proc (None if there is none) and what is mounted over
    paths inside it, from /proc/self/mountinfo."""
    options: set[str] | None = None
    over: list[str] = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:] or len(fields) < 5:
            continue
        sep = fields.index("-", 6)
        point, fstype = fields[4], fields[sep + 1]
        if point == "/proc" and fstype == "proc":
            options = set(fields[5].split(",")) | set(fields[sep + 3].split(","))
        elif point.startswith("/proc/") and fstype != "binfmt_misc":
            over.append(point)  # binfmt_misc sits on an empty directory: that is allowed
    return options, over


def proc(host: Host) -> Finding:
    if not host.probes.userns:
        return Finding("proc", Level.SKIPPED, "needs a user namespace (see userns)")
    if host.probes.proc:
        return Finding("proc", Level.OK, "proc mounts in a new user and pid namespace")
    options, over = _proc_mounts(host.read("proc/self/mountinfo") or "")
    failure = f" ({host.probes.proc_failure})" if host.probes.proc_failure else ""
    said = f"proc cannot be mounted in a new user and pid namespace{failure}: no container " \
           "can start"
    if over:
        shown = ", ".join(over[:SHOWN]) + (f" and {len(over) - SHOWN} more"
                                          if len(over) > SHOWN else "")
        return Finding(
            "proc", Level.FAIL,
            f"{said}; /proc is masked ({shown} mounted over it) and the kernel refuses a "
            "new proc where the one it can see is not fully visible",
            fix=(f"in the pod spec: {podspec.PROC_MOUNT}" if host.in_kubernetes else
                 "run sandboxd where /proc is not masked (Docker: --security-opt "
                 "systempaths=unconfined; or unmount " + " ".join(over) + ")"))
    if options is not None and "ro" in options:
        return Finding("proc", Level.FAIL,
                       f"{said}; /proc is read-only, and a new proc may not be less so",
                       fix=host.as_root("mount -o remount,rw /proc"))
    return Finding("proc", Level.FAIL,
                   f"{said}; /proc looks unmasked, so a seccomp filter or security module "
                   "refuses the mount", fix=(f"in the pod spec: {podspec.SECCOMP} and "
                                             f"{podspec.APPARMOR}" if host.in_kubernetes else
                                             "check `dmesg` for a denied mount of proc"))
