"""The build context (sandbox/images/buildcontext.py) on tars the tests build: plain and
gzip bodies, names normalised, implied directories, COPY sources (files, directories,
wildcards, symlinks followed inside the context), hard links, .dockerignore, the Dockerfile,
the copy digest, limits and ADD's archive check."""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import gzip
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sandbox.errors import ImageError, NotFound, QuotaExceeded
from sandbox.images.buildcontext import BuildContext, ContextLimits, digest_of, is_archive
from sandbox.images.buildfiles import Selected, SourceFile

MTIME = 1_600_000_000
DEFAULTS = ContextLimits()
Entry = tuple[tarfile.TarInfo, bytes | None]


def entry(name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes | None = None,
          mode: int = 0o644, link: str = "", mtime: int = MTIME) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.linkname, ti.mtime = kind, mode, link, mtime
    if data is not None:
        ti.size = len(data)
    return ti, data


def reg(name: str, data: bytes | str = b"", mode: int = 0o644, mtime: int = MTIME) -> Entry:
    return entry(name, data=data.encode() if isinstance(data, str) else data, mode=mode,
                 mtime=mtime)


def dir_(name: str, mode: int = 0o755) -> Entry:
    return entry(name, tarfile.DIRTYPE, mode=mode)


def sym(name: str, target: str) -> Entry:
    return entry(name, tarfile.SYMTYPE, link=target, mode=0o777)


def hard(name: str, target: str) -> Entry:
    return entry(name, tarfile.LNKTYPE, link=target)


def tar(*entries: Entry, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for ti, data in entries:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


async def chunked(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


Receive = Callable[..., BuildContext]


@pytest.fixture
def receive(tmp_path: Path) -> Iterator[Receive]:
    """Receives a body into a fresh work directory; every context is closed at the end."""
    made: list[BuildContext] = []

    def go(body: bytes | AsyncIterator[bytes], limits: ContextLimits = DEFAULTS,
           chunk: int = 65536) -> BuildContext:
        work = tmp_path / f"work{len(made)}-{len(list(tmp_path.iterdir()))}"
        work.mkdir()
        chunks = chunked(body, chunk) if isinstance(body, bytes) else body
        ctx = asyncio.run(BuildContext.receive(chunks, work, limits))
        made.append(ctx)
        return ctx
    yield go
    for ctx in made:
        ctx.close()


def listing(sel: Selected) -> list[tuple[str, str]]:
    return [(f.path, f.kind) for f in sel.files]


def read(f: SourceFile) -> bytes:
    assert f.open is not None
    with f.open() as r:
        return r.read()


def only(ctx: BuildContext, source: str) -> Selected:
    [sel] = ctx.select(source, where="Dockerfile:2")
    return sel


BASIC = tar(reg("Dockerfile", "FROM scratch\n"), dir_("src", 0o750),
            reg("src/main.py", "print(1)\n", 0o755), reg("src/util.py", "x = 1\n"),
            dir_("src/pkg"), reg("src/pkg/mod.py", "y = 2\n"), reg("README.md", "hi\n"))


# -- receiving --------------------------------------------------------------------------------

def test_plain_and_gzip_contexts_read_the_same(receive: Receive) -> None:
    plain, gz = receive(BASIC), receive(gzip.compress(BASIC), chunk=7)
    for ctx in (plain, gz):
        assert ctx.dockerfile() == "FROM scratch\n"
    assert plain.digest(plain.select(".", where="x")) == gz.digest(gz.select(".", where="x"))


def test_multi_member_gzip_and_trailing_zeros(receive: Receive) -> None:
    body = gzip.compress(BASIC[:5120]) + gzip.compress(BASIC[5120:]) + b"\0" * 100
    assert read(only(receive(body), "README.md").files[0]) == b"hi\n"


@pytest.mark.parametrize(("body", "words"), [
    (b"", "empty"),
    (b"this is not a tar, just text" * 40, "not a tar"),
    (gzip.compress(BASIC)[:-20], "ends in the middle"),
    (b"\x1f\x8b\x08\x00garbage-not-deflate" * 10, "not valid gzip"),
    (bz2.compress(BASIC), "bzip2"),
    (lzma.compress(BASIC), "xz"),
    (gzip.compress(BASIC) + b"trailing junk", "after its gzip stream"),
    (BASIC[:2000], "cut short"),
])
def test_bodies_that_are_not_contexts(receive: Receive, body: bytes, words: str) -> None:
    with pytest.raises(ImageError, match=words):
        receive(body)


def test_corrupt_header_after_members_is_refused(receive: Receive) -> None:
    body = bytearray(tar(reg("a", "x"), reg("b", "y")))
    body[1024:1024 + 10] = b"XXXXXXXXXX"  # b's header: a bad checksum
    with pytest.raises(ImageError, match="invalid header at byte 1024"):
        receive(bytes(body))


def test_names_are_normalised_and_dirs_implied(receive: Receive) -> None:
    ctx = receive(tar(reg("./a//b/c.txt", "c"), dir_("./d/"), reg("d/./e", "e")))
    sel = only(ctx, "a")
    assert sel.kind == "dir" and sel.name == "a"
    assert listing(sel) == [("", "dir"), ("b", "dir"), ("b/c.txt", "file")]
    assert [f.mode for f in sel.files] == [0o755, 0o755, 0o644]  # implied dirs: 0755
    assert listing(only(ctx, "d")) == [("", "dir"), ("e", "file")]


def test_pax_and_gnu_long_names(receive: Receive) -> None:
    long = "/".join(["d" * 60] * 5) + "/file.txt"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        ctx = receive(tar(reg(long, "deep"), sym("l" * 150, long), fmt=fmt))
        assert read(only(ctx, long).files[0]) == b"deep"
        assert read(only(ctx, "l" * 150).files[0]) == b"deep"


def test_the_last_member_of_a_name_wins(receive: Receive) -> None:
    ctx = receive(tar(reg("f", "old"), reg("f", "new"), dir_("d"), reg("d/x", "x"),
                      reg("d", "now a file"), dir_("k", 0o700), dir_("k", 0o711),
                      reg("k/y", "y")))
    assert read(only(ctx, "f").files[0]) == b"new"
    d = only(ctx, "d")
    assert d.kind == "file" and read(d.files[0]) == b"now a file"
    with pytest.raises(ImageError, match="names nothing"):
        ctx.select("d/x", where="Dockerfile:2")
    assert only(ctx, "k").files[0].mode == 0o711 and listing(only(ctx, "k"))[1] == ("y", "file")


def test_hard_links_read_as_their_target(receive: Receive) -> None:
    ctx = receive(tar(reg("a", "content", 0o600), hard("b", "a"), hard("./c", "./b")))
    for name in "abc":
        f = only(ctx, name).files[0]
        assert f.kind == "file" and f.mode == 0o600 and read(f) == b"content"


def test_root_entry_sets_the_root_mode(receive: Receive) -> None:
    ctx = receive(tar(dir_("./", 0o700), reg("a", "x")))
    assert only(ctx, ".").files[0].mode == 0o700


# -- COPY sources -----------------------------------------------------------------------------

def test_select_a_file(receive: Receive) -> None:
    ctx = receive(BASIC)
    sel = only(ctx, "src/main.py")
    assert (sel.name, sel.kind) == ("main.py", "file")
    [f] = sel.files
    assert (f.path, f.kind, f.mode, f.size, f.mtime, f.uid, f.gid) == (
        "", "file", 0o755, 9, MTIME, 0, 0)
    assert read(f) == b"print(1)\n" and read(f) == b"print(1)\n"  # a fresh reader each time


def test_readers_are_independent_across_threads(receive: Receive) -> None:
    files = [reg(f"f{i}", bytes([i]) * (100_000 + i)) for i in range(8)]
    ctx = receive(tar(*files))
    sels = [only(ctx, f"f{i}").files[0] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(read, sels * 4))
    assert got == [bytes([i % 8]) * (100_000 + i % 8) for i in range(32)]


def test_reader_reads_exactly_its_member_and_seeks(receive: Receive) -> None:
    ctx = receive(tar(reg("a", "AAAA"), reg("b", "BBBBBB")))
    f = only(ctx, "a").files[0]
    assert f.open is not None
    with f.open() as r:
        assert r.read(2) == b"AA" and r.read() == b"AA" and r.read() == b""
        r.seek(1)
        assert r.read() == b"AAA"


def test_select_a_directory_lists_it_sorted(receive: Receive) -> None:
    ctx = receive(tar(reg("d/b", "b"), reg("d/a-c", "x"), reg("d/a/z", "z"), sym("d/l", ".."),
                      reg("top", "t")))
    sel = only(ctx, "d")
    assert (sel.name, sel.kind) == ("d", "dir")
    # By component: a directory before what it holds; the symlink kept, not followed.
    assert listing(sel) == [("", "dir"), ("a", "dir"), ("a/z", "file"), ("a-c", "file"),
                            ("b", "file"), ("l", "symlink")]
    assert sel.files[-1].linkname == ".." and sel.files[-1].open is None


@pytest.mark.parametrize("source", [".", "/", "./", "", "src/.."])
def test_the_root_in_its_spellings(receive: Receive, source: str) -> None:
    sel = only(receive(BASIC), source)
    assert sel.kind == "dir" and sel.files[0].path == ""
    assert ("src/pkg/mod.py", "file") in listing(sel)


@pytest.mark.parametrize("source", ["/src/main.py", "./src/main.py", "src//main.py",
                                    "src/pkg/../main.py"])
def test_paths_are_cleaned(receive: Receive, source: str) -> None:
    assert read(only(receive(BASIC), source).files[0]) == b"print(1)\n"


def test_wildcards_give_every_match_sorted(receive: Receive) -> None:
    ctx = receive(tar(reg("b.txt", "b"), reg("a.txt", "a"), reg("c.md", "c"), dir_("x.txt"),
                      reg("x.txt/in", "i"), reg("d1/f.go", "1"), reg("d2/f.go", "2"),
                      reg("d2/g.go", "g"), reg("star*", "s")))
    sels = ctx.select("*.txt", where="Dockerfile:3")
    assert [(s.name, s.kind) for s in sels] == [("a.txt", "file"), ("b.txt", "file"),
                                                ("x.txt", "dir")]
    assert [s.name for s in ctx.select("d?/f.go", where="w")] == ["f.go", "f.go"]
    assert [read(s.files[0]) for s in ctx.select("d[12]/f.go", where="w")] == [b"1", b"2"]
    assert [s.name for s in ctx.select("d2/*", where="w")] == ["f.go", "g.go"]
    assert [s.name for s in ctx.select("/[ab].txt", where="w")] == ["a.txt", "b.txt"]
    assert read(only(ctx, "star[*]").files[0]) == b"s"
    with pytest.raises(ImageError, match="names nothing"):  # no wildcard: a literal name
        ctx.select("star\\*", where="w")
    with pytest.raises(ImageError, match=r"^Dockerfile:9: COPY source '\*.none' names nothing"):
        ctx.select("*.none", where="Dockerfile:9")
    with pytest.raises(ImageError, match="not a valid pattern"):
        ctx.select("[", where="w")


def test_wildcards_do_not_walk_through_symlinked_dirs(receive: Receive) -> None:
    ctx = receive(tar(reg("real/f", "f"), sym("link", "real"), sym("lf", "real/f")))
    assert [s.name for s in ctx.select("*/f", where="w")] == ["f"]  # real/f only
    # A match that is a symlink is followed, as BuildKit follows a COPY source.
    sels = ctx.select("l*", where="w")
    assert [(s.name, s.kind) for s in sels] == [("lf", "file"), ("link", "dir")]


def test_symlinks_are_followed_inside_the_context(receive: Receive) -> None:
    ctx = receive(tar(reg("data/real.txt", "real"), sym("data/rel", "real.txt"),
                      sym("abs", "/data/real.txt"), sym("up", "../../../data"),
                      sym("chain", "abs"), sym("dir", "data"), reg("etc/passwd", "ours")))
    for source in ["data/rel", "abs", "up/real.txt", "chain", "dir/rel", "dir/../abs"]:
        sel = only(ctx, source)
        assert sel.kind == "file" and read(sel.files[0]) == b"real", source
    assert only(ctx, "abs").name == "abs"  # lands under the name it was copied by
    assert listing(only(ctx, "up")) == [("", "dir"), ("real.txt", "file"), ("rel", "symlink")]


def test_symlink_loops_and_dangling_links(receive: Receive) -> None:
    ctx = receive(tar(sym("a", "b"), sym("b", "a"), sym("self", "self/x"),
                      sym("gone", "nowhere"), reg("f", "x"), sym("notdir", "f/x")))
    for source in ["a", "self"]:
        with pytest.raises(ImageError, match="symbolic links in a row"):
            ctx.select(source, where="Dockerfile:4")
    for source in ["gone", "notdir", "f/x"]:
        with pytest.raises(ImageError, match="names nothing"):
            ctx.select(source, where="Dockerfile:4")


def test_instruction_is_named(receive: Receive) -> None:
    with pytest.raises(ImageError, match=r"^Dockerfile:5: ADD source 'nope'"):
        receive(BASIC).select("nope", where="Dockerfile:5", instruction="ADD")


# -- .dockerignore ----------------------------------------------------------------------------

IGNORING = tar(reg("Dockerfile", "FROM scratch\n"), reg(".dockerignore", "*.log\nsecret\n"
               "build\n!build/keep.txt\n"), reg("app.log", "l"), reg("keep.txt", "k"),
               reg("secret/key", "s"), reg("build/out.o", "o"), reg("build/keep.txt", "b"),
               sym("tosecret", "secret/key"))


def test_ignored_paths_are_invisible(receive: Receive) -> None:
    ctx = receive(IGNORING)
    ctx.dockerfile()
    assert listing(only(ctx, ".")) == [
        ("", "dir"), (".dockerignore", "file"), ("Dockerfile", "file"), ("build", "dir"),
        ("build/keep.txt", "file"), ("keep.txt", "file"), ("tosecret", "symlink")]
    for source in ["app.log", "secret/key", "build/out.o", "tosecret", "*.log"]:
        with pytest.raises(ImageError, match=r"excluded by \.dockerignore"):
            ctx.select(source, where="Dockerfile:2")
    assert listing(only(ctx, "build")) == [("", "dir"), ("keep.txt", "file")]
    with pytest.raises(ImageError, match="names nothing"):
        ctx.select("absent", where="Dockerfile:2")


def test_select_before_dockerfile_uses_the_root_ignore_file(receive: Receive) -> None:
    with pytest.raises(ImageError, match="excluded"):
        receive(IGNORING).select("app.log", where="x")


def test_a_dockerfile_ignore_file_comes_first(receive: Receive) -> None:
    ctx = receive(tar(reg("docker/app.Dockerfile", "FROM scratch\n"),
                      reg("docker/app.Dockerfile.dockerignore", "a\n"),
                      reg(".dockerignore", "b\n"), reg("a", "a"), reg("b", "b")))
    ctx.dockerfile("docker/app.Dockerfile")
    assert read(only(ctx, "b").files[0]) == b"b"
    with pytest.raises(ImageError, match=r"excluded by docker/app\.Dockerfile\.dockerignore"):
        ctx.select("a", where="x")


def test_the_dockerfile_stays_readable_when_ignored(receive: Receive) -> None:
    ctx = receive(tar(reg("Dockerfile", "FROM scratch\n"),
                      reg(".dockerignore", "Dockerfile\n.dockerignore\n")))
    assert ctx.dockerfile() == "FROM scratch\n"
    assert listing(only(ctx, ".")) == [("", "dir")]


def test_a_bad_ignore_file_fails_at_the_dockerfile(receive: Receive) -> None:
    ctx = receive(tar(reg("Dockerfile", "FROM scratch\n"), reg(".dockerignore", "ok\n[x\n")))
    with pytest.raises(ImageError, match=r"\.dockerignore:2: "):
        ctx.dockerfile()
    with pytest.raises(ImageError, match=r"\.dockerignore:2: "):  # never copied unfiltered
        ctx.select(".", where="x")


# -- the Dockerfile ---------------------------------------------------------------------------

def test_dockerfile_by_name_and_lowercase_fallback(receive: Receive) -> None:
    ctx = receive(tar(reg("dockerfile", "lower\n"), reg("ci/Build.df", "custom\n"),
                      sym("linked", "ci/Build.df")))
    assert ctx.dockerfile() == "lower\n"
    assert ctx.dockerfile("ci/Build.df") == "custom\n"
    assert ctx.dockerfile("./ci//Build.df") == "custom\n"
    assert ctx.dockerfile("linked") == "custom\n"


@pytest.mark.parametrize(("body", "name", "error", "words"), [
    (tar(reg("x", "y")), "Dockerfile", NotFound, "no 'Dockerfile'"),
    (tar(reg("x", "y")), "ci/Other", NotFound, "no 'ci/Other'"),
    (tar(dir_("Dockerfile")), "Dockerfile", ImageError, "is a directory"),
    (tar(reg("Dockerfile", b"FROM \xff\n")), "Dockerfile", ImageError, "not UTF-8"),
    (tar(reg("Dockerfile", "x" * 2000)), "Dockerfile", QuotaExceeded, "over the 1024"),
    (tar(reg("Dockerfile", "x")), "/Dockerfile", ImageError, "^dockerfile: '/Dockerfile' is "
     "an absolute path"),
    (tar(reg("Dockerfile", "x")), "../Dockerfile", ImageError, "^dockerfile: '../Dockerfile' "
     "is outside the build context"),
])
def test_dockerfile_errors(receive: Receive, body: bytes, name: str, error: type[Exception],
                           words: str) -> None:
    ctx = receive(body, ContextLimits(max_dockerfile_bytes=1024))
    with pytest.raises(error, match=words):
        ctx.dockerfile(name)


# -- the copy digest --------------------------------------------------------------------------

def test_digest_is_stable_and_ignores_mtimes(receive: Receive) -> None:
    one = receive(BASIC)
    two = receive(tar(reg("Dockerfile", "FROM scratch\n", mtime=1), dir_("src", 0o750),
                      reg("src/util.py", "x = 1\n", mtime=5), reg("src/main.py", "print(1)\n",
                      0o755, mtime=7), reg("src/pkg/mod.py", "y = 2\n"), reg("README.md", "")))
    for source in ["src", "src/main.py", "Dockerfile"]:
        a, b = one.select(source, where="x"), two.select(source, where="x")
        assert one.digest(a) == two.digest(b) == digest_of(a), source
        assert one.digest(a).startswith("sha256:")


@pytest.mark.parametrize("change", [
    reg("src/util.py", "x = 2\n"),                # content
    reg("src/util.py", "x = 1\n", 0o600),         # mode
    reg("src/new.py", ""),                        # an added file
    sym("src/util.py", "main.py"),                # a kind
])
def test_digest_changes_with_any_copied_file(receive: Receive, change: Entry) -> None:
    before, after = receive(BASIC), receive(_with(change))
    assert before.digest(before.select("src", where="x")) != after.digest(
        after.select("src", where="x"))


def _with(change: Entry) -> bytes:
    """BASIC with `change` appended (the last member of a name wins)."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(BASIC)) as t:
        for ti in t.getmembers():
            data = t.extractfile(ti)
            members.append((ti, data.read() if data is not None else None))
    return tar(*members, change)


def test_digest_tells_names_and_link_targets_apart(receive: Receive) -> None:
    ctx = receive(tar(reg("a", "same"), reg("b", "same"), sym("l1", "a"), sym("l2", "b"),
                      dir_("d1"), sym("d1/l", "a"), dir_("d2"), sym("d2/l", "b")))
    assert ctx.digest(ctx.select("a", where="x")) != ctx.digest(ctx.select("b", where="x"))
    assert ctx.digest(ctx.select("d1", where="x")) != ctx.digest(ctx.select("d2", where="x"))


def test_digest_of_files_from_elsewhere_reads_them() -> None:
    def source(data: bytes) -> Selected:
        return Selected("f", "file", (SourceFile("", "file", 0o644, len(data),
                                                 open=lambda: io.BytesIO(data)),))
    assert digest_of([source(b"a")]) == digest_of([source(b"a")])
    assert digest_of([source(b"a")]) != digest_of([source(b"b")])


# -- limits -----------------------------------------------------------------------------------

def test_byte_limit(receive: Receive) -> None:
    body = tar(reg("big", b"\0" * 300_000))
    with pytest.raises(QuotaExceeded, match=r"build\.max_context_bytes"):
        receive(body, ContextLimits(max_bytes=200_000))
    with pytest.raises(QuotaExceeded, match=r"over 200000 bytes uncompressed"):
        receive(gzip.compress(body), ContextLimits(max_bytes=200_000))
    assert receive(body, ContextLimits(max_bytes=len(body))).dockerfile is not None


def test_entry_limit_counts_implied_directories(receive: Receive) -> None:
    limits = ContextLimits(max_entries=5)
    receive(tar(*(reg(f"f{i}") for i in range(5))), limits)
    with pytest.raises(QuotaExceeded, match=r"more than 5 entries.*build\.max_context_entries"):
        receive(tar(*(reg(f"f{i}") for i in range(6))), limits)
    with pytest.raises(QuotaExceeded, match="more than 5 entries"):
        receive(tar(reg("a/b/c/d/e/f")), limits)


# -- ADD's archives ---------------------------------------------------------------------------

def test_is_archive_by_magic_and_header(receive: Receive) -> None:
    inner = tar(reg("x", "y"))
    ctx = receive(tar(reg("a.tar", inner), reg("a.tgz", gzip.compress(inner)),
                      reg("a.tbz", bz2.compress(inner)), reg("a.txz", lzma.compress(inner)),
                      reg("notes.gz", gzip.compress(b"just text " * 100)),
                      reg("text", "hello"), reg("empty"), reg("zeros", b"\0" * 1024),
                      reg("raw.z", zlib.compress(inner)), dir_("dir")))
    for name, want in [("a.tar", True), ("a.tgz", True), ("a.tbz", True), ("a.txz", True),
                       ("notes.gz", False), ("text", False), ("empty", False),
                       ("zeros", False), ("raw.z", False), ("dir", False)]:
        assert is_archive(only(ctx, name).files[0]) is want, name


# -- closing ----------------------------------------------------------------------------------

def test_close_ends_reading_but_not_open_readers(receive: Receive) -> None:
    ctx = receive(BASIC)
    f = only(ctx, "README.md").files[0]
    assert f.open is not None
    reader = f.open()
    ctx.close()
    ctx.close()
    assert reader.read() == b"hi\n"
    reader.close()
    with pytest.raises(ImageError, match="closed"):
        f.open()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failed_and_cancelled_receives_leave_nothing_open(tmp_path: Path) -> None:
    before = _fds()
    for i, body in enumerate([b"", b"junk" * 1000, tar(hard("h", "x")), BASIC]):
        work = tmp_path / str(i)
        work.mkdir()
        with contextlib.suppress(ImageError):
            asyncio.run(BuildContext.receive(chunked(body, 100), work)).close()

    async def cancelled() -> None:
        started = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield BASIC[:3000]
            yield bytes(2 << 20)  # handed to the worker thread
            started.set()
            await asyncio.Event().wait()  # a client that stops sending
            yield b""

        (tmp_path / "c").mkdir()
        task = asyncio.create_task(BuildContext.receive(body(), tmp_path / "c"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(cancelled())
    assert _fds() == before
