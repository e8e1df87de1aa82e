"""Copying files into and out of real containers, with hostile symlinks and special files
planted by code running inside them, and directories swapped while they are copied out."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import tarfile
from typing import Any

import pytest

from sandbox.errors import NotFound, PolicyError
from sandbox.runtime import files
from sandbox.runtime.container import Container
from sandbox.runtime.files import get_path, put_file
from sandbox.runtime.profiles import Limits
from sandbox.runtime.requests import ExecRequest
from tests.conftest import Session

pytestmark = pytest.mark.timeout(120)


def sh(session: Session, c: Container, script: str, **kw: object) -> str:
    r = session.exec(c, ["/bin/sh", "-c", script], **kw)  # type: ignore[arg-type]
    assert r.exit_code == 0, (script, r.stderr)
    return r.stdout.decode()


def fetch(session: Session, container: Container, path: str,
          **kw: Any) -> tuple[str, bytes, int]:
    """(kind, bytes, mode) of a copy out, its stream read whole."""
    async def go() -> tuple[str, bytes, int]:
        async with get_path(container, path, **kw) as got:
            return got.kind, await got.read(), got.mode
    return session.run(go())


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
    assert fetch(session, container, "/tmp/new/sub/hello.txt") == ("file", b"x", 0o600)


def test_read_only_root_takes_files_only_in_its_tmpfs(session: Session,
                                                      judge_container: Container) -> None:
    session.run(put_file(judge_container, "/tmp/in.txt", b"42"))
    assert sh(session, judge_container, "cat /tmp/in.txt") == "42"
    with pytest.raises(PolicyError, match=r"read-only.*/tmp"):
        session.run(put_file(judge_container, "/etc/x", b"no"))
    with pytest.raises(PolicyError, match=r"read-only.*/tmp"):
        session.run(put_file(judge_container, "/newdir/x", b"no"))


def _busybox(session: Session, c: Container) -> str:
    return sh(session, c, "stat -c '%u %g %a %s' /bin/busybox; md5sum /bin/busybox")


def test_a_planted_file_symlink_is_refused_not_written_through(session: Session,
                                                               container: Container) -> None:
    # Issue #10: the copy overwrote /bin/busybox and gave it to the run user.
    before = _busybox(session, container)
    sh(session, container, "ln -s /bin/busybox /tmp/in.txt")
    with pytest.raises(PolicyError, match=r"^/tmp/in.txt is a symbolic link \(-> "
                       r"'/bin/busybox'\).*give the real path"):
        session.run(put_file(container, "/tmp/in.txt", b"\xcc" * 64))
    assert _busybox(session, container) == before
    # A dangling one is not created through either.
    sh(session, container, "ln -s /etc/created /tmp/dangling")
    with pytest.raises(PolicyError, match="is a symbolic link"):
        session.run(put_file(container, "/tmp/dangling", b"x"))
    assert sh(session, container, "ls /etc/created 2>&1 || true").endswith(
        "No such file or directory\n")


def test_a_planted_directory_symlink_is_refused_for_parents(session: Session,
                                                            container: Container) -> None:
    sh(session, container, "ln -s /etc /tmp/d && ln -s / /tmp/up && mkdir /tmp/real")
    # A missing parent below a link: nothing is made through it.
    with pytest.raises(PolicyError, match=r"^/tmp/d/new/x.txt passes through the symbolic "
                       r"link /tmp/d \(-> '/etc'\).*give the real path"):
        session.run(put_file(container, "/tmp/d/new/x.txt", b"x"))
    with pytest.raises(PolicyError, match="passes through the symbolic link /tmp/up"):
        session.run(put_file(container, "/tmp/up/etc/planted", b"x"))
    assert sh(session, container, "[ ! -e /etc/new ] && [ ! -e /etc/planted ] && echo no"
              ) == "no\n"
    # Swapped in for a parent made a moment ago: the next put refuses it.
    session.run(put_file(container, "/tmp/real/a/b.txt", b"b"))
    sh(session, container, "rm -r /tmp/real/a && ln -s /etc /tmp/real/a")
    with pytest.raises(PolicyError, match="passes through the symbolic link /tmp/real/a"):
        session.run(put_file(container, "/tmp/real/a/passwd", b"x"))
    # Copies out refuse links on the way just the same.
    with pytest.raises(PolicyError, match="passes through the symbolic link /tmp/d"):
        fetch(session, container, "/tmp/d/passwd")
    assert fetch(session, container, "/etc/passwd")[1].startswith(b"root:")


def test_a_file_with_other_hard_links_is_not_written(session: Session,
                                                     container: Container) -> None:
    sh(session, container, "echo mine > /tmp/orig && ln /tmp/orig /tmp/alias")
    with pytest.raises(PolicyError, match="/tmp/alias has 2 hard links"):
        session.run(put_file(container, "/tmp/alias", b"x"))
    assert sh(session, container, "cat /tmp/orig") == "mine\n"


def test_kernel_interfaces_are_refused_both_ways(session: Session,
                                                 container: Container) -> None:
    for path in ("/proc/1/environ", "/proc/version", "/proc/1/mem"):
        with pytest.raises(PolicyError, match=r"procfs|Permission denied"):
            session.run(put_file(container, path, b"\xcc" * 64))
    for path in ("/proc/1/status", "/proc/version"):
        with pytest.raises(PolicyError, match="is on procfs"):
            fetch(session, container, path)
    with pytest.raises(PolicyError, match=r"read-only mount|Permission denied"):
        session.run(put_file(container, "/proc/sys/kernel/hostname", b"x"))
    # /proc/self and the magic links of /proc/<pid>/fd are links: never followed.
    with pytest.raises(PolicyError, match=r"passes through the symbolic link /proc/self"):
        fetch(session, container, "/proc/self/status")
    with pytest.raises(PolicyError, match=r"^/proc/1/fd/0 is a symbolic link"):
        fetch(session, container, "/proc/1/fd/0")
    # Init is unharmed and the container still works.
    assert sh(session, container, "echo alive") == "alive\n"


def test_fifos_and_devices_are_refused_without_blocking(session: Session,
                                                        container: Container) -> None:
    sh(session, container, "mkfifo /tmp/fifo")
    with pytest.raises(PolicyError, match="FIFO"):
        fetch(session, container, "/tmp/fifo")
    with pytest.raises(PolicyError, match="FIFO"):
        session.run(put_file(container, "/tmp/fifo", b"x"))
    with pytest.raises(PolicyError, match="character device"):
        fetch(session, container, "/dev/null")
    with pytest.raises(PolicyError, match="not a regular file"):
        session.run(put_file(container, "/dev/null", b"x"))


def _members(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m) if m.isreg() else None
            out[m.name] = (m, f.read() if f is not None else None)
        return out


def test_a_directory_comes_back_as_a_tar_with_symlinks_kept(session: Session,
                                                            container: Container) -> None:
    sh(session, container, "mkdir -p /tmp/d/sub && echo one > /tmp/d/f && "
       "echo two > /tmp/d/sub/g && ln -s /etc/passwd /tmp/d/pw && "
       "ln -s / /tmp/d/root && mkfifo /tmp/d/fifo && chmod 600 /tmp/d/f && "
       "printf x > \"$(printf '/tmp/d/\\377')\"")
    kind, data, _ = fetch(session, container, "/tmp/d")
    assert kind == "dir"
    members = _members(data)
    assert sorted(members) == ["d", "d/f", "d/pw", "d/root", "d/sub", "d/sub/g", "d/\udcff"]
    assert members["d/pw"][0].issym() and members["d/pw"][0].linkname == "/etc/passwd"
    assert members["d/root"][0].issym() and members["d/root"][0].linkname == "/"
    assert members["d/sub"][0].isdir()
    assert members["d/f"][1] == b"one\n" and members["d/sub/g"][1] == b"two\n"
    assert members["d/\udcff"][1] == b"x"  # a name that is not UTF-8 comes through as is
    assert members["d/f"][0].mode == 0o600
    assert members["d/f"][0].uid == session.runtime.mapping.run_uid


def test_a_directory_swapped_during_a_copy_out_is_never_followed(
        session: Session, container: Container) -> None:
    """The container's code swaps a subdirectory for links (to another directory and to
    the root) and back, as fast as it can, while the host copies the directory out again
    and again: nothing from outside the directory may ever appear in a tar."""
    sh(session, container, "mkdir -p /tmp/d/sub /tmp/other && for i in $(seq 10 40); do "
       "echo inside > /tmp/d/sub/f$i; echo OUTSIDE > /tmp/other/f$i; done && "
       "cp /etc/passwd /tmp/other/passwd")
    race = ("cd /tmp/d; while [ ! -e /tmp/stop ]; do mv sub hold; ln -s /tmp/other sub; "
            "rm sub; ln -s / sub; rm sub; mv hold sub; done")

    async def go() -> tuple[int, set[str]]:
        run = asyncio.ensure_future(container.exec(ExecRequest(
            argv=["/bin/sh", "-c", race], env={"PATH": "/bin"},
            limits=Limits(wall_ms=100_000))))
        seen: set[str] = set()
        copies = 0
        try:
            while copies < 150 or not {"full", "link"} <= seen:
                async with get_path(container, "/tmp/d") as got:
                    data = await got.read()
                copies += 1
                for name, (m, content) in _members(data).items():
                    seen.add("link" if m.issym() else "full" if name.startswith("d/sub/")
                             else "other")
                    assert content in (None, b"inside\n"), (name, content)
                    assert not name.startswith(("d/sub/passwd", "d/sub/etc", "d/sub/tmp")), name
                if copies > 3000:
                    break
        finally:
            await put_file(container, "/tmp/stop", b"")
            result = await run
        assert result.exit_code == 0, result
        return copies, seen
    copies, seen = session.run(go())
    # The race really ran: the copies saw the directory whole and as a link.
    assert {"full", "link"} <= seen, (copies, seen)


def test_sizes_over_the_caps_are_refused(session: Session, container: Container,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sh(session, container, "head -c 4096 /dev/zero > /tmp/big && mkdir /tmp/bd && "
       "cp /tmp/big /tmp/bd/1 && cp /tmp/big /tmp/bd/2 && mkdir -p /tmp/deep/a/b/c/d")
    with pytest.raises(PolicyError, match="4096 bytes"):
        fetch(session, container, "/tmp/big", max_bytes=4000)
    with pytest.raises(PolicyError, match="over the 6000 byte limit"):
        fetch(session, container, "/tmp/bd", max_bytes=6000)
    monkeypatch.setattr(files, "MAX_GET_ENTRIES", 4)
    with pytest.raises(PolicyError, match="over 4 entries"):
        fetch(session, container, "/tmp/deep")
    monkeypatch.setattr(files, "MAX_GET_ENTRIES", 100)
    monkeypatch.setattr(files, "MAX_GET_DEPTH", 3)
    with pytest.raises(PolicyError, match="deeper than 3 levels"):
        fetch(session, container, "/tmp/deep")
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
        fetch(session, container, "/tmp/nothing")
    with pytest.raises(NotFound, match="/tmp/nothing/file"):
        fetch(session, container, "/tmp/nothing/file")
    sh(session, container, "ln -s /nowhere /tmp/dangling")
    with pytest.raises(PolicyError, match="symbolic link"):
        fetch(session, container, "/tmp/dangling")


def open_descriptors() -> set[str]:
    """This process's open descriptors ("fd -> target"), but the cgroup files that the
    runtime's housekeeping opens and closes meanwhile for the next runs."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if not target.startswith("/sys/fs/cgroup/"):
                out.add(f"{fd} -> {target}")
    return out


def assert_tarfile_would_write(data: bytes) -> None:
    """Every header of the tar `data` is byte for byte what tarfile writes for its member in
    PAX format, and GNU tar lists the same names."""
    names = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            info = tarfile.TarInfo(m.name)
            info.type, info.mode, info.uid, info.gid = m.type, m.mode, m.uid, m.gid
            info.mtime, info.size, info.linkname = m.mtime, m.size, m.linkname
            assert data[m.offset:m.offset_data] == info.tobuf(
                tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), m.name
            names.append(m.name + ("/" if m.isdir() else ""))
    listed = subprocess.run(["tar", "--list", "--quoting-style=literal", "-f", "-"],
                            input=data, capture_output=True, check=True)
    # tarfile marks a name that is not UTF-8 with PAX's hdrcharset=BINARY, which GNU tar
    # does not know; it takes the name's bytes as they are all the same.
    assert set(listed.stderr.splitlines()) <= {
        b"tar: Ignoring unknown extended header keyword 'hdrcharset'"}
    assert listed.stdout.split(b"\n")[:-1] == [os.fsencode(n) for n in names]


@pytest.mark.parametrize(("name", "kind", "uid", "size", "mtime", "linkname"), [
    ("f", tarfile.REGTYPE, 0, 0, 0, ""),
    ("a/b.txt", tarfile.REGTYPE, 65534, 10240, 1_700_000_000, ""),
    ("n" * 100, tarfile.REGTYPE, 1000, 1, 1, ""),              # fills the name field
    ("n" * 101, tarfile.REGTYPE, 1000, 1, 1, ""),              # PAX path
    ("d" * 99, tarfile.DIRTYPE, 0, 0, 1, ""),                  # "/" makes it 100
    ("d" * 100, tarfile.DIRTYPE, 0, 0, 1, ""),                 # "/" makes it 101: PAX
    ("l", tarfile.SYMTYPE, 0, 0, 1, "t" * 100),
    ("l", tarfile.SYMTYPE, 0, 0, 1, "t" * 101),                # PAX linkpath
    ("h", tarfile.LNKTYPE, 0, 0, 1, "été"),                    # not ASCII: PAX
    ("été", tarfile.REGTYPE, 0, 3, 1, ""),
    ("\udcff", tarfile.REGTYPE, 0, 3, 1, ""),                  # not UTF-8
    ("u", tarfile.FIFOTYPE, 8 ** 7 - 1, 0, 1, ""),
    ("u", tarfile.REGTYPE, 8 ** 7, 0, 1, ""),                  # PAX uid
    ("s", tarfile.REGTYPE, 0, 8 ** 11 - 1, 8 ** 11 - 1, ""),
    ("s", tarfile.REGTYPE, 0, 8 ** 11, 8 ** 11, ""),           # PAX size, mtime
    ("m", tarfile.REGTYPE, 0, 0, -1, ""),                      # PAX mtime
])
def test_tar_headers_are_what_tarfile_writes(name: str, kind: bytes, uid: int, size: int,
                                             mtime: int, linkname: str) -> None:
    for mode in (0, 0o644, 0o4755, 0o7777):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = kind, mode, uid, uid + 1
        info.mtime, info.size, info.linkname = mtime, size, linkname
        assert files.tar_header(name, kind, mode, uid, uid + 1, mtime, size=size,
                                linkname=linkname) == info.tobuf(
            tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_long_and_foreign_names_are_copied_out(session: Session,
                                               container: Container) -> None:
    """Names over ustar's 100 bytes (PAX headers), not ASCII, or not UTF-8, and long link
    targets, among ordinary ones: tarfile and GNU tar read them all back."""
    long, d99 = "L" * 150, "d" * 99
    sh(session, container, f"""
        set -e
        mkdir -p /tmp/n/{long} /tmp/n/{d99}
        echo a > /tmp/n/{long}/{long}
        echo b > /tmp/n/{d99}/x
        echo c > /tmp/n/{"e" * 98}
        printf d > "$(printf '/tmp/n/\\303\\251t\\303\\251')"
        printf e > "$(printf '/tmp/n/\\377\\376')"
        ln -s /{"t" * 120} /tmp/n/link
        for i in $(seq 100 160); do echo $i > /tmp/n/f$i; done
    """)
    _, data, _ = fetch(session, container, "/tmp/n")
    members = _members(data)
    assert members[f"n/{long}/{long}"][1] == b"a\n"
    assert members[f"n/{d99}"][0].isdir() and members[f"n/{d99}/x"][1] == b"b\n"
    assert members[f"n/{'e' * 98}"][1] == b"c\n"
    assert members["n/été"][1] == b"d"
    assert members["n/\udcff\udcfe"][1] == b"e"
    assert members["n/link"][0].linkname == "/" + "t" * 120
    assert [members[f"n/f{i}"][1] for i in range(100, 161)] == [
        b"%d\n" % i for i in range(100, 161)]
    assert len(members) == 2 + 2 + 4 + 61 + 1   # and the directory itself
    assert_tarfile_would_write(data)


def test_a_copy_out_cut_short_leaves_no_descriptor_open(session: Session,
                                                        container: Container) -> None:
    """The walk asks init for the next entries before it has written the first: a reader
    that stops early (or an error) leaves none of their descriptors open, those that came
    and those still to come."""
    sh(session, container, "mkdir -p /tmp/w/sub && for i in $(seq 100 199); do "
       "echo $i > /tmp/w/f$i; echo $i > /tmp/w/sub/g$i; done")
    before = open_descriptors()

    async def read_some(n: int) -> None:
        async with get_path(container, "/tmp/w") as got:
            async for _ in got.chunks:
                n -= 1
                if n == 0:
                    break
        # Init answers in order: once this one is back, so are all the walk's.
        os.close(await container.open_path("/tmp", os.O_RDONLY | os.O_DIRECTORY))

    for n in (1, 2, 3, 50, 101, 103, 150):
        session.run(read_some(n))
        assert open_descriptors() == before, n
    with pytest.raises(PolicyError, match="over the 8000 byte limit"):
        fetch(session, container, "/tmp/w", max_bytes=8000)
    session.run(read_some(1))
    assert open_descriptors() == before
