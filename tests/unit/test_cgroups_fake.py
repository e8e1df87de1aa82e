"""cgroup drivers against fake cgroupfs trees (plain directories and files in tmp_path).

A plain tree has no kernel behind it: mkdir makes no control files, so each test creates
the files a step needs, and rmdir is swapped for shutil.rmtree where directories are removed.
File contents are copied from a Debian 12 / kernel 6.18 host.
"""

from __future__ import annotations

import os
import pwd
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from sandbox.errors import CgroupError
from sandbox.runtime.cgroups import UNLIMITED, CgroupLimits, V1Driver, V2Driver, base, detect
from sandbox.runtime.cgroups.base import Cgroup
from sandbox.runtime.cgroups.delegate import delegate_v1, systemd_recipe_v2, undelegate_v1
from sandbox.runtime.cgroups.detect import parse_mountinfo, parse_proc_cgroup
from sandbox.runtime.cgroups.v1 import KEEP_MEMORY_RESIDUE_MAX
from sandbox.runtime.container import (
    CONTAINER_OVERHEAD_BYTES,
    CONTAINER_OVERHEAD_PIDS,
    container_limits,
)
from sandbox.runtime.profiles import Limits, load_profile
from sandbox.runtime.rootfs import RootfsSpec

V1_SEPARATE = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_SEPARATE_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/b8890378615fabf62e194d57b7ec7f55
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""
V1_COMOUNTED = """\
25 24 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec shared:10 - cgroup2 cgroup2 rw
29 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec shared:13 - cgroup cgroup rw,cpu,cpuacct
30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec shared:14 - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec shared:15 - cgroup cgroup rw,pids
32 25 0:29 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec shared:16 - cgroup cgroup rw,freezer
33 25 0:30 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec shared:17 - cgroup cgroup rw,net_cls,net_prio
"""  # noqa: E501
V2_PURE = """\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
25 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""  # noqa: E501
V2_OWN = "/user.slice/user-1000.slice/user@1000.service/app.slice/sandboxd.service"

MEMORY_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n"
V2_CPU_STAT = """\
usage_usec 41508975
user_usec 28187878
system_usec 13321096
core_sched.force_idle_usec 0
nr_periods 12
nr_throttled 3
throttled_usec 81234
nr_bursts 0
burst_usec 0
"""
V2_MEMORY_EVENTS = "low 0\nhigh 0\nmax 57\noom 2\noom_kill 2\noom_group_kill 0\n"

V1_FILES: dict[str, dict[str, str]] = {
    "memory": {"memory.limit_in_bytes": "9223372036854771712\n",
               "memory.memsw.limit_in_bytes": "9223372036854771712\n",
               "memory.swappiness": "60\n", "memory.max_usage_in_bytes": "7966720\n",
               "memory.usage_in_bytes": "0\n", "memory.failcnt": "0\n",
               "memory.oom_control": MEMORY_OOM_CONTROL.format(n=0)},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    "cpu": {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"},
    "cpuacct": {"cpuacct.usage": "44208287620\n", "cpuacct.usage_user": "28183878936\n",
                "cpuacct.usage_sys": "13317110264\n", "cpuacct.stat": "user 3002\nsystem 1418\n"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": "", "cgroup.clone_children": "0\n"},
    "freezer": {"freezer.state": "THAWED\n"},
}


def populate(d: Path, *controllers: str, **override: str) -> None:
    """Make d look like a fresh cgroup of the given (v1) controllers."""
    d.mkdir(parents=True, exist_ok=True)
    for name in ("cgroup.procs", "tasks", "notify_on_release"):
        (d / name).write_text("")
    for c in controllers:
        for name, text in V1_FILES.get(c, {}).items():
            (d / name).write_text(text)
    for name, text in override.items():
        (d / name.replace("__", ".")).write_text(text)


def write_proc(root: Path, mountinfo: str, cgroup: str) -> None:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/self/cgroup").write_text(cgroup)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every write the drivers make, as (path relative to the tree, data)."""
    log: list[tuple[str, str]] = []
    real, real_kept = base.write_raw, base.Cgroup.write_kept

    def recording(path: str, data: str) -> None:
        log.append((path, data))
        real(path, data)

    def recording_kept(self: Cgroup, path: str, data: str) -> None:
        log.append((path, data))
        real_kept(self, path, data)

    monkeypatch.setattr(base, "write_raw", recording)
    monkeypatch.setattr(base.Cgroup, "write_kept", recording_kept)
    return log


@pytest.fixture
def plain_rmdir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "rmdir", shutil.rmtree)


def v1_tree(root: Path, *, comounted: bool = False, base_name: str = "sandboxd") -> Path:
    cg = root / "sys/fs/cgroup"
    if comounted:
        write_proc(root, V1_COMOUNTED, "0::/\n")
        populate(cg / "cpu,cpuacct", "cpu", "cpuacct")
        (cg / "cpu").symlink_to("cpu,cpuacct")
        (cg / "cpuacct").symlink_to("cpu,cpuacct")
        hierarchies = ["memory", "pids", "freezer"]
    else:
        write_proc(root, V1_SEPARATE, V1_SEPARATE_CGROUP)
        hierarchies = ["memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"]
    (cg / "unified").mkdir(parents=True)
    (cg / "unified/cgroup.controllers").write_text("hugetlb\n")
    for h in hierarchies:
        populate(cg / h, h, cpuset__cpus="0-1\n", cpuset__mems="0\n")
    # What the kernel would show in a new cpuset cgroup, so detection can fill it in.
    if not comounted:
        populate(cg / "cpuset" / base_name, "cpuset")
    return cg


# --- parsing ------------------------------------------------------------------------------


def test_parse_mountinfo_finds_v1_and_v2_mounts() -> None:
    mounts = parse_mountinfo(V1_SEPARATE + V1_COMOUNTED)
    v1 = {str(m.path): m.controllers for m in mounts if m.fstype == "cgroup"}
    assert v1["/sys/fs/cgroup/memory"] == {"memory"}
    assert v1["/sys/fs/cgroup/cpu,cpuacct"] == {"cpu", "cpuacct"}
    assert v1["/sys/fs/cgroup/systemd"] == frozenset()  # name=systemd carries no controller
    assert [str(m.path) for m in mounts if m.fstype == "cgroup2"] == [
        "/sys/fs/cgroup/unified", "/sys/fs/cgroup/unified"]
    assert not any(m.fstype == "tmpfs" for m in mounts)


def test_parse_mountinfo_unescapes_paths() -> None:
    line = r"1 2 0:3 / /mnt/cg\040v1 rw - cgroup cgroup rw,memory" + "\n"
    assert str(parse_mountinfo(line)[0].path) == "/mnt/cg v1"


def test_parse_proc_cgroup() -> None:
    own = parse_proc_cgroup(V1_SEPARATE_CGROUP)
    assert own["memory"] == "/process_api/b8890378615fabf62e194d57b7ec7f55"
    assert own[""] == "/"
    assert own["name=systemd"] == "/"


# --- detection ----------------------------------------------------------------------------


def test_detect_v1_separate_as_root(tmp_path: Path) -> None:
    cg = v1_tree(tmp_path)
    det = detect(root=tmp_path, uid=0)
    drv = det.driver
    assert isinstance(drv, V1Driver)
    assert det.warnings == ()
    assert drv.controllers == {"memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"}
    assert drv.bases["memory"] == str(cg / "memory/sandboxd")
    assert drv.memsw and drv.cpuacct_split
    for h in ("memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"):
        assert (cg / h / "sandboxd").is_dir()
    # The cpuset base is filled from its parent and passes that on to every child.
    assert (cg / "cpuset/sandboxd/cpuset.cpus").read_text() == "0-1"
    assert (cg / "cpuset/sandboxd/cpuset.mems").read_text() == "0"
    assert (cg / "cpuset/sandboxd/cgroup.clone_children").read_text() == "1"
    assert drv.describe()["version"] == 1


def test_detect_v1_comounted_cpu_cpuacct(tmp_path: Path) -> None:
    cg = v1_tree(tmp_path, comounted=True)
    drv = detect(root=tmp_path, uid=0, base_name="sbx").driver
    assert isinstance(drv, V1Driver)
    assert drv.controllers == {"memory", "pids", "cpu", "cpuacct", "freezer"}
    assert drv.bases["cpu"] == drv.bases["cpuacct"] == str(cg / "cpu,cpuacct/sbx")
    c = drv.create("c-1")
    for h in ("memory", "pids", "cpu,cpuacct", "freezer"):
        populate(cg / h / "sbx/c-1", h)
    fds = c.open_procs_fds()
    try:
        assert len(fds) == 4  # memory, pids, cpu+cpuacct, freezer
    finally:
        for fd in fds:
            os.close(fd)


def test_detect_user_without_delegation_warns(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    uid = 4242
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    det = detect(root=tmp_path, uid=uid)
    assert det.driver is None
    assert len(det.warnings) == 1
    assert f"sandboxd-{name}" in det.warnings[0]
    assert "fall back to rlimits" in det.warnings[0]
    assert f"sandboxd setup --user {name}" in det.warnings[0]


def test_detect_v1_user_with_delegated_base(tmp_path: Path) -> None:
    cg = v1_tree(tmp_path, base_name="sandboxd-alice")
    for h in ("memory", "pids", "cpu", "cpuacct", "freezer"):
        populate(cg / h / "sandboxd-alice", h)
    det = detect(root=tmp_path, uid=4242, base_name="sandboxd-alice")
    assert isinstance(det.driver, V1Driver)
    assert det.driver.controllers == {"memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"}
    det.driver.close()
    assert (cg / "memory/sandboxd-alice").is_dir()  # made by setup, left to setup


def test_detect_v1_user_partial_delegation_warns(tmp_path: Path) -> None:
    cg = v1_tree(tmp_path, base_name="sandboxd-alice")
    populate(cg / "memory/sandboxd-alice", "memory")
    det = detect(root=tmp_path, uid=4242, base_name="sandboxd-alice")
    assert isinstance(det.driver, V1Driver)
    assert det.driver.controllers == {"memory", "cpuset"}
    assert any("pids not usable" in w for w in det.warnings)


def test_detect_without_memory_hierarchy(tmp_path: Path) -> None:
    write_proc(tmp_path, "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", "")
    det = detect(root=tmp_path, uid=0)
    assert det.driver is None and "rlimits" in det.warnings[0]


def v2_tree(root: Path, *, own: str = V2_OWN) -> Path:
    write_proc(root, V2_PURE, f"0::{own}\n")
    cg = root / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    parent = cg / own.lstrip("/")
    parent.mkdir(parents=True, exist_ok=True)
    (parent / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (parent / "cgroup.subtree_control").write_text("\n")
    (parent / "cgroup.procs").write_text("4321\n")
    b = parent / "sandboxd"
    b.mkdir()
    for name, text in {"cgroup.subtree_control": "\n", "cgroup.procs": "", "cgroup.kill": "",
                       "cgroup.freeze": "0\n", "cgroup.events": "populated 0\nfrozen 0\n"}.items():
        (b / name).write_text(text)
    return parent


def test_detect_prefers_v2_with_memory(tmp_path: Path, writes: list[tuple[str, str]]) -> None:
    parent = v2_tree(tmp_path)
    det = detect(root=tmp_path, uid=0)
    drv = det.driver
    assert isinstance(drv, V2Driver)
    assert drv.base == str(parent / "sandboxd")
    assert drv.controllers == {"memory", "pids", "cpu", "cpuset", "cpuacct", "freezer"}
    assert drv.has_kill
    enabled = [(Path(p).parent.name, d) for p, d in writes if p.endswith("subtree_control")]
    assert enabled == [(parent.name, f"+{c}") for c in ("memory", "pids", "cpu", "cpuset")] + [
        ("sandboxd", f"+{c}") for c in ("memory", "pids", "cpu", "cpuset")]
    assert det.warnings == ()


def test_detect_v2_with_fewer_controllers_warns(tmp_path: Path) -> None:
    parent = v2_tree(tmp_path)
    (parent / "cgroup.controllers").write_text("cpu pids\n")
    det = detect(root=tmp_path, uid=1000, base_name="sandboxd")
    assert isinstance(det.driver, V2Driver)
    assert det.driver.controllers == {"pids", "cpu", "cpuacct", "freezer"}
    assert any("memory cpuset" in w and "Delegate=yes" in w for w in det.warnings)


def test_detect_v2_nothing_writable(tmp_path: Path) -> None:
    v2_tree(tmp_path)
    (tmp_path / "proc/self/cgroup").write_text("0::/user.slice/user-1000.slice/session-2.scope\n")
    det = detect(root=tmp_path, uid=1000)
    assert det.driver is None
    assert "rlimits" in det.warnings[0] and "Delegate=yes" in det.warnings[0]


def test_detect_hybrid_without_v2_memory_picks_v1(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    assert isinstance(detect(root=tmp_path, uid=0).driver, V1Driver)


def test_v2_moves_itself_out_of_a_busy_parent(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    parent = v2_tree(tmp_path)
    populate(parent / "sandboxd-supervisor")
    real = base.write_raw
    busy = {"left": 1}

    def write_raw(path: str, data: str) -> None:
        if path == f"{parent}/cgroup.subtree_control" and busy["left"]:
            busy["left"] -= 1
            raise OSError(16, "Device or resource busy")
        real(path, data)

    monkeypatch.setattr(base, "write_raw", write_raw)
    drv, warnings = V2Driver.at(str(parent), "sandboxd", move_self=True, setup_hint="")
    assert drv is not None and "memory" in drv.controllers
    assert (parent / "sandboxd-supervisor/cgroup.procs").read_text() == str(os.getpid())
    assert any("moved the service" in w for w in warnings)


# --- v1 driver ----------------------------------------------------------------------------


def v1_driver(tmp_path: Path) -> tuple[V1Driver, Path]:
    cg = v1_tree(tmp_path)
    drv = detect(root=tmp_path, uid=0).driver
    assert isinstance(drv, V1Driver)
    return drv, cg


def new_v1_cgroup(drv: V1Driver, cg: Path, path: str) -> None:
    for h in ("memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"):
        populate(cg / h / "sandboxd" / path, h)


def test_v1_apply_writes_exactly(tmp_path: Path, writes: list[tuple[str, str]]) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1")
    new_v1_cgroup(drv, cg, "c-1")
    writes.clear()
    c.apply(CgroupLimits(memory_bytes=256 << 20, pids=64, cpu_quota_us=50_000,
                         cpuset_cpus="1"))
    rel = [(str(Path(p).relative_to(cg)), d) for p, d in writes]
    assert rel == [
        ("memory/sandboxd/c-1/memory.limit_in_bytes", "268435456"),
        ("memory/sandboxd/c-1/memory.memsw.limit_in_bytes", "268435456"),
        ("memory/sandboxd/c-1/memory.swappiness", "0"),
        ("pids/sandboxd/c-1/pids.max", "64"),
        ("cpu/sandboxd/c-1/cpu.cfs_period_us", "100000"),
        ("cpu/sandboxd/c-1/cpu.cfs_quota_us", "50000"),
        ("cpuset/sandboxd/c-1/cpuset.mems", "0"),
        ("cpuset/sandboxd/c-1/cpuset.cpus", "1"),
    ]
    writes.clear()
    c.apply(CgroupLimits())
    assert writes == []
    c.apply(CgroupLimits(pids=UNLIMITED, cpu_quota_us=UNLIMITED))  # a recycled one's lifted
    assert [(str(Path(p).relative_to(cg)), d) for p, d in writes] == [
        ("pids/sandboxd/c-1/pids.max", "max"),
        ("cpu/sandboxd/c-1/cpu.cfs_period_us", "100000"),
        ("cpu/sandboxd/c-1/cpu.cfs_quota_us", "-1"),
    ]


def test_v1_apply_raises_memsw_first_when_limit_goes_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1")
    new_v1_cgroup(drv, cg, "c-1")
    order: list[str] = []
    real = base.write_raw

    def write_raw(path: str, data: str) -> None:
        order.append(Path(path).name)
        if path.endswith("memory.limit_in_bytes") and order.count("memory.limit_in_bytes") == 1:
            raise OSError(22, "Invalid argument")  # above the current memsw limit
        real(path, data)

    monkeypatch.setattr(base, "write_raw", write_raw)
    c.apply(CgroupLimits(memory_bytes=1 << 30))
    assert order == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
                     "memory.limit_in_bytes", "memory.swappiness"]


def test_v1_without_memsw_or_a_controller(tmp_path: Path, writes: list[tuple[str, str]]) -> None:
    cg = v1_tree(tmp_path)
    (cg / "memory/memory.memsw.limit_in_bytes").unlink()
    (tmp_path / "proc/self/mountinfo").write_text(
        "\n".join(line for line in V1_SEPARATE.splitlines() if "pids" not in line) + "\n")
    det = detect(root=tmp_path, uid=0)
    drv = det.driver
    assert isinstance(drv, V1Driver) and not drv.memsw and "pids" not in drv.controllers
    assert any("swap" in w for w in det.warnings)
    assert any("pids" in w for w in det.warnings)
    c = drv.create("c")
    new_v1_cgroup(drv, cg, "c")
    c.apply(CgroupLimits(memory_bytes=1000))
    assert [Path(p).name for p, _ in writes if "/c/" in p] == [
        "memory.limit_in_bytes", "memory.swappiness"]
    with pytest.raises(CgroupError, match="pids cgroup controller"):
        c.apply(CgroupLimits(pids=5))


def test_v1_stats_parse_real_formats(tmp_path: Path) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1")
    new_v1_cgroup(drv, cg, "c-1")
    r = c.child("r-1")
    new_v1_cgroup(drv, cg, "c-1/r-1")
    (cg / "memory/sandboxd/c-1/memory.oom_control").write_text(MEMORY_OOM_CONTROL.format(n=1))
    (cg / "memory/sandboxd/c-1/r-1/memory.oom_control").write_text(
        MEMORY_OOM_CONTROL.format(n=2))
    s = c.stats()
    assert s.cpu_user_ns == 28183878936
    assert s.cpu_sys_ns == 13317110264
    assert s.cpu_total_ns == 44208287620
    assert s.memory_peak_bytes == 7966720
    assert s.oom_kills == 3  # v1 counts in the victim's cgroup only: the parent sums them
    assert s.cpu_source == "cgroup-v1:cpuacct.usage_user+usage_sys"
    assert s.memory_source == "cgroup-v1:memory.max_usage_in_bytes"
    assert r.stats().oom_kills == 2
    assert c.cpu_ns() == 44208287620


def test_v1_stats_old_kernel_fallbacks(tmp_path: Path) -> None:
    cg = v1_tree(tmp_path)
    (cg / "cpuacct/cpuacct.usage_user").unlink()
    drv = detect(root=tmp_path, uid=0).driver
    assert isinstance(drv, V1Driver) and not drv.cpuacct_split
    c = drv.create("c")
    new_v1_cgroup(drv, cg, "c")
    (cg / "memory/sandboxd/c/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\n")
    (cg / "memory/sandboxd/c/memory.failcnt").write_text("17\n")
    s = c.stats()
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert (s.cpu_user_ns, s.cpu_sys_ns) == (3002 * tick, 1418 * tick)
    assert s.cpu_source == "cgroup-v1:cpuacct.stat+usage"
    assert s.oom_kills == 1


def test_v1_pids_open_list_kill_destroy(tmp_path: Path, writes: list[tuple[str, str]],
                                         plain_rmdir: None) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1")
    new_v1_cgroup(drv, cg, "c-1")
    c.child("r-1")
    new_v1_cgroup(drv, cg, "c-1/r-1")
    (cg / "memory/sandboxd/c-1/cgroup.procs").write_text("")
    (cg / "pids/sandboxd/c-1/r-1/cgroup.procs").write_text("")
    assert c.pids(recursive=True) == []
    assert drv.list() == ["c-1"]
    opened = drv.open("c-1/r-1")
    assert opened is not None and opened.path == "c-1/r-1"
    assert drv.open("c-2") is None
    with pytest.raises(CgroupError):
        drv.open("../x")
    with pytest.raises(CgroupError, match="already exists"):
        drv.create("c-1")
    writes.clear()
    c.destroy()
    # Nothing runs in it, so there is nothing to freeze and kill: destroy only removes.
    assert [(Path(p).name, d) for p, d in writes] == []
    for h in ("memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"):
        assert not (cg / h / "sandboxd/c-1").exists()
    c.destroy()  # idempotent
    assert drv.list() == []
    drv.close()
    assert not (cg / "memory/sandboxd").exists()


def _joined(c: Cgroup, limits: CgroupLimits, cg: Path) -> list[str]:
    """The hierarchies of the cgroup.procs descriptors a run under `limits` joins by."""
    return [str(Path(os.readlink(f"/proc/self/fd/{fd}")).relative_to(cg).parts[0])
            for fd in c.join_fds(limits)]


def test_v1_a_run_joins_no_cpu_or_cpuset_cgroup_its_container_has_the_limits_of(
        tmp_path: Path) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c").child("r")
    new_v1_cgroup(drv, cg, "c/r")
    (cg / "cpuset/sandboxd/c/cpuset.cpus").write_text("0-1\n")   # the container's CPUs
    assert _joined(c, CgroupLimits(cpu_quota_us=UNLIMITED, cpuset_cpus="0-1"), cg) == [
        "memory", "pids", "cpuacct", "freezer"]
    everything = ["memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"]
    assert _joined(c, CgroupLimits(cpu_quota_us=50_000, cpuset_cpus="1"), cg) == everything
    assert _joined(c, CgroupLimits(), cg) == everything   # its limits left as they are
    c.close_procs_fds()
    # Co-mounted with cpuacct, the cpu hierarchy counts the run's CPU time: joined always.
    cg = v1_tree(tmp_path / "co", comounted=True)
    drv = detect(root=tmp_path / "co", uid=0).driver
    assert isinstance(drv, V1Driver)
    c = drv.create("c")
    for h in ("memory", "pids", "cpu,cpuacct", "freezer"):
        populate(cg / h / "sandboxd/c", h)
    assert _joined(c, CgroupLimits(cpu_quota_us=UNLIMITED, cpuset_cpus="0-1"), cg) == [
        "memory", "pids", "cpu,cpuacct", "freezer"]
    c.close_procs_fds()


def test_v1_add_pid_writes_every_hierarchy(tmp_path: Path,
                                           writes: list[tuple[str, str]]) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c")
    new_v1_cgroup(drv, cg, "c")
    writes.clear()
    c.add_pid(1234)
    assert sorted(str(Path(p).relative_to(cg)) for p, d in writes if d == "1234") == sorted(
        f"{h}/sandboxd/c/cgroup.procs"
        for h in ("memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"))
    (cg / "memory/sandboxd/c/cgroup.procs").write_text("1234\n1240\n")
    (cg / "pids/sandboxd/c/cgroup.procs").write_text("1234\n")
    assert c.pids() == [1234, 1240]


def test_names_are_checked(tmp_path: Path) -> None:
    drv, _ = v1_driver(tmp_path)
    for bad in ("", "a/b", "..", "x y", "é"):
        with pytest.raises(CgroupError, match="invalid cgroup name"):
            drv.create(bad)


# --- v2 driver ----------------------------------------------------------------------------


def v2_driver(tmp_path: Path) -> tuple[V2Driver, Path]:
    parent = v2_tree(tmp_path)
    drv = detect(root=tmp_path, uid=0).driver
    assert isinstance(drv, V2Driver)
    return drv, parent / "sandboxd"


def v2_files(d: Path) -> None:
    for name, text in {"cgroup.procs": "", "cgroup.subtree_control": "\n", "cgroup.kill": "",
                       "cgroup.events": "populated 0\nfrozen 0\n", "cgroup.freeze": "0\n",
                       "memory.max": "max\n", "memory.swap.max": "max\n", "pids.max": "max\n",
                       "cpu.max": "max 100000\n", "cpuset.cpus": "\n", "cpu.stat": V2_CPU_STAT,
                       "memory.peak": "123506688\n", "memory.events": V2_MEMORY_EVENTS,
                       }.items():
        (d / name).write_text(text)


def test_v2_apply_writes_exactly(tmp_path: Path, writes: list[tuple[str, str]]) -> None:
    drv, b = v2_driver(tmp_path)
    c = drv.create("c-1")
    v2_files(b / "c-1")
    writes.clear()
    c.apply(CgroupLimits(memory_bytes=64 << 20, pids=32, cpu_quota_us=150_000,
                         cpu_period_us=100_000, cpuset_cpus="0-1"))
    assert [(str(Path(p).relative_to(b)), d) for p, d in writes] == [
        ("c-1/memory.max", "67108864"),
        ("c-1/memory.swap.max", "0"),
        ("c-1/pids.max", "32"),
        ("c-1/cpu.max", "150000 100000"),
        ("c-1/cpuset.cpus", "0-1"),
    ]
    writes.clear()
    c.apply(CgroupLimits(pids=UNLIMITED, cpu_quota_us=UNLIMITED))  # a recycled one's lifted
    assert [(str(Path(p).relative_to(b)), d) for p, d in writes] == [
        ("c-1/pids.max", "max"), ("c-1/cpu.max", "max 100000")]


def test_v2_child_enables_controllers_once(tmp_path: Path,
                                           writes: list[tuple[str, str]]) -> None:
    drv, b = v2_driver(tmp_path)
    c = drv.create("c-1")
    v2_files(b / "c-1")
    writes.clear()
    # A container's init leaf needs no controller: the container's cgroup must stay able to
    # take the helper process until init has moved on, so nothing is handed down yet.
    c.child("init", limitable=False)
    assert writes == []
    c.child("r-1")
    c.child("r-2")
    assert writes == [(f"{b}/c-1/cgroup.subtree_control", "+cpu +cpuset +memory +pids")]
    assert sorted(p.name for p in (b / "c-1").iterdir() if p.is_dir()) == ["init", "r-1", "r-2"]


def test_v2_stats_parse_real_formats(tmp_path: Path) -> None:
    drv, b = v2_driver(tmp_path)
    c = drv.create("c-1")
    v2_files(b / "c-1")
    s = c.stats()
    assert (s.cpu_user_ns, s.cpu_sys_ns, s.cpu_total_ns) == (
        28187878000, 13321096000, 41508975000)
    assert s.memory_peak_bytes == 123506688
    assert s.oom_kills == 2
    assert s.cpu_source == "cgroup-v2:cpu.stat"
    assert s.memory_source == "cgroup-v2:memory.peak"
    assert c.cpu_ns() == 41508975000
    (b / "c-1/memory.peak").unlink()  # kernels before 5.19
    s = c.stats()
    assert s.memory_peak_bytes is None and s.memory_source is None


def test_v2_missing_controller(tmp_path: Path) -> None:
    parent = v2_tree(tmp_path)
    (parent / "cgroup.controllers").write_text("cpu\n")
    drv = detect(root=tmp_path, uid=0).driver
    assert drv is not None
    c = drv.create("c")
    v2_files(tmp_path / "sys/fs/cgroup" / V2_OWN.lstrip("/") / "sandboxd/c")
    with pytest.raises(CgroupError, match="memory cgroup controller"):
        c.apply(CgroupLimits(memory_bytes=1 << 20))
    assert c.stats().memory_peak_bytes is None


def test_v2_kill_destroy_close(tmp_path: Path, writes: list[tuple[str, str]],
                               plain_rmdir: None) -> None:
    drv, b = v2_driver(tmp_path)
    c = drv.create("c-1")
    v2_files(b / "c-1")
    fds = c.open_procs_fds()
    assert len(fds) == 1
    os.write(fds[0], b"0")
    os.close(fds[0])
    assert c.pids() == [0]
    (b / "c-1/cgroup.procs").write_text("")
    assert drv.list() == ["c-1"]
    writes.clear()
    c.destroy()
    assert writes == [(f"{b}/c-1/cgroup.kill", "1")]
    assert not (b / "c-1").exists()
    c.destroy()
    assert drv.open("c-1") is None
    drv.close()
    assert not b.exists()


# --- delegation ---------------------------------------------------------------------------


def test_delegate_v1_creates_and_chowns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        plain_rmdir: None) -> None:
    me = pwd.getpwuid(os.getuid())
    cg = v1_tree(tmp_path, base_name=f"sandboxd-{me.pw_name}")
    chowned: list[tuple[str, int, int]] = []
    real_chown = os.chown

    def chown(path: str | Path, uid: int, gid: int) -> None:
        chowned.append((str(path), uid, gid))
        real_chown(path, uid, gid)

    monkeypatch.setattr(os, "chown", chown)
    dirs = delegate_v1(me.pw_name, root=tmp_path)
    d = f"sandboxd-{me.pw_name}"
    assert sorted(str(p.relative_to(cg)) for p in dirs) == sorted(
        f"{h}/{d}" for h in ("memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"))
    assert (cg / "cpuset" / d / "cpuset.cpus").read_text() == "0-1"
    assert (cg / "cpuset" / d / "cpuset.mems").read_text() == "0"
    assert {(p, u, g) for p, u, g in chowned} >= {
        (str(cg / h / d), me.pw_uid, me.pw_gid) for h in ("memory", "pids", "freezer")}
    assert (str(cg / "cpuset" / d / "cpuset.cpus"), me.pw_uid, me.pw_gid) in chowned
    assert all(u == me.pw_uid for _, u, _ in chowned)

    # The delegated base is what a non-root detect() then uses.
    for h in ("memory", "pids", "cpu", "cpuacct", "freezer"):
        populate(cg / h / d, h)
    det = detect(root=tmp_path, uid=4242, base_name=d)
    assert isinstance(det.driver, V1Driver)

    (cg / "memory" / d / "leftover").mkdir()
    removed = undelegate_v1(me.pw_name, root=tmp_path)
    assert sorted(removed) == sorted(dirs)
    assert not any((cg / h / d).exists() for h in ("memory", "pids", "cpuset"))
    assert undelegate_v1(me.pw_name, root=tmp_path) == []


def test_delegate_unknown_user(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    with pytest.raises(CgroupError, match="no such user"):
        delegate_v1("no-such-user-here", root=tmp_path)


def test_systemd_recipe_v2() -> None:
    text = systemd_recipe_v2("alice")
    assert "/etc/systemd/system/user@.service.d/" in text
    assert "Delegate=memory pids cpu cpuset" in text
    assert "systemctl daemon-reload" in text
    assert "/proc/self/cgroup" in text and "sandboxd-alice" in text


def test_v1_create_remakes_a_base_another_runtime_removed(tmp_path: Path,
                                                          plain_rmdir: None) -> None:
    # Root's runtimes share the base; one that closes while it is empty removes it.
    drv, cg = v1_driver(tmp_path)
    other = detect(root=tmp_path, uid=0).driver
    assert other is not None
    other.close()
    assert not (cg / "memory/sandboxd").exists()
    c = drv.create("c-1")
    for h in ("memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"):
        assert (cg / h / "sandboxd/c-1").is_dir()
    assert c.path == "c-1"


def test_v1_recycle_resets_cpu_time_and_renews_the_memory_cgroup(
        tmp_path: Path, writes: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1").child("r-1")
    new_v1_cgroup(drv, cg, "c-1/r-1")
    mem = cg / "memory/sandboxd/c-1/r-1"
    # More charged than the next run may be given (slab, page cache, a file in /tmp)
    (mem / "memory.usage_in_bytes").write_text(f"{KEEP_MEMORY_RESIDUE_MAX + 4096}\n")
    monkeypatch.setattr(base, "rmdir", shutil.rmtree)
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:  # as cgroupfs does: with control files
        real_mkdir(path, mode)
        if path == str(mem):
            populate(mem, "memory", memory__max_usage_in_bytes="0\n")

    monkeypatch.setattr(os, "mkdir", mkdir)
    writes.clear()
    assert c.recycle(CgroupLimits(memory_bytes=64 << 20, pids=16))
    rel = [(str(Path(p).relative_to(cg)), d) for p, d in writes]
    # The other hierarchies keep their limits (pids.max); the memory cgroup is new.
    assert rel == [("cpuacct/sandboxd/c-1/r-1/cpuacct.usage", "0"),
                   ("memory/sandboxd/c-1/r-1/memory.limit_in_bytes", "67108864"),
                   ("memory/sandboxd/c-1/r-1/memory.memsw.limit_in_bytes", "67108864"),
                   ("memory/sandboxd/c-1/r-1/memory.swappiness", "0")]
    assert (mem / "memory.max_usage_in_bytes").read_text() == "0\n"  # nothing carried over
    assert (cg / "pids/sandboxd/c-1/r-1/pids.max").exists()  # the other hierarchies kept


def test_v1_recycle_under_a_parent_that_does_not_swap_writes_no_swappiness(
        tmp_path: Path, writes: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    # v1 copies the parent's memory.swappiness into a memory cgroup at its mkdir: under a
    # container whose swappiness is 0, the renewed one has it already.
    c, cg = renewable_v1_run(tmp_path, monkeypatch)
    (cg / "memory/sandboxd/c-1/memory.swappiness").write_text("0\n")
    for _ in range(2):
        (cg / "memory/sandboxd/c-1/r-1/memory.failcnt").write_text("3\n")   # not kept
        writes.clear()
        assert c.recycle(CgroupLimits(memory_bytes=64 << 20))
        assert [Path(p).name for p, _ in writes] == ["cpuacct.usage", "memory.limit_in_bytes",
                                                     "memory.memsw.limit_in_bytes"]
    # Read once: the parent's file is not opened again.
    (cg / "memory/sandboxd/c-1/memory.swappiness").unlink()
    (cg / "memory/sandboxd/c-1/r-1/memory.failcnt").write_text("3\n")
    assert c.recycle(CgroupLimits(memory_bytes=64 << 20))


def kept_v1_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> tuple[Cgroup, Path, list[str]]:
    """A v1 run cgroup with a 64 MiB limit that recycle may keep or make anew; the list
    records the memory cgroups it removed."""
    c, cg = renewable_v1_run(tmp_path, monkeypatch)
    removed: list[str] = []
    monkeypatch.setattr(base, "rmdir", lambda d: (removed.append(d), shutil.rmtree(d)))
    c.apply(CgroupLimits(memory_bytes=64 << 20))
    return c, cg / "memory/sandboxd/c-1/r-1", removed


def test_v1_recycle_keeps_a_memory_cgroup_the_run_left_nearly_empty(
        tmp_path: Path, writes: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    # What a run leaves charged after its end is mostly the per-CPU charge stock and slab
    # freed late: within the bound, the memory cgroup serves the next run with its
    # watermark reset (to that usage), rather than a rmdir and mkdir.
    c, mem, removed = kept_v1_run(tmp_path, monkeypatch)
    (mem / "memory.usage_in_bytes").write_text(f"{KEEP_MEMORY_RESIDUE_MAX}\n")
    writes.clear()
    assert c.recycle(CgroupLimits(memory_bytes=64 << 20))
    assert [(Path(p).name, d) for p, d in writes] == [("cpuacct.usage", "0"),
                                                      ("memory.max_usage_in_bytes", "0")]
    assert removed == []
    # Another limit is written in place, lowered in the order the kernel accepts.
    writes.clear()
    assert c.recycle(CgroupLimits(memory_bytes=32 << 20))
    assert [(Path(p).name, d) for p, d in writes] == [
        ("cpuacct.usage", "0"), ("memory.limit_in_bytes", str(32 << 20)),
        ("memory.memsw.limit_in_bytes", str(32 << 20)), ("memory.max_usage_in_bytes", "0")]
    assert removed == []
    # No limit at all: the memory cgroup is made anew, without one.
    writes.clear()
    assert c.recycle(CgroupLimits())
    assert removed == [str(mem)]
    assert [Path(p).name for p, _ in writes] == ["cpuacct.usage"]


@pytest.mark.parametrize("left", [
    {"memory.usage_in_bytes": f"{KEEP_MEMORY_RESIDUE_MAX + 4096}\n"},
    {"memory.failcnt": "1\n"},
    {"memory.oom_control": MEMORY_OOM_CONTROL.format(n=1)},
], ids=["usage", "failcnt", "oom_kill"])
def test_v1_recycle_makes_anew_a_memory_cgroup_with_more_in_it(
        tmp_path: Path, writes: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch,
        left: dict[str, str]) -> None:
    # More than the bound charged (it would count in the next run's peak and against its
    # limit), a limit hit or an OOM kill (whose count cannot be reset): a new one.
    c, mem, removed = kept_v1_run(tmp_path, monkeypatch)
    for name, text in left.items():
        (mem / name).write_text(text)
    writes.clear()
    assert c.recycle(CgroupLimits(memory_bytes=64 << 20))
    assert removed == [str(mem)]
    assert [Path(p).name for p, _ in writes] == [
        "cpuacct.usage", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
        "memory.swappiness"]
    assert (mem / "memory.failcnt").read_text() == "0\n"
    assert c.stats().oom_kills == 0


def test_v1_counters_kept_open_and_the_renewed_memory_cgroup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run's figures are read through descriptors kept open (read_kept), each read giving
    # the file's text now. The memory cgroup is made anew by each recycle: the next run's
    # memory figures come from the new one, never from the removed one, whose descriptors
    # are closed.
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1").child("r-1")
    new_v1_cgroup(drv, cg, "c-1/r-1")
    mem = cg / "memory/sandboxd/c-1/r-1"
    (mem / "memory.oom_control").write_text(MEMORY_OOM_CONTROL.format(n=1))
    first = c.stats()
    assert (first.memory_peak_bytes, first.oom_kills) == (7966720, 1)
    kept = set(c._kept.values())
    assert len(kept) == 5  # cpuacct.usage, usage_user, usage_sys; max_usage, oom_control
    (cg / "cpuacct/sandboxd/c-1/r-1/cpuacct.usage").write_text("44208287621\n")
    assert c.stats().cpu_total_ns == 44208287621
    monkeypatch.setattr(base, "rmdir", shutil.rmtree)
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:  # as cgroupfs does: with control files
        real_mkdir(path, mode)
        if path == str(mem):
            populate(mem, "memory", memory__max_usage_in_bytes="4096\n",
                     memory__oom_control=MEMORY_OOM_CONTROL.format(n=0))

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert c.recycle(CgroupLimits())
    again = c.stats()
    assert (again.memory_peak_bytes, again.oom_kills) == (4096, 0)
    kept |= set(c._kept.values())  # and pids.current, read by the recycle
    c.close_procs_fds()
    assert c._kept == {}
    for fd in kept:  # every descriptor kept was closed, none leaked
        with pytest.raises(OSError):
            os.fstat(fd)


def test_v1_recycle_without_wait_leaves_a_kill_under_way_alone(
        tmp_path: Path, writes: list[tuple[str, str]]) -> None:
    # The event loop recycles without waiting (Container._release): while a kill of the
    # last use holds the guard (a v1 kill may wait for a freezer), it does nothing at all,
    # and the use is still the one the kill acts for.
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1").child("r-1")
    new_v1_cgroup(drv, cg, "c-1/r-1")
    lease = c.lease()
    writes.clear()
    with c._guard:
        assert c.recycle(CgroupLimits(), wait=False) is None
    assert writes == [] and lease.current


@pytest.mark.parametrize("left", ["process", "child"])
def test_v1_recycle_refuses_a_cgroup_that_still_holds_something(
        tmp_path: Path, writes: list[tuple[str, str]], left: str) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1").child("r-1")
    new_v1_cgroup(drv, cg, "c-1/r-1")
    mem = cg / "memory/sandboxd/c-1/r-1"
    if left == "process":
        (mem / "cgroup.procs").write_text("4242\n")
        (cg / "pids/sandboxd/c-1/r-1/pids.current").write_text("1\n")
    else:
        populate(mem / "x", "memory")
    writes.clear()
    assert not c.recycle(CgroupLimits(memory_bytes=64 << 20))
    assert writes == []
    assert (mem / "memory.max_usage_in_bytes").exists()


def test_v2_does_not_recycle(tmp_path: Path) -> None:
    # cpu.stat and memory.events cannot be reset: a v2 run cgroup is always made anew.
    write_proc(tmp_path, V2_PURE, "0::/\n")
    populate(tmp_path / "sys/fs/cgroup", cgroup__controllers="cpu memory pids\n",
             cgroup__subtree_control="cpu memory pids\n")
    drv = detect(root=tmp_path, uid=0).driver
    assert isinstance(drv, V2Driver)
    assert not drv.create("c-1").recycle(CgroupLimits())


def test_v1_destroy_of_an_emptied_cgroup_only_removes_it(
        tmp_path: Path, writes: list[tuple[str, str]], plain_rmdir: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1")
    new_v1_cgroup(drv, cg, "c-1")
    # cgroup.procs still lists a process: a kill would freeze and signal it.
    (cg / "memory/sandboxd/c-1/cgroup.procs").write_text("4242\n")
    (cg / "freezer/sandboxd/c-1/cgroup.procs").write_text("4242\n")
    writes.clear()
    c.destroy(empty=True)  # the caller saw its pid namespace end
    assert writes == []
    assert drv.list() == []


def test_v1_destroy_kills_after_all_when_an_emptied_cgroup_will_not_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1")
    new_v1_cgroup(drv, cg, "c-1")
    calls: list[str] = []
    real_remove = base.remove_tree

    def remove_tree(top: str, timeout: float = base.RMDIR_TIMEOUT_S) -> None:
        calls.append("remove")
        if calls.count("remove") == 1:
            raise CgroupError(f"cannot remove cgroup {top}: Device or resource busy")
        real_remove(top, timeout)

    monkeypatch.setattr(base, "remove_tree", remove_tree)
    monkeypatch.setattr(base, "rmdir", shutil.rmtree)
    monkeypatch.setattr(type(c), "kill", lambda self: calls.append("kill"))
    c.destroy(empty=True)
    assert calls[:3] == ["remove", "kill", "remove"]
    assert drv.list() == []


def test_v1_is_empty_reads_the_pids_counter(tmp_path: Path) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1")
    new_v1_cgroup(drv, cg, "c-1")
    assert c.is_empty()
    # A zombie not yet reaped still counts: the counter is what the kernel charges.
    (cg / "pids/sandboxd/c-1/pids.current").write_text("1\n")
    assert not c.is_empty()
    # Without a pids hierarchy, the memory hierarchy's list of processes tells.
    del drv.bases["pids"]
    c = drv.open("c-1")
    assert c is not None and c.is_empty()
    (cg / "memory/sandboxd/c-1/cgroup.procs").write_text("4242\n")
    assert not c.is_empty()


# --- leases: a kill names the use of the cgroup it is for -----------------------------


def recorded_kills(c: Cgroup, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the driver's raw kill by one that records which cgroup it hit."""
    kills: list[str] = []
    monkeypatch.setattr(type(c), "kill", lambda self: kills.append(self.path))
    return kills


def renewable_v1_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Cgroup, Path]:
    """A v1 run cgroup in a fake tree that recycle can renew (cgroupfs's mkdir, emulated)."""
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1").child("r-1")
    new_v1_cgroup(drv, cg, "c-1/r-1")
    mem = cg / "memory/sandboxd/c-1/r-1"
    monkeypatch.setattr(base, "rmdir", shutil.rmtree)
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        if path == str(mem):
            populate(mem, "memory")

    monkeypatch.setattr(os, "mkdir", mkdir)
    return c, cg


def test_a_lease_kills_only_while_its_use_is_current(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    c, _ = renewable_v1_run(tmp_path, monkeypatch)
    kills = recorded_kills(c, monkeypatch)
    first = c.lease()
    assert first.current and first.kill()
    assert kills == ["c-1/r-1"]
    # The run ended, its cgroup was recycled and handed to the next run: the first run's
    # late kill (a timer, an output reader, a worker thread that started late) does nothing.
    assert c.recycle(CgroupLimits(memory_bytes=64 << 20))
    second = c.lease()
    assert not first.current and second.current
    assert not first.kill()
    assert kills == ["c-1/r-1"]
    assert second.kill() and second.kill()  # a use may be killed more than once
    assert kills == ["c-1/r-1"] * 3
    c.destroy(empty=True)
    assert not second.kill()
    assert kills == ["c-1/r-1"] * 3


def test_a_recycle_that_fails_still_ends_the_use(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    drv, cg = v1_driver(tmp_path)
    c = drv.create("c-1").child("r-1")
    new_v1_cgroup(drv, cg, "c-1/r-1")
    (cg / "pids/sandboxd/c-1/r-1/pids.current").write_text("1\n")  # still holds a process
    kills = recorded_kills(c, monkeypatch)
    lease = c.lease()
    assert not c.recycle(CgroupLimits())  # the caller destroys it then, which kills
    assert not lease.kill()
    assert kills == []


@pytest.mark.parametrize("ending", ["_renew", "_destroy"])
def test_recycle_and_destroy_wait_for_a_kill_under_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    c, _ = renewable_v1_run(tmp_path, monkeypatch)
    killing = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    def slow_kill(self: Cgroup) -> None:
        # A v1 kill freezes, signals, thaws and waits for the cgroup to empty: it takes a
        # while, in a worker thread, while the run's end goes on in the event loop.
        seen.append("kill begins")
        killing.set()
        assert release.wait(30)
        seen.append("kill ends")

    monkeypatch.setattr(type(c), "kill", slow_kill)
    monkeypatch.setattr(type(c), ending, lambda self, *a, **kw: seen.append(ending))
    end_use = {"_renew": lambda: c.recycle(CgroupLimits()),
               "_destroy": lambda: c.destroy(empty=True)}[ending]
    lease = c.lease()
    killer = threading.Thread(target=lease.kill)
    killer.start()
    assert killing.wait(30)
    ender = threading.Thread(target=end_use)
    ender.start()
    ender.join(0.2)  # time for an ending that does not wait to get ahead of the kill
    release.set()
    killer.join(30)
    ender.join(30)
    assert seen == ["kill begins", "kill ends", ending]
    assert not lease.kill()
    assert seen == ["kill begins", "kill ends", ending]


def test_container_limits_cover_one_maximal_run_every_tmpfs_and_init() -> None:
    judge = load_profile("judge")
    shape = judge.rootfs
    ro = RootfsSpec(layers=("/l",), tmpfs=shape.tmpfs)
    all_on = frozenset({"memory", "pids", "cpu", "cpuacct"})
    assert judge.maxima.memory_bytes is not None and judge.maxima.pids is not None
    # The staging tmpfs (1 MiB) and /dev (64 KiB) are the container's own mounts.
    mounts = sum(m.size for m in shape.tmpfs) + (1 << 20) + (64 << 10)
    limits = container_limits(judge, ro, all_on)
    assert limits.memory_bytes == judge.maxima.memory_bytes + mounts + CONTAINER_OVERHEAD_BYTES
    assert limits.pids == judge.maxima.pids + CONTAINER_OVERHEAD_PIDS
    assert (limits.cpu_quota_us, limits.cpuset_cpus) == (None, None)
    # A writable root's upper layer is a tmpfs of the container too.
    rw = RootfsSpec(layers=("/l",), writable=True, upper_size=256 << 20, tmpfs=shape.tmpfs)
    assert container_limits(judge, rw, all_on).memory_bytes == (
        limits.memory_bytes + (256 << 20))
    # Only what the host's cgroups can hold; no maximum for runs, none for the container.
    assert container_limits(judge, ro, frozenset({"cpu"})) == CgroupLimits()
    unbounded = replace(judge, maxima=Limits(cpu_ms=1000))
    assert container_limits(unbounded, ro, all_on) == CgroupLimits()
