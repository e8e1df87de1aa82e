"""What the checks look at: a filesystem root (for /proc, /sys, /etc and the programs), the
user the service would run as, and what only trying tells (the probes).

The checks read nothing else, so a unit test gives them a fake tree and fake probe results;
`observe()` gathers the real ones of this host or pod.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbox.doctor import probes
from sandbox.errors import CgroupError, SandboxError
from sandbox.runtime import hostinfo, idmap
from sandbox.runtime.cgroups import Detection, detect
from sandbox.runtime.cgroups.detect import user_name


@dataclass(frozen=True)
class Probes:
    """What only trying tells (hostinfo's probes, and sandbox/doctor/probes.py's)."""

    userns: bool  # a user namespace could be made
    overlay: bool  # overlayfs (userxattr) could be mounted in one
    proc: bool  # proc could be mounted in a new user and pid namespace
    seccomp_binding: str | None  # the Python libseccomp binding, if one imports
    proc_failure: str | None = None  # which call of the proc probe failed


@dataclass(frozen=True)
class Host:
    root: Path  # "/" on the real host; a fake tree in unit tests
    uid: int
    user: str
    probes: Probes
    cgroups: Detection  # the driver this user would get (detect(root=root, uid=uid))
    nproc: int | None  # soft RLIMIT_NPROC (`ulimit -u`); None when unlimited
    state_dir: Path | None = None
    in_kubernetes: bool = False

    def read(self, path: str) -> str | None:
        """A file's text below root ("proc/sys/kernel/osrelease"), None when unreadable."""
        try:
            return (self.root / path).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None

    @property
    def privileged(self) -> bool:
        """Root of the initial user namespace (a pod's root, with hostUsers: false, is not):
        no sysctl refuses it a user namespace, no RLIMIT_NPROC holds it."""
        return self.uid == 0 and (self.read("proc/self/uid_map") or "").split() in (
            ["0", "0", "4294967295"], [])

    @property
    def no_new_privs(self) -> bool:
        """Set by Kubernetes' allowPrivilegeEscalation: false, systemd's NoNewPrivileges:
        a setuid program (newuidmap) then runs without its privileges."""
        status = self.read("proc/self/status") or ""
        return any(line.split() == ["NoNewPrivs:", "1"] for line in status.splitlines())

    def as_root(self, command: str) -> str:
        """A fix that needs root, said so unless this is root (of the initial namespace)."""
        return command if self.privileged else f"as root: {command}"

    def on_node(self, command: str) -> str:
        """A fix of the kernel's (sysctls, modules): in a pod, the node's to make."""
        return f"on each node, as root: {command}" if self.in_kubernetes else \
            self.as_root(command)

    def sysctl(self, name: str) -> int | None:
        """An integer sysctl ("user.max_user_namespaces"); None where this kernel lacks it."""
        text = self.read("proc/sys/" + name.replace(".", "/"))
        try:
            return int(text) if text is not None else None
        except ValueError:
            return None


@contextlib.contextmanager
def observe(state_dir: Path | None = None) -> Iterator[Host]:
    """This host (or pod) as the user running this process sees it. The cgroup detection
    may make the base cgroup (as root); it is removed again, if empty, on leaving."""
    uid = os.geteuid()
    cgroups = detect()
    try:
        try:
            mapping: idmap.IdMapping | None = idmap.plan()
        except SandboxError:
            mapping = None  # the subids check says why
        # `sandboxd info`'s report, given what was detected here, tries a user namespace
        # and overlayfs in one; the doctor adds the proc mount.
        info = hostinfo.report(cgroups, mapping)
        failure = probes.proc_mount() if info["user_namespaces"] else None
        soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        yield Host(
            root=Path("/"), uid=uid, user=user_name(uid),
            probes=Probes(userns=info["user_namespaces"], overlay=info["overlay_in_userns"],
                          proc=info["user_namespaces"] and failure is None,
                          seccomp_binding=info["seccomp"]["binding"], proc_failure=failure),
            cgroups=cgroups, nproc=None if soft == resource.RLIM_INFINITY else soft,
            state_dir=state_dir,
            # The kubelet puts the API server's address in every container's environment
            # (with enableServiceLinks: false too).
            in_kubernetes="KUBERNETES_SERVICE_HOST" in os.environ)
    finally:
        if cgroups.driver is not None:
            # A base that existed before (another user's, seen as root in a user namespace
            # of ours) is not ours to remove: detection only looked at it.
            with contextlib.suppress(CgroupError):
                cgroups.driver.close()
