"""The cgroup drivers against this host's real cgroupfs (host root only).

Every cgroup and process a test makes is removed by a fixture finalizer, also on failure.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.runtime import syscalls as sc
from sandbox.runtime.cgroups import UNLIMITED, CgroupLimits, V1Driver, V2Driver, detect
from sandbox.runtime.cgroups.base import Cgroup
from sandbox.runtime.cgroups.delegate import delegate_v1, undelegate_v1
from sandbox.runtime.cgroups.v1 import KEEP_MEMORY_RESIDUE_MAX
from tests.integration.conftest import cleanup_driver

pytestmark = [
    pytest.mark.root_only,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating cgroups needs host root"),
]

SETUP_WAIT_S = 30.0  # only bounds waiting for a test's own processes to get going


@pytest.fixture
def v1() -> Iterator[V1Driver]:
    det = detect(base_name=f"sbx-test-{os.getpid()}")
    if not isinstance(det.driver, V1Driver):
        if det.driver is not None:
            cleanup_driver(det.driver)
        pytest.skip(f"this host does not use the cgroup v1 driver: {det.warnings}")
    try:
        yield det.driver
    finally:
        cleanup_driver(det.driver)


@pytest.fixture
def start() -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start `/bin/sh -c` that waits for a line on stdin, then execs Python running code."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(code: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            ["/bin/sh", "-c", f'read go && exec "{sys.executable}" -c "$0"', code],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(p)
        return p

    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()


def go(p: subprocess.Popen[bytes]) -> None:
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.close()


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETUP_WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def read(path: str) -> str:
    return Path(path).read_text().strip()


def test_limits_stats_and_membership(v1: V1Driver, start: Callable[..., subprocess.Popen[bytes]]
                                     ) -> None:
    cg = v1.create("c-limits")
    cg.apply(CgroupLimits(memory_bytes=128 << 20, pids=32, cpu_quota_us=200_000))
    mem = f"{v1.bases['memory']}/c-limits"
    assert read(f"{mem}/memory.limit_in_bytes") == str(128 << 20)
    if v1.memsw:
        assert read(f"{mem}/memory.memsw.limit_in_bytes") == str(128 << 20)
    assert read(f"{mem}/memory.swappiness") == "0"
    assert read(f"{v1.bases['pids']}/c-limits/pids.max") == "32"
    assert read(f"{v1.bases['cpu']}/c-limits/cpu.cfs_quota_us") == "200000"
    cg.apply(CgroupLimits(pids=UNLIMITED, cpu_quota_us=UNLIMITED))   # lifted, as the kernel has it
    assert read(f"{v1.bases['pids']}/c-limits/pids.max") == "max"
    assert read(f"{v1.bases['cpu']}/c-limits/cpu.cfs_quota_us") == "-1"

    p = start("b = b'x' * (48 << 20); s = sum(range(3_000_000))")
    cg.add_pid(p.pid)
    assert cg.pids() == [p.pid]
    go(p)
    assert p.wait() == 0
    s = cg.stats()
    assert s.cpu_total_ns and s.cpu_total_ns > 0
    assert s.cpu_user_ns is not None and s.cpu_user_ns > 0
    assert s.cpu_sys_ns is not None
    assert s.memory_peak_bytes is not None and s.memory_peak_bytes >= 48 << 20
    assert s.oom_kills == 0
    assert s.cpu_source == "cgroup-v1:cpuacct.usage_user+usage_sys"
    assert s.memory_source == "cgroup-v1:memory.max_usage_in_bytes"
    assert cg.cpu_ns() == s.cpu_total_ns
    assert cg.pids() == []


def test_oom_kill_is_counted(v1: V1Driver, start: Callable[..., subprocess.Popen[bytes]]
                             ) -> None:
    cg = v1.create("c-oom")
    run = cg.child("r-1")
    run.apply(CgroupLimits(memory_bytes=32 << 20))
    p = start("b = b'x' * (256 << 20)")
    run.add_pid(p.pid)
    go(p)
    assert p.wait() == -signal.SIGKILL
    assert run.stats().oom_kills >= 1
    assert cg.stats().oom_kills >= 1  # counted from the parent too


def test_pids_limit_makes_fork_fail(v1: V1Driver, start: Callable[..., subprocess.Popen[bytes]]
                                    ) -> None:
    cg = v1.create("c-pids")
    cg.apply(CgroupLimits(pids=8))
    p = start(
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 64:\n"
        "        if os.fork() == 0:\n"
        "            os.closerange(0, 3); time.sleep(120); os._exit(0)\n"
        "        n += 1\n"
        "    print('forked', n, flush=True)\n"
        "except OSError as e:\n"
        "    print('fork failed', e.errno, n, flush=True)\n")
    cg.add_pid(p.pid)
    go(p)
    assert p.stdout is not None
    words = p.stdout.readline().split()
    assert words[:3] == [b"fork", b"failed", str(11).encode()], words  # EAGAIN
    assert int(words[3]) < 8
    assert len(cg.pids()) <= 8


@pytest.mark.parametrize("freezer", [True, False], ids=["freezer", "kill-loop"])
def test_kill_empties_a_fork_loop(v1: V1Driver, freezer: bool,
                                  start: Callable[..., subprocess.Popen[bytes]]) -> None:
    drv: V1Driver = v1
    if not freezer:
        bases = {c: b for c, b in v1.bases.items() if c != "freezer"}
        drv = V1Driver(bases, owns_base=False, memsw=v1.memsw, cpuacct_split=v1.cpuacct_split)
    elif "freezer" not in v1.controllers:
        pytest.skip("no freezer hierarchy")
    cg = drv.create("c-forks")
    child = cg.child("r-1")
    cg.apply(CgroupLimits(pids=64))
    p = start(
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.001)\n")
    child.add_pid(p.pid)
    go(p)
    wait_for(lambda: len(cg.pids(recursive=True)) >= 16, "the fork loop")
    cg.kill()
    assert cg.pids(recursive=True) == []
    assert p.wait() == -signal.SIGKILL
    if freezer:
        assert read(f"{v1.bases['freezer']}/c-forks/freezer.state") == "THAWED"


def test_destroy_removes_every_hierarchy(v1: V1Driver,
                                         start: Callable[..., subprocess.Popen[bytes]]) -> None:
    cg = v1.create("c-destroy")
    run = cg.child("r-1")
    cg.child("init").child("deeper")
    p = start("import time; time.sleep(120)")
    run.add_pid(p.pid)
    go(p)
    assert v1.open("c-destroy/r-1") is not None
    cg.destroy()
    assert p.wait() == -signal.SIGKILL
    for b in set(v1.bases.values()):
        assert not os.path.exists(f"{b}/c-destroy"), b
    assert v1.open("c-destroy") is None
    assert "c-destroy" not in v1.list()
    cg.destroy()  # idempotent


def test_open_procs_fds_from_another_mount_namespace(v1: V1Driver) -> None:
    cg = v1.create("c-fds")
    fds = cg.open_procs_fds()
    assert len(fds) == len(set(v1.bases.values()))
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            sc.unshare(sc.CLONE_NEWNS)
            for fd in fds:
                os.write(fd, b"0")
            os.write(ready_w, b"k")
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    try:
        for fd in (*fds, ready_w, hold_r):
            os.close(fd)
        assert os.read(ready_r, 1) == b"k"
        assert cg.pids() == [pid]
        own = Path(f"/proc/{pid}/cgroup").read_text()
        base_name = Path(v1.bases["memory"]).name
        for c in v1.controllers:
            line = next(ln for ln in own.splitlines() if c in ln.split(":")[1].split(","))
            assert line.endswith(f"/{base_name}/c-fds"), line
    finally:
        cg.kill()
        os.close(hold_w)
        os.close(ready_r)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_close_removes_the_base() -> None:
    det = detect(base_name=f"sbx-test-close-{os.getpid()}")
    drv = det.driver
    if drv is None:
        pytest.skip(f"no cgroup driver: {det.warnings}")
    try:
        bases = list(drv.describe()["base"].values()) if drv.version == 1 else [
            drv.describe()["base"]]
        cg = drv.create("c-1")
        cg.child("r-1")
        cg.destroy()
    finally:
        cleanup_driver(drv)
    for b in bases:
        assert not os.path.exists(b), b


USER_SCRIPT = """
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from sandbox.runtime.cgroups import CgroupLimits, detect
det = detect()
drv = det.driver
c = drv.create("c-1")
r = c.child("r-1")
r.apply(CgroupLimits(memory_bytes=64 << 20, pids=16, cpu_quota_us=50_000, cpuset_cpus="0"))
p = subprocess.Popen(["sleep", "60"])
r.add_pid(p.pid)
joined = r.pids() == [p.pid]
c.destroy()
print(json.dumps({"warnings": det.warnings, "base": drv.describe()["base"],
                  "joined": joined, "rc": p.wait(), "left": drv.list()}))
drv.close()
"""


@pytest.fixture
def nobody() -> Iterator[str]:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 for an ordinary user")
    try:
        yield "nobody"
    finally:
        # Whatever the user's run left behind, then the delegated bases themselves.
        det = detect(base_name="sandboxd-nobody")
        if isinstance(det.driver, V1Driver):
            cleanup_driver(det.driver)
        undelegate_v1("nobody")


def test_delegate_v1_lets_a_user_use_cgroups(v1: V1Driver, nobody: str) -> None:
    dirs = delegate_v1(nobody)
    assert {str(d) for d in dirs} >= {f"{os.path.dirname(b)}/sandboxd-{nobody}"
                                      for b in v1.bases.values()}
    pw = pwd.getpwnam(nobody)
    for d in dirs:
        assert d.stat().st_uid == pw.pw_uid
        assert (d / "cgroup.procs").stat().st_uid == pw.pw_uid
    # The checkout may sit where the user cannot read (a 0700 temp dir): give it a copy.
    with tempfile.TemporaryDirectory(prefix="sandboxd-cgtest-") as tmp:
        os.chmod(tmp, 0o755)
        src = Path(__file__).resolve().parents[2] / "sandbox"
        shutil.copytree(src, Path(tmp) / "sandbox",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        out = subprocess.run(["/usr/bin/python3", "-c", USER_SCRIPT, tmp], user=pw.pw_uid,
                             group=pw.pw_gid, extra_groups=[], cwd="/", capture_output=True,
                             check=True, timeout=60)
    result = json.loads(out.stdout)
    assert result["warnings"] == []
    assert result["base"]["memory"].endswith(f"/sandboxd-{nobody}")
    assert result["joined"] and result["rc"] == -signal.SIGKILL and result["left"] == []
    assert undelegate_v1(nobody) == dirs
    assert not any(d.exists() for d in dirs)


def test_v2_as_far_as_it_goes(v2: V2Driver, start: Callable[..., subprocess.Popen[bytes]]
                              ) -> None:
    cg: Cgroup = v2.create("c-v2")
    p = start("while True: pass")
    cg.add_pid(p.pid)
    assert cg.pids() == [p.pid]
    go(p)
    wait_for(lambda: (cg.cpu_ns() or 0) > 0, "CPU time in cpu.stat")
    s = cg.stats()
    assert s.cpu_source == "cgroup-v2:cpu.stat"
    assert s.cpu_total_ns and s.cpu_total_ns > 0 and s.cpu_user_ns is not None
    cg.kill()
    assert p.wait() == -signal.SIGKILL
    assert cg.pids(recursive=True) == []
    cg.destroy()
    assert not os.path.exists(f"{v2.base}/c-v2")
    v2.close()
    assert not os.path.exists(v2.base)


def test_a_late_kill_does_not_reach_the_next_use(v1: V1Driver,
                                                 start: Callable[..., subprocess.Popen[bytes]]
                                                 ) -> None:
    cg = v1.create("c-lease")
    run = cg.child("r-1")
    first = run.lease()
    p1 = start("import time; time.sleep(120)")
    run.add_pid(p1.pid)
    go(p1)
    assert first.kill()
    assert p1.wait() == -signal.SIGKILL
    # Recycled for the next run, which is in it now: the first run's kill, come late,
    # leaves it alone; the next run's own lease reaches it.
    assert run.recycle(CgroupLimits(memory_bytes=64 << 20, pids=16))
    second = run.lease()
    p2 = start("import time; time.sleep(120)")
    run.add_pid(p2.pid)
    go(p2)
    assert not first.kill()
    assert run.pids() == [p2.pid] and p2.poll() is None
    assert second.kill()
    assert p2.wait() == -signal.SIGKILL
    cg.destroy()


@pytest.mark.parametrize("parent_swappiness", ["0", "37"])
def test_a_renewed_memory_cgroup_never_swaps(v1: V1Driver, parent_swappiness: str,
                                            tmp_path: Path) -> None:
    # A recycle makes the run's memory cgroup anew: under a container that does not swap,
    # the kernel copies its swappiness 0 into the new one at mkdir (no write); under one
    # that does, the recycle writes it.
    cg = v1.create("c-swap")
    mem = f"{v1.bases['memory']}/c-swap"
    Path(f"{mem}/memory.swappiness").write_text(parent_swappiness)
    run = cg.child("r-1")
    run.apply(CgroupLimits(memory_bytes=64 << 20))
    for i in range(3):
        # page cache charged to it, more than a kept one may hold
        assert run_to_end(run, "dd", "if=/dev/zero", f"of={tmp_path}/f{i}", "bs=1M",
                          "count=1", "status=none") == 0
        ino = os.stat(f"{mem}/r-1").st_ino
        assert run.recycle(CgroupLimits(memory_bytes=64 << 20))
        assert os.stat(f"{mem}/r-1").st_ino != ino
        assert read(f"{mem}/r-1/memory.swappiness") == "0"
        assert read(f"{mem}/r-1/memory.limit_in_bytes") == str(64 << 20)
    cg.destroy()


def run_to_end(cg: Cgroup, *argv: str) -> int:
    """argv in cg until it ends, on one CPU: what it leaves of the kernel's per-CPU charge
    stock is then one CPU's (64 pages), as a short run's usually is."""
    cpu = min(os.sched_getaffinity(0))
    p = subprocess.Popen(["/bin/sh", "-c", 'read go && exec "$0" "$@"', *argv],
                         stdin=subprocess.PIPE,
                         preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    cg.add_pid(p.pid)
    go(p)
    return p.wait()


def test_a_memory_cgroup_a_run_left_nearly_empty_serves_the_next_run(v1: V1Driver) -> None:
    # Kept, not made anew, after a run that freed what it used: the next run's peak starts
    # at what is left (at most the bound), not at the last run's peak.
    cg = v1.create("c-keep")
    run = cg.child("r-1")
    mem = f"{v1.bases['memory']}/c-keep/r-1"
    run.apply(CgroupLimits(memory_bytes=64 << 20))
    ino = os.stat(mem).st_ino
    assert run_to_end(run, "dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=1",
                      "status=none") == 0
    assert (run.stats().memory_peak_bytes or 0) >= 8 << 20
    # What the kernel frees after a grace period (the exited task's slab) may be charged a
    # moment longer: this test is of the recycle's choice, not of that moment.
    usage = f"{mem}/memory.usage_in_bytes"
    wait_for(lambda: int(read(usage)) <= KEEP_MEMORY_RESIDUE_MAX, "the slab's late free")
    assert run.recycle(CgroupLimits(memory_bytes=64 << 20))
    assert os.stat(mem).st_ino == ino
    assert (run.stats().memory_peak_bytes or 0) <= KEEP_MEMORY_RESIDUE_MAX
    assert run_to_end(run, "dd", "if=/dev/zero", "of=/dev/null", "bs=2M", "count=1",
                      "status=none") == 0
    assert 2 << 20 <= (run.stats().memory_peak_bytes or 0) < 8 << 20
    # A lower limit is written in place and holds: the next run is OOM-killed at it.
    assert run.recycle(CgroupLimits(memory_bytes=16 << 20))
    assert os.stat(mem).st_ino == ino
    assert read(f"{mem}/memory.limit_in_bytes") == str(16 << 20)
    assert run_to_end(run, "dd", "if=/dev/zero", "of=/dev/null", "bs=32M", "count=1",
                      "status=none") == -signal.SIGKILL
    assert run.stats().oom_kills == 1
    # An OOM kill's count cannot be reset: made anew, the next run's figures start at 0.
    assert run.recycle(CgroupLimits(memory_bytes=16 << 20))
    assert os.stat(mem).st_ino != ino
    s = run.stats()
    assert (s.oom_kills, s.memory_peak_bytes) == (0, 0)
    cg.destroy()
