"""Hostile build contexts (sandbox/images/buildcontext.py): member names that climb out or
are absolute, links to the host or to later members, devices, a member below a symlink,
a gzip bomb, too many entries, huge headers, COPY sources and Dockerfile names that leave
the context, and symlinks that point at the host used as sources. Each must be refused (or
resolve inside the context), read nothing of the host and write nothing outside the work
directory."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tarfile
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sandbox.errors import ImageError, NotFound, QuotaExceeded
from sandbox.images.buildcontext import BuildContext, ContextLimits
from sandbox.images.buildfiles import Selected
from tests.unit.test_buildcontext import chunked, dir_, entry, hard, reg, sym, tar

DEFAULTS = ContextLimits()
HOST_PASSWD = Path("/etc/passwd").read_bytes()


@dataclass
class Place:
    """A work directory two levels down in a directory the test watches."""

    top: Path
    work: Path
    made: list[BuildContext] = field(default_factory=list)
    tries: int = 0

    def receive(self, body: bytes | AsyncIterator[bytes],
                limits: ContextLimits = DEFAULTS) -> BuildContext:
        """Each body in a work directory of its own, as each build has one."""
        self.tries += 1
        workdir = self.work / str(self.tries)
        workdir.mkdir()
        chunks = chunked(body, 65536) if isinstance(body, bytes) else body
        ctx = asyncio.run(BuildContext.receive(chunks, workdir, limits))
        self.made.append(ctx)
        return ctx

    def outside(self) -> list[str]:
        """What exists under `top` but outside the work directory (the bait left empty)."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.top):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                if self.work not in (path, *path.parents) and path not in (
                        self.top / "outer", self.top / "bait"):
                    found.append(str(path.relative_to(self.top)))
        return sorted(found)


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Place]:
    work = tmp_path / "outer" / "work"
    work.mkdir(parents=True)
    (tmp_path / "bait").mkdir()
    p = Place(tmp_path, work)
    yield p
    for ctx in p.made:
        ctx.close()
    shutil.rmtree(work)  # as the caller does: nothing of it may stay
    assert not work.exists()
    assert p.outside() == [], "something was written outside the work directory"


def _text(sels: list[Selected]) -> bytes:
    out = b""
    for sel in sels:
        for f in sel.files:
            if f.open is not None:
                with f.open() as r:
                    out += r.read()
    return out


@pytest.mark.parametrize("name", ["../escaped", "../../escaped", "a/../../escaped",
                                  "./../escaped", "a/b/../../../../escaped", "/ABS/escaped"])
def test_member_names_that_leave_are_refused(place: Place, name: str) -> None:
    name = name.replace("/ABS", str(place.top))
    with pytest.raises(ImageError, match=r"entry '.*escaped'.*(absolute|'\.\.')"):
        place.receive(tar(reg("Dockerfile", "FROM scratch\n"), reg(name, "planted")))


def test_a_member_below_a_symlink_is_refused(place: Place) -> None:
    body = tar(sym("l", str(place.top / "bait")), reg("l/planted", "x"),
               sym("rel", "../../bait"), reg("rel/planted2", "y"))
    with pytest.raises(ImageError, match="which is not a directory"):
        place.receive(body)
    assert list((place.top / "bait").iterdir()) == []


def test_the_root_cannot_become_a_file(place: Place) -> None:
    with pytest.raises(ImageError, match="root a non-directory"):
        place.receive(tar(reg("./", "x")))


@pytest.mark.parametrize("members", [
    [hard("h", "/etc/passwd")],
    [hard("h", "../../../../../../etc/passwd")],
    [hard("h", "later"), reg("later", "x")],
    [hard("h", "h")],
    [dir_("d"), hard("h", "d")],
    [reg("f", "x"), sym("s", "f"), hard("h", "s")],
])
def test_hard_links_must_name_an_earlier_file(place: Place, members: list) -> None:
    with pytest.raises(ImageError, match=r"hard link|hard link target"):
        place.receive(tar(*members))


@pytest.mark.parametrize(("kind", "word"), [(tarfile.CHRTYPE, "character device"),
                                            (tarfile.BLKTYPE, "block device"),
                                            (tarfile.FIFOTYPE, "FIFO")])
def test_devices_and_fifos_are_refused(place: Place, kind: bytes, word: str) -> None:
    ti, _ = entry("dev/sda", kind)
    ti.devmajor, ti.devminor = 8, 0
    with pytest.raises(ImageError, match=f"{word}: a build context holds files, directories "
                                         "and links"):
        place.receive(tar(reg("Dockerfile", "x"), (ti, None)))


def test_symlinks_to_the_host_read_nothing_of_it(place: Place) -> None:
    ctx = place.receive(tar(reg("Dockerfile", "FROM scratch\n"), sym("passwd", "/etc/passwd"),
                            sym("hostetc", "/etc"), sym("up", "../../../../../../.."),
                            sym("upetc", "../../../../../../../etc/passwd"),
                            dir_("sub"), sym("sub/deep", "../../../..")))
    for source in ["passwd", "hostetc/passwd", "upetc", "up/etc/passwd", "sub/deep/etc/passwd",
                   "up/etc/*", "hostetc/*", "*/passwd"]:
        with pytest.raises(ImageError, match="names nothing"):
            ctx.select(source, where="Dockerfile:2")
    # A link that climbs stops at the context's root: copying it copies the context.
    for source in ["up", "sub/deep", "up/up/up"]:
        sels = ctx.select(source, where="Dockerfile:2")
        assert _text(sels) == b"FROM scratch\n", source


def test_a_host_path_in_a_link_resolves_to_the_context_copy(place: Place) -> None:
    ctx = place.receive(tar(sym("passwd", "/etc/passwd"), reg("etc/passwd", "ours\n")))
    sels = ctx.select("passwd", where="Dockerfile:2")
    assert _text(sels) == b"ours\n" != HOST_PASSWD


@pytest.mark.parametrize("source", ["..", "../", "../x", "a/../../x", "/../x", "./../../x",
                                    "../" * 12 + "etc/passwd", "../*", "*/../../x"])
def test_copy_sources_outside_the_context(place: Place, source: str) -> None:
    ctx = place.receive(tar(reg("Dockerfile", "FROM scratch\n"), reg("a/x", "x")))
    with pytest.raises(ImageError, match=r"^Dockerfile:7: COPY source .* is outside the build "
                                         "context"):
        ctx.select(source, where="Dockerfile:7")


@pytest.mark.parametrize("name", ["../Dockerfile", "a/../../Dockerfile",
                                  "../" * 12 + "etc/passwd", "/etc/passwd"])
def test_dockerfile_names_outside_the_context(place: Place, name: str) -> None:
    ctx = place.receive(tar(reg("Dockerfile", "FROM scratch\n"), reg("a/x", "x")))
    with pytest.raises(ImageError, match=r"^dockerfile: .*(outside the build context|absolute)"):
        ctx.dockerfile(name)


def test_a_dockerfile_linked_to_the_host_is_not_read(place: Place) -> None:
    ctx = place.receive(tar(sym("Dockerfile", "/etc/passwd"),
                            sym(".dockerignore", "../../../etc/passwd")))
    with pytest.raises(NotFound, match="no 'Dockerfile'"):
        ctx.dockerfile()


async def _gzip_bomb(mib: int, sent: list[int]) -> AsyncIterator[bytes]:
    """A gzip context whose one file is `mib` MiB of zeros: one deflated MiB, flushed so
    that it stands alone, sent again and again (made fast, whatever its size)."""
    ti = tarfile.TarInfo("bomb")
    ti.size = mib << 20
    header, zeros = ti.tobuf(tarfile.PAX_FORMAT), bytes(1 << 20)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + z.compress(header) + z.flush(
        zlib.Z_FULL_FLUSH)
    piece = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(header)
    for _ in range(mib):
        sent[0] += 1
        crc = zlib.crc32(zeros, crc)
        yield piece
    end = bytes(2 * tarfile.BLOCKSIZE)
    crc = zlib.crc32(end, crc)
    total = len(header) + (mib << 20) + len(end)
    yield z.compress(end) + z.flush() + struct.pack("<II", crc, total & 0xFFFFFFFF)


def test_a_gzip_bomb_stops_at_the_byte_limit(place: Place) -> None:
    sent = [0]
    limit = 4 << 20
    with pytest.raises(QuotaExceeded, match=r"over 4194304 bytes uncompressed"):
        place.receive(_gzip_bomb(4096, sent), ContextLimits(max_bytes=limit))
    # Stopped soon after the limit (at most 1 MiB of the gzip, here ~1000 pieces, is taken
    # before it is decompressed): most of the 4 GiB was never asked for.
    assert sent[0] < 2048
    assert all(p.stat().st_size <= limit for p in place.work.iterdir())


def test_too_many_entries(place: Place) -> None:
    limits = ContextLimits(max_entries=100)
    with pytest.raises(QuotaExceeded, match=r"more than 100 entries"):
        place.receive(tar(*(reg(f"f{i}") for i in range(101))), limits)
    deep = "/".join(["d"] * 1000) + "/f"  # one member, a thousand implied directories
    with pytest.raises(QuotaExceeded, match=r"more than 100 entries"):
        place.receive(tar(reg(deep, "x")), limits)


def test_a_huge_header_is_refused_unread(place: Place) -> None:
    with pytest.raises(ImageError, match="tar header in the build context is over 1 MiB"):
        place.receive(tar(reg("n" * (2 << 20), "x")))
