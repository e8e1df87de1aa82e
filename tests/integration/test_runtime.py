"""The runtime against the real kernel: a busybox root, real namespaces, cgroups, seccomp."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from sandbox.errors import ContainerGoneError, PolicyError, RuntimeSetupError
from sandbox.runtime.container import Container
from sandbox.runtime.profiles import format_cpuset, host_cpus
from sandbox.runtime.requests import ContainerSpec, ExecRequest
from sandbox.runtime.results import Status
from testbed import busybox
from tests.conftest import Session


def sh(session: Session, c: Container, script: str, **kw: object):
    return session.exec(c, ["sh", "-c", script], **kw)  # type: ignore[arg-type]


def test_echo_and_exit_code(session: Session, container: Container) -> None:
    r = session.exec(container, ["echo", "hello", "world"])
    assert (r.status, r.exit_code, r.stdout, r.stderr) == (Status.OK, 0, b"hello world\n", b"")
    r = sh(session, container, "echo out; echo err >&2; exit 7")
    assert (r.status, r.exit_code) == (Status.NONZERO_EXIT, 7)
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")


def test_stdin_reaches_cat_whole(session: Session, container: Container) -> None:
    data = os.urandom(300_000)  # larger than a pipe buffer
    r = session.exec(container, ["cat"], stdin=data, output_bytes=1 << 20)
    assert r.status == Status.OK
    assert r.stdout == data


def test_pipeline_env_and_cwd(session: Session, container: Container) -> None:
    r = sh(session, container, "printf 'b\\na\\nc\\n' | sort | tr a-z A-Z; pwd; env | sort",
           env={"PATH": "/bin", "ANSWER": "42"}, cwd="/tmp")
    lines = r.stdout.decode().splitlines()
    assert lines[:4] == ["A", "B", "C", "/tmp"]
    # Only what was declared (plus what sh itself sets) reaches the program.
    assert sorted(set(lines[4:]) - {"SHLVL=1", "PWD=/tmp"}) == ["ANSWER=42", "PATH=/bin"]


def test_killed_by_signal(session: Session, container: Container) -> None:
    r = sh(session, container, "kill -SEGV $$")
    assert (r.status, r.signal, r.exit_code) == (Status.SIGNALED, signal.SIGSEGV, None)


def test_missing_program_and_bad_cwd(session: Session, container: Container) -> None:
    r = session.exec(container, ["/bin/no-such-program"])
    assert (r.status, r.exit_code) == (Status.NONZERO_EXIT, 127)
    assert r.error and "No such file" in r.error
    r = session.exec(container, ["true"], cwd="/does/not/exist")
    assert r.exit_code == 127 and r.error and "chdir /does/not/exist" in r.error


def test_runs_as_unprivileged_id_when_mapped(session: Session, container: Container) -> None:
    m = session.runtime.mapping
    r = sh(session, container, "id -u; id -g")
    assert r.stdout.split() == [str(m.run_uid).encode(), str(m.run_gid).encode()]
    if m.method != "single":
        assert m.run_uid != 0, "untrusted code must not run as container root"


def test_concurrent_execs_in_one_container(session: Session, container: Container) -> None:

    from sandbox.runtime.requests import ExecRequest

    async def many() -> list:
        return await asyncio.gather(*(container.exec(ExecRequest(
            argv=["sh", "-c", f"sleep 0.2; echo {i}"], env={"PATH": "/bin"}))
            for i in range(6)))

    results = session.run(many())
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(6)]
    assert all(r.status == Status.OK for r in results)


def test_cpu_limit(session: Session, container: Container) -> None:
    r = sh(session, container, "while :; do :; done", cpu_ms=300, wall_ms=10_000)
    assert r.status == Status.TIME_LIMIT
    assert r.cpu_ms is not None and r.cpu_ms >= 300
    assert r.signal == signal.SIGKILL


def test_wall_limit_kills_every_process(session: Session, container: Container) -> None:
    r = sh(session, container, "sleep 100 & sleep 100 & sleep 100", wall_ms=300)
    assert r.status == Status.WALL_LIMIT
    left = sh(session, container, "ls /proc | grep -c '^[0-9]'")
    # init, the sh running the count and its ls/grep: nothing of the killed run.
    assert int(left.stdout) <= 4, left.stdout


def test_memory_limit(session: Session, container: Container) -> None:
    limit = 48 << 20
    r = sh(session, container, "x=a; while :; do x=$x$x; done", memory_bytes=limit)
    assert r.status == Status.MEMORY_LIMIT
    assert r.memory_peak_bytes is not None and r.memory_peak_bytes <= limit
    if session.runtime.cgroups.driver is not None:
        assert r.oom_killed


def test_runs_after_one_another_are_measured_and_limited_each_on_its_own(
        session: Session, judge_container: Container) -> None:
    """A finished run's cgroup is reused by the next run of the container: its CPU time,
    peak memory, OOM kill and limits must not reach that run."""
    c = judge_container
    if session.runtime.cgroups.driver is None:
        pytest.skip("no cgroups: nothing is reused")
    big = "dd if=/dev/zero of=/dev/null bs=150M count=1; i=0; " \
          "while [ $i -lt 100000 ]; do i=$((i + 1)); done"
    # Spares are taken last in, first out: of three runs after one, one gets its cgroup.
    heavy = sh(session, c, big, memory_bytes=512 << 20, cpu_ms=30_000)
    small = [sh(session, c, "true") for _ in range(3)]
    killed = sh(session, c, big, memory_bytes=64 << 20, cpu_ms=30_000)
    after = [sh(session, c, "true", memory_bytes=512 << 20) for _ in range(3)]
    assert heavy.status == Status.OK and heavy.memory_peak_bytes > 150 << 20
    assert killed.status == Status.MEMORY_LIMIT and killed.oom_killed
    for r in small + after:
        assert r.status == Status.OK and not r.oom_killed
        assert r.memory_peak_bytes < heavy.memory_peak_bytes // 8
        assert r.cpu_ms is not None and heavy.cpu_ms is not None
        assert r.cpu_ms < heavy.cpu_ms / 8


def test_a_file_left_in_tmp_counts_in_no_later_runs_peak(session: Session,
                                                        container: Container) -> None:
    """A file a run leaves in its container (a session's /tmp) stays charged to the memory
    cgroup it was written from. A run cgroup that served that run is made anew for the
    next (KEEP_MEMORY_RESIDUE_MAX): the file counts in no later run's peak or limit."""
    if session.runtime.cgroups.driver is None:
        pytest.skip("no cgroups: nothing is reused")
    assert sh(session, container, "dd if=/dev/zero of=/tmp/left bs=1M count=4").status \
        == Status.OK
    # Spares are taken last in, first out: of three runs after one, one gets its cgroup.
    after = [sh(session, container, "true") for _ in range(3)]
    for r in after:
        assert r.status == Status.OK and r.memory_peak_bytes is not None
        assert r.memory_peak_bytes < 2 << 20
    sh(session, container, "rm /tmp/left")


def test_fork_bomb_held_by_pids(session: Session, container: Container) -> None:
    r = sh(session, container, "b() { b | b & }; b; sleep 1; echo survived", pids=20,
           wall_ms=5000)
    assert b"can't fork" in r.stderr
    assert r.status in (Status.OK, Status.WALL_LIMIT)
    assert sh(session, container, "echo alive").stdout == b"alive\n"


def test_output_limit_keeps_partial_output(session: Session, container: Container) -> None:
    r = session.exec(container, ["yes"], output_bytes=10_000)
    assert r.status == Status.OUTPUT_LIMIT
    assert r.stdout_truncated
    assert r.stdout == b"y\n" * 5000


def test_file_size_bomb_stopped(session: Session, container: Container) -> None:
    r = sh(session, container, "cat /dev/zero > /tmp/big", file_size_bytes=1 << 20)
    assert r.status == Status.OUTPUT_LIMIT
    assert r.signal == signal.SIGXFSZ
    size = sh(session, container, "wc -c < /tmp/big").stdout
    assert int(size) == 1 << 20


def test_tmp_is_size_limited(session: Session, container: Container) -> None:
    r = sh(session, container, "dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>&1; echo rc=$?",
           file_size_bytes=1 << 30)
    assert b"No space left" in r.stdout


def test_double_forked_daemon_dies_with_the_run(session: Session, container: Container) -> None:
    r = sh(session, container, "(setsid sh -c 'trap \"\" HUP; sleep 1000' &) ; echo started")
    assert r.stdout == b"started\n"
    listing = sh(session, container, "for p in /proc/[0-9]*; do cat $p/comm; done")
    assert b"sleep" not in listing.stdout


def test_read_only_root_and_reset(session: Session, judge_container: Container) -> None:
    c = judge_container
    r = sh(session, c, "touch /etc/owned 2>&1; echo secret > /tmp/left; sleep 1000 &")
    assert b"Read-only file system" in r.stdout
    session.run(c.reset())
    r = sh(session, c, "ls -A /tmp; ls /proc | grep -c '^[0-9]'")
    lines = r.stdout.split()
    assert b"left" not in lines
    assert int(lines[-1]) <= 4


def _tmp_mount_id(session: Session, c: Container) -> bytes:
    r = sh(session, c, "grep ' /tmp ' /proc/self/mountinfo")
    assert r.status == Status.OK, r.stderr
    return r.stdout.split()[0]


_INODE_PROBE = "touch /tmp/p && stat -c %i /tmp/p && rm /tmp/p"


def test_reset_remounts_only_a_tmpfs_a_run_changed(session: Session,
                                                   judge_container: Container) -> None:
    c = judge_container
    session.run(c.reset())
    # A tmpfs numbers its inodes from its mount on: the probe's is a fresh one's first.
    fresh = sh(session, c, _INODE_PROBE).stdout
    session.run(c.reset())
    time.sleep(0.03)  # past the clock tick of the mount: a change would show in its ctime
    before = _tmp_mount_id(session, c)
    session.run(c.reset())
    # Kept, the mount keeps its id (a new mount may also reuse a freed one: the id cannot
    # tell a new mount, the inode numbers below can).
    assert _tmp_mount_id(session, c) == before, "a run that changed nothing got a new /tmp"
    time.sleep(0.03)
    r = sh(session, c, "echo x > /tmp/f; rm /tmp/f")  # leaves nothing but a moved ctime
    assert r.status == Status.OK, r
    session.run(c.reset())
    assert sh(session, c, _INODE_PROBE).stdout == fresh, "a changed /tmp was kept"


def test_reset_right_after_a_remount_gives_a_new_tmpfs(session: Session,
                                                       judge_container: Container) -> None:
    """Made and removed within the clock tick of the mount, files leave the ctime as it was;
    the inode numbers they used would still tell the next run about them."""
    c = judge_container
    session.run(c.reset())
    fresh = sh(session, c, _INODE_PROBE).stdout
    for _ in range(5):
        session.run(c.reset())
        sh(session, c, "for i in 1 2 3 4 5 6 7 8; do touch /tmp/$i; rm /tmp/$i; done")
        session.run(c.reset())
        assert sh(session, c, _INODE_PROBE).stdout == fresh


def test_destroy_during_a_run_leaves_no_process_and_no_cgroup(session: Session,
                                                             busybox_root: Path) -> None:
    driver = session.runtime.cgroups.driver
    if driver is None:
        pytest.skip("no cgroups to look in")
    c = session.container(busybox_root, profile="judge")
    assert c.cgroup is not None
    run = session.loop.create_task(c.exec(ExecRequest(
        ["sh", "-c", "sleep 1000 & sleep 1000"], env={"PATH": "/bin"})))
    deadline = time.monotonic() + 10
    pids: list[int] = []
    while len(pids) < 3 and time.monotonic() < deadline:  # init, and both sleeps
        session.run(asyncio.sleep(0.01))
        pids = c.cgroup.pids(recursive=True)
    assert len(pids) >= 3, pids
    session.run(c.destroy())
    with pytest.raises(ContainerGoneError):
        session.run(run)
    assert driver.open(c.cgroup.path) is None
    left = [p for p in pids if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert left == []


def test_writable_root_is_private(session: Session, busybox_root: Path) -> None:
    a = session.container(busybox_root, profile="default")
    b = session.container(busybox_root, profile="default")
    try:
        m = session.runtime.mapping
        root = {"uid": 0} if m.method != "single" else {}
        r = sh(session, a, "echo mine > /etc/mine && cat /etc/mine", **root)
        assert (r.status, r.stdout) == (Status.OK, b"mine\n")
        assert sh(session, b, "cat /etc/mine").status == Status.NONZERO_EXIT
        assert not (busybox_root / "etc/mine").exists(), "the write reached the host directory"
        session.run(a.reset())  # the root as the image made it, in place
        assert sh(session, a, "cat /etc/mine").status == Status.NONZERO_EXIT
        assert sh(session, a, "echo again > /etc/mine && cat /etc/mine", **root).stdout == (
            b"again\n")
    finally:
        session.run(a.destroy())
        session.run(b.destroy())


def test_layers_stack_in_order(session: Session, busybox_root: Path, tmp_path: Path) -> None:
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    (top / "etc/group").write_text("from-top\n")
    (top / "etc/only-top").write_text("yes\n")
    m = session.runtime.mapping
    for p in (top, top / "etc", top / "etc/group", top / "etc/only-top"):
        os.lchown(p, m.root_uid, m.root_gid)
    for writable in (False, True):
        c = session.container([busybox_root, top], profile="judge", writable=writable)
        r = sh(session, c, "cat /etc/group /etc/only-top; echo x > /tmp/ok && echo tmp-ok")
        assert r.stdout == b"from-top\nyes\ntmp-ok\n"
        session.run(c.destroy())


def test_destroy_leaves_nothing(session: Session, busybox_root: Path) -> None:
    c = session.container(busybox_root, profile="judge")
    sh(session, c, "sleep 1000 & echo")
    pid, cgroup = c.pid, c.cgroup
    session.run(c.destroy())
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        import time

        time.sleep(0.01)
    assert not Path(f"/proc/{pid}").exists(), "init survived destroy"
    if cgroup is not None:
        assert session.runtime.cgroups.driver is not None
        assert session.runtime.cgroups.driver.open(cgroup.path) is None


def test_limits_above_maxima_refused(session: Session, container: Container) -> None:
    with pytest.raises(PolicyError, match=r"limits\.cpu_ms: .*maximum"):
        session.exec(container, ["true"], cpu_ms=10**9)


def test_measurements_name_their_source(session: Session, container: Container) -> None:
    r = sh(session, container, "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
    assert r.cpu_ms and r.cpu_ms > 0 and r.wall_ms > 0
    assert r.memory_peak_bytes and r.memory_peak_bytes > 0
    driver = session.runtime.cgroups.driver
    if driver is not None and "memory" in driver.controllers:
        assert r.measured_by["memory"].startswith("cgroup-v")
        assert r.measured_by["cpu"].startswith("cgroup-v")
    else:
        assert r.measured_by["memory"].startswith("rusage")


def test_missing_layer_is_a_clear_error(session: Session, tmp_path: Path) -> None:
    with pytest.raises(RuntimeSetupError, match="is not a directory"):
        session.container(tmp_path / "nope")


def _busybox_only(session: Session, base: Path, names: list[str]) -> list[Path]:
    """Layers `base/<name>` holding only /bin/busybox, FROM scratch style: no /proc, /dev,
    /tmp, /etc or /var."""
    m = session.runtime.mapping
    full = busybox.build_rootfs(base / "full", owner=(m.root_uid, m.root_gid))
    for name in names:
        (base / name / "bin").mkdir(parents=True)
        shutil.copy2(full / "bin/busybox", base / name / "bin/busybox")
    return [base / name for name in names]


def _owned_by_container_root(session: Session, layers: list[Path]) -> None:
    m = session.runtime.mapping
    for layer in layers:
        for path in [layer, *layer.rglob("*")]:
            os.lchown(path, m.root_uid, m.root_gid)


def _shapeless_root(session: Session, base: Path, *, plant: bool) -> list[Path]:
    """A busybox-only image with an empty /etc; with `plant`, /tmp is a link to /etc and a
    second layer adds a file, as a hostile image would."""
    [bare] = _busybox_only(session, base, ["bare"])
    (bare / "etc").mkdir()
    layers = [bare]
    if plant:
        (bare / "tmp").symlink_to("/etc")
        top = base / "top"
        (top / "etc").mkdir(parents=True)
        (top / "etc/marker").write_text("top layer\n")
        layers.append(top)
    _owned_by_container_root(session, layers)
    return layers


@pytest.mark.parametrize("profile", ["judge", "default"])
@pytest.mark.parametrize("plant", [False, True])
def test_image_without_mount_points_runs(session: Session, tmp_path: Path, profile: str,
                                         plant: bool) -> None:
    """The runtime brings its own mount points (an image's shape is never an error), and a
    mount point the image made a link never leads a mount out of place."""
    c = session.container(_shapeless_root(session, tmp_path, plant=plant), profile=profile)
    script = ("/bin/busybox test -r /proc/self/status && /bin/busybox test -c /dev/null"
              " && echo x > /tmp/x && /bin/busybox stat -f -c %T /tmp"
              " && /bin/busybox ls /etc")
    for _ in range(2):  # and again after a reset (a writable root is made anew with them)
        r = session.exec(c, ["/bin/busybox", "sh", "-c",
                             script + "; echo y 2>/dev/null > /etc/y; true"],
                         uid=0)
        assert r.status == Status.OK, r
        lines = r.stdout.decode().split()
        assert lines[0] == "tmpfs"                  # /tmp is the profile's tmpfs
        assert "x" not in lines[1:]                 # and not the image's /etc behind a link
        assert "y" not in lines[1:]                 # nothing of the run before
        assert ("marker" in lines[1:]) == plant     # every layer is there
        session.run(c.reset())


@pytest.mark.parametrize("profile", ["judge", "default"])
def test_skeleton_keeps_image_directories_and_replaces_links_and_files(
        session: Session, tmp_path: Path, profile: str) -> None:
    """Where the skeleton layer goes over an image, an image directory on the way keeps its
    mode (the merged tree shows the skeleton's copy); a mount point the image has as a file
    becomes a directory; an image /etc that is a link keeps its shape, and gets none of the
    runtime's files (they would land wherever the link leads)."""
    image, linked = _busybox_only(session, tmp_path, ["image", "linked"])
    (image / "proc").write_text("a file where /proc goes")
    (image / "etc").mkdir()
    (image / "etc").chmod(0o750)
    (linked / "elsewhere").mkdir()
    (linked / "etc").symlink_to("elsewhere")
    _owned_by_container_root(session, [image, linked])
    script = ("/bin/busybox stat -c %a /etc; /bin/busybox test -r /proc/self/status && "
              "echo proc; /bin/busybox cat /etc/hostname")
    c = session.container(image, profile=profile)
    r = session.exec(c, ["/bin/busybox", "sh", "-c", script], uid=0)
    assert r.stdout.decode().split() == ["750", "proc", "sandbox"], r
    c = session.container(linked, profile=profile)
    r = session.exec(c, ["/bin/busybox", "sh", "-c", "/bin/busybox ls -A /elsewhere; "
                         "/bin/busybox test -L /etc && echo link"], uid=0)
    assert r.stdout.decode().split() == ["link"], r


@pytest.mark.parametrize("profile", ["judge", "default"])
def test_init_root_is_out_of_a_runs_sight(session: Session, busybox_root: Path,
                                         profile: str) -> None:
    """A run's root is /root of init's: the layer binds and the upper tmpfs around it are
    neither reachable nor listed among the run's mounts."""
    c = session.container(busybox_root, profile=profile)
    r = sh(session, c, "cut -d' ' -f5 /proc/self/mountinfo; ls -d /layers /rw")
    points = r.stdout.decode().split()
    assert "/" in points and "/proc" in points and "/tmp" in points
    assert not [p for p in points if p.split("/")[1:2] in (["layers"], ["rw"], ["next"],
                                                           ["skeleton"], ["next-rw"])]
    assert b"/layers" in r.stderr and b"/rw" in r.stderr  # ls: no such file


@pytest.mark.parametrize(("kw", "match"), [
    ({"argv": []}, "argv: give at least"),
    ({"argv": ["echo", "a\0b"]}, "NUL"),
    ({"argv": ["echo", "x" * (200 << 10)]}, r"argv/env: one string is over"),
    ({"argv": ["echo", *["y" * 1000] * 1100]}, r"argv/env: over \d+ bytes in all"),
    ({"argv": ["true"], "env": {"A=B": "1"}}, "env: 'A=B' is not a valid variable"),
    ({"argv": ["true"], "cwd": "relative"}, "cwd: must be an absolute path"),
    ({"argv": ["true"], "uid": 1 << 20}, r"uid: 1048576 is not mapped in this container"),
])
def test_bad_exec_requests_are_refused(session: Session, container: Container,
                                       kw: dict, match: str) -> None:
    from sandbox.runtime.requests import ExecRequest

    with pytest.raises(PolicyError, match=match):
        session.run(container.exec(ExecRequest(**kw)))
    # Nothing was started and the container is still usable.
    assert session.exec(container, ["echo", "ok"]).stdout == b"ok\n"


def test_init_survives_signals_from_inside(session: Session, container: Container) -> None:
    # Pid 1 of a pid namespace only gets the signals it handles from inside; init handles
    # none that hurt it, and untrusted code has no capability to change that.
    r = sh(session, container, "kill -TERM 1; kill -INT 1; kill -KILL 1; kill -STOP 1; echo sent")
    assert r.stdout == b"sent\n"
    assert container.alive
    assert session.exec(container, ["echo", "still here"]).stdout == b"still here\n"


def test_many_runs_across_containers_at_once(session: Session, busybox_root: Path) -> None:

    from sandbox.runtime.requests import ExecRequest

    boxes = [session.container(busybox_root, profile="judge") for _ in range(4)]

    async def burst() -> list:
        return await asyncio.gather(*(
            box.exec(ExecRequest(argv=["sh", "-c", f"echo {i}; echo e{i} >&2"],
                                 env={"PATH": "/bin"}))
            for i in range(40) for box in [boxes[i % 4]]))

    results = session.run(burst())
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(40)]
    assert [r.stderr for r in results] == [f"e{i}\n".encode() for i in range(40)]
    assert len({r.id for r in results}) == 40
    for box in boxes:
        session.run(box.destroy())


def test_streaming_callback_sees_output_as_it_comes(session: Session,
                                                    container: Container) -> None:
    from sandbox.runtime.requests import ExecRequest

    seen: list[tuple[str, bytes]] = []
    req = ExecRequest(argv=["sh", "-c", "echo one; sleep 0.1; echo two >&2"],
                      env={"PATH": "/bin"})
    r = session.run(container.exec(req, on_output=lambda s, d: seen.append((s, d))))
    assert seen == [("stdout", b"one\n"), ("stderr", b"two\n")]
    assert (r.stdout, r.stderr) == (b"one\n", b"two\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting on the host needs root")
def test_host_mounts_below_a_directory_root_are_read_only(session: Session,
                                                          tmp_path: Path) -> None:
    import subprocess

    from testbed import busybox

    m = session.runtime.mapping
    root = busybox.build_rootfs(tmp_path / "rootfs", owner=(m.root_uid, m.root_gid))
    (root / "extra").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", str(root / "extra")],
                   check=True)
    try:
        (root / "extra/seen").write_text("host\n")
        c = session.container(root, profile="judge")
        r = sh(session, c, "cat /extra/seen; echo x > /extra/new; echo x > /etc/new", uid=0)
        assert b"Read-only file system" in r.stderr
        assert r.stderr.count(b"Read-only") == 2, r.stderr
        assert not (root / "extra/new").exists() and not (root / "etc/new").exists()
        session.run(c.destroy())
    finally:
        subprocess.run(["umount", "-l", str(root / "extra")], check=True)


def test_cancelled_exec_takes_its_run_with_it(session: Session, container: Container) -> None:

    from sandbox.runtime.requests import ExecRequest

    async def give_up() -> None:
        req = ExecRequest(argv=["sh", "-c", "sleep 1000 & sleep 1000"], env={"PATH": "/bin"})
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await container.exec(req)

    session.run(give_up())
    # Killed processes init has not reaped yet are zombies (state Z): dead, but listed.
    listing = sh(session, container, "for p in /proc/[0-9]*; do"
                                     " [ \"$(cut -d' ' -f3 $p/stat)\" = Z ] || cat $p/comm; done")
    assert b"sleep" not in listing.stdout


def test_cpuset_and_cpu_quota(session: Session, container: Container) -> None:
    driver = session.runtime.cgroups.driver
    if driver is None or not {"cpu", "cpuset"} <= driver.controllers:
        pytest.skip("no cpu and cpuset cgroup controllers here")
    r = sh(session, container, "grep Cpus_allowed_list /proc/self/status", cpuset="0")
    assert r.stdout.split()[-1] == b"0"
    # Half a core: over a busy second the run gets about half of the wall time as CPU.
    r = sh(session, container, "while :; do :; done", cpu_quota_cores=0.5, wall_ms=1000)
    assert r.status == Status.WALL_LIMIT
    assert r.cpu_ms is not None and r.cpu_ms < 0.75 * r.wall_ms


def test_profile_tmpfs_mounts(session: Session, busybox_root: Path) -> None:
    from dataclasses import replace

    from sandbox.runtime.profiles import RootfsShape, load_profile

    judge = load_profile("judge")
    shape = RootfsShape.from_dict({"tmpfs": [{"target": "/work", "size": 1 << 20}]}, "t")
    session.runtime.policies.register(replace(judge, name="judge-work", rootfs=shape))
    c = session.container(busybox_root, profile="judge-work")
    r = sh(session, c, "echo kept > /work/a && cat /work/a; "
                       "dd if=/dev/zero of=/work/big bs=64k count=64 2>&1")
    assert r.stdout.startswith(b"kept\n") and b"No space left" in r.stdout
    assert (busybox_root / "work").exists() and not (busybox_root / "work/a").exists()
    session.run(c.reset())
    assert sh(session, c, "ls -A /work").stdout == b""


def test_large_argv_reaches_the_program(session: Session, container: Container) -> None:
    # ~900 KiB of arguments: more than a datagram may carry on a stock kernel.
    args = ["y" * 1000] * 900
    r = session.exec(container, ["sh", "-c", 'echo $#; echo "${900}" | wc -c', "sh", *args])
    assert r.stdout.split() == [b"900", b"1001"]


def test_a_cancelled_creation_leaves_the_runtime_usable_and_nothing_behind(
        session: Session, busybox_root: Path) -> None:
    """A client that goes away while its container is being made must not leave the
    spawner's reply in the socket for the next creation to read."""
    runtime = session.runtime

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(runtime.create_container(
            ContainerSpec(layers=(str(busybox_root),), policy="judge")))
        await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while runtime._undoing:
            await asyncio.gather(*runtime._undoing, return_exceptions=True)

    before = set(runtime.containers)
    for _ in range(3):
        session.run(cancel_midway())
    assert set(runtime.containers) == before
    c = session.container(busybox_root)
    assert session.exec(c, ["echo", "fine"]).stdout == b"fine\n"


def test_a_cpu_quota_ends_with_its_run(session: Session, container: Container) -> None:
    """Run cgroups are recycled: the next run in one that had a quota runs unthrottled."""
    driver = session.runtime.cgroups.driver
    if driver is None or "cpu" not in driver.controllers:
        pytest.skip("no cpu cgroup controller here")
    for _ in range(3):   # through every spare the container keeps
        r = sh(session, container, "while :; do :; done", cpu_quota_cores=0.2, wall_ms=300)
        assert r.cpu_ms is not None and r.cpu_ms < 0.5 * r.wall_ms
    for _ in range(3):
        r = sh(session, container, "while :; do :; done", wall_ms=600)
        assert r.status == Status.WALL_LIMIT
        assert r.cpu_ms is not None and r.cpu_ms > 0.75 * r.wall_ms, (r.cpu_ms, r.wall_ms)


def test_a_run_joins_cpu_and_cpuset_cgroups_of_its_own_only_for_their_limits(
        session: Session, container: Container) -> None:
    """Cgroup joins fewer on a run's path: without a quota, or a cpuset of its own, the run
    stays in its container's cpu or cpuset cgroup (cpuacct still counts its time in its
    own)."""
    driver = session.runtime.cgroups.driver
    if driver is None or driver.version != 1 or not {"cpu", "cpuset"} <= driver.controllers:
        pytest.skip("no cgroup v1 cpu and cpuset controllers here")

    def paths(**limits: object) -> dict[str, str]:
        r = sh(session, container, "cat /proc/self/cgroup", **limits)
        assert r.status == Status.OK, r
        return {ctl: line.split(":", 2)[2] for line in r.stdout.decode().splitlines()
                for ctl in line.split(":", 2)[1].split(",")}

    plain, own = paths(), paths(cpu_quota_cores=1.5, cpuset="0")
    # The run's own cgroup is where memory and cpuacct have it; init's is the container's.
    assert plain["cpuacct"] == plain["memory"] != plain["cpu"] == plain["cpuset"] == "/init", \
        plain
    assert own["cpu"] == own["cpuset"] == own["cpuacct"] == own["memory"] != "/init", own
    r = sh(session, container, "grep Cpus_allowed_list /proc/self/status")
    assert r.stdout.split()[-1].decode() == format_cpuset(host_cpus()), r   # the service's


def test_a_filter_that_would_stop_the_childs_own_setup_is_loaded_last(
        session: Session, busybox_root: Path) -> None:
    """A child loads its filter before its cgroup joins only where every call it makes after
    that passes the filter: one that denies chdir is loaded after the child's own chdir,
    and holds for the run all the same."""
    from dataclasses import replace

    from sandbox.runtime import seccomp
    from sandbox.runtime.profiles import load_profile

    program = seccomp.compile_profile(seccomp.load_profile(
        {"defaultAction": "SCMP_ACT_ALLOW",
         "syscalls": [{"names": ["chdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]},
        name="no-chdir"))
    policies = session.runtime.policies
    policies._programs["no-chdir"] = program
    policies.register(replace(load_profile("judge"), name="judge-no-chdir", seccomp="no-chdir"))
    c = session.container(busybox_root, profile="judge-no-chdir")
    assert not c.filter_ahead
    r = sh(session, c, "cd /tmp || echo refused")
    assert r.status == Status.OK and b"refused" in r.stdout, r


def test_a_finished_runs_cgroup_is_recycled_without_a_next_exec(session: Session,
                                                                 container: Container) -> None:
    """A run's cgroup waits for the container's next exec to be recycled (off the next
    request's path), and no longer than a few milliseconds when none comes."""
    if session.runtime.cgroups.driver is None:
        pytest.skip("no cgroups for sandboxd here")
    assert sh(session, container, "true").status == Status.OK
    session.run(container._settle())
    assert sh(session, container, "true").status == Status.OK
    [(ended, _)] = container._ended
    assert all(cg is not ended for cg, _ in container._spares)
    session.run(asyncio.sleep(0.5))
    assert container._ended == [] and any(cg is ended for cg, _ in container._spares)
