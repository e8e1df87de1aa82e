"""User namespaces (every container is one) and overlayfs inside them (writable roots)."""

from __future__ import annotations

from sandbox.doctor import podspec
from sandbox.doctor.findings import Finding, Level
from sandbox.doctor.host import Host

# Knobs that refuse a user namespace to an ordinary user: (sysctl, the value that refuses,
# the value to set). Root of the initial user namespace is refused by none of them.
UNPRIVILEGED_KNOBS = (
    ("kernel.unprivileged_userns_clone", 0, 1),  # Debian's and Ubuntu's patch
    ("kernel.apparmor_restrict_unprivileged_userns", 1, 0),  # Ubuntu 23.10 and later
)

# Each container holds one namespace of each kind (its own user, mount, pid, net, ipc,
# uts and cgroup namespaces); warm pools and sessions keep many at once.
NAMESPACE_LIMITS = tuple(f"user.max_{kind}_namespaces"
                         for kind in ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup"))
WANTED_NAMESPACES = 1024
SET_NAMESPACES = 65536


def sysctl_fix(host: Host, settings: list[tuple[str, int]]) -> str:
    """Set the sysctls now and at every boot."""
    now = " ".join(f"{k}={v}" for k, v in settings)
    keep = "\\n".join(f"{k} = {v}" for k, v in settings)
    return host.on_node(f"sysctl -w {now} && printf '{keep}\\n' >> "
                        "/etc/sysctl.d/60-sandboxd.conf")


def userns(host: Host) -> Finding:
    knobs = {k: host.sysctl(k) for k in (*(k for k, _, _ in UNPRIVILEGED_KNOBS),
                                         *NAMESPACE_LIMITS)}
    refusing = [(k, good) for k, bad, good in UNPRIVILEGED_KNOBS
                if not host.privileged and knobs[k] == bad]
    refusing += [(k, SET_NAMESPACES) for k in NAMESPACE_LIMITS if knobs[k] == 0]
    low = [(k, SET_NAMESPACES) for k in NAMESPACE_LIMITS
           if 0 < (knobs[k] or WANTED_NAMESPACES) < WANTED_NAMESPACES]
    shown = ", ".join(f"{k}={knobs[k]}" for k, _ in refusing + low)
    if refusing:
        said = ("cannot make a user namespace" if not host.probes.userns else
                "a user namespace can be made but gets no capabilities in it")
        return Finding("userns", Level.FAIL,
                       f"{said}: {shown}; every container is a user namespace",
                       fix=sysctl_fix(host, refusing + low))
    if not host.probes.userns:
        if host.in_kubernetes:
            fix = f"in the pod spec: {podspec.USER_NAMESPACE}, and {podspec.SECCOMP}"
        else:
            fix = ("find what refuses unshare(CLONE_NEWUSER): try `unshare --user "
                   "--map-root-user true`; under Docker, run with --security-opt "
                   "seccomp=<a profile allowing unshare, mount, pivot_root, setns>")
        return Finding("userns", Level.FAIL,
                       "cannot make a user namespace, though no sysctl forbids it (a seccomp "
                       "filter or a security module refuses it); every container is one",
                       fix=fix)
    if low:
        return Finding("userns", Level.WARN,
                       f"user namespaces work, but {shown}: each container holds one of each "
                       f"kind, so at most that many containers (warm ones and sessions "
                       f"included) can exist at once", fix=sysctl_fix(host, low))
    return Finding("userns", Level.OK, "user namespaces work")


def overlay(host: Host) -> Finding:
    if not host.probes.userns:
        return Finding("overlay", Level.SKIPPED, "needs a user namespace (see userns)")
    if host.probes.overlay:
        return Finding("overlay", Level.OK, "overlayfs mounts in a user namespace")
    said = ("overlayfs cannot be mounted in a user namespace: writable roots (the default "
            "and build policies) cannot be made")
    filesystems = host.read("proc/filesystems") or ""
    if "overlay" not in filesystems.split():
        return Finding("overlay", Level.FAIL, f"{said}; the overlay module is not loaded",
                       fix=host.on_node("modprobe overlay && echo overlay >> "
                                        "/etc/modules-load.d/sandboxd.conf"))
    return Finding("overlay", Level.FAIL,
                   f"{said}, though the module is loaded and the kernel new enough: a "
                   "security module (AppArmor, SELinux) or a seccomp filter refuses the mount",
                   fix=(f"in the pod spec: {podspec.APPARMOR} and {podspec.SECCOMP}"
                        if host.in_kubernetes else
                        "check `dmesg` for apparmor=\"DENIED\" or avc: denied lines naming "
                        "mount, and allow mount for sandboxd's profile"))
