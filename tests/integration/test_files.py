"""Copying files into and out of real containers, with hostile symlinks and special files
planted by code running inside them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from sandbox.errors import NotFound, PolicyError
from sandbox.runtime import files
from sandbox.runtime.container import Container
from sandbox.runtime.files import get_path, put_file
from tests.conftest import Session

pytestmark = pytest.mark.timeout(60)


def sh(session: Session, c: Container, script: str, **kw: object) -> str:
    r = session.exec(c, ["/bin/sh", "-c", script], **kw)  # type: ignore[arg-type]
    assert r.exit_code == 0, (script, r.stderr)
    return r.stdout.decode()


def test_put_is_read_back_inside_owned_by_the_run_user(session: Session,
                                                       container: Container) -> None:
    m = session.runtime.mapping
    session.run(put_file(container, "/tmp/new/sub/hello.txt", b"hello\n", 0o6755))
    assert sh(session, container, "cat /tmp/new/sub/hello.txt") == "hello\n"
    # setuid and setgid are stripped; parents are made for the run user too.
    assert sh(session, container, "stat -c '%u %g %a' /tmp/new/sub/hello.txt /tmp/new/sub"
              ) == f"{m.run_uid} {m.run_gid} 755\n{m.run_uid} {m.run_gid} 755\n"
    # The run user (untrusted code) can rewrite it; a second put truncates.
    sh(session, container, "echo changed > /tmp/new/sub/hello.txt")
    session.run(put_file(container, "/tmp/new/sub/hello.txt", b"x", 0o600))
    assert sh(session, container, "cat /tmp/new/sub/hello.txt; stat -c %a "
              "/tmp/new/sub/hello.txt") == "x600\n"
    got = session.run(get_path(container, "/tmp/new/sub/hello.txt"))
    assert (got.kind, got.data, got.mode) == ("file", b"x", 0o600)


def test_read_only_root_takes_files_only_in_its_tmpfs(session: Session,
                                                      judge_container: Container) -> None:
    session.run(put_file(judge_container, "/tmp/in.txt", b"42"))
    assert sh(session, judge_container, "cat /tmp/in.txt") == "42"
    with pytest.raises(PolicyError, match=r"read-only.*/tmp"):
        session.run(put_file(judge_container, "/etc/x", b"no"))
    with pytest.raises(PolicyError, match=r"read-only.*/tmp"):
        session.run(put_file(judge_container, "/newdir/x", b"no"))


def test_symlinks_out_of_the_root_resolve_inside_it(session: Session,
                                                    container: Container) -> None:
    host_passwd = Path("/etc/passwd").read_bytes()
    mine = b"root:x:0:0:container-only-marker:/root:/bin/sh\n"
    session.run(put_file(container, "/etc/passwd", mine, uid=0, gid=0))
    session.run(put_file(container, "/etc/shadow", b"container-shadow\n", uid=0, gid=0))
    sh(session, container, "ln -s /etc/passwd /tmp/pw && mkdir -p /tmp/a/b/c/d && "
       "ln -s ../../../../../../../../etc/shadow /tmp/a/b/c/d/sh && "
       "ln -s /tmp/a/b/c/d/sh /tmp/chain")
    # The link itself is refused (bytes cannot carry it); its parent's links resolve inside.
    for link in ("/tmp/pw", "/tmp/a/b/c/d/sh", "/tmp/chain"):
        with pytest.raises(PolicyError, match="symbolic link"):
            session.run(get_path(container, link))
    sh(session, container, "ln -s /etc /tmp/etc && ln -s ../../../../../../../etc /tmp/a/up")
    assert session.run(get_path(container, "/tmp/etc/passwd")).data == mine != host_passwd
    assert session.run(get_path(container, "/tmp/a/up/shadow")).data == b"container-shadow\n"


def test_a_parent_symlinked_to_root_stays_in_the_container(
        session: Session, container: Container, tmp_path: Path) -> None:
    sh(session, container, f"ln -s / /tmp/up && ln -s {tmp_path}/victim /tmp/hostlink")
    session.run(put_file(container, "/tmp/up/etc/planted", b"inside"))
    assert sh(session, container, "cat /etc/planted") == "inside"
    assert not Path("/etc/planted").exists()
    # A symlink to a host path: written at that path inside the container (docker cp
    # follows a final symlink within the container's root), the host's file untouched.
    victim = tmp_path / "victim"
    victim.write_bytes(b"host")
    session.run(put_file(container, f"{tmp_path}/keep", b""))  # the parents, inside
    session.run(put_file(container, "/tmp/hostlink", b"written"))
    assert sh(session, container, f"cat {tmp_path}/victim") == "written"
    assert victim.read_bytes() == b"host"


def test_kernel_interfaces_are_refused_both_ways(session: Session,
                                                 container: Container) -> None:
    sh(session, container, "ln -s /proc/self/mem /tmp/mem && "
       "ln -s /proc/1/environ /tmp/env && ln -s /proc/self/fd/1 /tmp/fd")
    # Init's own /proc files belong to host root (it is non-dumpable), so the kernel already
    # refuses them at open; what it lets through, the pseudo-filesystem check refuses.
    for path in ("/tmp/mem", "/tmp/env"):
        with pytest.raises(PolicyError, match=r"procfs|Permission denied"):
            session.run(put_file(container, path, b"\xcc" * 64))
        with pytest.raises(PolicyError, match=r"procfs|Permission denied|symbolic link"):
            session.run(get_path(container, path))
    # Reached through a symlinked parent instead, they meet the same refusals.
    sh(session, container, "ln -s /proc/self /tmp/self")
    with pytest.raises(PolicyError, match=r"procfs|Permission denied"):
        session.run(get_path(container, "/tmp/self/mem"))
    for path in ("/proc/self/status", "/proc/version"):
        with pytest.raises(PolicyError, match="is on procfs"):
            session.run(get_path(container, path))
    with pytest.raises(PolicyError, match="read-only mount"):
        session.run(put_file(container, "/proc/sys/kernel/hostname", b"x"))
    # A magic link (a descriptor of init's) is never followed.
    with pytest.raises(PolicyError, match=r"magic link|is on procfs"):
        session.run(get_path(container, "/proc/self/fd/1"))
    with pytest.raises(PolicyError, match="magic link"):
        session.run(put_file(container, "/tmp/fd", b"x"))
    # Init is unharmed and the container still works.
    assert sh(session, container, "echo alive") == "alive\n"


def test_fifos_and_devices_are_refused_without_blocking(session: Session,
                                                        container: Container) -> None:
    sh(session, container, "mkfifo /tmp/fifo")
    with pytest.raises(PolicyError, match="FIFO"):
        session.run(get_path(container, "/tmp/fifo"))
    with pytest.raises(PolicyError, match="FIFO"):
        session.run(put_file(container, "/tmp/fifo", b"x"))
    with pytest.raises(PolicyError, match="character device"):
        session.run(get_path(container, "/dev/null"))
    with pytest.raises(PolicyError, match="not a regular file"):
        session.run(put_file(container, "/dev/null", b"x"))


def test_a_directory_comes_back_as_a_tar_with_symlinks_kept(session: Session,
                                                            container: Container) -> None:
    sh(session, container, "mkdir -p /tmp/d/sub && echo one > /tmp/d/f && "
       "echo two > /tmp/d/sub/g && ln -s /etc/passwd /tmp/d/pw && "
       "ln -s / /tmp/d/root && mkfifo /tmp/d/fifo && chmod 600 /tmp/d/f")
    got = session.run(get_path(container, "/tmp/d"))
    assert got.kind == "dir"
    with tarfile.open(fileobj=io.BytesIO(got.data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["d", "d/f", "d/pw", "d/root", "d/sub", "d/sub/g"]
        assert members["d/pw"].issym() and members["d/pw"].linkname == "/etc/passwd"
        assert members["d/root"].issym() and members["d/root"].linkname == "/"
        assert members["d/sub"].isdir()
        f = tar.extractfile("d/f")
        assert f is not None and f.read() == b"one\n"
        assert members["d/f"].mode == 0o600
        assert members["d/f"].uid == session.runtime.mapping.run_uid


def test_sizes_over_the_caps_are_refused(session: Session, container: Container,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sh(session, container, "head -c 4096 /dev/zero > /tmp/big && mkdir /tmp/bd && "
       "cp /tmp/big /tmp/bd/1 && cp /tmp/big /tmp/bd/2")
    with pytest.raises(PolicyError, match="4096 bytes"):
        session.run(get_path(container, "/tmp/big", max_bytes=4000))
    with pytest.raises(PolicyError, match="over the 6000 byte limit"):
        session.run(get_path(container, "/tmp/bd", max_bytes=6000))
    monkeypatch.setattr(files, "MAX_PUT_BYTES", 1000)
    with pytest.raises(PolicyError, match="over the 1000 byte limit"):
        session.run(put_file(container, "/tmp/toolarge", b"x" * 1001))


def test_a_full_tmpfs_is_a_clear_error(session: Session, container: Container) -> None:
    # /dev/shm is a 16 MiB tmpfs in the default profile.
    with pytest.raises(PolicyError, match="no space"):
        session.run(put_file(container, "/dev/shm/fill", b"\0" * (17 << 20)))
    assert sh(session, container, "stat -c %s /dev/shm/fill") == "0\n"


@pytest.mark.parametrize("path", ["relative", "/tmp/a\0b", "/tmp/../etc/x", "/", "//./"])
def test_bad_paths_are_refused(session: Session, container: Container, path: str) -> None:
    with pytest.raises(PolicyError, match="path"):
        session.run(put_file(container, path, b""))


def test_missing_paths_are_not_found(session: Session, container: Container) -> None:
    with pytest.raises(NotFound, match="/tmp/nothing"):
        session.run(get_path(container, "/tmp/nothing"))
    sh(session, container, "ln -s /nowhere /tmp/dangling && ln -s /nowhere /tmp/dir")
    with pytest.raises(PolicyError, match="symbolic link"):
        session.run(get_path(container, "/tmp/dangling"))
    with pytest.raises(NotFound):
        session.run(get_path(container, "/tmp/dir/file"))
