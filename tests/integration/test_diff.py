"""A container's changes as an OCI layer (sandbox/runtime/diff.py), from real containers:
what runs as container root and as other container users change, delete and replace in
the image, read back with tarfile and unpacked over the image by umoci.

Runs have no capabilities, container root's neither (a run cannot chown a file to another
user): files of other users are made by runs under their ids, or by put_file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.errors import Busy, PolicyError
from sandbox.runtime import files
from sandbox.runtime.container import Container
from sandbox.runtime.diff import layer_tar
from sandbox.runtime.files import put_file
from sandbox.runtime.profiles import Limits
from sandbox.runtime.requests import ExecRequest
from testbed import busybox
from tests.conftest import Session
from tests.integration.test_files import assert_tarfile_would_write, open_descriptors
from tests.support.images import Tools

pytestmark = pytest.mark.timeout(180)

EMPTY_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)


def build_image(dest: Path, owner: tuple[int, int] | None = None) -> Path:
    """busybox, and a directory every user may replace (/work is 0777): /work/keep."""
    busybox.build_rootfs(dest, owner=owner)
    keep = dest / "work/keep"
    keep.mkdir()
    keep.chmod(0o777)
    (keep / "old").write_text("image\n")
    if owner is not None:
        for path in (keep, keep / "old"):
            os.lchown(path, *owner)
    return dest


@pytest.fixture(scope="module")
def image_root(session: Session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    m = session.runtime.mapping
    return build_image(tmp_path_factory.mktemp("diff") / "rootfs", (m.root_uid, m.root_gid))


@pytest.fixture
def container(session: Session, image_root: Path) -> Iterator[Container]:
    c = session.container(image_root)
    yield c
    session.run(c.destroy())


def sh(session: Session, c: Container, script: str, *, uid: int = 0) -> str:
    """`script` as container root (or `uid`), which may change the image's files."""
    r = session.run(c.exec(ExecRequest(argv=["/bin/sh", "-c", script], env={"PATH": "/bin"},
                                       uid=uid, gid=uid)))
    assert r.exit_code == 0, (script, r.stderr)
    return r.stdout.decode()


async def _read(container: Container, **kw: int) -> bytes:
    async with contextlib.aclosing(layer_tar(container, **kw)) as chunks:
        return b"".join([chunk async for chunk in chunks])


def layer(session: Session, container: Container, **kw: int) -> bytes:
    return session.run(_read(container, **kw))


def members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Every member in order, with a regular file's content."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        out = []
        for m in tar.getmembers():
            f = tar.extractfile(m) if m.isreg() else None
            out.append((m, f.read() if f is not None else None))
        return out


def by_name(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    return {m.name: (m, content) for m, content in members(data)}


def test_changes_become_a_layer(session: Session, container: Container) -> None:
    sh(session, container, """
        set -e
        echo new > /etc/new.txt
        echo changed > /etc/hostname
        rm /etc/group
        rm -r /var/tmp
        rm -r /usr
        mkdir -p /usr/local
        echo again > /usr/local/f
        chmod 640 /etc/passwd
        mkdir /data
        chmod 1777 /data
        mkdir /data/shared
        chmod 2775 /data/shared
        printf '#!/bin/sh\\n' > /data/tool
        chmod 4755 /data/tool
        ln -s ../etc/passwd /data/pw
        ln -s /etc /data/etc-link
        echo same > /data/a
        ln /data/a /data/b
        mkfifo /data/fifo
        mkdir -p /data/n1/n2/n3
        echo deep > /data/n1/n2/n3/f
        printf x > "$(printf '/data/\\377')"
        echo scratch > /tmp/not-in-the-layer
    """)
    # Another owner, given by the host (no run may chown).
    session.run(put_file(container, "/etc/shadow", b"root:*:1::::::\n", 0o640, uid=1000,
                         gid=1001))
    data = layer(session, container)
    got = members(data)
    names = [m.name for m, _ in got]
    assert names == [
        "data", "data/a", "data/b", "data/etc-link", "data/fifo", "data/n1", "data/n1/n2",
        "data/n1/n2/n3", "data/n1/n2/n3/f", "data/pw", "data/shared", "data/tool",
        "data/\udcff",
        "etc", "etc/.wh.group", "etc/new.txt", "etc/passwd", "etc/shadow",
        "usr", "usr/.wh..wh..opq", "usr/local", "usr/local/f", "var", "var/.wh.tmp"], names
    # Every header is POSIX (PAX), names relative: no "/" or "./" (tarfile shows a
    # directory's name without the "/" it was written with).
    assert all(data[off + 257:off + 265] == b"ustar\x0000" for off in _header_offsets(data))
    assert not any(n.startswith(("/", "./")) for n in names)
    assert data.endswith(EMPTY_ARCHIVE)
    m = by_name(data)
    assert m["etc/new.txt"][1] == b"new\n"
    assert "etc/hostname" not in m   # the runtime's own file: a run's change is not the image's
    assert m["usr/local/f"][1] == b"again\n"
    for marker in ("etc/.wh.group", "var/.wh.tmp", "usr/.wh..wh..opq"):
        assert m[marker][0].isreg() and m[marker][0].size == 0 and m[marker][1] == b""
    passwd, shadow = m["etc/passwd"][0], m["etc/shadow"][0]
    assert (passwd.uid, passwd.gid, passwd.mode) == (0, 0, 0o640)
    assert m["etc/passwd"][1] == busybox.PASSWD.encode()
    assert (shadow.uid, shadow.gid, shadow.mode) == (1000, 1001, 0o640)
    assert m["etc/shadow"][1] == b"root:*:1::::::\n"
    assert m["data"][0].isdir() and m["data"][0].mode == 0o1777
    assert m["data/shared"][0].mode == 0o2775
    assert m["data/tool"][0].mode == 0o4755 and m["data/tool"][1] == b"#!/bin/sh\n"
    assert m["data/pw"][0].issym() and m["data/pw"][0].linkname == "../etc/passwd"
    assert m["data/etc-link"][0].issym() and m["data/etc-link"][0].linkname == "/etc"
    # A hard link pair: the content once, the second name a link to the first.
    assert m["data/a"][0].isreg() and m["data/a"][1] == b"same\n"
    assert m["data/b"][0].islnk() and m["data/b"][0].linkname == "data/a"
    assert m["data/fifo"][0].isfifo()
    assert m["data/n1/n2/n3/f"][1] == b"deep\n"
    assert m["data/\udcff"][1] == b"x"   # a name that is not UTF-8 comes through as is
    for name in ("etc/new.txt", "data/n1/n2/n3", "data/fifo", "data/pw"):
        assert (m[name][0].uid, m[name][0].gid) == (0, 0), name
    assert_tarfile_would_write(data)
    # The same changes give the same tar.
    assert layer(session, container) == data


def _header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar.getmembers()]


def test_other_users_files_are_read_through_init(session: Session,
                                                  container: Container) -> None:
    """A run of uid 1000 keeps its files to itself (0600 in 0700 directories, an opaque
    one among them, hard links): the service, which may not read them nor their xattrs
    with its own ids, gets them whole."""
    sh(session, container, """
        set -e
        umask 077
        rm -r /work/keep
        mkdir /work/keep
        mkdir -p /work/keep/u/deep
        echo secret > /work/keep/u/deep/s
        ln /work/keep/u/deep/s /work/keep/u/s2
        echo mine > /work/keep/m
    """, uid=1000)
    m = by_name(layer(session, container))
    assert sorted(m) == ["work", "work/keep", "work/keep/.wh..wh..opq", "work/keep/m",
                         "work/keep/u", "work/keep/u/deep", "work/keep/u/deep/s",
                         "work/keep/u/s2"]
    assert m["work/keep/u/deep/s"][1] == b"secret\n" and m["work/keep/m"][1] == b"mine\n"
    assert m["work/keep/u/s2"][0].linkname == "work/keep/u/deep/s"
    for name in ("work/keep", "work/keep/u", "work/keep/u/deep"):
        assert (m[name][0].uid, m[name][0].gid, m[name][0].mode) == (1000, 1000, 0o700)
    for name in ("work/keep/m", "work/keep/u/deep/s"):
        assert (m[name][0].uid, m[name][0].mode) == (1000, 0o600)
    assert (m["work"][0].uid, m["work"][0].mode) == (0, 0o777)   # the image's, copied up


def test_a_read_only_root_changed_nothing(session: Session,
                                          judge_container: Container) -> None:
    sh(session, judge_container, "echo x > /tmp/x")
    assert layer(session, judge_container) == EMPTY_ARCHIVE


def test_an_unchanged_root_is_an_empty_layer(session: Session, container: Container) -> None:
    sh(session, container, "cat /etc/passwd > /dev/null; echo x > /tmp/x")
    assert layer(session, container) == EMPTY_ARCHIVE


def test_a_reset_gives_an_empty_layer_again(session: Session, container: Container) -> None:
    """And the same changes after it the same entries: overlayfs makes a whiteout as
    whoever mounted the overlay, which is init under its own id once a reset made it."""
    def change() -> dict[str, tuple[int, int, int]]:
        sh(session, container, "rm /etc/group")
        return {m.name: (m.uid, m.gid, m.mode) for m, _ in members(layer(session, container))}
    before = change()
    session.run(container.reset())
    assert layer(session, container) == EMPTY_ARCHIVE
    assert change() == before == {"etc": (0, 0, 0o755), "etc/.wh.group": (0, 0, 0)}


def test_a_reset_during_the_walk_is_busy(session: Session, container: Container) -> None:
    """The walk reads the root's upper directory as it was when it began; a reset in
    between turns to a new one, and the layer would lack what is below: refused."""
    sh(session, container, "mkdir -p /data/a /data/b && echo 1 > /data/a/f && echo 2 > "
       "/data/b/f")

    async def go() -> None:
        async with contextlib.aclosing(layer_tar(container)) as chunks:
            first = await anext(chunks)
            assert first.startswith(b"data/")
            await container.reset()
            async for _ in chunks:
                pass
    with pytest.raises(Busy, match=r"was reset while its changes were read; commit it "
                       "again"):
        session.run(go())


def test_the_upper_layer_is_only_read(session: Session, container: Container,
                                      judge_container: Container) -> None:
    """Overlayfs's layers must not change under it: init opens the upper directory for
    reading only. A read-only root has none."""
    sh(session, container, "echo x > /etc/x")
    for flags, kw in ((os.O_WRONLY, {}), (os.O_RDWR, {}), (os.O_RDONLY | os.O_TRUNC, {}),
                      (os.O_WRONLY | os.O_CREAT, {}), (os.O_RDONLY | os.O_APPEND, {}),
                      (os.O_RDONLY, {"owner": (0, 0)})):
        for path in ("/etc/x", "/etc/new"):
            with pytest.raises(OSError) as e:
                session.run(container.open_path(path, flags, base="upper", **kw))
            assert e.value.errno == errno.EPERM, (path, flags)
            assert "opened for reading only" in e.value.strerror
    assert sh(session, container, "cat /etc/x; ls /etc/new 2>&1 || true") == (
        "x\nls: /etc/new: No such file or directory\n")
    with pytest.raises(OSError) as e:
        session.run(judge_container.open_path("/", os.O_RDONLY, base="upper"))
    assert e.value.errno == errno.EROFS and "it has no upper layer" in e.value.strerror


def test_links_are_stored_as_links_never_followed(session: Session,
                                                  container: Container) -> None:
    """Directories of the image replaced by links to elsewhere (the image's /etc, the
    root, a directory outside the upper layer's tree) come out as links; nothing the
    links lead to is read."""
    sh(session, container, "rm -r /work && ln -s /etc /work && rm -r /root && ln -s / /root "
       "&& mkdir /data && ln -s /proc/1 /data/init && ln -s /data /data/self")
    m = by_name(layer(session, container))
    assert sorted(m) == ["data", "data/init", "data/self", "root", "work"]
    assert [(m[n][0].type, m[n][0].linkname) for n in ("work", "root", "data/init",
                                                      "data/self")] == [
        (tarfile.SYMTYPE, "/etc"), (tarfile.SYMTYPE, "/"), (tarfile.SYMTYPE, "/proc/1"),
        (tarfile.SYMTYPE, "/data")]


def test_a_directory_swapped_during_the_walk_is_never_followed(
        session: Session, container: Container) -> None:
    """A run swaps a directory of its changes for links (to its other changes, to the
    image's /etc, to the root) and back as fast as it can while the host reads its
    layer again and again: nothing from where the links lead appears below the
    directory's name."""
    sh(session, container, "mkdir -p /data/d/sub /data/other && for i in $(seq 10 40); do "
       "echo inside > /data/d/sub/f$i; echo OUTSIDE > /data/other/g$i; done && "
       "echo changed > /etc/hostname")
    race = ("cd /data/d; while [ ! -e /tmp/stop ]; do mv sub hold; ln -s /data/other sub; "
            "rm sub; ln -s /etc sub; rm sub; ln -s / sub; rm sub; mv hold sub; done")

    async def go() -> set[str]:
        run = asyncio.ensure_future(container.exec(ExecRequest(
            argv=["/bin/sh", "-c", race], env={"PATH": "/bin"}, uid=0, gid=0,
            limits=Limits(wall_ms=100_000))))
        seen: set[str] = set()
        walks = 0
        try:
            while walks < 100 or not {"full", "link"} <= seen:
                for m, content in members(await _read(container)):
                    if m.name == "data/d/sub":
                        seen.add("link" if m.issym() else "full")
                    elif m.name.startswith("data/d/sub/"):
                        assert m.name[len("data/d/sub/"):].startswith("f"), m.name
                        assert content == b"inside\n", (m.name, content)
                walks += 1
                if walks > 3000:
                    break
        finally:
            await put_file(container, "/tmp/stop", b"")
            result = await run
        assert result.exit_code == 0, result
        return seen
    seen = session.run(go())
    assert {"full", "link"} <= seen, seen  # the race really ran


def test_long_and_foreign_names_in_a_layer(session: Session, container: Container) -> None:
    """Names over ustar's 100 bytes (PAX headers), not ASCII, or not UTF-8, long link
    targets and a hard link to a long name, in a directory of the image and a new one."""
    long = "L" * 150
    sh(session, container, f"""
        set -e
        mkdir -p /data/{long} /data/{"d" * 94}
        echo a > /data/{long}/{long}
        ln /data/{long}/{long} /data/hard
        echo b > /data/{"d" * 94}/x
        echo c > /data/{"e" * 95}
        printf d > "$(printf '/etc/\\303\\251t\\303\\251')"
        printf e > "$(printf '/etc/\\377\\376')"
        ln -s /{"t" * 120} /data/link
    """)
    data = layer(session, container)
    m = by_name(data)
    assert sorted(m) == sorted([
        "data", f"data/{long}", f"data/{long}/{long}", f"data/{'d' * 94}",
        f"data/{'d' * 94}/x", f"data/{'e' * 95}", "data/hard", "data/link", "etc",
        "etc/\udcff\udcfe", "etc/été"])
    assert m[f"data/{long}/{long}"][1] == b"a\n"
    assert m["data/hard"][0].islnk() and m["data/hard"][0].linkname == f"data/{long}/{long}"
    assert m[f"data/{'d' * 94}/x"][1] == b"b\n" and m[f"data/{'e' * 95}"][1] == b"c\n"
    assert m["etc/été"][1] == b"d" and m["etc/\udcff\udcfe"][1] == b"e"
    assert m["data/link"][0].linkname == "/" + "t" * 120
    assert_tarfile_would_write(data)


def test_an_entry_gone_after_the_listing_is_left_out(session: Session,
                                                     container: Container) -> None:
    """The walk asks init for a directory's next entries ahead of writing them: what a
    run removes meanwhile is left out if it was not open yet (whole if it was), and the
    rest comes out whole."""
    sh(session, container, "mkdir -p /data/sub && for i in $(seq 100 199); do "
       "echo $i > /data/f$i; done && echo s > /data/sub/s")

    async def go() -> list[tuple[tarfile.TarInfo, bytes | None]]:
        async with contextlib.aclosing(layer_tar(container)) as chunks:
            got = [await anext(chunks), await anext(chunks)]
            assert got[0].startswith(b"data/\0") and got[1].startswith(b"data/f100\0")
            # Removed while the walk is in /data, with some of its entries asked for.
            r = await container.exec(ExecRequest(
                argv=["/bin/sh", "-c", "rm /data/f101 /data/f150 /data/f199 && rm -r "
                      "/data/sub"], env={"PATH": "/bin"}, uid=0, gid=0))
            assert r.exit_code == 0, r.stderr
            got += [chunk async for chunk in chunks]
        return members(b"".join(got))
    got = session.run(go())
    names = [m.name for m, _ in got]
    assert {"data/f150", "data/f199", "data/sub", "data/sub/s"}.isdisjoint(names)
    expected = [f"data/f{i}" for i in range(100, 199) if i not in (101, 150)]
    assert [n for n in names if n != "data/f101"] == ["data", *expected]
    for m, content in got[1:]:
        assert content == m.name[len("data/f"):].encode() + b"\n", m.name


def test_a_walk_cancelled_or_failing_leaves_no_descriptor_open(
        session: Session, container: Container) -> None:
    """However a walk ends, the descriptors of the entries it asked init for (come or
    still to come) are closed, and none is left in use by a worker thread (/data is big
    enough to be listed in one, /data/sub is listed on the event loop)."""
    sh(session, container, "mkdir -p /data/sub && for i in $(seq 100 599); do "
       "echo $i > /data/f$i; done && for i in $(seq 100 199); do echo $i > /data/sub/g$i; "
       "done")
    before = open_descriptors()

    async def settle() -> None:
        # Init answers in order: once this one is back, so are all the walk's.
        os.close(await container.open_path("/", os.O_RDONLY | os.O_DIRECTORY))

    async def cancel_after(n: int) -> None:
        """Cancelled at the walk's first wait after `n` chunks (for an answer, mostly)."""
        async def read() -> None:
            left = n
            async with contextlib.aclosing(layer_tar(container)) as chunks:
                async for _ in chunks:
                    left -= 1
                    if left == 0:
                        asyncio.get_running_loop().call_soon(task.cancel)
        task = asyncio.ensure_future(read())
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await settle()

    for n in (1, 1, 1, 1, 1, 2, 3, 10, 33, 60, 400, 500, 501, 502, 503, 550, 600):
        session.run(cancel_after(n))
        assert open_descriptors() == before, n
    with pytest.raises(PolicyError, match="over the 20000 byte limit"):
        layer(session, container, max_bytes=20000)
    session.run(settle())
    assert open_descriptors() == before


def test_a_name_a_layer_cannot_hold_is_refused(session: Session,
                                               container: Container) -> None:
    sh(session, container, "mkdir /data && touch /data/.wh.passwd")
    with pytest.raises(PolicyError, match=r"^/data/.wh.passwd: a layer cannot hold a name "
                       "that begins with .wh."):
        layer(session, container)


def test_sizes_over_the_caps_are_refused(session: Session, container: Container,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sh(session, container, "mkdir -p /data/a/b/c/d && head -c 8192 /dev/zero > /data/big")
    with pytest.raises(PolicyError, match="over 4 entries, the limit for a layer"):
        layer(session, container, max_entries=4)
    with pytest.raises(PolicyError, match="over the 6000 byte limit for a layer"):
        layer(session, container, max_bytes=6000)
    monkeypatch.setattr(files, "MAX_GET_DEPTH", 3)
    with pytest.raises(PolicyError, match="deeper than 3 directories"):
        layer(session, container)


def _tree(root: Path) -> dict[str, str]:
    """path -> "mode uid gid what" (what: a symlink's target, a file's md5), below `root`,
    as _TREE prints it inside a container."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(dirpath, name)
            st = path.lstat()
            if path.is_symlink():
                what = os.readlink(path)
            elif path.is_file():
                what = hashlib.md5(path.read_bytes()).hexdigest()
            else:
                what = ""
            out[f"./{path.relative_to(root)}"] = f"{st.st_mode:x} {st.st_uid} {st.st_gid} {what}"
    return out


# Everything of the root filesystem (not its mounts) as _tree shows it.
_TREE = r"""
cd / && find . -xdev ! -path . ! -path ./proc ! -path ./dev ! -path ./tmp ! -path ./sys |
while read -r p; do
    if [ -L "$p" ]; then what=$(readlink "$p")
    elif [ -f "$p" ]; then what=$(md5sum < "$p" | cut -d' ' -f1)
    else what=
    fi
    echo "$p $(stat -c '%f %u %g' "$p") $what"
done
"""


def test_umoci_unpacks_the_layer_to_what_the_container_saw(
        session: Session, container: Container, tmp_path: Path) -> None:
    """An OCI layout whose base layer is the container's image (umoci made it from the
    same files) and whose top layer is the container's changes: umoci unpacks it to the
    tree the container sees, owners included where it may set them (as root), but for the
    runtime's own files: what a run did to them is not the image's."""
    sh(session, container, """
        set -e
        echo new > /etc/new.txt
        echo changed >> /etc/passwd
        echo changed > /etc/hostname
        echo 198.51.100.1 elsewhere >> /etc/hosts
        rm /etc/group /bin/vi
        rm -r /usr
        mkdir -p /usr/local
        echo again > /usr/local/f
        chmod 640 /etc/passwd
        mkdir /data
        chmod 1777 /data
        printf x > /data/tool
        chmod 4755 /data/tool
        ln -s ../etc/passwd /data/pw
        echo same > /data/a
        ln /data/a /data/b
        mkfifo /data/fifo
        mkdir -p /data/n1/n2
        echo deep > /data/n1/n2/f
        rm -r /root
        ln -s /etc /root
    """)
    long = "L" * 150   # names and a link target over ustar's 100 bytes: PAX headers
    sh(session, container, f"""
        set -e
        mkdir -p /data/{long}
        echo long > /data/{long}/{long}
        ln -s /data/{long} /data/{long}/up
        printf u > "$(printf '/data/\\303\\251t\\303\\251')"
    """)
    # Readable by the run that lists them (test_other_users_files_are_read_through_init
    # has the unreadable ones).
    sh(session, container, """
        set -e
        rm -r /work/keep
        mkdir -p /work/keep/u
        echo secret > /work/keep/u/s
    """, uid=1000)
    session.run(put_file(container, "/etc/shadow", b"x\n", 0o644, uid=1000, gid=1001))
    seen = {}
    for line in sh(session, container, _TREE).splitlines():
        path, mode, uid, gid, *what = line.split(" ")
        seen[path] = f"{mode} {uid} {gid} {' '.join(what)}"
    layer_file = tmp_path / "layer.tar"
    layer_file.write_bytes(layer(session, container))

    tools = Tools(tmp_path / "tools")
    oci = tmp_path / "oci"
    tools.run("umoci", "init", "--layout", str(oci))
    tools.run("umoci", "new", "--image", f"{oci}:base")
    bundle = tmp_path / "bundle"
    tools.run("umoci", "unpack", *tools.rootless, "--image", f"{oci}:base", str(bundle))
    build_image(bundle / "rootfs")
    tools.run("umoci", "repack", "--image", f"{oci}:base", str(bundle))
    shutil.rmtree(bundle)
    tools.run("umoci", "raw", "add-layer", "--image", f"{oci}:base", "--tag", "committed",
              str(layer_file))
    tools.run("umoci", "unpack", *tools.rootless, "--image", f"{oci}:committed",
              str(bundle))
    rootfs = bundle / "rootfs"
    unpacked = {path: entry for path, entry in _tree(rootfs).items()
                if path not in ("./proc", "./dev", "./tmp", "./sys")}
    if tools.rootless:  # umoci without root owns everything itself: compare the rest
        def strip(entry: str) -> str:
            mode, _uid, _gid, what = entry.split(" ", 3)
            return f"{mode} {what}"
        seen = {p: strip(e) for p, e in seen.items()}
        unpacked = {p: strip(e) for p, e in unpacked.items()}
    provided = ("./etc/hosts", "./etc/hostname")
    assert "./etc/hosts" in seen             # the container saw its own
    assert "./etc/hosts" not in unpacked    # neither the image nor the layer has one
    assert (rootfs / "etc/hostname").read_text() == "sandbox\n"   # the image's, unchanged
    assert {p: e for p, e in unpacked.items() if p not in provided} == \
        {p: e for p, e in seen.items() if p not in provided}
    assert (rootfs / "data/a").stat().st_ino == (rootfs / "data/b").stat().st_ino
