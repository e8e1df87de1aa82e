"""The kernel: its version, and seccomp filters with the actions sandboxd's policies use."""

from __future__ import annotations

import re

from sandbox.doctor.findings import Finding, Level
from sandbox.doctor.host import Host

# mount_setattr (5.12: read-only layer binds, cached files' binds), overlayfs in a user
# namespace (5.11: writable roots), close_range (5.9: every exec child) are not optional.
MINIMUM = (5, 12)

# Every policy's BPF needs these: allow and errno (the default action), kill_process (a
# call from another architecture).
SECCOMP_ACTIONS = ("allow", "errno", "kill_process")


def kernel(host: Host) -> Finding:
    release = host.read("proc/sys/kernel/osrelease")
    found = re.match(r"(\d+)\.(\d+)", release or "")
    if release is None or found is None:
        return Finding("kernel", Level.WARN,
                       "cannot read the kernel's version from /proc/sys/kernel/osrelease; "
                       f"sandboxd needs Linux {MINIMUM[0]}.{MINIMUM[1]} or later",
                       fix="run the doctor where /proc is mounted, or compare `uname -r` "
                           f"with {MINIMUM[0]}.{MINIMUM[1]} by hand")
    version = (int(found[1]), int(found[2]))
    if version < MINIMUM:
        return Finding(
            "kernel", Level.FAIL,
            f"Linux {release} is older than {MINIMUM[0]}.{MINIMUM[1]}, which the runtime "
            "needs (mount_setattr 5.12, overlayfs in a user namespace 5.11, close_range 5.9)",
            fix=f"boot a Linux {MINIMUM[0]}.{MINIMUM[1]} or later kernel (Debian 12 ships "
                "6.1; on a cluster, a node pool with a newer image)")
    return Finding("kernel", Level.OK, f"Linux {release}")


def seccomp(host: Host) -> Finding:
    actions = host.read("proc/sys/kernel/seccomp/actions_avail")
    if actions is None:
        return Finding(
            "seccomp", Level.FAIL,
            "this kernel has no seccomp filters (no /proc/sys/kernel/seccomp/actions_avail): "
            "the runtime loads a BPF policy into every run",
            fix="boot a kernel built with CONFIG_SECCOMP_FILTER=y (every distribution's is)")
    missing = [a for a in SECCOMP_ACTIONS if a not in actions.split()]
    if missing:
        return Finding("seccomp", Level.FAIL,
                       f"the kernel's seccomp lacks the actions {', '.join(missing)} that "
                       "sandboxd's policies use", fix="boot a Linux 5.12 or later kernel")
    if host.probes.seccomp_binding is None:
        return Finding(
            "seccomp", Level.FAIL,
            "no Python binding of libseccomp loads (module pyseccomp or seccomp): the "
            "runtime compiles its policies with it and the service cannot start without it",
            fix="apt-get install libseccomp2, and pip install pyseccomp in sandboxd's "
                "environment (a dependency of sandboxd)")
    status = host.read("proc/self/status") or ""
    mode = re.search(r"^Seccomp:\s*(\d)", status, re.MULTILINE)
    nested = (" (this process is already filtered: the outer filter must allow unshare, "
              "mount, pivot_root and setns, as deploy/kubernetes/seccomp/sandboxd.json does)"
              if mode and mode[1] == "2" else "")
    return Finding("seccomp", Level.OK,
                   f"seccomp filters, binding {host.probes.seccomp_binding}{nested}")
