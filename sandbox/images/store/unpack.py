"""Unpack one image layer (a tar, plain, gzip or zstd) into a directory: the boundary between
a registry's bytes and the host filesystem, so every entry is treated as hostile.

- `tarfile` parses the headers only, reading sequentially from a forward-only stream that
  decompresses and hashes (for the diff_id) in a thread of its own (`layerstream.py`); file
  data is copied from that stream by this module, and nothing is extracted by tarfile.
- Every path is opened inside `dest` with openat2 RESOLVE_IN_ROOT (`resolve.py`): symlinks,
  the layer's own included, are followed but can never lead out of `dest`; the last
  component is acted on with *at calls that do not follow it. A `..` component, a NUL, an
  over-long path, a hard link to anything but an earlier non-directory entry and an entry
  that would turn `dest` itself into a non-directory (CVE-2021-29136) are refused.
- Overlay mode (the default): the layer becomes an overlayfs lower directory. `.wh.<name>`
  becomes a char 0:0 whiteout, `.wh..wh..opq` the `user.overlay.opaque` xattr (overlay is
  mounted with `userxattr`). Flatten mode: `dest` already holds the lower layers and the
  whiteouts delete from them.
- Device nodes are never created, as root or not: they would be useless (a user namespace's
  mounts ignore them) and dangerous on the host. They, sockets and unknown entry types are
  listed in `UnpackReport.skipped`.
- Ownership is mapped into the container's id range, or squashed to the unpacking user with
  the original owner kept in the `user.rootlesscontainers` xattr (as umoci does).
- Setuid and setgid bits of files and `security.capability` (file capabilities) are dropped,
  once per layer in the report: on the host, a layer file is a file of the service's user
  (or of its subordinate ids), and a setuid one would be a way into that user for anyone
  who reaches it; in a container they grant nothing, as every run has no_new_privs (and
  roots are mounted nosuid). A directory keeps its setgid bit (new files take its group:
  no privilege) and its sticky bit.
- Caps on entries, declared file bytes, path length and header sizes are checked before
  anything is written. On any error a LayerError is raised and `dest` is left partly filled:
  the caller removes it (directories in it may lack write permission for their owner).
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from sandbox.errors import LayerError
from sandbox.images.store.layerstream import (
    CHUNK,
    HEADER_ALLOWANCE,
    LayerStream,
    Prefetch,
    Prefixed,
    decoder,
    detect_compression,
    read_head,
    write_all,
)
from sandbox.runtime.resolve import open_in_root

if TYPE_CHECKING:
    from sandbox.runtime.idmap import IdMapping

T = TypeVar("T")

_PATH_MAX = 4096
_NOOP_ID = 0xFFFFFFFF
_SKIPPED_CAP = 100

_ROOTLESS_XATTR = b"user.rootlesscontainers"
_OPAQUE_XATTR = b"user.overlay.opaque"
_WHITEOUT = b".wh."
_OPAQUE_MARKER = b".wh..wh..opq"

_SETID = stat.S_ISUID | stat.S_ISGID
# The setuid/setgid bits a file lost here, in octal: a build that copies it on (COPY
# --from) writes them into its layer, as the image had them (store/merged.py).
_SETID_XATTR = b"user.sandboxd.setid"
_O_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Ownership:
    """How tar uids/gids become host ids.

    "map": host id = base + tar id when tar id < count (ids beyond the range become the
    base, container root, and the real ids go to `user.rootlesscontainers`); needs root.
    "squash": files keep the unpacking user's ids; non-zero tar ids go to the xattr.
    """

    mode: str
    uid_base: int = 0
    gid_base: int = 0
    count: int = 65536

    def __post_init__(self) -> None:
        if self.mode not in ("map", "squash"):
            raise ValueError(f"Ownership mode must be 'map' or 'squash', not {self.mode!r}")
        if self.count < 1 or self.uid_base < 0 or self.gid_base < 0:
            raise ValueError(f"invalid id range in {self!r}")

    @classmethod
    def for_mapping(cls, mapping: IdMapping) -> Ownership:
        # Only root may chown, and only the `direct` method maps container N to base + N.
        if os.geteuid() == 0 and mapping.method == "direct":
            return cls("map", mapping.uids[0].outside, mapping.gids[0].outside,
                       min(mapping.uids[0].count, mapping.gids[0].count))
        return cls("squash")


@dataclass(frozen=True)
class UnpackLimits:
    max_bytes: int = 16 << 30  # sum of declared regular-file sizes (sparse ones at full size)
    max_entries: int = 1_000_000


@dataclass
class UnpackReport:
    diff_id: str  # sha256 of the uncompressed tar stream, trailing bytes included
    compression: str  # "gzip" | "zstd" | "none"
    entries: int
    bytes: int
    skipped: list[str] = field(default_factory=list)


def unpack_layer(src: Path | BinaryIO, dest: Path, *, ownership: Ownership,
                 limits: UnpackLimits = UnpackLimits(), flatten: bool = False) -> UnpackReport:
    """Unpack the layer blob `src` into the existing directory `dest` (empty unless
    `flatten`, where it holds the lower layers applied so far).

    Raises LayerError when the layer is malformed, unsafe or over `limits`; `dest` is then
    partly filled and the caller removes it. The report's diff_id must be checked by the
    caller against the image config.
    """
    try:
        root = os.open(dest, _O_DIR_READ)
    except OSError as e:
        raise LayerError(f"cannot open the unpack directory {dest}: {e.strerror}; it must be "
                         "an existing directory (not a symlink) owned by this user") from e
    own_file = isinstance(src, (str, Path))
    f: BinaryIO = open(src, "rb", buffering=0) if own_file else src  # noqa: SIM115
    try:
        head = read_head(f)
        compression = detect_compression(head)
        unpacker = _Unpacker(root, ownership, flatten)
        source = Prefetch(decoder(compression, Prefixed(head, f)))
        try:
            entries, nbytes = unpacker.run(LayerStream(source), limits)
        finally:
            source.close()
            unpacker.close()
    finally:
        if own_file:
            f.close()
        os.close(root)
    return UnpackReport(diff_id="sha256:" + source.digest.hexdigest(), compression=compression,
                        entries=entries, bytes=nbytes, skipped=unpacker.notes.lines())


# -- helpers ----------------------------------------------------------------------------------

class _Notes:
    """`UnpackReport.skipped`: capped, with repeated reasons reported once."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._more = 0
        self._seen: set[object] = set()

    def add(self, line: str) -> None:
        if len(self._lines) < _SKIPPED_CAP:
            self._lines.append(line)
        else:
            self._more += 1

    def once(self, key: object, line: str) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self.add(line)

    def lines(self) -> list[str]:
        return self._lines + ([f"... and {self._more} more"] if self._more else [])


def _show(name: str) -> str:
    return repr(name if len(name) <= 200 else name[:200] + "...")


def _normalise(name: str, what: str = "entry") -> tuple[bytes, ...]:
    """The components of a tar path inside the layer; () is the layer root itself."""
    raw = name.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise LayerError(f"{what} {_show(name)} contains a NUL byte: the layer is malformed")
    if len(raw) >= _PATH_MAX:
        raise LayerError(f"{what} {_show(name)} is {len(raw)} bytes long, over the path cap "
                         f"of {_PATH_MAX - 1}: the layer is malformed or hostile")
    parts = raw.split(b"/")
    comps = tuple(p for p in parts if p and p != b".")
    if b".." in comps:
        raise LayerError(f"{what} {_show(name)} contains '..': layer paths must name places "
                         "inside the layer; the layer is rejected")
    if comps and next(p for p in reversed(parts) if p) == b".":
        raise LayerError(f"{what} {_show(name)} ends in '.': the layer is malformed")
    return comps


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _rootless_payload(uid: int, gid: int) -> bytes:
    # protobuf `Resource {uint32 uid = 1; uint32 gid = 2;}`, 0xFFFFFFFF meaning "unchanged".
    return b"\x08" + _varint(uid) + b"\x10" + _varint(gid)


def container_owner(fd: int, st: os.stat_result, own: Ownership) -> tuple[int, int]:
    """The (uid, gid) an unpacked entry (`fd`, O_PATH or open; `st` its lstat) has in the
    image: the host ids mapped back, and `user.rootlesscontainers` over them."""
    if own.mode == "map" and 0 <= st.st_uid - own.uid_base < own.count:
        uid, gid = st.st_uid - own.uid_base, st.st_gid - own.gid_base
    else:
        uid = gid = 0
    try:
        payload = os.getxattr(f"/proc/self/fd/{fd}", _ROOTLESS_XATTR)
    except OSError:
        return uid, gid
    fields = _read_payload(payload)
    recorded = fields.get(1, _NOOP_ID), fields.get(2, _NOOP_ID)
    return (uid if recorded[0] == _NOOP_ID else recorded[0],
            gid if recorded[1] == _NOOP_ID else recorded[1])


def container_mode(fd: int, st: os.stat_result) -> int:
    """The permission bits an unpacked entry (`fd`, O_PATH or open) has in the image: its
    own, and the setuid/setgid bits the unpack took off a regular file."""
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return mode
    try:
        recorded = int(os.getxattr(f"/proc/self/fd/{fd}", _SETID_XATTR), 8)
    except (OSError, ValueError):
        return mode
    return mode | (recorded & _SETID)


def _read_payload(payload: bytes) -> dict[int, int]:
    """The varint fields of a `_rootless_payload`; what does not parse counts as absent."""
    fields: dict[int, int] = {}
    i = 0
    while i < len(payload):
        key, value, shift = payload[i], 0, 0
        i += 1
        while i < len(payload) and shift < 35:
            byte = payload[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if key & 7 != 0:  # only varint fields are ever written
            return {}
        fields[key >> 3] = value
    return fields


def _mtime_ns(ti: tarfile.TarInfo) -> int | None:
    """The entry's mtime in ns, None when it is not a sane number."""
    # A PAX mtime has nanoseconds that a float (tarfile's TarInfo.mtime) rounds off.
    text = ti.pax_headers.get("mtime") if ti.pax_headers else None
    try:
        if text is not None:
            value = Decimal(text)
            if value.is_finite() and value.adjusted() < 12:  # never a way to build a huge int
                return int(value.scaleb(9))
        return int(ti.mtime * 1_000_000_000) if isinstance(ti.mtime, float) else ti.mtime * 10**9
    except (ArithmeticError, ValueError):
        return None


def _children(fd: int) -> list[tuple[bytes, bool]]:
    # By path so the names come back as bytes, exactly as on disk.
    with os.scandir(b"/proc/self/fd/%d" % fd) as it:
        return [(e.name, e.is_dir(follow_symlinks=False)) for e in it]


# -- the unpacker -----------------------------------------------------------------------------

class _Unpacker:
    def __init__(self, root: int, ownership: Ownership, flatten: bool) -> None:
        self.root = root
        self.root_abs = os.readlink(b"/proc/self/fd/%d" % root)
        self.own = ownership
        self.flatten = flatten
        self.euid = os.geteuid()
        self.privileged = self.euid == 0
        self.notes = _Notes()
        # Directory mode and mtime, applied last and deepest first, by canonical path (the
        # path inside dest with every symlink resolved): (mode, mtime_ns or None).
        self.dir_attrs: dict[bytes, tuple[int, int | None]] = {}
        # Flatten: canonical paths this layer created or entered (opaque dirs keep these).
        self.created: set[bytes] = set()
        # Overlay: opaque directories, and the whiteouts made in each directory.
        self.opaque: set[bytes] = set()
        self.whiteouts: dict[bytes, list[bytes]] = {}
        self.out_of_range = 0
        # The last parent directory opened (tar entries come directory by directory).
        self._pkey: bytes | None = None
        self._pfd = -1
        self._pcanon = b""

    def close(self) -> None:
        if self._pfd >= 0:
            os.close(self._pfd)
            self._pfd = -1

    # The archive ------------------------------------------------------------------------

    def run(self, stream: LayerStream, limits: UnpackLimits) -> tuple[int, int]:
        if not self.flatten or not _children(self.root):
            # The layer root is a directory like the others: 0755, container root's, unless
            # the layer has an entry for it. (Flattening onto layers keeps what they set.)
            self.dir_attrs[b""] = (0o755, None)
            if self.own.mode == "map":
                os.fchown(self.root, self.own.uid_base, self.own.gid_base)
        elif not self.privileged:
            self._ensure_rwx(self.root)
        try:
            # "r:" rather than "r|": tarfile then reads the stream directly instead of through
            # its own buffer (which copied every byte several times); reads stay sequential.
            tf = tarfile.open(fileobj=stream, mode="r:",  # noqa: SIM115
                              encoding="utf-8", errors="surrogateescape")
        except tarfile.ReadError as e:
            if stream.tell() == 0:  # an empty blob: a layer with no entries
                self.finish()
                return 0, 0
            raise LayerError(f"the layer is not a tar archive ({e})") from e
        entries = nbytes = 0
        try:
            while True:
                try:
                    ti = tf.next()
                except tarfile.TarError as e:
                    raise LayerError(f"the layer's tar is malformed after {entries} entries "
                                     f"({e})") from e
                if ti is None:
                    break
                tf.members.clear()  # tarfile keeps every member otherwise
                stream.limit = tf.offset + HEADER_ALLOWANCE
                entries += 1
                if entries > limits.max_entries:
                    raise LayerError(f"the layer has more than {limits.max_entries} entries, "
                                     "the cap: it is rejected (raise UnpackLimits.max_entries "
                                     "if the image is genuine)")
                if ti.size < 0:
                    raise LayerError(f"{_show(ti.name)} has a negative size: the layer is "
                                     "malformed or hostile")
                if ti.isreg() or ti.type not in tarfile.SUPPORTED_TYPES:
                    nbytes += ti.size
                    if nbytes > limits.max_bytes:
                        raise LayerError(
                            f"the layer's files add up to {nbytes} bytes by {_show(ti.name)}, "
                            f"over the cap of {limits.max_bytes}: it is rejected (raise "
                            "UnpackLimits.max_bytes if the image is genuine)")
                try:
                    self.apply(ti, tf, stream)
                except OSError as e:
                    raise _os_error(ti, e) from e
                except tarfile.TarError as e:
                    raise LayerError(f"the layer's tar is malformed at {_show(ti.name)} "
                                     f"({e})") from e
            end = tf.offset
        finally:
            tf.close()
        # tarfile ends the archive quietly at a header it cannot parse, too.
        at, block = stream.last_block
        if at == end and block.strip(b"\0"):
            raise LayerError(f"invalid tar header at byte {end} after {entries} entries: the "
                             "layer is corrupt")
        stream.drain()
        try:
            self.finish()
        except OSError as e:
            raise LayerError(f"setting directory modes failed: {e}") from e
        if self.out_of_range:
            self.notes.add(f"{self.out_of_range} entries have ids beyond the {self.own.count} "
                           "mapped: owned by container root, real ids in "
                           "user.rootlesscontainers")
        return entries, nbytes

    def apply(self, ti: tarfile.TarInfo, tf: tarfile.TarFile, stream: LayerStream) -> None:
        path = _normalise(ti.name)
        if not path:
            self._root_entry(ti)
            return
        name = path[-1]
        if name.startswith(_WHITEOUT):
            self._whiteout(ti, path)
            return
        if ti.ischr() or ti.isblk():
            self.notes.add(f"{ti.name}: device {ti.devmajor}:{ti.devminor} not created (device "
                           "nodes do not work in a user namespace; the runtime provides /dev)")
            return
        if not (ti.isreg() or ti.isdir() or ti.issym() or ti.islnk() or ti.isfifo()):
            self.notes.add(f"{ti.name}: entry type {ti.type!r} not created (sockets and "
                           "unknown types are not part of an image)")
            return
        pfd, pcanon = self._parent(path[:-1])
        if len(self.root_abs) + len(pcanon) + len(name) + 2 >= _PATH_MAX:
            raise LayerError(f"{_show(ti.name)} resolves to a path over {_PATH_MAX - 1} bytes: "
                             "the layer is malformed or hostile")
        if ti.isreg():
            self._file(pfd, name, ti, tf, stream)
        elif ti.isdir():
            self._dir(pfd, pcanon, name, ti)
        elif ti.issym():
            self._symlink(pfd, name, ti)
        elif ti.islnk():
            self._hardlink(pfd, name, path, ti)
        else:
            fd = self._replace(pfd, name, lambda: self._mkfifo(pfd, name))
            try:
                self._attrs(fd, ti)
            finally:
                os.close(fd)
        if self.flatten:
            self._touch(_join(pcanon, name))

    # Entry types ------------------------------------------------------------------------

    def _root_entry(self, ti: tarfile.TarInfo) -> None:
        if not ti.isdir():
            raise LayerError(f"entry {_show(ti.name)} would turn the layer root into a "
                             "non-directory (CVE-2021-29136): the layer is rejected")
        uid, gid, payload = self._ids(ti)
        if uid >= 0:
            os.fchown(self.root, uid, gid)
        self._set_xattrs(self.root, ti, self._xattrs(ti), payload, merged=True)
        self.dir_attrs[b""] = (ti.mode & 0o7777, _mtime_ns(ti))

    def _file(self, pfd: int, name: bytes, ti: tarfile.TarInfo, tf: tarfile.TarFile,
              stream: LayerStream) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = self._replace(pfd, name, lambda: os.open(name, flags, 0o600, dir_fd=pfd))
        try:
            if ti.size and ti.sparse is None:
                stream.seek(ti.offset_data)
                stream.copy_to(fd, ti.size)
            elif ti.size:  # sparse: tarfile fills the holes
                data = tf.extractfile(ti)
                assert data is not None  # a regular file always has a reader
                while chunk := data.read(CHUNK):
                    write_all(fd, chunk)
            self._attrs(fd, ti)
        finally:
            os.close(fd)

    def _mkfifo(self, pfd: int, name: bytes) -> int:
        os.mkfifo(name, 0o600, dir_fd=pfd)
        return os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=pfd)

    def _attrs(self, fd: int, ti: tarfile.TarInfo) -> None:
        # Owner, then xattrs, then mode, then mtime.
        uid, gid, payload = self._ids(ti)
        if uid >= 0:
            os.fchown(fd, uid, gid)
        self._set_xattrs(fd, ti, self._xattrs(ti), payload)
        if ti.mode & _SETID:
            self.notes.once("setid", f"{ti.name}: setuid/setgid bits dropped (useless under "
                            "no_new_privs, a risk on the host; also on any later entry)")
            self._setxattr(fd, _SETID_XATTR, b"%o" % (ti.mode & _SETID), ti)
        os.fchmod(fd, ti.mode & 0o7777 & ~_SETID)
        self._utime(ti, fd)

    def _dir(self, pfd: int, pcanon: bytes, name: bytes, ti: tarfile.TarInfo) -> None:
        merged = opaque = False
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                merged = True
                if not self.privileged and st.st_mode & 0o700 != 0o700:
                    os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=pfd)
            else:
                # A layer's own directory where it put a whiteout hides the lower one.
                opaque = not self.flatten and _is_whiteout(st)
                self._remove(pfd, name, st.st_mode)
                os.mkdir(name, 0o700, dir_fd=pfd)
        uid, gid, payload = self._ids(ti)
        if uid >= 0:
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        canon = _join(pcanon, name)
        xattrs = self._xattrs(ti)
        if opaque or payload or xattrs or (merged and self.flatten):
            fd = os.open(name, _O_DIR_READ, dir_fd=pfd)
            try:
                self._set_xattrs(fd, ti, xattrs, payload, merged=merged)
                if opaque:
                    self._mark_opaque(fd, canon)
            finally:
                os.close(fd)
        self.dir_attrs[canon] = (ti.mode & 0o7777, _mtime_ns(ti))

    def _symlink(self, pfd: int, name: bytes, ti: tarfile.TarInfo) -> None:
        target = ti.linkname.encode("utf-8", "surrogateescape")
        if not target or b"\0" in target or len(target) >= _PATH_MAX:
            raise LayerError(f"symlink {_show(ti.name)} has an empty, over-long or NUL-holding "
                             "target: the layer is malformed")
        self._replace(pfd, name, lambda: os.symlink(target, name, dir_fd=pfd))
        uid, gid, _ = self._ids(ti)
        if uid >= 0:
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        if self._xattrs(ti):
            self.notes.once("symlink-xattr", f"{ti.name}: xattrs on symlinks are not applied")
        self._utime(ti, name, pfd)

    def _hardlink(self, pfd: int, name: bytes, path: tuple[bytes, ...],
                  ti: tarfile.TarInfo) -> None:
        target = _normalise(ti.linkname, "hard link target")
        missing = LayerError(f"hard link {_show(ti.name)} -> {_show(ti.linkname)}: the target "
                             "must be an earlier non-directory entry of the layer; the layer "
                             "is rejected")
        if not target or target == path:
            raise missing
        try:
            tfd = self._open_dir(target[:-1], create=False) if len(target) > 1 else self.root
        except (FileNotFoundError, NotADirectoryError):
            raise missing from None
        try:
            try:
                st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise missing from None
            if stat.S_ISDIR(st.st_mode) or _is_whiteout(st):
                raise missing
            try:
                self._replace(pfd, name, lambda: os.link(
                    target[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False))
            except FileNotFoundError:
                raise missing from None
        finally:
            if tfd != self.root:
                os.close(tfd)

    # Whiteouts --------------------------------------------------------------------------

    def _whiteout(self, ti: tarfile.TarInfo, path: tuple[bytes, ...]) -> None:
        parent, name = path[:-1], path[-1]
        if name == _OPAQUE_MARKER:
            if self.flatten:
                self._flat_opaque(parent)
            else:
                fd, canon = self._parent(parent)
                dfd = os.open(b".", _O_DIR_READ, dir_fd=fd)
                try:
                    self._mark_opaque(dfd, canon)
                finally:
                    os.close(dfd)
            return
        if name.startswith(_WHITEOUT * 2):
            self.notes.add(f"{ti.name}: AUFS metadata ignored")
            return
        target = name[len(_WHITEOUT):]
        if target in (b"", b".", b".."):
            raise LayerError(f"whiteout {_show(ti.name)} names no entry (a bare '.wh.' or "
                             "'.'/'..'): the layer is malformed")
        if self.flatten:
            self._flat_whiteout(parent, target)
            return
        pfd, pcanon = self._parent(parent)
        if pcanon in self.opaque:
            return  # an opaque dir hides every lower entry; whiteouts in it would show up
        try:
            os.mknod(target, stat.S_IFCHR, 0, dir_fd=pfd)
        except FileExistsError:
            # This layer already has an entry there, which hides the lower one; a directory
            # of its own must in addition hide what the lower directory held.
            st = os.stat(target, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(target, _O_DIR_READ, dir_fd=pfd)
                try:
                    self._mark_opaque(fd, _join(pcanon, target))
                finally:
                    os.close(fd)
            return
        self.whiteouts.setdefault(pcanon, []).append(target)

    def _mark_opaque(self, fd: int, canon: bytes) -> None:
        try:
            os.setxattr(fd, _OPAQUE_XATTR, b"y")
        except OSError as e:
            raise LayerError(f"cannot set {_OPAQUE_XATTR.decode()} ({e.strerror}): the store's "
                             "filesystem must support user xattrs for overlay layers") from e
        self.opaque.add(canon)
        for name in self.whiteouts.pop(canon, ()):
            try:
                if _is_whiteout(os.stat(name, dir_fd=fd, follow_symlinks=False)):
                    os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass

    def _flat_whiteout(self, parent: tuple[bytes, ...], target: bytes) -> None:
        try:
            pfd, pcanon = self._parent(parent, create=False)
            st = os.stat(target, dir_fd=pfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing below to delete (a whiteout under a deleted directory)
        canon = _join(pcanon, target)
        if canon in self.created:
            # This layer's own entry stays; if it is a directory merged with a lower one,
            # the lower contents go.
            if stat.S_ISDIR(st.st_mode):
                self._clean(canon)
            return
        self._remove(pfd, target, st.st_mode)

    def _flat_opaque(self, parent: tuple[bytes, ...]) -> None:
        try:
            _, canon = self._parent(parent, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        self._touch(canon)
        self._clean(canon)

    def _clean(self, top: bytes) -> None:
        """Remove everything below `top` that this layer did not create: as if the lower
        directory had been emptied before the layer was applied."""
        stack = [top]
        while stack:
            canon = stack.pop()
            try:
                fd = self._open_canon(canon)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                for name, is_dir in _children(fd):
                    child = _join(canon, name)
                    if child in self.created:
                        if is_dir:
                            stack.append(child)
                    else:
                        self._remove(fd, name, stat.S_IFDIR if is_dir else 0)
            finally:
                os.close(fd)

    def _touch(self, canon: bytes) -> None:
        while canon and canon not in self.created:
            self.created.add(canon)
            canon = canon.rpartition(b"/")[0]

    # Paths ------------------------------------------------------------------------------

    def _parent(self, comps: tuple[bytes, ...], create: bool = True) -> tuple[int, bytes]:
        """An O_PATH fd of the directory `comps` inside dest and its canonical path; missing
        directories are created (0755, owned by container root) when `create`."""
        if not comps:
            return self.root, b""
        key = b"/".join(comps)
        if key == self._pkey:
            return self._pfd, self._pcanon
        fd = self._open_dir(comps, create)
        try:
            canon = self._canon(fd)
        except BaseException:
            os.close(fd)
            raise
        # The previous fd is closed only now: an entry may still be using it when a removal
        # made the cache stale (see _remove).
        if self._pfd >= 0:
            os.close(self._pfd)
        self._pkey, self._pfd, self._pcanon = key, fd, canon
        return fd, canon

    def _open_dir(self, comps: tuple[bytes, ...], create: bool) -> int:
        try:
            fd = open_in_root(self.root, b"/".join(comps), _O_DIR_PATH)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                raise
            fd = self._walk(comps, create)
        if not self.privileged:
            self._ensure_rwx(fd)
        return fd

    def _walk(self, comps: tuple[bytes, ...], create: bool) -> int:
        """Open `comps` one component at a time, making what is missing (and, unprivileged,
        making each directory passed through searchable by its owner)."""
        fd = self.root
        try:
            for i, comp in enumerate(comps):
                if not self.privileged:
                    self._ensure_rwx(fd)
                try:
                    nfd = open_in_root(self.root, b"/".join(comps[:i + 1]), _O_DIR_PATH)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ENOTDIR) or not create:
                        raise
                    nfd = self._implicit_dir(fd, comp, comps[:i + 1])
                if fd != self.root:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != self.root:
                os.close(fd)
            raise
        return fd

    def _implicit_dir(self, fd: int, name: bytes, path: tuple[bytes, ...]) -> int:
        shown = _show(b"/".join(path).decode("utf-8", "surrogateescape"))
        try:
            st: os.stat_result | None = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        opaque = st is not None and not self.flatten and _is_whiteout(st)
        if opaque:
            assert st is not None
            self._remove(fd, name, st.st_mode)
        elif st is not None and stat.S_ISLNK(st.st_mode):
            raise LayerError(f"{shown} is a symlink that does not lead to a directory inside "
                             "the layer, so nothing can be unpacked below it")
        elif st is not None and not stat.S_ISDIR(st.st_mode):
            raise LayerError(f"{shown} is not a directory, so nothing can be unpacked below it")
        if st is None or opaque:
            os.mkdir(name, 0o700, dir_fd=fd)
            if self.own.mode == "map":
                os.chown(name, self.own.uid_base, self.own.gid_base, dir_fd=fd,
                         follow_symlinks=False)
        nfd = os.open(name, _O_DIR_PATH | os.O_NOFOLLOW, dir_fd=fd)
        try:
            canon = self._canon(nfd)
            self.dir_attrs.setdefault(canon, (0o755, None))
            if opaque:
                dfd = os.open(b".", _O_DIR_READ, dir_fd=nfd)
                try:
                    self._mark_opaque(dfd, canon)
                finally:
                    os.close(dfd)
            if self.flatten:
                self._touch(canon)
        except BaseException:
            os.close(nfd)
            raise
        return nfd

    def _open_canon(self, canon: bytes) -> int:
        """A readable fd of a directory by canonical path (no symlink may be on the way)."""
        pfd = open_in_root(self.root, canon or b".", _O_DIR_PATH, no_symlinks=True)
        try:
            if not self.privileged:
                self._ensure_rwx(pfd)
            return os.open(b".", _O_DIR_READ, dir_fd=pfd)
        finally:
            os.close(pfd)

    def _canon(self, fd: int) -> bytes:
        link = os.readlink(b"/proc/self/fd/%d" % fd)
        if link == self.root_abs:
            return b""
        prefix = self.root_abs.rstrip(b"/") + b"/"
        if not link.startswith(prefix):
            raise LayerError(f"internal error: {link!r} resolved outside {self.root_abs!r}")
        return link[len(prefix):]

    def _ensure_rwx(self, fd: int) -> None:
        """Let the unprivileged owner into a directory a lower layer left without
        permissions; its mode is restored at the end."""
        st = os.fstat(fd)
        if st.st_mode & 0o700 != 0o700 and st.st_uid == self.euid:
            mode = stat.S_IMODE(st.st_mode)
            os.chmod(b"/proc/self/fd/%d" % fd, mode | 0o700)
            self.dir_attrs.setdefault(self._canon(fd), (mode, st.st_mtime_ns))

    # Replacing and removing -------------------------------------------------------------

    def _replace(self, pfd: int, name: bytes, make: Callable[[], T]) -> T:
        """`make()` creates `name` exclusively; whatever is there first is removed."""
        try:
            return make()
        except FileExistsError:
            pass
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        self._remove(pfd, name, st.st_mode)
        return make()

    def _remove(self, pfd: int, name: bytes, mode: int) -> None:
        self._pkey = None  # a cached parent may have resolved through what goes now
        if stat.S_ISDIR(mode):
            self._remove_tree(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)

    def _remove_tree(self, pfd: int, name: bytes) -> None:
        """Remove the directory `name` in `pfd` and everything below it, never following a
        symlink; iterative with one fd open, since a layer's tree can be very deep."""
        fd = self._open_for_removal(pfd, name)
        try:
            stack = [(name, self._empty_files(fd))]
            while stack:
                subdirs = stack[-1][1]
                if subdirs:
                    child = subdirs.pop()
                    cfd = self._open_for_removal(fd, child)
                    os.close(fd)
                    fd = cfd
                    stack.append((child, self._empty_files(fd)))
                    continue
                done = stack.pop()[0]
                # `..` of a directory below `name` is its real parent, still below `name`.
                up = os.open(b"..", _O_DIR_READ, dir_fd=fd) if stack else pfd
                os.close(fd)
                fd = up
                os.rmdir(done, dir_fd=up)
        finally:
            if fd != pfd:
                os.close(fd)

    def _open_for_removal(self, pfd: int, name: bytes) -> int:
        try:
            return os.open(name, _O_DIR_READ, dir_fd=pfd)
        except PermissionError:
            if self.privileged:
                raise
            # A 0000 directory: chmod follows a symlink, but `name` was just seen as a dir.
            os.chmod(name, 0o700, dir_fd=pfd)
            return os.open(name, _O_DIR_READ, dir_fd=pfd)

    def _empty_files(self, fd: int) -> list[bytes]:
        """Unlink every non-directory in `fd`; return the subdirectories."""
        if not self.privileged and os.fstat(fd).st_mode & 0o300 != 0o300:
            os.fchmod(fd, 0o700)
        subdirs = []
        for name, is_dir in _children(fd):
            if is_dir:
                subdirs.append(name)
            else:
                os.unlink(name, dir_fd=fd)
        return subdirs

    # Attributes -------------------------------------------------------------------------

    def _ids(self, ti: tarfile.TarInfo) -> tuple[int, int, bytes | None]:
        """(host uid, host gid, user.rootlesscontainers payload); -1 ids: leave as is."""
        uid, gid = ti.uid, ti.gid
        if not (0 <= uid < _NOOP_ID and 0 <= gid < _NOOP_ID):
            raise LayerError(f"{_show(ti.name)} has owner {uid}:{gid}, outside the 32-bit id "
                             "range: the layer is malformed")
        own = self.own
        if own.mode == "squash":
            if uid == 0 and gid == 0:
                return -1, -1, None
            return -1, -1, _rootless_payload(uid or _NOOP_ID, gid or _NOOP_ID)
        uid_ok, gid_ok = uid < own.count, gid < own.count
        if uid_ok and gid_ok:
            return own.uid_base + uid, own.gid_base + gid, None
        self.out_of_range += 1
        return (own.uid_base + uid if uid_ok else own.uid_base,
                own.gid_base + gid if gid_ok else own.gid_base,
                _rootless_payload(_NOOP_ID if uid_ok else uid, _NOOP_ID if gid_ok else gid))

    def _xattrs(self, ti: tarfile.TarInfo) -> list[tuple[bytes, bytes]]:
        """The layer's xattrs that may be applied: user.* (but overlay metadata and, when
        squashing, our ownership record); the rest (security.capability among them) is
        noted."""
        if not ti.pax_headers:
            return []
        out = []
        for key, value in ti.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr."):]
            allowed = (name.startswith("user.")
                       and not name.startswith(("user.overlay.", "user.sandboxd."))
                       and not (name == "user.rootlesscontainers" and self.own.mode == "squash"))
            if allowed:
                out.append((name.encode("utf-8", "surrogateescape"),
                            value.encode("utf-8", "surrogateescape")))
            else:
                self.notes.once(("drop", name), f"{ti.name}: xattr {name!r} not applied (not "
                                "allowed from a layer; also on any later entry)")
        return out

    def _set_xattrs(self, fd: int, ti: tarfile.TarInfo, xattrs: list[tuple[bytes, bytes]],
                    payload: bytes | None, merged: bool = False) -> None:
        for name, value in xattrs:
            self._setxattr(fd, name, value, ti)
        if payload is not None:
            self._setxattr(fd, _ROOTLESS_XATTR, payload, ti)
        elif merged and self.own.mode == "squash":
            # A directory a lower layer owned as someone else now belongs to root.
            try:
                os.removexattr(fd, _ROOTLESS_XATTR)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise

    def _setxattr(self, fd: int, name: bytes, value: bytes, ti: tarfile.TarInfo) -> None:
        try:
            os.setxattr(fd, name, value)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # EPERM (security.* unprivileged), ENOTSUP, bad names or sizes: note once.
            self.notes.once(("xattr", name, e.errno),
                            f"{ti.name}: xattr {name.decode('utf-8', 'replace')!r} not applied "
                            f"({e.strerror}; also on any later entry)")

    def _utime(self, ti: tarfile.TarInfo, target: int | bytes, pfd: int | None = None) -> None:
        ns = _mtime_ns(ti)
        if ns is None:
            self.notes.once("mtime", f"{ti.name}: mtime {ti.mtime} not applied (not a time)")
            return
        try:
            if pfd is None:
                os.utime(target, ns=(ns, ns))
            else:
                os.utime(target, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
        except (OSError, OverflowError) as e:
            self.notes.once("mtime", f"{ti.name}: mtime {ti.mtime} not applied ({e})")

    def finish(self) -> None:
        """Directory modes and mtimes, deepest first, so that a 0555 or 0000 directory
        could be filled first and its mtime is not changed by its own entries."""
        order = sorted(self.dir_attrs, key=lambda p: p.count(b"/") + bool(p), reverse=True)
        for canon in order:
            mode, mtime = self.dir_attrs[canon]
            try:
                fd = open_in_root(self.root, canon or b".", _O_DIR_READ, no_symlinks=True)
            except (FileNotFoundError, NotADirectoryError):
                continue  # replaced or deleted by a later entry
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                continue
            try:
                os.fchmod(fd, mode)
                if mtime is not None:
                    try:
                        os.utime(fd, ns=(mtime, mtime))
                    except (OSError, OverflowError) as e:
                        self.notes.once("mtime", f"directory mtime not applied ({e})")
            finally:
                os.close(fd)


def _os_error(ti: tarfile.TarInfo, e: OSError) -> LayerError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free space in the image store and pull again"
    elif e.errno == errno.ENOSYS:
        hint = "sandboxd needs Linux 5.6 or newer (openat2)"
    else:
        hint = "the layer cannot be unpacked safely and is rejected"
    return LayerError(f"unpacking {_show(ti.name)} failed: {e.strerror} [errno {e.errno}]; "
                      f"{hint}")
