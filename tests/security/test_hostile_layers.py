"""Hostile layer tars, built by the tests, against sandbox/images/store/unpack.py.

Every layer is either rejected with a LayerError or neutralised (whatever it creates stays
inside the layer directory). Around the layer directory sit a canary file and a sibling
directory with another canary; after every test they are byte for byte and inode for inode
what they were, and nothing new exists outside the layer directory. Each test runs in
overlay mode and flatten mode, and as root also with mapped ownership.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbox.errors import LayerError
from sandbox.images.store.unpack import Ownership, UnpackLimits, UnpackReport, unpack_layer

Entry = tuple[tarfile.TarInfo, bytes | None]

OWNERSHIPS = [Ownership("squash")]
if os.geteuid() == 0:
    OWNERSHIPS.append(Ownership("map", 400000, 400000, 65536))


def entry(name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes | None = None,
          link: str = "", mode: int = 0o644, pax: dict[str, str] | None = None) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = kind, link, mode
    if pax:
        ti.pax_headers = dict(pax)
    if data is not None:
        ti.size = len(data)
    return ti, data


def reg(name: str, data: bytes = b"pwned", **kw: object) -> Entry:
    return entry(name, data=data, **kw)  # type: ignore[arg-type]


def dir_(name: str, **kw: object) -> Entry:
    return entry(name, tarfile.DIRTYPE, mode=0o755, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str) -> Entry:
    return entry(name, tarfile.SYMTYPE, link=target)


def hard(name: str, target: str) -> Entry:
    return entry(name, tarfile.LNKTYPE, link=target)


def build(*entries: Entry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def snapshot(root: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            content = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p)] = (st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_size,
                           st.st_mtime_ns, content)
    return out


@dataclass
class Arena:
    dest: Path
    canary: Path  # beside dest
    sibling: Path  # a directory beside dest, holding canary2
    flatten: bool
    ownership: Ownership

    def unpack(self, *entries: Entry, blob: bytes | None = None,
               limits: UnpackLimits | None = None) -> UnpackReport:
        data = build(*entries) if blob is None else blob
        return unpack_layer(io.BytesIO(data), self.dest, ownership=self.ownership,
                            limits=limits or UnpackLimits(), flatten=self.flatten)

    def rejects(self, *entries: Entry, match: str, blob: bytes | None = None,
                limits: UnpackLimits | None = None) -> None:
        with pytest.raises(LayerError, match=match):
            self.unpack(*entries, blob=blob, limits=limits)

    def inside(self, rel: str) -> Path:
        return self.dest / rel.lstrip("/")


@pytest.fixture(params=[(f, o) for f in (False, True) for o in OWNERSHIPS],
                ids=lambda p: f"{'flatten' if p[0] else 'overlay'}-{p[1].mode}")
def arena(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Arena]:
    flatten, ownership = request.param
    dest = tmp_path / "layer"
    dest.mkdir()
    canary = tmp_path / "canary"
    canary.write_bytes(os.urandom(64))
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "canary2").write_bytes(os.urandom(64))
    before = snapshot(tmp_path, dest)
    yield Arena(dest, canary, sibling, flatten, ownership)
    assert snapshot(tmp_path, dest) == before, "something outside the layer changed"


# -- paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../canary", "a/../../canary", "./../sibling/canary2",
                                  "a/b/../../../x"])
def test_dotdot_traversal_is_rejected(arena: Arena, name: str) -> None:
    arena.rejects(reg(name), match="contains '..'")


def test_absolute_paths_stay_inside(arena: Arena) -> None:
    arena.unpack(reg(str(arena.canary)), reg(str(arena.sibling / "new")))
    assert arena.inside(str(arena.canary)).read_bytes() == b"pwned"
    assert arena.inside(str(arena.sibling / "new")).read_bytes() == b"pwned"


def test_symlink_out_then_a_write_through_it(arena: Arena) -> None:
    # The target is resolved inside the layer, where it does not exist.
    arena.rejects(sym("l", str(arena.sibling)), reg("l/pwned"),
                  match="does not lead to a directory")
    arena.rejects(sym("r", "../../sibling"), reg("r/pwned"), match="does not lead")


def test_symlink_whose_target_exists_inside_is_followed_inside(arena: Arena) -> None:
    arena.unpack(dir_("sibling"), sym("l", "../../../sibling"), reg("l/canary2"))
    assert arena.inside("sibling/canary2").read_bytes() == b"pwned"


def test_symlink_to_root_then_a_file_below_it(arena: Arena) -> None:
    arena.unpack(sym("l", "/"), reg(f"l/{arena.canary.name}"), sym("up", ".."),
                 reg("up/up/x"))
    assert arena.inside(arena.canary.name).read_bytes() == b"pwned"
    assert arena.inside("x").read_bytes() == b"pwned"


def test_symlink_dotdot_chains_are_clamped_at_the_root(arena: Arena) -> None:
    arena.unpack(dir_("a/b"), sym("a/b/l1", ".."), sym("a/b/l2", "l1/../.."),
                 sym("a/b/l3", "l2/../../../../.."), reg("a/b/l3/escaped"),
                 reg("a/b/l3/l3/l3/escaped2"))
    assert arena.inside("escaped").read_bytes() == b"pwned"
    assert arena.inside("l3/l3/escaped2").read_bytes() == b"pwned"


def test_a_directory_replaced_by_a_symlink_then_written_through(arena: Arena) -> None:
    arena.rejects(dir_("d"), reg("d/f"), sym("d", str(arena.sibling)), reg("d/pwned"),
                  match="does not lead")
    arena.unpack(dir_("e"), reg("e/f"), sym("e", "/"), reg("e/pwned2"))
    assert arena.inside("pwned2").read_bytes() == b"pwned"
    assert arena.inside("e").is_symlink()


def test_an_entry_replaces_a_symlink_instead_of_writing_through_it(arena: Arena) -> None:
    arena.unpack(sym("f", str(arena.canary)), reg("f", b"mine"),
                 sym("g", str(arena.canary)), hard("h", "g"), reg("h", b"mine too"),
                 sym("d", str(arena.sibling)), dir_("d"), reg("d/canary2"))
    assert not arena.inside("f").is_symlink() and arena.inside("f").read_bytes() == b"mine"
    assert arena.inside("h").read_bytes() == b"mine too"
    assert arena.inside("g").is_symlink()
    assert arena.inside("d/canary2").read_bytes() == b"pwned"


def test_a_lower_layers_symlink_cannot_redirect_a_later_layer(arena: Arena) -> None:
    # GNU tar CVE-2025-45582: the symlink and the write come in different archives.
    arena.unpack(sym("etc", str(arena.sibling)), sym("rel", "../sibling"))
    arena.rejects(reg("etc/canary2"), match="does not lead")
    arena.rejects(reg("rel/canary2"), match="does not lead")


def test_symlink_loops_are_rejected(arena: Arena) -> None:
    arena.rejects(sym("a", "b"), sym("b", "a"), reg("a/x"), match="symbolic links")
    arena.rejects(sym("self", "self/x"), hard("h", "self/y"), match="symbolic links")


@pytest.mark.parametrize("name", ["a" * 300, "a/" * 2100 + "x", "ok\0/../../canary"])
def test_over_long_and_nul_names_are_rejected(arena: Arena, name: str) -> None:
    ti, data = reg("placeholder")
    ti.pax_headers = {"path": name}
    with pytest.raises(LayerError):
        arena.unpack((ti, data))


# -- the root -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".", "./", "/", ""])
def test_the_root_cannot_become_a_symlink(arena: Arena, name: str) -> None:
    ti, _ = sym("placeholder", str(arena.sibling))
    ti.pax_headers = {"path": name}
    arena.rejects((ti, None), reg("pwned"), match="CVE-2021-29136")
    assert not arena.dest.is_symlink() and os.listdir(arena.dest) == []


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])
def test_the_root_cannot_become_a_file_link_or_fifo(arena: Arena, kind: bytes) -> None:
    arena.rejects(reg("x"), entry("./", kind, data=b"" if kind == tarfile.REGTYPE else None,
                                  link="x"), match="CVE-2021-29136")
    assert arena.dest.is_dir()


# -- hard links -----------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["../canary", "../sibling/canary2"])
def test_hardlink_out_with_dotdot_is_rejected(arena: Arena, target: str) -> None:
    arena.rejects(hard("h", target), match="contains '..'")


def test_hardlink_to_an_absolute_host_path_is_rejected(arena: Arena) -> None:
    arena.rejects(hard("h", str(arena.canary)), match="earlier non-directory entry")
    assert arena.canary.stat().st_nlink == 1


def test_hardlink_to_a_later_entry_is_rejected(arena: Arena) -> None:
    arena.rejects(hard("h", "later"), reg("later"), match="earlier non-directory entry")


def test_hardlink_to_a_directory_or_itself_is_rejected(arena: Arena) -> None:
    arena.rejects(dir_("d"), hard("h", "d"), match="earlier non-directory entry")
    arena.rejects(hard("self", "self"), match="earlier non-directory entry")


def test_hardlink_through_a_symlink(arena: Arena) -> None:
    arena.rejects(sym("l", str(arena.sibling)), hard("h", "l/canary2"),
                  match="earlier non-directory entry")
    # Through a symlink that stays inside, the link is to the entry inside.
    arena.unpack(reg("inside"), sym("r", "/"), hard("h2", "r/inside"))
    assert arena.inside("h2").stat().st_ino == arena.inside("inside").stat().st_ino


# -- whiteouts ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".wh.", "a/.wh.", ".wh..", ".wh..."])
def test_bare_and_dot_whiteouts_are_rejected(arena: Arena, name: str) -> None:
    arena.rejects(reg(name, b""), match="names no entry")


def test_whiteout_with_dotdot_is_rejected(arena: Arena) -> None:
    arena.rejects(reg("../.wh.canary", b""), match="contains '..'")
    arena.rejects(reg("../sibling/.wh.canary2", b""), match="contains '..'")


def test_whiteout_under_a_symlink_pointing_out(arena: Arena) -> None:
    entries = (sym("etc", str(arena.sibling)), reg("etc/.wh.canary2", b""))
    if arena.flatten:
        arena.unpack(*entries)  # nothing to delete inside the layer
    else:
        arena.rejects(*entries, match="does not lead")


def test_whiteouts_through_symlinks_act_inside(arena: Arena) -> None:
    if arena.flatten:
        arena.unpack(sym("etc", str(arena.sibling)), sym("up", "/"), reg("x"))
        arena.unpack(reg(".wh.etc", b""), reg("up/.wh.x", b""), reg("up/.wh..wh..opq", b""))
        # The links themselves went, not what they point to; the opaque root took `up`.
        assert os.listdir(arena.dest) == []
    else:
        arena.unpack(sym("up", "/"), reg("up/.wh.x", b""), reg("up/.wh..wh..opq", b""))
        assert os.getxattr(arena.dest, "user.overlay.opaque") == b"y"
        assert sorted(os.listdir(arena.dest)) == ["up"]


def test_opaque_marker_through_a_symlink_pointing_out(arena: Arena) -> None:
    entries = (sym("l", str(arena.sibling)), reg("l/.wh..wh..opq", b""))
    if arena.flatten:
        arena.unpack(*entries)
    else:
        arena.rejects(*entries, match="does not lead")


# -- devices, xattrs ------------------------------------------------------------------------

def test_device_nodes_are_not_created(arena: Arena) -> None:
    null = entry("dev/null", tarfile.CHRTYPE, mode=0o666)
    null[0].devmajor, null[0].devminor = 1, 3
    disk = entry("dev/sda", tarfile.BLKTYPE, mode=0o666)
    disk[0].devmajor = 8
    fake_whiteout = entry("dev/zero", tarfile.CHRTYPE)
    report = arena.unpack(dir_("dev"), null, disk, fake_whiteout)
    assert os.listdir(arena.inside("dev")) == []
    assert sum("device" in line for line in report.skipped) == 3


OVERLAY_XATTRS = {"SCHILY.xattr.trusted.overlay.opaque": "y",
                  "SCHILY.xattr.user.overlay.opaque": "y",
                  "SCHILY.xattr.trusted.overlay.redirect": "/etc",
                  "SCHILY.xattr.user.overlay.redirect": "/etc",
                  "SCHILY.xattr.user.overlay.metacopy": "",
                  "SCHILY.xattr.trusted.overlay.origin": "x"}


def test_overlay_xattrs_in_a_layer_are_never_applied(arena: Arena) -> None:
    report = arena.unpack(dir_("d", pax=OVERLAY_XATTRS), reg("d/f", pax=OVERLAY_XATTRS),
                          entry("fifo", tarfile.FIFOTYPE, pax=OVERLAY_XATTRS))
    for rel in ("d", "d/f", "fifo"):
        names = os.listxattr(arena.inside(rel))
        assert not [n for n in names if ".overlay." in n], (rel, names)
    assert sum("overlay" in line for line in report.skipped) == len(OVERLAY_XATTRS)


def test_ownership_record_from_a_layer_is_not_trusted_when_squashing(arena: Arena) -> None:
    arena.unpack(reg("f", pax={"SCHILY.xattr.user.rootlesscontainers": "\x08\x00\x10\x00"}))
    if arena.ownership.mode == "squash":
        assert "user.rootlesscontainers" not in os.listxattr(arena.inside("f"))


# -- caps -----------------------------------------------------------------------------------

def test_huge_sparse_file_is_refused_before_writing(arena: Arena) -> None:
    ti, _ = reg("GNUSparseFile.0/huge")
    ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                      "GNU.sparse.name": "huge", "GNU.sparse.realsize": str(1 << 40)}
    data = b"1\n0\n4\n".ljust(512, b"\0") + b"abcd"
    ti.size = len(data)
    arena.rejects((ti, data), match=f"over the cap of {16 << 30}")
    assert not arena.inside("huge").exists()


def test_huge_declared_file_size_is_refused_before_reading(arena: Arena) -> None:
    ti = tarfile.TarInfo("big")
    ti.size = 100 << 30
    blob = ti.tobuf(tarfile.PAX_FORMAT) + b"\0" * 4096  # no data at all behind the claim
    arena.rejects(blob=blob, match="over the cap")
    assert not arena.inside("big").exists()


def test_negative_size_is_rejected(arena: Arena) -> None:
    arena.rejects(reg("a", b"", pax={"size": "-1024"}), reg("b"), match="negative size")


def test_entry_cap(arena: Arena) -> None:
    entries = [reg(f"d{i % 10}/f{i}", b"") for i in range(1001)]
    arena.rejects(*entries, limits=UnpackLimits(max_entries=1000), match="more than 1000")


def test_byte_cap_counts_every_file(arena: Arena) -> None:
    entries = [reg(f"f{i}", b"x" * 1000) for i in range(20)]
    arena.rejects(*entries, limits=UnpackLimits(max_bytes=10_000), match="over the cap")
    assert len(os.listdir(arena.dest)) == 10


def test_header_bomb_is_refused(arena: Arena) -> None:
    ti, data = reg("f")
    ti.pax_headers = {"comment": "x" * (4 << 20)}
    arena.rejects((ti, data), match="header is larger")


def test_trailing_data_bomb_is_refused(arena: Arena) -> None:
    blob = gzip.compress(build(reg("f")) + b"\0" * (20 << 20), compresslevel=1)
    arena.rejects(blob=blob, match="after the end of its tar archive")
