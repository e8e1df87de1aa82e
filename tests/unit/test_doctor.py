"""`sandboxd doctor`'s checks against fake /proc, /sys and /etc trees and fake probe results:
each problem the doctor knows, found, with the line that fixes it.

The trees are plain directories in tmp_path (see test_cgroups_fake.py for how the cgroup
drivers meet them); what only trying tells (a user namespace, an overlay, a proc mount) is
given as Probes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sandbox.doctor import cgroups as doctor_cgroups
from sandbox.doctor import disk, ids, kernel, limits, procfs, userns
from sandbox.doctor.examine import examine
from sandbox.doctor.findings import Finding, Level
from sandbox.doctor.host import Host, Probes
from sandbox.runtime.cgroups import base, detect

USER, UID = "alice", 4242
CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "cpuset", "freezer")
MOUNTINFO = "\n".join([
    "22 27 0:21 / /proc rw,relatime - proc proc rw",
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
    *(f"{32 + i} 31 0:{29 + i} / /sys/fs/cgroup/{c} rw,relatime - cgroup cgroup rw,{c}"
      for i, c in enumerate(CONTROLLERS)),
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,favordynmods",
]) + "\n"
OWN_CGROUP = "".join(f"{i}:{c}:/\n" for i, c in enumerate(CONTROLLERS, 1)) + "0::/\n"
# What a v1 cgroup directory holds once the kernel made it (the subset the drivers touch).
CGROUP_FILES = {
    "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.swappiness"),
    "pids": ("pids.max",), "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us"),
    "cpuset": ("cpuset.cpus", "cpuset.mems", "cgroup.clone_children"),
}
V2_FILES = ("cgroup.procs", "cgroup.subtree_control", "memory.max", "memory.swap.max",
            "pids.max", "cpu.max")
V2_UNIT = f"/user.slice/user-{UID}.slice/user@{UID}.service/app.slice/sandboxd.service"
needs_uidmap = pytest.mark.skipif(
    not all(Path("/usr/bin", h).exists() for h in ids.HELPERS),
    reason="the fake tree links the real setuid newuidmap and newgidmap: install uidmap")
HEALTHY = Probes(userns=True, overlay=True, proc=True, seccomp_binding="pyseccomp")


def write(root: Path, path: str, text: str) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)


def populate(d: Path, controller: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name in ("cgroup.procs", *CGROUP_FILES.get(controller, ())):
        (d / name).write_text("0-1\n" if name.startswith("cpuset.") else "")


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A healthy host: Linux 6.1, cgroup v1 delegated to alice, subordinate ids, uidmap."""
    root = tmp_path / "root"
    files = {
        "proc/sys/kernel/osrelease": "6.1.0-18-amd64",
        "proc/sys/kernel/seccomp/actions_avail":
            "kill_process kill_thread trap errno user_notif trace log allow",
        "proc/sys/kernel/pid_max": "4194304", "proc/sys/kernel/threads-max": "192735",
        "proc/self/status": "Name:\tpython3\nNoNewPrivs:\t0\nSeccomp:\t0\n",
        "proc/self/uid_map": "         0          0 4294967295\n",
        "proc/self/gid_map": "         0          0 4294967295\n",
        "proc/self/mountinfo": MOUNTINFO, "proc/self/cgroup": OWN_CGROUP,
        "proc/filesystems": "nodev\ttmpfs\nnodev\tproc\n\text4\nnodev\toverlay\n",
        "etc/subuid": f"{USER}:100000:65536\n", "etc/subgid": f"{USER}:100000:65536\n",
    }
    for name in ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup"):
        files[f"proc/sys/user/max_{name}_namespaces"] = "63000"
    for path, text in files.items():
        write(root, path, text)
    cg = root / "sys/fs/cgroup"
    for c in CONTROLLERS:
        populate(cg / c, c)
        populate(cg / c / f"sandboxd-{USER}", c)
        populate(cg / c / "sandboxd", c)
    (cg / "unified").mkdir()
    (root / "usr/bin").mkdir(parents=True)
    for helper in ids.HELPERS:  # the real ones: setuid root cannot be faked unprivileged
        if Path("/usr/bin", helper).exists():
            (root / "usr/bin" / helper).symlink_to(Path("/usr/bin", helper))

    # cgroupfs makes a new cgroup's control files itself; a plain tree needs help.
    real_mkdir = os.mkdir

    def mkdir(path: Any, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        p = Path(path)
        if cg in p.parents and (cg / "cgroup.controllers").exists():
            for name in V2_FILES:
                (p / name).write_text("")
        elif cg in p.parents:
            populate(p, p.relative_to(cg).parts[0])

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(base, "rmdir", shutil.rmtree)
    return root


def host(root: Path, *, uid: int = UID, user: str = USER, probes: Probes = HEALTHY,
         **fields: Any) -> Host:
    name = "sandboxd" if uid == 0 else f"sandboxd-{user}"
    return Host(root=root, uid=uid, user=user, probes=probes,
                cgroups=detect(root=root, uid=uid, base_name=name),
                nproc=fields.pop("nproc", None), **fields)


def find(found: Finding, level: Level, *said: str) -> Finding:
    """The finding, checked: its level, and each of `said` in its message or fix."""
    assert found.level is level, found
    text = f"{found.message}\n{found.fix}"
    for s in said:
        assert s in text, (s, found)
    if level in (Level.WARN, Level.FAIL):
        assert found.fix, f"a problem without its fix: {found}"
    return found


# --- the whole report ---------------------------------------------------------------------


@needs_uidmap
def test_a_healthy_host_passes_and_leaves_no_cgroup(tree: Path) -> None:
    report = examine(host(tree))
    levels = {f.check: f.level for f in report.findings}
    assert levels.pop("state_dir") is Level.SKIPPED  # none given
    assert set(levels.values()) == {Level.OK}, report.text()
    assert report.exit_status == 0
    assert not list(tree.rglob("doctor-*"))  # the trial cgroup is gone
    doc = json.loads(json.dumps(report.as_dict()))
    assert doc["ok"] is True and doc["failures"] == 0
    assert [f["check"] for f in doc["findings"]] == [f.check for f in report.findings]


def test_a_failure_sets_the_exit_status_and_a_warning_does_not(tree: Path) -> None:
    write(tree, "etc/subuid", "")
    warned = examine(host(tree))
    assert warned.exit_status == 0 and warned.count(Level.WARN) == 1
    write(tree, "proc/sys/kernel/osrelease", "5.10.0-28-amd64")
    failed = examine(host(tree))
    assert failed.exit_status == 1
    assert failed.as_dict()["ok"] is False
    text = failed.text()
    assert "FAIL  kernel" in text and "fix: boot a Linux 5.12" in text
    assert text.endswith("1 problem blocking runs, 1 warning")


# --- kernel and seccomp -------------------------------------------------------------------


def test_an_old_kernel_fails(tree: Path) -> None:
    write(tree, "proc/sys/kernel/osrelease", "5.10.0-28-amd64")
    find(kernel.kernel(host(tree)), Level.FAIL, "5.10.0-28-amd64", "mount_setattr")


def test_seccomp_without_filters_fails(tree: Path) -> None:
    (tree / "proc/sys/kernel/seccomp/actions_avail").unlink()
    find(kernel.seccomp(host(tree)), Level.FAIL, "CONFIG_SECCOMP_FILTER=y")


def test_seccomp_without_a_python_binding_fails(tree: Path) -> None:
    no_binding = replace(HEALTHY, seccomp_binding=None)
    find(kernel.seccomp(host(tree, probes=no_binding)), Level.FAIL, "pip install pyseccomp")


def test_an_already_filtered_process_is_told_what_its_filter_must_allow(tree: Path) -> None:
    write(tree, "proc/self/status", "NoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n")
    find(kernel.seccomp(host(tree)), Level.OK, "unshare, mount, pivot_root and setns")


# --- user namespaces, ids, overlay, proc --------------------------------------------------


def test_a_user_namespace_refused_by_debians_knob(tree: Path) -> None:
    write(tree, "proc/sys/kernel/unprivileged_userns_clone", "0")
    refused = replace(HEALTHY, userns=False)
    find(userns.userns(host(tree, probes=refused)), Level.FAIL,
         "kernel.unprivileged_userns_clone=0",
         "sysctl -w kernel.unprivileged_userns_clone=1",
         "kernel.unprivileged_userns_clone = 1", "/etc/sysctl.d/60-sandboxd.conf",
         "as root: ")
    # It does not apply to root.
    find(userns.userns(host(tree, uid=0, user="root")), Level.OK)


def test_a_pods_root_is_held_to_the_knobs_and_ulimit(tree: Path) -> None:
    # hostUsers: false: the pod's root is an unprivileged id of the node.
    write(tree, "proc/self/uid_map", "0 1879048192 65536\n")
    write(tree, "proc/sys/kernel/unprivileged_userns_clone", "0")
    pods_root = host(tree, uid=0, user="root", in_kubernetes=True, nproc=50,
                     probes=replace(HEALTHY, userns=False))
    find(userns.userns(pods_root), Level.FAIL, "on each node, as root: sysctl -w "
         "kernel.unprivileged_userns_clone=1")
    find(limits.pids(pods_root), Level.FAIL, "ulimit -u 50")


def test_apparmor_restriction_fails_even_when_unshare_works(tree: Path) -> None:
    write(tree, "proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1")
    find(userns.userns(host(tree)), Level.FAIL, "no capabilities",
         "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")


def test_namespace_limits_zero_fails_low_warns(tree: Path) -> None:
    write(tree, "proc/sys/user/max_user_namespaces", "0")
    find(userns.userns(host(tree, probes=replace(HEALTHY, userns=False))), Level.FAIL,
         "sysctl -w user.max_user_namespaces=65536")
    write(tree, "proc/sys/user/max_user_namespaces", "63000")
    write(tree, "proc/sys/user/max_mnt_namespaces", "100")
    find(userns.userns(host(tree)), Level.WARN, "user.max_mnt_namespaces=100",
         "sysctl -w user.max_mnt_namespaces=65536")


def test_a_user_namespace_refused_without_a_knob_names_the_pod_spec(tree: Path) -> None:
    refused = replace(HEALTHY, userns=False)
    find(userns.userns(host(tree, probes=refused)), Level.FAIL, "seccomp")
    find(userns.userns(host(tree, probes=refused, in_kubernetes=True)), Level.FAIL,
         "hostUsers: false", "Localhost")


def test_missing_subordinate_ids_warn_with_a_free_range(tree: Path) -> None:
    write(tree, "etc/subuid", "bob:100000:65536\n")
    write(tree, "etc/subgid", "bob:100000:65536\n")
    find(ids.subids(host(tree)), Level.WARN, "/etc/subuid and /etc/subgid",
         f"as root: usermod --add-subuids 165536-231071 --add-subgids 165536-231071 {USER}")


def test_root_without_subordinate_ids_fails(tree: Path) -> None:
    find(ids.subids(host(tree, uid=0, user="root")), Level.FAIL, "container root is not "
         "host root", "usermod --add-subuids 165536-231071 --add-subgids 165536-231071 root")


def test_subordinate_ids_outside_a_pods_namespace_fail(tree: Path) -> None:
    # hostUsers: false gives the pod 65536 ids; the image's 100000:65536 is not among them.
    write(tree, "proc/self/uid_map", "0 1879048192 65536\n")
    write(tree, "proc/self/gid_map", "0 1879048192 65536\n")
    found = find(ids.subids(host(tree, in_kubernetes=True)), Level.FAIL,
                 "/etc/subuid 100000:65536", "outside", "/proc/self/uid_map")
    assert found.fix == ("in the image, a RUN line of its Dockerfile before USER: usermod "
                         "--del-subuids 100000-165535 --del-subgids 100000-165535 "
                         f"--add-subuids {UID + 1}-65535 --add-subgids {UID + 1}-65535 {USER}")


@needs_uidmap
def test_newuidmap_missing_warns_and_unprivileged_fails(tree: Path) -> None:
    (tree / "usr/bin/newgidmap").unlink()
    find(ids.newuidmap(host(tree)), Level.WARN, "newgidmap not found",
         "apt-get install uidmap")
    (tree / "usr/bin/newgidmap").write_text("")  # a copy without its setuid bit
    find(ids.newuidmap(host(tree)), Level.FAIL, "not setuid root, nor given file "
         "capabilities: newgidmap",
         "apt-get install --reinstall uidmap")


def test_without_subordinate_ids_newuidmap_is_not_looked_at(tree: Path) -> None:
    write(tree, "etc/subuid", "")
    write(tree, "proc/self/status", "NoNewPrivs:\t1\nSeccomp:\t2\n")
    find(ids.newuidmap(host(tree)), Level.SKIPPED)
    # What the subids fix adds does not work without newuidmap's privileges: it says so.
    found = find(ids.subids(host(tree, in_kubernetes=True)), Level.WARN, "/etc/subuid:",
                 "allowPrivilegeEscalation: true")
    assert found.fix is not None and found.fix.startswith(
        f"in the image, a RUN line of its Dockerfile before USER: usermod --add-subuids "
        f"165536-231071 {USER}; ")


@needs_uidmap
def test_no_new_privs_makes_newuidmap_useless(tree: Path) -> None:
    write(tree, "proc/self/status", "NoNewPrivs:\t1\nSeccomp:\t0\n")
    find(ids.newuidmap(host(tree)), Level.FAIL, "no_new_privs", "NoNewPrivileges=no")
    find(ids.newuidmap(host(tree, in_kubernetes=True)), Level.FAIL,
         "allowPrivilegeEscalation: true")
    find(ids.newuidmap(host(tree, uid=0, user="root")), Level.OK)  # root needs none


def test_overlay_refused(tree: Path) -> None:
    refused = replace(HEALTHY, overlay=False)
    find(userns.overlay(host(tree, probes=refused)), Level.FAIL, "security module")
    write(tree, "proc/filesystems", "nodev\ttmpfs\n")
    find(userns.overlay(host(tree, probes=refused)), Level.FAIL, "not loaded",
         "modprobe overlay")
    nothing = replace(HEALTHY, userns=False, overlay=False, proc=False)
    find(userns.overlay(host(tree, probes=nothing)), Level.SKIPPED)
    find(procfs.proc(host(tree, probes=nothing)), Level.SKIPPED)


def test_a_masked_proc_fails_and_names_procmount(tree: Path) -> None:
    masked = MOUNTINFO + "".join(
        f"{60 + i} 22 0:5 /null /proc/{p} rw,nosuid - devtmpfs udev rw\n"
        for i, p in enumerate(("kcore", "keys", "timer_list", "latency_stats", "sched_debug")))
    write(tree, "proc/self/mountinfo", masked)
    no_proc = replace(HEALTHY, proc=False, proc_failure="mount('proc', ...): EPERM")
    find(procfs.proc(host(tree, probes=no_proc, in_kubernetes=True)), Level.FAIL,
         "namespace (mount('proc', ...): EPERM): no container can start",
         "/proc/kcore, /proc/keys, /proc/timer_list, /proc/latency_stats and 1 more",
         "procMount: Unmasked")
    find(procfs.proc(host(tree, probes=no_proc)), Level.FAIL, "systempaths=unconfined")


def test_a_read_only_proc_fails(tree: Path) -> None:
    write(tree, "proc/self/mountinfo", MOUNTINFO.replace("/proc rw,relatime", "/proc ro"))
    find(procfs.proc(host(tree, probes=replace(HEALTHY, proc=False))), Level.FAIL,
         "read-only", "mount -o remount,rw /proc")


# --- cgroups and pids ---------------------------------------------------------------------


def test_no_memory_controller_for_root_names_the_boot_option(tree: Path) -> None:
    write(tree, "proc/self/mountinfo", "".join(
        line + "\n" for line in MOUNTINFO.splitlines() if "memory" not in line))
    find(doctor_cgroups.cgroups(host(tree, uid=0, user="root")), Level.WARN,
         "fall back to rlimits", "cgroup_enable=memory")


def test_cgroups_not_delegated_warn_with_setup(tree: Path) -> None:
    for c in CONTROLLERS:
        shutil.rmtree(tree / f"sys/fs/cgroup/{c}/sandboxd-{USER}")
    h = host(tree)
    find(doctor_cgroups.cgroups(h), Level.WARN, "fall back to rlimits",
         f"as root: sandboxd setup --user {USER}")
    find(doctor_cgroups.favordynmods(h), Level.SKIPPED)


def test_a_cgroup_without_control_files_fails_the_trial(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # a plain mkdir: the new cgroup has no memory.limit_in_bytes
    found = find(doctor_cgroups.cgroups(host(tree)), Level.FAIL, "cannot set limits",
                 "memory.limit_in_bytes")
    assert found.fix is not None and "sandboxd setup --user" in found.fix
    assert not list(tree.rglob("doctor-*"))


def test_partial_delegation_and_no_swap_accounting_warn(tree: Path) -> None:
    for c in ("pids", "cpu"):
        shutil.rmtree(tree / f"sys/fs/cgroup/{c}/sandboxd-{USER}")
    find(doctor_cgroups.cgroups(host(tree)), Level.WARN, "no pids, cpu controller")
    for c in ("pids", "cpu"):
        populate(tree / f"sys/fs/cgroup/{c}/sandboxd-{USER}", c)
    (tree / "sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").unlink()
    find(doctor_cgroups.cgroups(host(tree)), Level.WARN, "swap accounting", "swapaccount=1")


def v2_tree(root: Path, controllers: str) -> Path:
    """Turn the tree into a cgroup v2 host whose systemd delegates `controllers` to the
    service's unit (sandboxd-alice and its -supervisor leaf are made by detection)."""
    cg = root / "sys/fs/cgroup"
    shutil.rmtree(cg)
    write(root, "proc/self/mountinfo", MOUNTINFO.split("31 23")[0] +
          "25 24 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    write(root, "proc/self/cgroup", f"0::{V2_UNIT}\n")
    write(root, "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    unit = cg / V2_UNIT.lstrip("/")
    write(root, f"sys/fs/cgroup{V2_UNIT}/cgroup.controllers", controllers + "\n")
    (unit / "cgroup.subtree_control").write_text("\n")
    return unit


def test_cgroup_v2_delegated_by_systemd(tree: Path) -> None:
    unit = v2_tree(tree, "cpuset cpu io memory pids")
    find(doctor_cgroups.cgroups(host(tree)), Level.OK, "cgroup v2", "memory pids")
    assert sorted(p.name for p in unit.iterdir() if p.is_dir()) == [f"sandboxd-{USER}"]
    # The user's slice has a TasksMax: the lowest pids.max on the way up is reported.
    (unit.parents[2] / "pids.max").write_text("1000\n")
    find(limits.pids(host(tree)), Level.WARN, f"/user-{UID}.slice 1000", "TasksMax=infinity")


def test_cgroup_v2_without_memory_delegated_warns(tree: Path) -> None:
    v2_tree(tree, "cpu pids")
    find(doctor_cgroups.cgroups(host(tree)), Level.WARN, "no memory controller",
         f"sandboxd setup --user {USER}", "systemd recipe")


def test_favordynmods_off_warns(tree: Path) -> None:
    write(tree, "proc/self/mountinfo", MOUNTINFO.replace("rw,favordynmods", "rw"))
    find(doctor_cgroups.favordynmods(host(tree)), Level.WARN, "sandboxd setup")


def test_pid_limits(tree: Path) -> None:
    find(limits.pids(host(tree)), Level.OK, "kernel.pid_max 4194304")
    write(tree, "proc/sys/kernel/pid_max", "100")
    find(limits.pids(host(tree)), Level.FAIL, "kernel.pid_max 100",
         "sysctl -w kernel.pid_max=4194304")
    write(tree, "proc/sys/kernel/pid_max", "4194304")
    # The service's own cgroup (a systemd unit's TasksMax) is the lowest on its way up.
    write(tree, "proc/self/cgroup", OWN_CGROUP.replace("pids:/", "pids:/system.slice/sbx"))
    populate(tree / "sys/fs/cgroup/pids/system.slice/sbx", "pids")
    (tree / "sys/fs/cgroup/pids/system.slice/pids.max").write_text("3000\n")
    (tree / "sys/fs/cgroup/pids/system.slice/sbx/pids.max").write_text("max\n")
    find(limits.pids(host(tree)), Level.WARN,
         "pids.max of /sys/fs/cgroup/pids/system.slice 3000", "TasksMax=infinity")
    find(limits.pids(host(tree, in_kubernetes=True)), Level.WARN, "podPidsLimit")


def test_ulimit_u_counts_for_users_not_for_root(tree: Path) -> None:
    find(limits.pids(host(tree, nproc=50)), Level.FAIL, "ulimit -u 50",
         f"'{USER} - nproc unlimited' in /etc/security/limits.d/sandboxd.conf")
    find(limits.pids(host(tree, uid=0, user="root", nproc=50)), Level.OK)


# --- the state directory ------------------------------------------------------------------


@pytest.fixture
def statvfs(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """os.statvfs as the doctor sees it, with the free blocks and inodes the test sets."""
    space = {"bytes": 50 << 30, "inodes": 1_000_000}
    real = os.statvfs

    def fake(path: Any) -> Any:
        st = real(path)
        fields = list(st)
        fields[0] = fields[1] = 4096  # f_bsize, f_frsize
        fields[4] = space["bytes"] // 4096  # f_bavail
        fields[5], fields[7] = 2_000_000, space["inodes"]  # f_files, f_favail
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", fake)
    yield space


def test_state_dir_space(tree: Path, tmp_path: Path, statvfs: dict[str, int]) -> None:
    state = tmp_path / "state"  # missing: its parent's filesystem is checked
    me = host(tree, uid=os.geteuid(), state_dir=state)
    find(disk.state_dir(me), Level.OK, "51200 MiB and 1000000 inodes free")
    statvfs["bytes"] = 1 << 30
    find(disk.state_dir(me), Level.WARN, "1024 MiB", "/v1/images/gc")
    statvfs["bytes"], statvfs["inodes"] = 50 << 30, 500
    find(disk.state_dir(me), Level.FAIL, "500 inodes", "sbx rmi IMAGE")


def test_a_state_dir_of_another_user_fails(tree: Path, tmp_path: Path) -> None:
    found = find(disk.state_dir(host(tree, state_dir=tmp_path)), Level.FAIL,
                 f"not to {USER}", f"chown -R {USER}: {tmp_path}")
    assert found.check == "state_dir"


def test_a_long_path_in_a_message_stays_whole_in_the_text() -> None:
    from sandbox.doctor.findings import Finding, Report
    path = "/tmp/suite-root.1vU1l2/pytest-of-root/pytest-0/test-a-blocking-problem/" + "x" * 80
    report = Report("root", 0, False, (Finding("state_dir", Level.FAIL,
                                                f"{path} belongs to uid 65534, not to root"),))
    assert any(path in line for line in report.text().splitlines()), report.text()
