"""Pure logic of the runtime: profiles and limits, verdicts, the mount plan, id map choice."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from sandbox.errors import PolicyError, RuntimeSetupError
from sandbox.runtime import idmap, rootfs
from sandbox.runtime.profiles import Limits, load_profile
from sandbox.runtime.requests import ExecRequest, validate
from sandbox.runtime.results import Observed, Status, verdict


def exited(code: int) -> int:
    return code << 8


def killed(sig: int) -> int:
    return sig


def obs(status: int, **kw: object) -> Observed:
    base = {"wait_status": status, "killed_for": None, "cpu_ns": 0, "cpu_limit_ms": None,
            "oom_kills": 0, "exec_error": None}
    base.update(kw)
    return Observed(**base)


@pytest.mark.parametrize(("o", "expected"), [
    (obs(exited(0)), (Status.OK, 0, None)),
    (obs(exited(3)), (Status.NONZERO_EXIT, 3, None)),
    (obs(killed(signal.SIGSEGV)), (Status.SIGNALED, None, signal.SIGSEGV)),
    (obs(killed(signal.SIGSYS)), (Status.SYSCALL_BLOCKED, None, signal.SIGSYS)),
    (obs(killed(signal.SIGXFSZ)), (Status.OUTPUT_LIMIT, None, signal.SIGXFSZ)),
    (obs(killed(signal.SIGXCPU)), (Status.TIME_LIMIT, None, signal.SIGXCPU)),
    (obs(killed(signal.SIGKILL), oom_kills=1), (Status.MEMORY_LIMIT, None, signal.SIGKILL)),
    (obs(exited(1), oom_kills=1), (Status.MEMORY_LIMIT, 1, None)),
    (obs(killed(9), cpu_ns=2_000_000_000, cpu_limit_ms=1000), (Status.TIME_LIMIT, None, 9)),
    # The first limit the host enforced wins over what the kernel saw afterwards.
    (obs(killed(9), killed_for=Status.WALL_LIMIT, oom_kills=1), (Status.WALL_LIMIT, None, 9)),
    (obs(killed(9), killed_for=Status.OUTPUT_LIMIT), (Status.OUTPUT_LIMIT, None, 9)),
    (obs(exited(125), exec_error="125:seccomp: bad"), (Status.INTERNAL_ERROR, 125, None)),
    (obs(exited(127), exec_error="127:exec x: No such file"), (Status.NONZERO_EXIT, 127, None)),
    (obs(None), (Status.INTERNAL_ERROR, None, None)),
])
def test_verdicts(o: Observed, expected: tuple[Status, int | None, int | None]) -> None:
    assert verdict(o) == expected


def test_builtin_profiles_load() -> None:
    judge = load_profile("judge")
    assert not judge.rootfs.writable and judge.network == "none"
    assert load_profile("default").rootfs.writable
    for p in (judge, load_profile("default")):
        for f in ("cpu_ms", "wall_ms", "memory_bytes", "pids", "output_bytes"):
            assert getattr(p.defaults, f) <= getattr(p.maxima, f)


def test_limits_resolve_and_refuse() -> None:
    judge = load_profile("judge")
    got = judge.resolve(Limits(cpu_ms=500))
    assert got.cpu_ms == 500 and got.wall_ms == judge.defaults.wall_ms
    with pytest.raises(PolicyError, match=r"limits\.memory_bytes: .* maximum of 2147483648"):
        judge.resolve(Limits(memory_bytes=1 << 40))


@pytest.mark.parametrize(("data", "match"), [
    ({"cpu_ms": -1}, r"limits\.cpu_ms: expected a positive integer"),
    ({"cpu_ms": True}, r"limits\.cpu_ms"),
    ({"cpus": 1}, r"limits\.cpus: unknown limit"),
    ({"cpuset": "0;rm"}, r"limits\.cpuset"),
    ([], "expected an object"),
])
def test_limits_validation(data: object, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        Limits.from_dict(data)


def test_unknown_profile_names_known_ones() -> None:
    with pytest.raises(PolicyError, match="known profiles: build, default, judge"):
        load_profile("missing")
    with pytest.raises(PolicyError, match="lowercase"):
        load_profile("../etc/passwd")


def _kinds(plan: rootfs.Plan) -> list[str]:
    return [type(op).__name__ for op in plan.ops]


def test_plan_read_only_directory_root() -> None:
    spec = rootfs.RootfsSpec(layers=("/r",))
    plan = rootfs.plan(spec)
    kinds = _kinds(plan)
    assert kinds[-1] == "PivotRoot"
    layers = [op for op in plan.ops if isinstance(op, rootfs.Layer)]
    assert [(op.source, op.target) for op in layers] == [("/r", "/layers/0")]
    root = next(op for op in plan.ops if isinstance(op, rootfs.Root))
    assert (root.lowers, root.upper) == (("/layers/0",), None)
    assert root.mountpoints == ("/proc", "/dev", "/tmp")   # /dev/shm is inside our /dev
    masked = {op.target for op in plan.ops if isinstance(op, rootfs.Mask)}
    assert {"/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"} <= masked
    assert not any(p.startswith("/sys") for p in masked)  # no /sys at all by default
    ro = {op.target for op in plan.ops if isinstance(op, rootfs.ReadOnly)}
    assert ro == set(rootfs.READONLY_PATHS)
    # /proc comes before what masks parts of it; /dev is sealed after it is filled.
    assert kinds.index("Proc") < kinds.index("Mask")
    order = [op.target for op in plan.ops if hasattr(op, "target")]
    assert order.index("/dev/pts") < len(order) - order[::-1].index("/dev") - 1
    assert {op.target for op in plan.resettable()} == {"/tmp", "/dev/shm"}


def test_plan_writable_overlay_puts_top_layer_first() -> None:
    spec = rootfs.RootfsSpec(layers=("/a", "/b", "/c"), writable=True, upper_size=1 << 20)
    plan = rootfs.plan(spec)
    layers = {op.target: op.source for op in plan.ops if isinstance(op, rootfs.Layer)}
    root = next(op for op in plan.ops if isinstance(op, rootfs.Root))
    assert [layers[d] for d in root.lowers] == ["/c", "/b", "/a"]
    assert root.upper and root.work
    upper_tmpfs = next(op for op in plan.ops if isinstance(op, rootfs.Tmpfs)
                       and op.target == rootfs.RW)
    assert upper_tmpfs.size == 1 << 20 and upper_tmpfs.staging


def test_plan_read_only_layers_use_overlay_without_upper() -> None:
    plan = rootfs.plan(rootfs.RootfsSpec(layers=("/a", "/b")))
    root = next(op for op in plan.ops if isinstance(op, rootfs.Root))
    assert root.upper is None and len(root.lowers) == 2


def test_message_splits_the_plan_between_helper_and_init() -> None:
    """The helper gets every operation up to the proc mount, joined to the staging mount;
    init gets the proc mount and the plan's end; a writable root's reset is told its layers
    (the skeleton apart: only the helper knows whether the image needed one)."""
    spec = rootfs.RootfsSpec(layers=("/a", "/b"), writable=True, upper_size=1 << 20,
                             provided=(("/etc/hosts", "127.0.0.1 localhost\n"),))
    m = rootfs.message(spec)
    helper, init = m["mounts"], m["init"]
    assert init["mounts"][0]["op"] == "proc"
    assert init["mounts"][-1] == {"op": "pivot_root", "target": rootfs.STAGING}
    assert {op["op"] for op in helper} == {"mount", "mkdir", "layer", "root", "bind",
                                           "touch", "symlink", "remount"}
    assert all(op["target"].startswith(rootfs.STAGING + "/") or op["target"] == rootfs.STAGING
               for op in helper)
    assert [op["source"] for op in helper if op["op"] == "layer"] == ["/a", "/b"]
    root = next(op for op in helper if op["op"] == "root")
    assert root["lowers"] == ["/tmp/layers/1", "/tmp/layers/0"]
    assert root["skeleton"] == "/tmp/skeleton"
    assert root["provided"] == [["/etc/hosts", "127.0.0.1 localhost\n"]]
    assert init["writable"]["lowers"] == ["/layers/1", "/layers/0"]
    assert init["writable"]["skeleton"] == rootfs.SKELETON
    assert rootfs.message(spec) is m  # planned once per spec


def test_writable_root_carries_only_outermost_mounts() -> None:
    assert rootfs._outermost(["/proc", "/dev", "/tmp", "/tmp/x", "/var/tmp"]) == (
        "/proc", "/dev", "/tmp", "/var/tmp")


def test_plan_needs_a_layer() -> None:
    with pytest.raises(RuntimeSetupError):
        rootfs.plan(rootfs.RootfsSpec(layers=()))


def _etc(tmp_path: Path, subuid: str, subgid: str) -> Path:
    (tmp_path / "subuid").write_text(subuid)
    (tmp_path / "subgid").write_text(subgid)
    return tmp_path


def test_idmap_root_uses_a_subordinate_range(tmp_path: Path) -> None:
    etc = _etc(tmp_path, "root:100000:65536\n", "root:200000:65536\n")
    m = idmap.plan(uid=0, gid=0, etc=etc)
    assert m.method == "direct" and m.root_uid == 100000 and m.root_gid == 200000
    assert m.run_uid == 65534 and m.host_uid(65534) == 165534
    with pytest.raises(RuntimeSetupError, match="root:100000:65536"):
        idmap.plan(uid=0, gid=0, etc=_etc(tmp_path, "", ""))


def test_idmap_user_with_and_without_ranges(tmp_path: Path) -> None:
    uid = os.geteuid() or 1000
    etc = _etc(tmp_path, f"{uid}:300000:65536\n", f"{uid}:300000:65536\n")
    m = idmap.plan(uid=uid, gid=uid, etc=etc)
    if m.method == "newuidmap":
        assert m.root_uid == uid and m.host_uid(1) == 300000 and m.run_uid == 65534
    single = idmap.plan(uid=uid, gid=uid, etc=tmp_path / "none")
    assert single.method == "single" and single.run_uid == 0 and single.root_uid == uid
    with pytest.raises(RuntimeSetupError, match="subordinate"):
        idmap.plan(uid=uid, gid=uid, etc=tmp_path / "none", allow_single=False)


@pytest.mark.parametrize(("count", "run", "init"), [
    (65536, 65534, 65535), (70000, 65534, 65535), (65535, 65533, 65534), (3, 1, 2), (2, 0, 1),
])
def test_idmap_init_has_the_highest_id_and_runs_another(tmp_path: Path, count: int, run: int,
                                                        init: int) -> None:
    etc = _etc(tmp_path, f"root:100000:{count}\n", f"root:200000:{count}\n")
    m = idmap.plan(uid=0, gid=0, etc=etc)
    assert (m.run_uid, m.run_gid, m.init_uid, m.init_gid) == (run, run, init, init)
    assert not m.shares_init_id
    assert m.describe()["init_uid"] == init


def test_idmap_one_id_is_shared_by_init_and_runs(tmp_path: Path) -> None:
    m = idmap.plan(uid=0, gid=0, etc=_etc(tmp_path, "root:100000:1\n", "root:200000:1\n"))
    assert (m.run_uid, m.init_uid) == (0, 0) and m.shares_init_id
    uid = os.geteuid() or 1000
    single = idmap.plan(uid=uid, gid=uid, etc=tmp_path / "none")
    assert single.method == "single" and single.shares_init_id and single.init_uid == 0
    newuid = idmap.plan(uid=uid, gid=uid, etc=_etc(tmp_path, f"{uid}:300000:65536\n",
                                                     f"{uid}:300000:65536\n"))
    if newuid.method == "newuidmap":  # 0 is the user, 1..65535 the range
        assert (newuid.run_uid, newuid.init_uid, newuid.host_uid(65535)) == (65534, 65535,
                                                                              365534)


def test_plan_read_only_sys_masks_its_sensitive_parts() -> None:
    plan = rootfs.plan(rootfs.RootfsSpec(layers=("/r",), sys="ro"))
    assert any(isinstance(op, rootfs.Sysfs) for op in plan.ops)
    masked = {op.target for op in plan.ops if isinstance(op, rootfs.Mask)}
    assert {"/sys/firmware", "/sys/devices/virtual/powercap"} <= masked


@pytest.mark.parametrize(("tmpfs", "match"), [
    ([{"target": "/", "size": 1}], "not a place a tmpfs may go"),
    ([{"target": "/proc/x", "size": 1}], "not a place a tmpfs may go"),
    ([{"target": "/a/../etc", "size": 1}], "not a place a tmpfs may go"),
    ([{"target": "/dev/a/b", "size": 1}], "not a place a tmpfs may go"),
    ([{"target": "/work"}], r"tmpfs\[0\]\.size: required"),
    ([{"target": "/work", "size": 1, "mode": 7}], r"tmpfs\[0\]\.mode: unknown key"),
    ([{"target": "/w", "size": 1}, {"target": "/w", "size": 2}], "appears twice"),
    ({"target": "/w"}, "expected an array"),
])
def test_profile_tmpfs_mounts_are_validated(tmpfs: object, match: str) -> None:
    from sandbox.runtime.profiles import RootfsShape

    with pytest.raises(PolicyError, match=match):
        RootfsShape.from_dict({"tmpfs": tmpfs}, "p.rootfs")


def test_profile_tmpfs_mounts_become_resettable_mounts() -> None:
    from sandbox.runtime.profiles import RootfsShape

    shape = RootfsShape.from_dict({"tmpfs": [
        {"target": "/work", "size": 1 << 20, "inodes": 64},
        {"target": "/dev/shm", "size": 1 << 20, "noexec": True}]}, "p.rootfs")
    plan = rootfs.plan(rootfs.RootfsSpec(layers=("/r",), tmpfs=shape.tmpfs))
    kinds = [(type(op).__name__, getattr(op, "target", None)) for op in plan.ops]
    # /dev/shm is mounted while /dev is still writable; /work after /dev is sealed.
    assert kinds.index(("Tmpfs", "/dev/shm")) < kinds.index(("RemountReadOnly", "/dev"))
    assert kinds.index(("Tmpfs", "/work")) > kinds.index(("RemountReadOnly", "/dev"))
    assert {op.target for op in plan.resettable()} == {"/work", "/dev/shm"}
    work = next(op for op in plan.resettable() if op.target == "/work")
    assert (work.size, work.inodes) == (1 << 20, 64)


def _request(**ids: int) -> ExecRequest:
    return ExecRequest(argv=["true"], **ids)


@pytest.mark.parametrize(("ids", "message"), [
    ({"uid": 65535}, r"^uid: 65535 is the container init's own id, which no run may share .*"
                     r"run as another user, e\.g\. 65534$"),
    ({"gid": 65535}, r"^gid: 65535 is the container init's own id"),
    ({"uid": 65536}, r"^uid: 65536 is not mapped in this container; use 0 to 65534$"),
    ({"gid": -1}, r"^gid: -1 is not mapped in this container; use 0 to 65534$"),
])
def test_runs_may_not_take_init_id(ids: dict[str, int], message: str) -> None:
    m = idmap.IdMapping("direct", (idmap.IdRange(0, 100000, 65536),),
                        (idmap.IdRange(0, 100000, 65536),), 65534, 65534)
    validate(_request(uid=0, gid=0), m)
    validate(_request(uid=65534, gid=65534), m)
    with pytest.raises(PolicyError, match=message):
        validate(_request(**ids), m)


def test_a_single_id_is_every_run_s() -> None:
    single = idmap.IdMapping("single", (idmap.IdRange(0, 1000, 1),),
                             (idmap.IdRange(0, 1000, 1),), 0, 0)
    validate(_request(uid=0, gid=0), single)
    with pytest.raises(PolicyError, match=r"^uid: 1 is not mapped in this container; use 0 to 0"):
        validate(_request(uid=1), single)
