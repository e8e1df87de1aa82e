"""Layer unpacking (sandbox/images/store/unpack.py) on tars the tests build: every entry type,
whiteouts in both modes, ownership, caps, compression and the diff_id."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
import tarfile
from pathlib import Path

import pytest
import zstandard

from sandbox.errors import LayerError
from sandbox.images.store.unpack import (
    Ownership,
    UnpackLimits,
    UnpackReport,
    container_mode,
    detect_compression,
    unpack_layer,
)
from sandbox.runtime.idmap import IdMapping, IdRange

SQUASH = Ownership("squash")
ROOT = os.geteuid() == 0
ME = (os.geteuid(), os.getegid())
MTIME = 1_600_000_000

Entry = tuple[tarfile.TarInfo, bytes | None]


def entry(name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes | None = None,
          mode: int = 0o644, link: str = "", uid: int = 0, gid: int = 0,
          xattrs: dict[str, str] | None = None, mtime: int = MTIME) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.linkname, ti.uid, ti.gid, ti.mtime = kind, mode, link, uid, gid, mtime
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    if data is not None:
        ti.size = len(data)
    return ti, data


def reg(name: str, data: bytes = b"", **kw: object) -> Entry:
    return entry(name, data=data, **kw)  # type: ignore[arg-type]


def dir_(name: str, mode: int = 0o755, **kw: object) -> Entry:
    return entry(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str) -> Entry:
    return entry(name, tarfile.SYMTYPE, link=target, mode=0o777)


def hard(name: str, target: str) -> Entry:
    return entry(name, tarfile.LNKTYPE, link=target)


def build(*entries: Entry, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def unpack(tmp_path: Path, blob: bytes, *, name: str = "dest", flatten: bool = False,
           ownership: Ownership = SQUASH, limits: UnpackLimits | None = None) -> UnpackReport:
    dest = tmp_path / name
    dest.mkdir(exist_ok=True)
    return unpack_layer(io.BytesIO(blob), dest, ownership=ownership,
                        limits=limits or UnpackLimits(), flatten=flatten)


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything below root: type, mode, size, content hash, link target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, extra)
    return out


# -- compression and the diff_id ----------------------------------------------------------

def test_detect_compression_by_magic() -> None:
    assert detect_compression(gzip.compress(b"x")[:6]) == "gzip"
    assert detect_compression(zstandard.compress(b"x")[:6]) == "zstd"
    assert detect_compression(b"\x50\x2a\x4d\x18\x00\x00") == "zstd"  # skippable frame
    assert detect_compression(b"etc/\0\0") == "none"
    assert detect_compression(b"") == "none"
    assert detect_compression(b"BZhello") == "none"  # a tar whose first name starts "BZh"
    with pytest.raises(LayerError, match="bzip2"):
        detect_compression(b"BZh91AY&SY")
    with pytest.raises(LayerError, match="xz"):
        detect_compression(b"\xfd7zXZ\x00\x00")


SAMPLE = (dir_("etc"), reg("etc/hosts", b"127.0.0.1 localhost\n" * 1000, mode=0o600),
          sym("etc/link", "hosts"), dir_("bin", 0o555), reg("bin/sh", os.urandom(3 << 20)))


def test_gzip_zstd_and_plain_give_the_same_tree_and_diff_id(tmp_path: Path) -> None:
    plain = build(*SAMPLE) + b"\0" * 10240  # trailing padding is part of the diff_id
    blobs = {
        "none": plain,
        "gzip": gzip.compress(plain),
        # Two frames and a skippable one: zstd:chunked layers look like this.
        "zstd": zstandard.compress(plain[:5000]) + b"\x50\x2a\x4d\x18\x04\0\0\0abcd"
                + zstandard.compress(plain[5000:]),
    }
    trees, expected = [], "sha256:" + hashlib.sha256(plain).hexdigest()
    for kind, blob in blobs.items():
        report = unpack(tmp_path, blob, name=kind)
        assert (report.compression, report.diff_id, report.entries) == (kind, expected, 5)
        assert report.bytes == 20 * 1000 + (3 << 20)
        trees.append(tree(tmp_path / kind))
    assert trees[0] == trees[1] == trees[2]
    assert set(trees[0]) == {"etc", "etc/hosts", "etc/link", "bin", "bin/sh"}


def test_multi_member_gzip_and_a_path_source(tmp_path: Path) -> None:
    plain = build(reg("a", b"1" * 100_000), reg("b", b"2"))
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(plain[:7000]) + gzip.compress(plain[7000:]) + b"\0" * 8)
    (tmp_path / "dest").mkdir()
    report = unpack_layer(blob, tmp_path / "dest", ownership=SQUASH)
    assert report.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert (tmp_path / "dest/a").read_bytes() == b"1" * 100_000


def test_an_empty_blob_is_an_empty_layer(tmp_path: Path) -> None:
    report = unpack(tmp_path, b"")
    assert report.entries == 0 and report.diff_id == "sha256:" + hashlib.sha256().hexdigest()
    assert stat.S_IMODE((tmp_path / "dest").stat().st_mode) == 0o755
    assert unpack(tmp_path, gzip.compress(b"\0" * 1024), name="d2").entries == 0


@pytest.mark.parametrize("blob, match", [
    (gzip.compress(build(reg("a", b"x" * 50_000)))[:-100], "truncated"),
    (gzip.compress(build(reg("a", b"x"))) + b"garbage", "not gzip"),
    (gzip.compress(b"x" * 300), "not a tar archive"),
    (build(reg("a", b"x"))[:1024] + b"\xff" * 512 + b"\0" * 1024, "invalid tar header"),
    (build(reg("a", b"x" * 4000))[:1024], "ends in the middle of a file"),
    (b"\x28\xb5\x2f\xfd" + b"\xff" * 20, "decompress"),
    (zstandard.ZstdCompressor(write_checksum=True).compress(build(reg("a")))[:-2] + b"xx",
     "decompress"),
])
def test_corrupt_blobs_are_rejected(tmp_path: Path, blob: bytes, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        unpack(tmp_path, blob)


# -- entry types ----------------------------------------------------------------------------

def test_regular_files_keep_content_mode_and_mtime(tmp_path: Path) -> None:
    unpack(tmp_path, build(reg("bin/sh", b"\x7fELF", mode=0o755),
                           reg("ro", b"r", mode=0o400), reg("sticky", mode=0o1644)))
    d = tmp_path / "dest"
    st = (d / "bin/sh").stat()
    assert (d / "bin/sh").read_bytes() == b"\x7fELF"
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_mtime_ns == MTIME * 10**9
    assert stat.S_IMODE((d / "ro").stat().st_mode) == 0o400
    assert stat.S_IMODE((d / "sticky").stat().st_mode) == 0o1644
    # A parent missing from the tar is made as root's 0755 directory.
    assert stat.S_IMODE((d / "bin").stat().st_mode) == 0o755
    assert (d / "bin").stat().st_uid == ME[0]


@pytest.mark.parametrize("flatten", [False, True])
def test_setuid_setgid_bits_and_file_capabilities_are_dropped(tmp_path: Path,
                                                              flatten: bool) -> None:
    """Issue #10: a layer file is the service user's (or a subordinate id's) on the host;
    setuid there would be a way into that user for anyone reaching it. Under no_new_privs
    they gave nothing inside a container anyway."""
    # cap_net_raw, permitted and effective (struct vfs_cap_data, revision 2).
    cap = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0).decode("utf-8", "surrogateescape")
    own = Ownership("map", 100000, 100000, 65536) if ROOT else SQUASH
    report = unpack(tmp_path, build(
        reg("bin/su", b"\x7fELF", mode=0o4755), reg("bin/wall", b"w", mode=0o2755),
        reg("bin/both", b"b", mode=0o6711),
        reg("bin/ping", b"p", mode=0o755, xattrs={"security.capability": cap}),
        hard("bin/su2", "bin/su"), dir_("var/mail", 0o2775), dir_("tmp", 0o1777)),
        ownership=own, flatten=flatten)
    d = tmp_path / "dest"
    modes = {name: stat.S_IMODE((d / name).stat().st_mode)
             for name in ("bin/su", "bin/su2", "bin/wall", "bin/both", "var/mail", "tmp")}
    assert modes == {"bin/su": 0o755, "bin/su2": 0o755, "bin/wall": 0o755, "bin/both": 0o711,
                     "var/mail": 0o2775, "tmp": 0o1777}
    assert "security.capability" not in os.listxattr(d / "bin/ping")
    # What was dropped is recorded, for a build that copies the file on (COPY --from) ...
    assert os.getxattr(d / "bin/both", "user.sandboxd.setid") == b"6000"
    fd = os.open(d / "bin/su", os.O_PATH)
    try:
        assert container_mode(fd, os.stat(fd)) == 0o4755
    finally:
        os.close(fd)
    notes = "\n".join(report.skipped)
    assert "bin/su: setuid/setgid bits dropped" in notes
    assert "xattr 'security.capability' not applied" in notes


def test_directory_modes_are_applied_after_their_contents(tmp_path: Path) -> None:
    unpack(tmp_path, build(dir_("ro", 0o555), reg("ro/f", b"1"), dir_("ro/none", 0o000),
                           reg("ro/none/g", b"2"), dir_("ro/none/deep", 0o700)))
    d = tmp_path / "dest"
    assert stat.S_IMODE((d / "ro").stat().st_mode) == 0o555
    assert stat.S_IMODE((d / "ro/none").stat().st_mode) == 0o000
    assert (d / "ro").stat().st_mtime_ns == MTIME * 10**9
    assert (d / "ro/none").stat().st_mtime_ns == MTIME * 10**9
    os.chmod(d / "ro/none", 0o700)
    assert (d / "ro/none/g").read_bytes() == b"2"


def test_pax_mtimes_are_exact_and_insane_ones_ignored(tmp_path: Path) -> None:
    exact, huge, nan = reg("exact"), reg("huge"), reg("nan")
    exact[0].pax_headers = {"mtime": "1795812885.609029041"}
    huge[0].pax_headers = {"mtime": "1e999999999"}
    nan[0].pax_headers = {"mtime": "nan"}
    report = unpack(tmp_path, build(exact, huge, nan))
    assert (tmp_path / "dest/exact").stat().st_mtime_ns == 1795812885609029041
    assert (tmp_path / "dest/huge").exists() and (tmp_path / "dest/nan").exists()
    assert any("mtime" in line for line in report.skipped)


def test_the_root_entry_sets_the_mode_of_dest(tmp_path: Path) -> None:
    unpack(tmp_path, build(dir_("./", 0o751), reg("./a", b"x")))
    assert stat.S_IMODE((tmp_path / "dest").stat().st_mode) == 0o751
    # Without one, the layer root is an ordinary 0755 directory (dest was made 0700).
    (tmp_path / "d2").mkdir(mode=0o700)
    unpack(tmp_path, build(reg("a", b"x")), name="d2")
    assert stat.S_IMODE((tmp_path / "d2").stat().st_mode) == 0o755
    # Flattening: the first layer's root entry (or the default) stays under later layers.
    (tmp_path / "flat").mkdir(mode=0o700)
    unpack(tmp_path, build(dir_(".", 0o750), reg("a")), name="flat", flatten=True)
    unpack(tmp_path, build(reg("b")), name="flat", flatten=True)
    assert stat.S_IMODE((tmp_path / "flat").stat().st_mode) == 0o750
    (tmp_path / "flat2").mkdir(mode=0o700)
    unpack(tmp_path, build(reg("a")), name="flat2", flatten=True)
    assert stat.S_IMODE((tmp_path / "flat2").stat().st_mode) == 0o755


def test_names_are_normalised(tmp_path: Path) -> None:
    unpack(tmp_path, build(reg("/abs", b"1"), reg("./dot/./x", b"2"), reg("a//b", b"3")))
    d = tmp_path / "dest"
    assert sorted(tree(d)) == ["a", "a/b", "abs", "dot", "dot/x"]


@pytest.mark.parametrize("name", ["a/..", "a/../b", "../b", "a/.", "x" * 4100, "a\0b"])
def test_bad_names_are_rejected(tmp_path: Path, name: str) -> None:
    ti, data = reg("placeholder", b"1")
    ti.pax_headers = {"path": name}  # PAX carries anything tarfile would otherwise mangle
    with pytest.raises(LayerError):
        unpack(tmp_path, build((ti, data)))


def test_symlinks_hardlinks_and_fifos(tmp_path: Path) -> None:
    report = unpack(tmp_path, build(
        reg("etc/passwd", b"root:x:0:0\n"), sym("abs", "/etc/passwd"),
        sym("rel", "../../etc/passwd"), hard("etc/hl", "etc/passwd"),
        hard("etc/hl2", "./abs"), entry("fifo", tarfile.FIFOTYPE, mode=0o640)))
    d = tmp_path / "dest"
    assert os.readlink(d / "abs") == "/etc/passwd" and os.readlink(d / "rel") == "../../etc/passwd"
    assert (d / "etc/hl").stat().st_ino == (d / "etc/passwd").stat().st_ino
    assert (d / "etc/hl2").lstat().st_ino == (d / "abs").lstat().st_ino  # the link itself
    assert stat.S_ISFIFO((d / "fifo").lstat().st_mode)
    assert stat.S_IMODE((d / "fifo").lstat().st_mode) == 0o640
    assert report.skipped == []


def test_devices_sockets_and_unknown_types_are_skipped_and_listed(tmp_path: Path) -> None:
    null = entry("dev/null", tarfile.CHRTYPE, mode=0o666)
    null[0].devmajor, null[0].devminor = 1, 3
    disk = entry("dev/sda", tarfile.BLKTYPE)
    odd = entry("odd", b"Z", data=b"payload")
    report = unpack(tmp_path, build(dir_("dev"), null, disk, odd, reg("after", b"ok")))
    d = tmp_path / "dest"
    assert sorted(os.listdir(d)) == ["after", "dev"] and os.listdir(d / "dev") == []
    assert (d / "after").read_bytes() == b"ok"
    assert any("dev/null" in s and "1:3" in s for s in report.skipped)
    assert any("dev/sda" in s for s in report.skipped)
    assert any("'Z'" in s for s in report.skipped)


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    unpack(tmp_path, build(reg("f", b"old"), dir_("f", 0o700), reg("f/x", b"1"),
                           dir_("d"), reg("d/sub/y", b"2"), reg("d", b"file now"),
                           sym("s", "f"), reg("s", b"not a link"),
                           dir_("m", 0o700, mtime=5), dir_("m", 0o750)))
    d = tmp_path / "dest"
    assert (d / "f/x").read_bytes() == b"1"
    assert (d / "d").read_bytes() == b"file now"
    assert not (d / "s").is_symlink() and (d / "s").read_bytes() == b"not a link"
    assert stat.S_IMODE((d / "m").stat().st_mode) == 0o750


def test_sparse_files_are_written_in_full(tmp_path: Path) -> None:
    # PAX sparse 1.0: the map ("1 segment: offset 0, 4 bytes") precedes the data.
    ti, _ = reg("GNUSparseFile.0/s")
    ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                      "GNU.sparse.name": "sparse", "GNU.sparse.realsize": "70000"}
    data = b"1\n0\n4\n".ljust(512, b"\0") + b"abcd"
    ti.size = len(data)
    report = unpack(tmp_path, build((ti, data)))
    content = (tmp_path / "dest/sparse").read_bytes()
    assert content == b"abcd" + b"\0" * (70000 - 4)
    assert report.bytes == 70000


# -- xattrs and ownership -------------------------------------------------------------------

def rootless_xattr(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, "user.rootlesscontainers", follow_symlinks=False)
    except OSError:
        return None


def test_squash_keeps_our_ids_and_records_the_real_owner(tmp_path: Path) -> None:
    unpack(tmp_path, build(reg("a", b"1", uid=1000, gid=0), reg("b", b"2", uid=0, gid=42),
                           reg("root", b"3"), dir_("d", uid=1, gid=1), sym("l", "a")))
    d = tmp_path / "dest"
    # Resource{uid=1000, gid=0xFFFFFFFF (unchanged)}, as umoci writes it.
    assert rootless_xattr(d / "a") == b"\x08\xe8\x07\x10\xff\xff\xff\xff\x0f"
    assert rootless_xattr(d / "b") == b"\x08\xff\xff\xff\xff\x0f\x10\x2a"
    assert rootless_xattr(d / "d") == b"\x08\x01\x10\x01"
    assert rootless_xattr(d / "root") is None
    for p in ("a", "b", "root", "d"):
        st = (d / p).lstat()
        assert (st.st_uid, st.st_gid) == ME


def test_flatten_drops_a_stale_owner_record_when_a_directory_is_merged(tmp_path: Path) -> None:
    unpack(tmp_path, build(dir_("d", uid=7)), flatten=True)
    assert rootless_xattr(tmp_path / "dest/d") is not None
    unpack(tmp_path, build(dir_("d", 0o700)), flatten=True)
    assert rootless_xattr(tmp_path / "dest/d") is None


@pytest.mark.skipif(not ROOT, reason="mapping ownership needs chown: root only")
def test_map_mode_shifts_ids_into_the_range(tmp_path: Path) -> None:
    own = Ownership("map", 200000, 300000, 65536)
    report = unpack(tmp_path, build(reg("a", b"1", uid=33, gid=44), sym("l", "a"),
                                    reg("big", b"2", uid=70000, gid=5), reg("x/y", b"3")),
                    ownership=own)
    d = tmp_path / "dest"
    st = (d / "a").stat()
    assert (st.st_uid, st.st_gid) == (200033, 300044)
    assert (d / "l").lstat().st_uid == 200000
    st = (d / "big").stat()
    assert (st.st_uid, st.st_gid) == (200000, 300005)
    assert rootless_xattr(d / "big") == b"\x08\xf0\xa2\x04\x10\xff\xff\xff\xff\x0f"
    assert (d / "x").stat().st_uid == 200000  # an implicit parent belongs to container root
    assert (d.stat().st_uid, d.stat().st_gid) == (200000, 300000)
    assert any("beyond" in s for s in report.skipped)


def test_ownership_for_mapping() -> None:
    direct = IdMapping("direct", (IdRange(0, 100000, 65536),), (IdRange(0, 200000, 4096),),
                       65534, 65534)
    single = IdMapping("single", (IdRange(0, 1000, 1),), (IdRange(0, 1000, 1),), 0, 0)
    expected = Ownership("map", 100000, 200000, 4096) if ROOT else SQUASH
    assert Ownership.for_mapping(direct) == expected
    assert Ownership.for_mapping(single) == SQUASH
    with pytest.raises(ValueError):
        Ownership("chown")


def test_layer_xattrs_user_kept_overlay_and_ownership_ones_dropped(tmp_path: Path) -> None:
    report = unpack(tmp_path, build(
        reg("f", b"1", xattrs={"user.mime": "text/plain", "user.rootlesscontainers": "\x08\x00",
                               "trusted.overlay.opaque": "y", "user.overlay.redirect": "/x",
                               "system.posix_acl_access": "x",
                               # ours: a layer cannot claim setuid bits it never had
                               "user.sandboxd.setid": "4000"}),
        dir_("d", xattrs={"user.overlay.opaque": "y"})))
    d = tmp_path / "dest"
    assert os.listxattr(d / "f") == ["user.mime"]
    assert os.getxattr(d / "f", "user.mime") == b"text/plain"
    assert os.listxattr(d / "d") == []
    dropped = "\n".join(report.skipped)
    for name in ("user.rootlesscontainers", "trusted.overlay.opaque", "user.overlay.redirect",
                 "system.posix_acl_access", "user.overlay.opaque", "user.sandboxd.setid"):
        assert name in dropped


# -- whiteouts ------------------------------------------------------------------------------

def is_whiteout(p: Path) -> bool:
    st = p.lstat()
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_overlay_whiteouts_become_devices_and_opaque_xattrs(tmp_path: Path) -> None:
    unpack(tmp_path, build(
        dir_("etc"), reg("etc/.wh.gone"), dir_("var"), reg("var/.wh.old"),
        reg("var/.wh..wh..opq"), reg("var/new", b"n"), reg("var/.wh.later"),
        dir_("mine"), reg("mine/f"), reg(".wh.mine"),
        reg("implicit/.wh.x"), reg(".wh..wh..opq")))
    d = tmp_path / "dest"
    assert is_whiteout(d / "etc/gone")
    assert os.getxattr(d / "var", "user.overlay.opaque") == b"y"
    assert os.getxattr(d, "user.overlay.opaque") == b"y"
    # A whiteout in an opaque directory is dropped (overlayfs would list it).
    assert sorted(os.listdir(d / "var")) == ["new"]
    # A directory of this layer that is also whited out hides the lower one: opaque.
    assert os.getxattr(d / "mine", "user.overlay.opaque") == b"y"
    assert (d / "mine/f").exists()
    assert is_whiteout(d / "implicit/x")
    names = [p for p in tree(d) if ".wh." in p]
    assert names == []


def test_overlay_entry_after_its_whiteout_replaces_it(tmp_path: Path) -> None:
    unpack(tmp_path, build(reg(".wh.a"), reg("a", b"file"), reg(".wh.b"), reg("b/c", b"c")))
    d = tmp_path / "dest"
    assert (d / "a").read_bytes() == b"file"
    assert (d / "b").is_dir() and os.getxattr(d / "b", "user.overlay.opaque") == b"y"


def test_flatten_whiteouts_delete_lower_entries(tmp_path: Path) -> None:
    unpack(tmp_path, build(reg("etc/keep", b"k"), reg("etc/gone", b"g"),
                           dir_("tree"), dir_("tree/sub", 0o555), reg("tree/sub/f"),
                           sym("link", "/etc"), reg("var/lower", b"l"), reg("var/sub/x"),
                           reg("var/again", b"old")), flatten=True)
    unpack(tmp_path, build(reg("etc/.wh.gone"), reg(".wh.tree"), reg(".wh.link"),
                           reg(".wh.nothing"), reg("missing/.wh.x"),
                           reg("var/again", b"new"), reg("var/.wh..wh..opq"),
                           reg("var/sub/mine", b"m")), flatten=True)
    d = tmp_path / "dest"
    assert sorted(tree(d)) == ["etc", "etc/keep", "var", "var/again", "var/sub", "var/sub/mine"]
    assert (d / "var/again").read_bytes() == b"new"


def test_flatten_whiteout_of_this_layers_directory_only_hides_lower_contents(
        tmp_path: Path) -> None:
    unpack(tmp_path, build(reg("d/lower", b"l")), flatten=True)
    unpack(tmp_path, build(reg("d/upper", b"u"), reg(".wh.d")), flatten=True)
    assert sorted(os.listdir(tmp_path / "dest/d")) == ["upper"]


def test_flatten_into_directories_without_write_permission(tmp_path: Path) -> None:
    unpack(tmp_path, build(dir_("ro", 0o555), reg("ro/a"), dir_("ro/x", 0o000),
                           reg("ro/x/b"), dir_("ro/x/y", 0o500)), flatten=True)
    unpack(tmp_path, build(reg("ro/x/y/c", b"c"), reg("ro/.wh.a"), reg("ro/x/.wh.b")),
           flatten=True)
    d = tmp_path / "dest"
    assert stat.S_IMODE((d / "ro").stat().st_mode) == 0o555
    assert stat.S_IMODE((d / "ro/x").stat().st_mode) == 0o000
    os.chmod(d / "ro/x", 0o700)
    assert stat.S_IMODE((d / "ro/x/y").stat().st_mode) == 0o500
    assert sorted(tree(d / "ro")) == ["x", "x/y", "x/y/c"]


# -- caps -----------------------------------------------------------------------------------

def test_entry_cap(tmp_path: Path) -> None:
    blob = build(*(reg(f"f{i}") for i in range(11)))
    assert unpack(tmp_path, blob, name="ok", limits=UnpackLimits(max_entries=11)).entries == 11
    with pytest.raises(LayerError, match="more than 10 entries"):
        unpack(tmp_path, blob, limits=UnpackLimits(max_entries=10))


def test_byte_cap_is_checked_before_writing(tmp_path: Path) -> None:
    blob = build(reg("a", b"x" * 600), reg("b", b"y" * 600))
    with pytest.raises(LayerError, match="over the cap of 1000"):
        unpack(tmp_path, blob, limits=UnpackLimits(max_bytes=1000))
    assert os.listdir(tmp_path / "dest") == ["a"]


def test_huge_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    ti, data = reg("a", b"1")
    ti.pax_headers = {"comment": "x" * (2 << 20)}
    with pytest.raises(LayerError, match="header is larger"):
        unpack(tmp_path, build((ti, data)))
