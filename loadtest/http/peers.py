"""Peers side by side: the workload's busybox command through bwrap, crun, runc and podman,
each with isolation comparable to sandboxd's, as one local process per request (the same
spawn, output check, stdin and files as the bare baseline).

Every peer runs the same busybox rootfs read-only, with /proc, /dev, a tmpfs /tmp, every
namespace including the network, no capabilities and no new privileges; the workload's
files are bound read-only at their paths. A peer is probed once (one `true`) before its
first phase; a missing binary or a failed probe is reported as skipped, with what to do.

This machine's hybrid cgroup layout (cgroup v1 controllers, a cgroup2 /sys/fs/cgroup/unified
with a controller in it) makes crun 1.8 refuse to start ("cgroups in hybrid mode not
supported"): crun runs in a private mount namespace where a tmpfs hides that mount, and
podman, which would call crun, uses runc there.
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass

from loadtest.http.peer_targets import TARGETS, PeerEnv, PeerTarget, cgroup_hybrid
from loadtest.http.workloads import Workload

__all__ = ["PEERS", "TARGETS", "Peer", "PeerEnv", "find", "ready", "select"]

PEERS = ("bwrap", "crun", "runc", "podman")
PACKAGES = {"bwrap": "bubblewrap", "crun": "crun", "runc": "runc", "podman": "podman",
            "unshare": "util-linux", "sh": "dash"}
PROBE = Workload("probe", "one busybox true", "", argv=("true",))
PROBE_TIMEOUT_S = 60.0   # podman's first run sets up its store

HINTS = {
    "bwrap": "bwrap needs unprivileged user namespaces as an ordinary user "
             "(sysctl kernel.unprivileged_userns_clone=1)",
    "crun": "crun needs cgroup v2 or v1 (no controller in /sys/fs/cgroup/unified), and "
            "unprivileged user namespaces as an ordinary user",
    "runc": "runc needs unprivileged user namespaces as an ordinary user",
    "podman": "podman needs uidmap, /etc/subuid and /etc/subgid entries and "
              "unprivileged user namespaces as an ordinary user",
}


@dataclass(frozen=True)
class Peer:
    """A peer found and probed: `target` makes its runs of one workload; `how` is the
    probe's command line, for the report."""

    name: str
    bins: dict[str, str]
    env: PeerEnv
    how: str = ""

    def target(self, workload: Workload, workers: int, timeout_s: float | None) -> PeerTarget:
        return TARGETS[self.name](self.env, self.bins, workload, workers, timeout_s)


def find(name: str, env: PeerEnv) -> dict[str, str] | str:
    """The peer's binaries by name, or why it cannot run (what to install)."""
    bins: dict[str, str] = {}
    wanted = list(TARGETS[name].binaries)
    if name == "crun" and cgroup_hybrid():
        wanted += ["unshare", "sh"]
    for b in wanted:
        found = shutil.which(b, path=env.search_path)
        if found is None:
            return (f"{b} not found on PATH: install it with "
                    f"`apt-get install {PACKAGES[b]}`")
        bins[b] = found
    return bins


async def ready(name: str, env: PeerEnv) -> Peer | str:
    """The peer, found and probed with one `true`; or why it is skipped."""
    if name not in TARGETS:
        raise ValueError(f"unknown peer {name}: choose from {', '.join(PEERS)}")
    bins = find(name, env)
    if isinstance(bins, str):
        return bins
    peer = Peer(name, bins, env)
    try:
        async with peer.target(PROBE, 1, PROBE_TIMEOUT_S) as t:
            how = shlex.join(t.invocation(0).argv)
            outcome = await t.send(0)
    except OSError as e:
        return f"{name} could not start: {e}; {HINTS[name]}"
    if not outcome.ok:
        return f"{name} probe (busybox true) failed: {outcome.error}; {HINTS[name]}"
    return Peer(name, bins, env, how)


def select(names: str) -> tuple[str, ...]:
    """'auto' (every peer; the missing ones are reported skipped), 'none', or a list."""
    if names.strip() == "auto":
        return PEERS
    if names.strip() == "none":
        return ()
    wanted = tuple(n.strip() for n in names.split(",") if n.strip())
    unknown = [n for n in wanted if n not in TARGETS]
    if unknown or not wanted:
        raise ValueError(f"unknown peer {', '.join(unknown) or '(none)'}: choose from "
                         f"{', '.join(PEERS)}, auto or none")
    return wanted

