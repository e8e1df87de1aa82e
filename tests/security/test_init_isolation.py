"""A run cannot reach the container's init, and everything init does still works although it
runs under an id of its own (issue #10).

- Where the id map holds more than one id, init moves to the highest, which no run may ask
  for; with a single id (shared), the seccomp policy refuses the calls that act on another
  process's limits and scheduling.
- Init handles no signal but SIGCHLD, stays non-dumpable after every child (even where
  fs.suid_dumpable is 1), and a child that cannot close init's descriptors never execs.
- Each run has an IPC namespace of its own; a session's concurrent execs do not share one.
- What init does for the host after the switch keeps its ownership: tmpfs remounts at reset,
  copies in (also on an overlay root), files opened for copy-out.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.errors import PolicyError
from sandbox.runtime import idmap
from sandbox.runtime.container import Container
from sandbox.runtime.files import put_file
from sandbox.runtime.requests import ContainerSpec, ExecRequest
from sandbox.runtime.results import RunResult, Status
from sandbox.runtime.spawnerclient import Runtime
from tests.conftest import Session

REPO = Path(__file__).resolve().parents[2]
ENV = {"PATH": "/bin"}
SIGCHLD_ONLY = f"{1 << 16:016x}"  # SigCgt: bit 17-1
OVERFLOW_UID = 65534              # how an id outside the map shows inside


def _single(m: idmap.IdMapping) -> idmap.IdMapping:
    """A map of one id: container root, as the session's root (so its roots are ours)."""
    return idmap.IdMapping("single", (idmap.IdRange(0, m.root_uid, 1),),
                           (idmap.IdRange(0, m.root_gid, 1),), 0, 0)


@pytest.fixture(scope="module")
def runtimes(session: Session) -> Iterator[dict[str, Runtime]]:
    rt = session.run(Runtime.start(mapping=_single(session.runtime.mapping)))
    yield {"plan": session.runtime, "single": rt}
    session.run(rt.close())


@pytest.fixture(params=["plan", "single"])
def judge(request: pytest.FixtureRequest, session: Session, runtimes: dict[str, Runtime],
          probe_root: Path) -> Iterator[Container]:
    c = session.run(runtimes[request.param].create_container(
        ContainerSpec(layers=(str(probe_root),), policy="judge")))
    yield c
    session.run(c.destroy())


def _sh(session: Session, c: Container, script: str, *, uid: int | None = None,
        reset_after: bool = True) -> RunResult:
    return session.run(c.exec(ExecRequest(argv=["sh", "-c", script], env=ENV, uid=uid, gid=uid),
                              reset_after=reset_after))


def _describe(r: RunResult) -> str:
    return f"status={r.status} error={r.error}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"


def _highest(ranges: tuple[idmap.IdRange, ...]) -> int:
    return max(r.inside + r.count for r in ranges) - 1


# ------------------------------------------------------------------------- init's own id


def test_init_runs_under_an_id_no_run_may_take(session: Session, judge: Container) -> None:
    m = judge.runtime.mapping
    r = _sh(session, judge, "grep -E '^(Uid|Gid|CapEff):' /proc/1/status")
    fields = {line.split(":")[0]: line.split()[1:] for line in r.stdout.decode().splitlines()}
    if m.method == "single":
        assert fields["Uid"] == ["0"] * 4, _describe(r)
        return
    top_uid, top_gid = _highest(m.uids), _highest(m.gids)
    assert fields["Uid"] == [str(top_uid)] * 4 and fields["Gid"] == [str(top_gid)] * 4, (
        _describe(r))
    # It keeps what it needs in its namespace: every capability.
    assert int(fields["CapEff"][0], 16) == (1 << (_cap_last() + 1)) - 1
    for field, value in (("uid", top_uid), ("gid", top_gid)):
        with pytest.raises(PolicyError, match=rf"^{field}: {value} is the container init's own"):
            session.run(judge.exec(ExecRequest(argv=["true"], env=ENV, **{field: value})))
    # The ids below it are any run's.
    r = _sh(session, judge, "id -u; id -g", uid=top_uid - 1)
    assert r.stdout.split() == [str(top_uid - 1).encode()] * 2, _describe(r)


def _cap_last() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


def test_a_run_cannot_change_init_limits_or_scheduling(session: Session,
                                                       judge: Container) -> None:
    """As container root (init's id itself under a single-id map): prlimit, setpriority,
    sched_setscheduler, sched_setaffinity, ioprio_set on pid 1, /proc/1/oom_score_adj."""
    r = session.run(judge.exec(ExecRequest(argv=["/probes/state", "plant", "init"], env=ENV,
                                           uid=0, gid=0)))
    lines = dict(line.split()[1:3] for line in r.stdout.decode().splitlines()
                 if line.startswith("PLANT "))
    assert r.status == Status.OK and len(lines) == 8, _describe(r)
    changed = {k: v for k, v in lines.items()
               if k != "init-sigint" and v not in ("EPERM", "EACCES")}
    assert changed == {}, f"a run changed init's state: {changed}\n{_describe(r)}"
    after = _sh(session, judge, "grep -E 'Max (data size|open files)' /proc/1/limits")
    assert b"1048576" not in after.stdout and b" 16 " not in after.stdout, _describe(after)


def test_signals_from_a_run_do_not_reach_init(session: Session, judge: Container) -> None:
    r = _sh(session, judge, "grep SigCgt /proc/1/status; for s in INT TERM HUP QUIT USR1 USR2 "
                            "ALRM CHLD PIPE SEGV; do kill -$s 1; done; echo sent", uid=0)
    assert r.status == Status.OK and r.stdout.split()[:2] == [b"SigCgt:",
                                                              SIGCHLD_ONLY.encode()], (
        _describe(r))
    assert judge.alive
    assert _sh(session, judge, "echo alive").stdout == b"alive\n"


@pytest.mark.parametrize("uid", [None, 0])
def test_a_run_can_neither_read_nor_reach_init_binary(session: Session, judge: Container,
                                                      uid: int | None) -> None:
    """Init is a native program exec'd by descriptor: its /proc/1/exe (and its descriptors)
    must stay closed to a run, container root included, also where it shares init's id."""
    r = _sh(session, judge, "cat /proc/1/exe >/dev/null 2>&1 && echo READ; "
                            "readlink /proc/1/exe 2>/dev/null && echo LINK; "
                            "ls /proc/1/fd >/dev/null 2>&1 && echo FDS; "
                            "cat /proc/1/maps 2>/dev/null | head -1 | grep . && echo MAPS; "
                            "echo done", uid=uid)
    assert r.stdout.split() == [b"done"], _describe(r)


@pytest.fixture
def suid_dumpable() -> Iterator[None]:
    """fs.suid_dumpable = 1, where an identity change leaves a process dumpable."""
    if os.geteuid() != 0:
        pytest.skip("setting fs.suid_dumpable needs root")
    path = Path("/proc/sys/fs/suid_dumpable")
    was = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(was)


def test_init_stays_non_dumpable_after_its_children(session: Session, judge: Container,
                                                    suid_dumpable: None) -> None:
    """The vfork child shares init's mm until it execs, and its identity change sets the
    mm's dumpable flag to fs.suid_dumpable: a dumpable init's /proc files would belong to
    its own id, which a run under a single-id map shares (and its oom_score_adj would be
    the run's to raise, for every later run to inherit)."""
    for _ in range(3):
        assert _sh(session, judge, "true").status == Status.OK
    r = _sh(session, judge, "stat -c %u /proc/1/status /proc/1/oom_score_adj; "
                            "echo 500 > /proc/1/oom_score_adj; cat /proc/1/oom_score_adj", uid=0)
    owners = r.stdout.split()[:2]
    assert owners == [str(OVERFLOW_UID).encode()] * 2, (
        f"init's /proc files belong to an id inside the container: it is dumpable\n"
        f"{_describe(r)}")
    assert r.stdout.split()[-1] == b"0", _describe(r)


# ------------------------------------------------------------------------- the exec child


def test_each_run_has_an_ipc_namespace_of_its_own(session: Session,
                                                  runtimes: dict[str, Runtime],
                                                  probe_root: Path) -> None:
    """Also a session's execs (a container kept by its caller, never reset): two at once
    have two namespaces, and what one exec made is gone for the next."""
    c = session.run(runtimes["plan"].create_container(
        ContainerSpec(layers=(str(probe_root),), policy="judge")))
    try:
        async def two() -> list[RunResult]:
            script = "readlink /proc/self/ns/ipc; sleep 0.3"
            return list(await asyncio.gather(*(
                c.exec(ExecRequest(argv=["sh", "-c", script], env=ENV)) for _ in range(2))))

        first, second = session.run(two())
        plant = session.run(c.exec(ExecRequest(argv=["/probes/state", "plant", "ipc"],
                                               env=ENV)))
        check = session.run(c.exec(ExecRequest(argv=["/probes/state", "check"], env=ENV)))
    finally:
        session.run(c.destroy())
    assert first.stdout.startswith(b"ipc:[") and first.stdout != second.stdout, (
        _describe(first), _describe(second))
    assert b"PLANT sysv-shm ok" in plant.stdout and b"PLANT mqueue ok" in plant.stdout, (
        _describe(plant))
    leaks = [line for line in check.stdout.decode().splitlines()
             if line.startswith(("LEAK sysv", "LEAK mqueue"))]
    assert leaks == [], _describe(check)


CLOSE_RANGE_FAILS = textwrap.dedent("""
    import asyncio, ctypes, json, sys
    from sandbox.runtime import idmap, seccomp
    from sandbox.runtime.requests import ContainerSpec, ExecRequest
    from sandbox.runtime.spawnerclient import Runtime

    root, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # Everything this process starts (the spawner, init, the run's child) gets ENOSYS from
    # close_range, as on a kernel older than 5.9. A single-id map: no setuid helper.
    if ctypes.CDLL(None).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise SystemExit("no_new_privs failed")
    seccomp.install(seccomp.compile_profile(seccomp.load_profile(
        {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["close_range"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]},
        name="no-close-range")).bpf)

    async def main() -> None:
        rt = await Runtime.start(mapping=idmap.IdMapping(
            "single", (idmap.IdRange(0, uid, 1),), (idmap.IdRange(0, gid, 1),), 0, 0))
        try:
            c = await rt.create_container(ContainerSpec(layers=(root,), policy="judge"))
            r = await c.exec(ExecRequest(argv=["ls", "-l", "/proc/self/fd/"],
                                         env={"PATH": "/bin"}))
            print(json.dumps({"status": r.status.value, "error": r.error,
                              "stdout": r.stdout.decode()}))
            await c.destroy()
        finally:
            await rt.close()

    asyncio.run(main())
""")


def test_a_child_that_cannot_close_init_descriptors_never_execs(session: Session,
                                                                 busybox_root: Path) -> None:
    m = session.runtime.mapping
    proc = subprocess.run([sys.executable, "-c", CLOSE_RANGE_FAILS, str(busybox_root),
                           str(m.root_uid), str(m.root_gid)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["status"] == Status.INTERNAL_ERROR.value and got["stdout"] == "", (
        f"the program ran with whatever init had open:\n{got['stdout']}")
    assert got["error"].startswith("close_range:"), got


# ------------------------------------------------------------- init's work after the switch


def test_scratch_mounts_come_back_as_container_root_made_them(session: Session,
                                                              judge: Container) -> None:
    r = _sh(session, judge, "touch /tmp/x /dev/shm/x && chmod 700 /tmp /dev/shm", uid=0)
    assert r.status == Status.OK, _describe(r)
    r = _sh(session, judge, "stat -c '%n %u %g %a' /tmp /dev/shm; ls -A /tmp /dev/shm")
    assert r.stdout.decode().splitlines() == ["/tmp 0 0 1777", "/dev/shm 0 0 1777",
                                              "/dev/shm:", "", "/tmp:"], _describe(r)


@pytest.mark.parametrize("policy", ["judge", "default"])
def test_copies_in_and_out_keep_their_owners(session: Session, probe_root: Path,
                                             policy: str) -> None:
    """put_file makes parents and the file as the run user (overlay upper on `default`);
    init opens a root-only file of a run for copy-out."""
    m = session.runtime.mapping
    c = session.container(probe_root, profile=policy)
    try:
        where = "/tmp" if policy == "judge" else "/work"
        session.run(put_file(c, f"{where}/new/dir/in.txt", b"data\n", 0o640))
        r = _sh(session, c, f"stat -c '%u %g %a' {where}/new {where}/new/dir "
                            f"{where}/new/dir/in.txt; echo secret > {where}/root-only; "
                            f"chmod 600 {where}/root-only", uid=0, reset_after=False)
        run = f"{m.run_uid} {m.run_gid}"
        assert r.stdout.decode().splitlines() == [f"{run} 755", f"{run} 755", f"{run} 640"], (
            _describe(r))

        async def read_back() -> bytes:
            fd = await c.open_path(f"{where}/root-only", os.O_RDONLY)
            try:
                return os.read(fd, 100)
            finally:
                os.close(fd)

        assert session.run(read_back()) == b"secret\n"
    finally:
        session.run(c.destroy())
