"""Copying files into and out of a running container, never through a symbolic link.

Every path is opened by the container's init (Container.open_path, native/hostopen.c): as
container root, inside the container's root, every component with openat2
RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS and the last with O_NOFOLLOW; a path through a link
is refused, naming the link (give the real path). Missing parents of a put are made one
directory descriptor at a time, never through a link. This process then only reads or
writes through descriptors. So a symlink planted by the container's code, whenever it is
planted, never redirects a copy (CVE-2018-15664, CVE-2019-10152), no host code ever loads
anything from the container (CVE-2019-14271), and init refuses files of kernel pseudo
filesystems (/proc/self/mem is a regular file) before touching them.

A copy out is a stream: a file is read from its descriptor in chunks as the reader takes
them, and a directory becomes a tar written as it is walked. The walk holds each directory
open and has every entry opened from that directory (init proves the path still names it),
so directories swapped for links or moved during the walk are never followed: what comes
out was inside the directory when it was read, and symlinks in it stay links in the tar.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import struct
import tarfile
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

from sandbox.errors import NotFound, PolicyError
from sandbox.runtime.container import BindError, CachedBind, Container, PendingOpen
from sandbox.runtime.idmap import IdRange
from sandbox.runtime.protocol import Base, Entry, Opened

_T = TypeVar("_T")

MAX_PUT_BYTES = 256 << 20
# Memory no longer grows with a copy out (it streams); these bound one request's work.
MAX_GET_BYTES = 4 << 30
MAX_GET_ENTRIES = 65536
MAX_GET_DEPTH = 256      # directories held open at once by one walk
_CHUNK = 256 << 10
# Up to this much is read or written on the event loop: a thread's round trip (~50 µs)
# would cost more than the copy, and a judge sends and fetches such files with every run.
_INLINE = 64 << 10
_BLOCK = tarfile.BLOCKSIZE
# A directory up to this size is listed on the event loop: a few hundred entries at most
# (a directory's size is ~20 bytes an entry on tmpfs, where writable roots live; one or
# two 4 KiB blocks on ext4).
_INLINE_LISTING = 8 << 10
# Open requests a walk keeps under way (each a descriptor held once answered): init serves
# them back to back while the host writes out the entries already answered. Half of them
# are sent again at once when half are answered.
_WINDOW = 32

# Never block: a FIFO opens at once without a peer (for reading) or fails with ENXIO.
# O_TRUNC is applied by init only once the file is known to be one that may be written.
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_NOCTTY
# Entries that vanished, changed kind or moved since the listing, or live on a kernel
# interface: left out of the tar.
_SKIP = (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EPERM, errno.ENOTDIR, errno.ESTALE)


@dataclass(frozen=True)
class Fetched:
    """A copy out: `chunks` yields a file's bytes (exactly `size` of them) or a tar of the
    directory (`size` None), read from the container as they are taken."""

    kind: str          # "file" | "dir"
    mode: int
    size: int | None
    chunks: AsyncIterator[bytes]

    async def read(self) -> bytes:
        """The whole stream, for callers that want the bytes in memory."""
        return b"".join([chunk async for chunk in self.chunks])


def _normalise(path: str, *, allow_root: bool) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise PolicyError(f"path {path!r}: give an absolute path inside the container")
    if "\0" in path:
        raise PolicyError("path: contains a NUL byte")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PolicyError(f"path {path!r}: '..' is not allowed; give the path without it")
    if not parts and not allow_root:
        raise PolicyError("path: '/' is a directory; give the path of a file")
    return "/" + "/".join(parts)


def _inside(ranges: tuple[IdRange, ...], host: int) -> int:
    """A host id as the container sees it (the overflow id when it is not mapped)."""
    for r in ranges:
        if r.outside <= host < r.outside + r.count:
            return r.inside + host - r.outside
    return 65534


def _writable_hint(container: Container) -> str:
    targets = ", ".join(m.target for m in container.rootfs.tmpfs) or "none"
    return f"this container's root is read-only; the writable paths are: {targets}"


def _open_error(e: OSError, container: Container, path: str, *, writing: bool) -> Exception:
    code = e.errno
    if code == errno.ENOENT:
        return NotFound(f"{path}: no such file or directory in container {container.id}")
    if code == errno.EROFS:
        if container.rootfs.writable:
            return PolicyError(f"{path} is on a read-only mount of the container")
        return PolicyError(f"{path}: {_writable_hint(container)}")
    if code in (errno.ELOOP, errno.EMLINK) and (e.strerror or "").startswith(path):
        return PolicyError(e.strerror)  # init's, naming the link and where it points
    if code == errno.ELOOP:
        return PolicyError(f"{path} passes through a symbolic link; copies never follow "
                           "symbolic links: give the real path")
    if code == errno.EISDIR:
        return PolicyError(f"{path} is a directory; give the path of a file")
    if code == errno.ENXIO:
        return PolicyError(f"{path} is a FIFO, socket or device; only regular files "
                           "and directories can be copied")
    if code == errno.ENOTDIR:
        return PolicyError(f"{path}: a parent of it is not a directory")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return PolicyError(f"{path}: no space (or inodes) left on its filesystem in the "
                           "container; remove files there or copy less")
    what = "write" if writing else "read"
    return PolicyError(f"cannot {what} {path} in container {container.id}: {e.strerror}")


def _check_owner(container: Container, uid: int | None, gid: int | None) -> tuple[int, int]:
    m = container.runtime.mapping
    ids = (m.run_uid if uid is None else uid, m.run_gid if gid is None else gid)
    m.check_run_id("uid", ids[0])
    m.check_run_id("gid", ids[1])
    return ids


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    try:
        while view:
            view = view[os.write(fd, view[:_CHUNK]):]
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            # A half-written file would only take the room someone else needs.
            os.ftruncate(fd, 0)
        raise


async def put_file(container: Container, path: str, content: bytes, mode: int = 0o644, *,
                   uid: int | None = None, gid: int | None = None) -> None:
    """Write `content` to `path` in the container, creating missing parents (0755).

    The file and the parents made are owned by `uid`/`gid` (ids inside the container; the
    run user by default); `mode` keeps only the permission bits, never setuid or setgid.
    A path through a symbolic link, or to one, is refused; so is a file with other hard
    links.
    """
    norm = _normalise(path, allow_root=False)
    if len(content) > MAX_PUT_BYTES:
        raise PolicyError(f"{norm}: {len(content)} bytes is over the {MAX_PUT_BYTES} byte "
                          "limit for one file")
    owner = _check_owner(container, uid, gid)
    try:
        fd = await container.open_path(norm, _WRITE, owner=owner, mode=mode & 0o777)
    except OSError as e:
        if e.errno == errno.EINVAL:  # init: an existing path that is not a regular file
            raise PolicyError(f"{norm} exists and is not a regular file; only regular "
                              "files can be written") from e
        raise _open_error(e, container, norm, writing=True) from e
    try:
        if len(content) <= _INLINE:
            _write_all(fd, content)
        else:
            await _in_thread(_write_all, fd, content)
    except OSError as e:
        raise _open_error(e, container, norm, writing=True) from e
    finally:
        os.close(fd)


def bind_files(container: Container, binds: Sequence[CachedBind], *,
               uid: int | None = None, gid: int | None = None,
               exec_follows: bool = False) -> Callable[[], Awaitable[None]]:
    """Send a request to bind cached files at their paths (Container.send_bind: read-only,
    no copy); returns what awaits its answer. Paths follow put_file's rules (never through a
    symbolic link; missing parents made, owned by `uid`/`gid`, the run user by default) and
    fail as a put would; a bind goes over an existing regular file (hiding it until the
    next reset) or a new empty one. The answer raises BindError when a blob is gone from
    the cache."""
    owner = _check_owner(container, uid, gid)
    binds = [replace(b, path=_normalise(b.path, allow_root=False)) for b in binds]
    pending = container.send_bind(binds, owner, exec_follows=exec_follows)

    async def answer() -> None:
        try:
            await pending.answer()
        except BindError as e:
            if e.blob_failed:
                raise
            path = binds[e.index].path
            if e.error.errno == errno.EINVAL:
                raise PolicyError(f"{path} exists and is not a regular file; a cached file "
                                  "is bound over a regular file or at a new path only") from e
            raise _open_error(e.error, container, path, writing=True) from e

    return answer


async def _in_thread(work: Callable[..., _T], *args: Any) -> _T:
    """`work(*args)` in a worker thread, waited for to its end even when the caller is
    cancelled meanwhile: it works on a descriptor that the caller closes as it unwinds,
    whose number a thread yet to start could otherwise find given to another file."""
    job = asyncio.get_running_loop().run_in_executor(None, work, *args)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        while not job.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({job})
        if not job.cancelled():
            job.exception()  # taken: the caller is cancelled, not failed
        raise


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.asynccontextmanager
async def get_path(container: Container, path: str, *,
                   max_bytes: int = MAX_GET_BYTES) -> AsyncIterator[Fetched]:
    """A regular file, or a directory as a tar (symlinks kept as symlinks; FIFOs, sockets
    and devices left out), streamed: `async with get_path(...) as got`, then iterate
    `got.chunks`. At most `max_bytes`: a file over it is refused here, a tar that grows
    past it (or past MAX_GET_ENTRIES, MAX_GET_DEPTH) stops with PolicyError mid-stream. A
    path through a symbolic link, or to one, is refused: bytes cannot carry a link, and a
    link's target is for the container's processes to resolve (copy its directory to get
    the link itself)."""
    norm = _normalise(path, allow_root=True)
    try:
        fd = await container.open_path(norm, _READ)
    except OSError as e:
        raise _open_error(e, container, norm, writing=False) from e
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            if st.st_size > max_bytes:
                raise PolicyError(f"{norm} is {st.st_size} bytes, over the {max_bytes} byte "
                                  "limit for a copy out; copy a smaller file or compress it "
                                  "first")
            chunks = _file_chunks(fd, st.st_size, norm, pad=False)
            size: int | None = st.st_size
            kind = "file"
        elif stat.S_ISDIR(st.st_mode):
            chunks = TreeTar(container, max_bytes, MAX_GET_ENTRIES).stream(norm, fd, st)
            size, kind = None, "dir"
        else:
            raise PolicyError(f"{norm} is {_kind(st.st_mode)}; only regular files and "
                              "directories can be copied out")
        async with contextlib.aclosing(chunks):
            yield Fetched(kind, mode, size, chunks)
    finally:
        os.close(fd)


async def _file_chunks(fd: int, size: int, shown: str, *, pad: bool) -> AsyncIterator[bytes]:
    """Exactly `size` bytes of `fd` (its size when opened: what grows later is cut). A file
    that shrank meanwhile is padded with zeros in a tar, as GNU tar does (its header already
    gave the size); a lone file is refused, having promised its length."""
    left = size
    while left:
        if left <= _INLINE:
            chunk = os.read(fd, left)
        else:
            chunk = await _in_thread(os.read, fd, min(_CHUNK, left))
        if not chunk:
            if not pad:
                raise PolicyError(f"{shown} shrank while it was copied out; copy it again "
                                  "when nothing writes to it")
            chunk = bytes(min(_CHUNK, left))
        left -= len(chunk)
        yield chunk


@dataclass
class TreeDir:
    """A directory of a TreeTar's walk: held open, named by its path and identity, the
    entries of its listing still to ask for (last first), and those asked for, in order
    (their open requests under way; None for one left out unopened)."""

    path: bytes        # relative to the container's root
    arcname: str
    fd: int
    identity: tuple[int, int]
    entries: list[tuple[str, str]]
    asked: deque[tuple[str, str, PendingOpen | None]] = field(default_factory=deque)


class TreeTar:
    """A directory tree as a tar stream: each entry opened by init from its directory's
    descriptor without following symlinks, written as it is read. A subclass may walk
    another base (diff.py: the upper directory) and write more kinds of entries."""

    base: Base = "root"
    # How each kind of the listing is opened; kinds not here ("other": FIFOs, sockets,
    # devices) are left out of a copy unopened.
    opens: ClassVar[Mapping[str, int]] = {"dir": _READ | os.O_DIRECTORY | os.O_NOFOLLOW,
                                          "file": _READ | os.O_NOFOLLOW,
                                          "link": os.O_PATH | os.O_NOFOLLOW}
    # What each cap's error says, the cap in {}.
    too_many = "the directory holds over {} entries; copy a subdirectory"
    too_deep = "the directory nests deeper than {} levels; copy a subdirectory"
    too_big = ("the directory is over the {} byte limit for a copy out as a tar; copy a "
               "subdirectory or fewer files")

    def __init__(self, container: Container, max_bytes: int, max_entries: int) -> None:
        self.container, self.max_bytes, self.max_entries = container, max_bytes, max_entries
        self.entries = 0
        self.written = 0
        m = container.runtime.mapping
        self.uids, self.gids = m.uids, m.gids

    async def stream(self, top: str, fd: int, st: os.stat_result) -> AsyncIterator[bytes]:
        arcname = top.rsplit("/", 1)[1] or "."
        yield self._header(arcname, st, tarfile.DIRTYPE)
        async with contextlib.aclosing(self.walk(os.fsencode(top.lstrip("/")), arcname, fd,
                                                 st)) as chunks:
            async for chunk in chunks:
                yield chunk
        yield bytes(2 * _BLOCK)  # the end of the archive

    async def walk(self, path: bytes, arcname: str, fd: int,
                   st: os.stat_result) -> AsyncIterator[bytes]:
        """The tar entries of everything below the directory `fd` (the caller's to close),
        found at `path` and named `arcname` in the tar ("" : its entries are named as they
        are, with no leading "./").

        The next entries of a directory are asked for before the first is answered (up to
        _WINDOW, never past a subdirectory, whose own entries come first): init's round
        trips overlap the writing."""
        stack: list[TreeDir] = []
        try:
            stack.append(await self._enter(path, arcname, fd, st))
            while stack:
                d = stack[-1]
                if len(d.asked) <= _WINDOW // 2:
                    self._ask(d)
                if not d.asked:
                    stack.pop()
                    if stack:  # the top's descriptor is the caller's
                        os.close(d.fd)
                    continue
                name, kind, request = d.asked.popleft()
                if request is None:
                    continue
                if kind == "dir" and len(stack) >= MAX_GET_DEPTH:
                    request.drop()
                    raise PolicyError(self.too_deep.format(MAX_GET_DEPTH))
                opened = await self._answer(request)
                if opened is None:
                    continue
                entry_name = f"{d.arcname}/{name}" if d.arcname else name
                if kind == "dir":
                    try:
                        cst = os.fstat(opened.fd)
                        for header in self._dir(entry_name, cst, opened):
                            yield header
                        stack.append(await self._enter(_child(d, name), entry_name,
                                                       opened.fd, cst))
                    except BaseException:
                        os.close(opened.fd)
                        raise
                    continue
                try:
                    if kind == "file":
                        now, left = self._file(opened.fd, entry_name, os.fstat(opened.fd))
                        if now:
                            yield now
                        if left:
                            async for chunk in _file_chunks(opened.fd, left, entry_name,
                                                            pad=True):
                                yield chunk
                            if left % _BLOCK:
                                yield bytes(_BLOCK - left % _BLOCK)
                        continue
                    header = (self._link(opened.fd, entry_name) if kind == "link" else
                              self._other(d, name, entry_name, opened.fd))
                finally:
                    os.close(opened.fd)
                if header is not None:
                    yield header
        finally:
            for d in stack:
                for _name, _kind, request in d.asked:
                    if request is not None:
                        request.drop()
            for d in stack[1:]:
                os.close(d.fd)

    def _ask(self, d: TreeDir) -> None:
        """Send the open requests of `d`'s next entries, up to _WINDOW under way, the last
        a subdirectory at most."""
        while d.entries and len(d.asked) < _WINDOW and (
                not d.asked or d.asked[-1][1] != "dir"):
            name, kind = d.entries.pop()
            flags = self.opens.get(kind)
            request = None
            if flags is not None:
                entry = Entry(d.path, *d.identity, os.fsencode(name))
                request = self.container.send_open("/" + os.fsdecode(_child(d, name)), flags,
                                                   entry=entry, base=self.base)
            d.asked.append((name, kind, request))

    async def _answer(self, request: PendingOpen) -> Opened | None:
        """An entry's descriptor; None for one that vanished, changed kind or moved since
        the listing, or lives on a kernel interface (left out of the tar)."""
        try:
            return await request.answer()
        except OSError as e:
            if e.errno in _SKIP:
                return None
            raise _open_error(e, self.container, request.path, writing=False) from e

    def _dir(self, arcname: str, st: os.stat_result, opened: Opened) -> list[bytes]:
        """The entries that stand for a directory opened in the walk."""
        return [self._header(arcname, st, tarfile.DIRTYPE)]

    def _other(self, d: TreeDir, name: str, arcname: str, fd: int) -> bytes | None:
        """The entry for what is neither a directory, a regular file nor a symlink, opened
        (O_PATH) when a subclass's `opens` has "other": none by default."""
        return None

    async def _enter(self, path: bytes, arcname: str, fd: int, st: os.stat_result) -> TreeDir:
        budget = self.max_entries - self.entries
        if st.st_size <= _INLINE_LISTING:  # a thread's round trip would cost more
            entries = _list(fd, budget + 1)
        else:
            entries = await _in_thread(_list, fd, budget + 1)
        if len(entries) > budget:
            raise PolicyError(self.too_many.format(self.max_entries))
        entries.reverse()
        return TreeDir(path, arcname, fd, (st.st_dev, st.st_ino), entries)

    def _header(self, arcname: str, st: os.stat_result, kind: bytes, *, size: int = 0,
                linkname: str = "", mode: int | None = None) -> bytes:
        """The header of one entry, with `st`'s owner (as the container sees it), mtime
        and mode (or `mode`)."""
        self.entries += 1
        if self.entries > self.max_entries:
            raise PolicyError(self.too_many.format(self.max_entries))
        header = tar_header(arcname, kind, stat.S_IMODE(st.st_mode) if mode is None else mode,
                            _inside(self.uids, st.st_uid), _inside(self.gids, st.st_gid),
                            int(st.st_mtime), size=size, linkname=linkname)
        self.written += len(header) + -(-size // _BLOCK) * _BLOCK
        if self.written + 2 * _BLOCK > self.max_bytes:
            raise PolicyError(self.too_big.format(self.max_bytes))
        return header

    def _link(self, fd: int, arcname: str) -> bytes | None:
        st = os.fstat(fd)
        if not stat.S_ISLNK(st.st_mode):
            return None  # replaced since the listing; it is not what was listed
        return self._header(arcname, st, tarfile.SYMTYPE, linkname=os.readlink("", dir_fd=fd))

    def _file(self, fd: int, arcname: str, st: os.stat_result) -> tuple[bytes, int]:
        """A regular file's entry: what is written at once (its header; a small file's
        content and padding too, read here), and how many bytes of content are left to
        stream (for a file over _INLINE)."""
        if not stat.S_ISREG(st.st_mode):
            return b"", 0  # replaced since the listing by a FIFO, socket or device
        header = self._header(arcname, st, tarfile.REGTYPE, size=st.st_size)
        if st.st_size > _INLINE:
            return header, st.st_size
        return header + _read_inline(fd, st.st_size) + bytes(-st.st_size % _BLOCK), 0


# The fields of a ustar header block before its checksum is filled in (tarfile's order).
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_POSIX_MAGIC = b"ustar\x0000"
_MAX7, _MAX11 = 8 ** 7, 8 ** 11   # what 7 and 11 octal digits hold


def tar_header(name: str, kind: bytes, mode: int, uid: int, gid: int, mtime: int, *,
               size: int = 0, linkname: str = "") -> bytes:
    """The header of one tar entry, byte for byte what tarfile writes in PAX format (a
    directory's name gets its "/"). Most names and numbers fit a plain ustar block, built
    here at a fifth of tarfile's cost; the rest (names over 100 bytes or not ASCII, numbers
    too big for their fields) are tarfile's, with a PAX extended header before the block."""
    if kind == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    if (len(name) <= 100 and len(linkname) <= 100 and name.isascii() and linkname.isascii()
            and 0 <= uid < _MAX7 and 0 <= gid < _MAX7 and 0 <= size < _MAX11
            and 0 <= mtime < _MAX11):
        block = _USTAR.pack(name.encode(), b"%07o" % (mode & 0o7777), b"%07o" % uid,
                            b"%07o" % gid, b"%011o" % size, b"%011o" % mtime, b" " * 8, kind,
                            linkname.encode(), _POSIX_MAGIC, b"", b"", b"", b"", b"")
        # The checksum: the sum of the block's bytes, its own field counted as spaces.
        return b"%s%06o\0%s" % (block[:148], sum(block), block[155:])
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
    info.mtime, info.size, info.linkname = mtime, size, linkname
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _read_inline(fd: int, size: int) -> bytes:
    """Exactly `size` bytes of a small file, read on the event loop: zeros past its end if
    it shrank since its header was written (as _file_chunks pads)."""
    data = os.read(fd, size)
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            return data + bytes(size - len(data))
        data += more
    return data


def _child(d: TreeDir, name: str) -> bytes:
    return (d.path + b"/" if d.path else b"") + os.fsencode(name)


def _list(fd: int, limit: int) -> list[tuple[str, str]]:
    """(name, "dir" | "file" | "link" | "other") for up to `limit` entries, sorted, never
    following a link."""
    out = []
    with os.scandir(fd) as it:
        for entry in it:
            if len(out) == limit:
                break
            try:
                if entry.is_symlink():
                    kind = "link"
                elif entry.is_dir(follow_symlinks=False):
                    kind = "dir"
                elif entry.is_file(follow_symlinks=False):
                    kind = "file"
                else:
                    kind = "other"
            except OSError:
                kind = "other"  # no type in the listing and no way to look: left out
            out.append((entry.name, kind))
    return sorted(out)
