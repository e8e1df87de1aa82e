"""Cached files bound into runs (issue #13 point 1's goal): a run's file of the file cache is
a read-only bind of its blob, not a copy, under both policies' roots (judge: read-only,
default: writable), readable, executable when its mode says so, and in sessions until they
end. Real registry, real containers, the real engine."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.engine import CachedFile, FileSpec, PoolConfig
from sandbox.errors import PolicyError
from sandbox.runtime.results import Status
from sandbox.tenants import Tenant
from tests.integration.test_engine import Running, sh

T = Tenant("test")
PROGRAM = b'#!/bin/sh\necho "ran $0"\n'
DATA = b"line one\nline two\n"


@pytest.fixture(scope="module")
def eng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    r = Running(tmp_path_factory.mktemp("bind") / "state",
                pools=PoolConfig(min_idle=1, max_idle=2))
    yield r
    r.close()


def cached(eng: Running, data: bytes) -> CachedFile:
    return eng.run(eng.engine.files.put_bytes(T, data))


def run(eng: Running, image: str, script: str, policy: str, *files: FileSpec) -> Any:
    out = eng.run(eng.engine.run(image, sh(script, files=files), policy=policy, tenant=T))
    eng.settle()
    return out.result


@pytest.mark.parametrize("policy", ["judge", "default"])
def test_a_cached_file_is_bound_readable_and_executable_as_its_mode_says(
        eng: Running, images: Any, policy: str) -> None:
    program, data = cached(eng, PROGRAM), cached(eng, DATA)
    r = run(eng, images.oci, """
        /tmp/bin/prog
        cat /tmp/in/data
        stat -c '%a %s' /tmp/bin/prog /tmp/in/data
        /tmp/in/data 2>/dev/null || echo "data: not executable"
        sh -c 'echo more >> /tmp/in/data' 2>&1 |
            grep -qE 'Read-only file system|Permission denied' && echo "not writable"
        grep -E ' /tmp/(bin/prog|in/data) ' /proc/self/mountinfo | cut -d' ' -f5,6
        """, policy,
        FileSpec("/tmp/bin/prog", mode=0o755, cached=program),
        FileSpec("/tmp/in/data", mode=0o644, cached=data))
    assert r.status == Status.OK, r.stderr
    assert r.stdout.decode().splitlines() == [
        "ran /tmp/bin/prog", "line one", "line two",
        f"555 {len(PROGRAM)}", f"444 {len(DATA)}",
        "data: not executable", "not writable",
        "/tmp/bin/prog ro,nosuid,nodev,relatime",
        "/tmp/in/data ro,nosuid,nodev,noexec,relatime"]
    # The next runs (the same warm containers, reset) have neither.
    for _ in range(3):
        r = run(eng, images.oci, "ls -A /tmp; cut -d' ' -f5 /proc/self/mountinfo | "
                "grep -c ^/tmp/", policy)
        assert r.stdout == b"0\n", r.stdout


def test_the_same_content_binds_both_ways_in_one_run(eng: Running, images: Any) -> None:
    entry = cached(eng, PROGRAM)
    r = run(eng, images.oci, "/tmp/x; /tmp/r 2>/dev/null || echo no; cat /tmp/r", "judge",
            FileSpec("/tmp/x", mode=0o700, cached=entry),
            FileSpec("/tmp/r", mode=0o600, cached=entry))
    assert r.stdout.decode() == "ran /tmp/x\nno\n" + PROGRAM.decode()


def test_a_bind_goes_over_an_image_file_and_the_reset_gives_it_back(
        eng: Running, images: Any) -> None:
    entry = cached(eng, DATA)
    for policy in ("judge", "default"):
        r = run(eng, images.oci, "cat /etc/hostname", policy,
                FileSpec("/etc/hostname", cached=entry))
        assert r.stdout == DATA
        for _ in range(3):
            assert run(eng, images.oci, "cat /etc/hostname", policy).stdout == b"sandbox\n"


def test_a_writable_root_takes_a_bind_at_a_new_path(eng: Running, images: Any) -> None:
    entry = cached(eng, PROGRAM)
    r = run(eng, images.oci, "/opt/tools/prog; stat -c '%U %a' /opt/tools", "default",
            FileSpec("/opt/tools/prog", mode=0o755, cached=entry))
    assert r.stdout.decode() == "ran /opt/tools/prog\nnobody 755\n"
    assert run(eng, images.oci, "ls /opt 2>&1", "default").stdout.endswith(
        b"No such file or directory\n")


def test_paths_follow_put_files_rules(eng: Running, images: Any) -> None:
    entry = cached(eng, DATA)
    with pytest.raises(PolicyError, match=r"read-only.*/tmp"):
        run(eng, images.oci, "true", "judge", FileSpec("/newdir/x", cached=entry))
    with pytest.raises(PolicyError, match=r"^/bin/sh is a symbolic link \(-> 'busybox'\)"):
        run(eng, images.oci, "true", "default", FileSpec("/bin/sh", cached=entry))
    with pytest.raises(PolicyError, match=r"^/tmp is a directory|^/tmp exists and is not a "
                       "regular file"):
        run(eng, images.oci, "true", "judge", FileSpec("/tmp", cached=entry))
    # The engine stays usable: the containers of the refused runs were replaced.
    assert run(eng, images.oci, "echo ok", "judge").stdout == b"ok\n"


def test_a_session_keeps_its_bound_files_until_it_ends(eng: Running, images: Any) -> None:
    entry = cached(eng, PROGRAM)
    e = eng.engine
    s = eng.run(e.create_session(images.oci, tenant=T))
    try:
        out = eng.run(e.sessions.exec(s.id, sh("/work/prog", files=(
            FileSpec("/work/prog", mode=0o755, cached=entry),)), owner=T.id))
        assert out.result.stdout == b"ran /work/prog\n"
        out = eng.run(e.sessions.exec(s.id, sh("/work/prog; echo x > /work/prog"),
                                      owner=T.id))
        assert out.result.stdout == b"ran /work/prog\n"
        assert re.search(rb"Read-only file system|Permission denied", out.result.stderr)
        with pytest.raises(PolicyError, match=r"/work/prog.*(read-only|Permission denied)"):
            eng.run(e.sessions.put_file(s.id, "/work/prog", b"x", owner=T.id))
        # Bound again at the same path: the new bind replaces the old one.
        other = cached(eng, PROGRAM.replace(b"ran", b"now"))
        for again in (other, other, entry):
            out = eng.run(e.sessions.exec(s.id, sh(
                "/work/prog; cut -d' ' -f5 /proc/self/mountinfo | grep -c ^/work/prog",
                files=(FileSpec("/work/prog", mode=0o755, cached=again),)), owner=T.id))
            word = b"ran" if again is not other else b"now"
            assert out.result.stdout == word + b" /work/prog\n1\n", out.result
    finally:
        eng.run(e.sessions.delete(s.id))


def test_a_copy_is_the_run_users_to_change(eng: Running, images: Any) -> None:
    # What `"copy": true` asks of the API: the bytes, copied in (service/api/runs.py).
    r = run(eng, images.oci, "echo more >> /tmp/in; cat /tmp/in; stat -c %a /tmp/in", "judge",
            FileSpec("/tmp/in", DATA, 0o600))
    assert r.stdout == DATA + b"more\n600\n"


def test_the_blob_directory_is_not_in_a_runs_root(eng: Running, images: Any) -> None:
    entry = cached(eng, DATA)
    r = run(eng, images.oci, "ls /files 2>&1; cut -d' ' -f5 /proc/self/mountinfo | "
            "grep -c ^/files", "judge", FileSpec("/tmp/in", cached=entry))
    assert r.stdout.decode().endswith("No such file or directory\n0\n")
    assert Path(eng.engine.files.blob_dir).stat().st_mode & 0o777 == 0o711


def test_a_run_whose_file_cannot_be_bound_does_not_run(eng: Running, images: Any) -> None:
    entry = cached(eng, DATA)
    e = eng.engine
    s = eng.run(e.create_session(images.oci, tenant=T))
    try:
        eng.run(e.sessions.exec(s.id, sh("ln -s /etc /work/link"), owner=T.id))
        # The bind request and the exec go out together; the failed bind refuses the exec.
        with pytest.raises(PolicyError, match=r"^/work/link/x passes through the symbolic "
                           r"link /work/link \(-> '/etc'\)"):
            eng.run(e.sessions.exec(s.id, sh("touch /work/ran", files=(
                FileSpec("/work/link/x", cached=entry),)), owner=T.id))
        out = eng.run(e.sessions.exec(s.id, sh("ls /work; ls /etc/x 2>&1 | wc -l"),
                                      owner=T.id))
        assert out.result.stdout == b"link\n1\n", out.result
    finally:
        eng.run(e.sessions.delete(s.id))
