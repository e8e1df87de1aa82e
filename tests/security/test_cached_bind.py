"""Cached files bound into runs (Container.send_bind, native/scratch.c): what a run can do to
a bound file and through it. A run cannot write its file (nor chmod, move, unlink, link it),
cannot remount or unmount it, not even as container root with the build policy's
capabilities (build steps never take cached files, but their capabilities are the most a
run holds); cannot reach the blob directory or any other blob; a symbolic link planted at or
above the target is refused, never followed; a reset takes every bind away; and another
tenant's runs never see a tenant's file. Each test was first seen failing on a deliberately
broken variant (notes in /work/notes/bind.md)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.engine import CachedFile, FileSpec, PoolConfig, runfiles
from sandbox.engine.filecache import FileCache
from sandbox.errors import NotFound, PolicyError, SandboxError
from sandbox.runtime import files
from sandbox.runtime.container import CachedBind, Container
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import RunResult
from sandbox.tenants import Tenant
from testbed import busybox
from tests.conftest import Session
from tests.integration.test_engine import Running, sh

pytestmark = pytest.mark.timeout(180)

MINE = b"#!/bin/sh\necho mine\n"
OTHER = b"another tenant's secret 7f3a9c\n"


def _name(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A blob directory as the file cache keeps it: 0711, blobs 0444 (0555 executable)."""
    d = tmp_path_factory.mktemp("blobs")
    d.chmod(0o711)
    for data in (MINE, OTHER):
        (d / _name(data)).write_bytes(data)
        (d / _name(data)).chmod(0o444)
    (d / (_name(MINE) + ".x")).write_bytes(MINE)
    (d / (_name(MINE) + ".x")).chmod(0o555)
    return d


@pytest.fixture(scope="module")
def root(session: Session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    m = session.runtime.mapping
    return busybox.build_rootfs(tmp_path_factory.mktemp("bind") / "rootfs",
                                owner=(m.root_uid, m.root_gid))


@pytest.fixture
def make(session: Session, root: Path, blobs: Path) -> Iterator[Any]:
    """Containers whose init holds `blobs` (as the engine's have the file cache's)."""
    made: list[Container] = []

    def container(profile: str) -> Container:
        before, session.runtime.files = session.runtime.files, str(blobs)
        try:
            c = session.container(root, profile=profile)
        finally:
            session.runtime.files = before
        made.append(c)
        return c

    yield container
    for c in made:
        session.run(c.destroy())


def bind(session: Session, c: Container, *binds: CachedBind, uid: int | None = None) -> None:
    async def go() -> None:
        await files.bind_files(c, binds, uid=uid, gid=uid)()
    session.run(go())


def run(session: Session, c: Container, script: str, *, uid: int | None = None,
        reset_after: bool = False) -> RunResult:
    return session.run(c.exec(ExecRequest(argv=["/bin/sh", "-c", script],
                                          env={"PATH": "/bin"}, uid=uid, gid=uid),
                              reset_after=reset_after))


ATTEMPTS = {
    "write": "echo x > /tmp/d/prog",
    "append": "echo x >> /tmp/d/prog",
    "truncate": "truncate -s 0 /tmp/d/prog",
    "chmod": "chmod 777 /tmp/d/prog",
    "chown": "chown 0:0 /tmp/d/prog",
    "touch": "touch /tmp/d/prog",
    "unlink": "rm -f /tmp/d/prog",
    "rename": "mv /tmp/d/prog /tmp/d/moved",
    "hard link": "ln /tmp/d/prog /tmp/d/link",
    "remount rw": "mount -o remount,rw /tmp/d/prog",
    "bind over": "mount --bind /tmp/d /tmp/d/prog",
    "unmount": "umount /tmp/d/prog",
    "lazy unmount": "umount -l /tmp/d/prog",
    "unmount the tmpfs": "umount -l /tmp",
}


@pytest.mark.parametrize(("profile", "uid"), [("judge", None), ("default", None),
                                              ("build", 0)])
def test_a_run_cannot_change_remount_or_unmount_its_bound_file(
        session: Session, make: Any, blobs: Path, profile: str, uid: int | None) -> None:
    c = make(profile)
    bind(session, c, CachedBind("/tmp/d/prog", _name(MINE) + ".x", True), uid=uid)
    for what, attempt in ATTEMPTS.items():
        r = run(session, c, f"{attempt} 2>/dev/null; /tmp/d/prog", uid=uid)
        assert r.stdout == b"mine\n", (what, r.stdout, r.stderr)
    r = run(session, c, "cat /tmp/d/prog; ls /tmp/d; grep -c ' /tmp/d/prog ' "
            "/proc/self/mountinfo", uid=uid)
    assert r.stdout == MINE + b"prog\n1\n", (r.stdout, r.stderr)
    assert (blobs / (_name(MINE) + ".x")).read_bytes() == MINE
    assert (blobs / _name(MINE)).read_bytes() == MINE


@pytest.mark.parametrize("profile", ["judge", "default"])
def test_no_other_blob_and_not_the_blob_directory_is_in_a_runs_reach(
        session: Session, make: Any, profile: str) -> None:
    c = make(profile)
    bind(session, c, CachedBind("/tmp/mine", _name(MINE), False))
    r = run(session, c, f"""
        for d in /*; do case $d in /proc|/sys|/dev) ;; *) grep -rlsF 7f3a9c $d;; esac; done
        for p in /files /files/{_name(OTHER)} /proc/1/root/files/{_name(OTHER)} \
                 /proc/1/cwd/files /proc/self/root/../files; do
            cat $p >/dev/null 2>&1 && echo "reached $p"; ls $p >/dev/null 2>&1 && echo "listed $p"
        done
        cut -d' ' -f5 /proc/self/mountinfo | grep -c '^/files'
        cat /tmp/mine
        """)
    assert r.stdout == b"0\n" + MINE, (r.stdout, r.stderr)


@pytest.mark.parametrize("profile", ["judge", "default"])
def test_a_planted_symlink_is_refused_never_followed(session: Session, make: Any,
                                                     profile: str) -> None:
    c = make(profile)  # no reset between these runs: a session's container
    run(session, c, "ln -s /etc/passwd /tmp/x; ln -s /etc /tmp/d; ln -s /etc/passwd /tmp/rel")
    with pytest.raises(PolicyError, match=r"^/tmp/x is a symbolic link \(-> '/etc/passwd'\)"):
        bind(session, c, CachedBind("/tmp/x", _name(MINE), False))
    with pytest.raises(PolicyError, match=r"^/tmp/d/passwd passes through the symbolic link "
                       r"/tmp/d \(-> '/etc'\)"):
        bind(session, c, CachedBind("/tmp/d/passwd", _name(MINE), False))
    with pytest.raises(PolicyError, match=r"^/tmp/d/new passes through the symbolic link"):
        bind(session, c, CachedBind("/tmp/d/new", _name(MINE), False))
    r = run(session, c, "cat /etc/passwd; ls /etc; cut -d' ' -f5 /proc/self/mountinfo "
            "| grep -c ^/etc")
    assert r.stdout.startswith(busybox.PASSWD.encode()), r.stdout
    assert b"new" not in r.stdout and r.stdout.endswith(b"\n0\n"), r.stdout


@pytest.mark.parametrize("profile", ["judge", "default"])
def test_a_reset_takes_every_bind_away(session: Session, make: Any, profile: str) -> None:
    c = make(profile)
    bind(session, c, CachedBind("/etc/hostname", _name(MINE), False),
         CachedBind("/tmp/a/b/prog", _name(MINE) + ".x", True))
    # The run moves a bind's mount point elsewhere (a directory above it renamed).
    r = run(session, c, "cat /etc/hostname; mv /tmp/a /tmp/z; /tmp/z/b/prog",
            reset_after=True)
    assert r.stdout == MINE + b"mine\n", (r.stdout, r.stderr)
    for _ in range(3):
        r = run(session, c, "cat /etc/hostname; ls -A /tmp; cut -d' ' -f5 /proc/self/mountinfo"
                " | grep -cE '^/etc/hostname|^/tmp/'", reset_after=True)
        assert r.stdout == b"sandbox\n0\n", (r.stdout, r.stderr)


T_A, T_B = Tenant("tenant-a"), Tenant("tenant-b")


@pytest.fixture(scope="module")
def eng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    r = Running(tmp_path_factory.mktemp("tenants") / "state",
                pools=PoolConfig(min_idle=1, max_idle=2))
    yield r
    r.close()


def test_another_tenant_never_sees_a_tenants_file(eng: Running, images: Any) -> None:
    e = eng.engine
    mine: CachedFile = eng.run(e.files.put_bytes(T_A, OTHER))
    for policy in ("judge", "default"):
        out = eng.run(e.run(images.oci, sh("cat /tmp/f", files=(
            FileSpec("/tmp/f", cached=e.files.get(T_A, mine.id)),)), policy=policy,
            tenant=T_A))
        assert out.result.stdout == OTHER
        with pytest.raises(NotFound):
            e.files.get(T_B, mine.id)
        for _ in range(3):
            out = eng.run(e.run(images.oci, sh(
                "cat /tmp/f 2>/dev/null; for d in /*; do case $d in /proc|/sys|/dev) ;; *) "
                "grep -rlsF 7f3a9c $d;; esac; done; "
                "cut -d' ' -f5 /proc/self/mountinfo | grep -c '^/tmp/f'"),
                policy=policy, tenant=T_B))
            assert out.result.stdout == b"0\n", out.result
            eng.settle()
    assert os.listdir(e.files.blob_dir) == [mine.id.removeprefix("sha256:")]


@pytest.fixture
def cached(session: Session, root: Path, tmp_path: Path) -> Iterator[Any]:
    """A file cache of its own holding MINE, a container whose init holds its blobs, and
    what places MINE (executable) into it at /tmp/prog as a run's cached file."""
    cache = FileCache(tmp_path / "files")
    got = session.run(cache.put_bytes(T_A, MINE))
    spec = FileSpec("/tmp/prog", mode=0o755, cached=cache.get(T_A, got.id))
    before, session.runtime.files = session.runtime.files, str(cache.blob_dir)
    try:
        c = session.container(root, profile="judge")
    finally:
        session.runtime.files = before

    def place() -> None:
        async def go() -> None:
            await runfiles.place(c, [spec], cache, uid=None, gid=None)
        session.run(go())

    place()  # bound, its executable variant made on the way
    yield cache, place
    cache.blob_dir.chmod(0o711)
    session.run(c.destroy())
    cache.close()


def test_a_blob_gone_from_the_cache_is_the_clients_not_found(cached: Any) -> None:
    """A blob deleted (or expired) since its entry was looked up: NotFound, "store it
    first"."""
    cache, place = cached
    for blob in cache.blob_dir.iterdir():
        blob.unlink()
    with pytest.raises(NotFound, match=r"^no file sha256:[0-9a-f]{64}: store it first"):
        place()


@pytest.mark.skipif(os.geteuid() != 0, reason="the blob directory is the unprivileged "
                    "service's own id, which container root is: no mode keeps init out")
def test_a_blob_init_cannot_take_otherwise_is_the_runtimes_error(cached: Any) -> None:
    """Any other reason init could not take a blob (here a blob directory it may not
    search) is the runtime's, told with init's reason, never blamed on the client's file."""
    cache, place = cached
    cache.blob_dir.chmod(0o700)
    with pytest.raises(SandboxError, match=r"^cannot bind cached file sha256:[0-9a-f]{64} "
                       r"at /tmp/prog: \[Errno 13\] open_tree\('.*'\): Permission denied") as e:
        place()
    assert not isinstance(e.value, NotFound)
