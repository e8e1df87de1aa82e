"""The seccomp profile of sandboxd's pod (deploy/kubernetes/seccomp/sandboxd.json), derived
from the runs' own policy: `python deploy/seccomp_profile.py > deploy/kubernetes/seccomp/
sandboxd.json`. A test checks that the file is what this prints.

The pod's filter sits under every run's own filter (seccomp filters stack: the stricter
answer wins), so the pod must allow at least what a run's policy allows, or a run would get
EPERM where its policy says yes. Above that, the pod allows only what the runtime itself
calls to make containers: the list below, each with the code that needs it (seen in an
strace of `sandboxd serve` making, running, resetting, committing and building containers,
and in the sources). Everything else stays refused, as for a run: kernel modules, kexec,
reboot, the clock, swap, bpf, perf_event_open, ptrace, process_vm_*, keyctl and the
keyring calls (nothing in sandboxd uses the kernel keyring, which is not namespaced),
32-bit system calls.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RUN_POLICY = Path(__file__).resolve().parents[1] / "policies" / "seccomp" / "default.json"

# name -> why the runtime (service, spawner, helper, mapper, init) calls it.
RUNTIME_SYSCALLS = {
    "unshare": "the helper's user, mount, ipc, uts, net, cgroup and pid namespaces "
               "(native/helper.c); every run's own IPC namespace (native/child.c)",
    "setns": "a helper enters the id mapper's user namespace before it makes the "
             "container's (native/helper.c, sbx-init helper)",
    "mount": "the container's root: tmpfs, binds of the layers, overlayfs, proc, devpts, "
             "/dev; remounts at reset (native/rootfs.c, mounts.c, scratch.c)",
    "umount2": "the root remounted with its skeleton layer (native/rootfs.c); the old root "
               "after pivot_root; a reset's old root and tmpfs (native/scratch.c)",
    "pivot_root": "init's own root (native/mounts.c)",
    "chroot": "every run's child enters the container's /root (native/child.c)",
    "sethostname": "the container's hostname in its UTS namespace (native/helper.c)",
    "mount_setattr": "read-only, nosuid, nodev on layer trees with locked mounts "
                     "(native/rootfs.c) and on cached-file binds (native/scratch.c)",
    "open_tree": "a cached file's blob cloned for its bind into a run (native/scratch.c)",
    "move_mount": "that clone attached at the run's path (native/scratch.c)",
}


def profile() -> dict[str, Any]:
    run = json.loads(RUN_POLICY.read_text())
    taken = {n for rule in run["syscalls"] for n in rule.get("names", [rule.get("name")])}
    overlap = sorted(taken & RUNTIME_SYSCALLS.keys())
    if overlap:
        # libseccomp drops a syscall's argument rules when it also has an unconditional one:
        # a name in both lists would change what the runs' rules mean.
        raise SystemExit(f"{RUN_POLICY} now names {', '.join(overlap)}: decide in "
                         "deploy/seccomp_profile.py which rule the pod keeps")
    runtime_rules = [{"names": [name], "action": "SCMP_ACT_ALLOW", "comment": why}
                     for name, why in RUNTIME_SYSCALLS.items()]
    return {
        "defaultAction": run["defaultAction"],
        "defaultErrnoRet": run["defaultErrnoRet"],
        "archMap": run["archMap"],
        "syscalls": [*run["syscalls"], *runtime_rules],
    }


if __name__ == "__main__":
    json.dump(profile(), sys.stdout, indent=1)
    sys.stdout.write("\n")
