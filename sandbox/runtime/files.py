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
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sandbox.errors import NotFound, PolicyError
from sandbox.runtime.container import Container
from sandbox.runtime.idmap import IdRange
from sandbox.runtime.protocol import Entry

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
            await asyncio.to_thread(_write_all, fd, content)
    except OSError as e:
        raise _open_error(e, container, norm, writing=True) from e
    finally:
        os.close(fd)


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
            chunks = _Tar(container, max_bytes).stream(norm, fd, st)
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
            chunk = await asyncio.to_thread(os.read, fd, min(_CHUNK, left))
        if not chunk:
            if not pad:
                raise PolicyError(f"{shown} shrank while it was copied out; copy it again "
                                  "when nothing writes to it")
            chunk = bytes(min(_CHUNK, left))
        left -= len(chunk)
        yield chunk


@dataclass
class _Dir:
    """A directory of the walk: held open, named by its path and identity, and the entries
    of its listing still to copy (last first)."""

    path: bytes        # relative to the container's root
    arcname: str
    fd: int
    identity: tuple[int, int]
    entries: list[tuple[str, str]]


class _Tar:
    """A directory tree as a tar stream: each entry opened by init from its directory's
    descriptor without following symlinks, written as it is read."""

    def __init__(self, container: Container, max_bytes: int) -> None:
        self.container, self.max_bytes = container, max_bytes
        self.entries = 0
        self.written = 0

    async def stream(self, top: str, fd: int, st: os.stat_result) -> AsyncIterator[bytes]:
        arcname = top.rsplit("/", 1)[1] or "."
        stack: list[_Dir] = []
        try:
            yield self._header(arcname, st, tarfile.DIRTYPE)
            stack.append(await self._enter(os.fsencode(top.lstrip("/")), arcname, fd, st))
            while stack:
                d = stack[-1]
                if not d.entries:
                    stack.pop()
                    if stack:  # the top's descriptor is the caller's
                        os.close(d.fd)
                    continue
                name, kind = d.entries.pop()
                if kind == "link":
                    header = await self._link(d, name)
                    if header is not None:
                        yield header
                elif kind == "dir":
                    if len(stack) >= MAX_GET_DEPTH:
                        raise PolicyError(f"the directory nests deeper than {MAX_GET_DEPTH} "
                                          "levels; copy a subdirectory")
                    cfd = await self._open(d, name, _READ | os.O_DIRECTORY | os.O_NOFOLLOW)
                    if cfd is None:
                        continue
                    try:
                        cst = os.fstat(cfd)
                        yield self._header(f"{d.arcname}/{name}", cst, tarfile.DIRTYPE)
                        stack.append(await self._enter(_child(d, name), f"{d.arcname}/{name}",
                                                       cfd, cst))
                    except BaseException:
                        os.close(cfd)
                        raise
                elif kind == "file":
                    cfd = await self._open(d, name, _READ | os.O_NOFOLLOW)
                    if cfd is None:
                        continue
                    try:
                        async for chunk in self._file(cfd, f"{d.arcname}/{name}"):
                            yield chunk
                    finally:
                        os.close(cfd)
            yield bytes(2 * _BLOCK)  # the end of the archive
        finally:
            for d in stack[1:]:
                os.close(d.fd)

    async def _enter(self, path: bytes, arcname: str, fd: int, st: os.stat_result) -> _Dir:
        budget = MAX_GET_ENTRIES - self.entries
        entries = await asyncio.to_thread(_list, fd, budget + 1)
        if len(entries) > budget:
            raise PolicyError(f"the directory holds over {MAX_GET_ENTRIES} entries; copy a "
                              "subdirectory")
        entries.reverse()
        return _Dir(path, arcname, fd, (st.st_dev, st.st_ino), entries)

    async def _open(self, d: _Dir, name: str, flags: int) -> int | None:
        shown = "/" + os.fsdecode(_child(d, name))
        entry = Entry(d.path, *d.identity, os.fsencode(name))
        try:
            return await self.container.open_path(shown, flags, entry=entry)
        except OSError as e:
            if e.errno in _SKIP:
                return None
            raise _open_error(e, self.container, shown, writing=False) from e

    def _header(self, arcname: str, st: os.stat_result, kind: bytes, *, size: int = 0,
                linkname: str = "") -> bytes:
        self.entries += 1
        if self.entries > MAX_GET_ENTRIES:
            raise PolicyError(f"the directory holds over {MAX_GET_ENTRIES} entries; copy a "
                              "subdirectory")
        m = self.container.runtime.mapping
        info = tarfile.TarInfo(arcname)
        info.type, info.mode, info.mtime = kind, stat.S_IMODE(st.st_mode), int(st.st_mtime)
        info.uid, info.gid = _inside(m.uids, st.st_uid), _inside(m.gids, st.st_gid)
        info.size, info.linkname = size, linkname
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self.written += len(header) + -(-size // _BLOCK) * _BLOCK
        if self.written + 2 * _BLOCK > self.max_bytes:
            raise PolicyError(f"the directory is over the {self.max_bytes} byte limit for a "
                              "copy out as a tar; copy a subdirectory or fewer files")
        return header

    async def _link(self, d: _Dir, name: str) -> bytes | None:
        lfd = await self._open(d, name, os.O_PATH | os.O_NOFOLLOW)
        if lfd is None:
            return None
        try:
            st = os.fstat(lfd)
            if not stat.S_ISLNK(st.st_mode):
                return None  # replaced since the listing; it is not what was listed
            target = os.readlink("", dir_fd=lfd)
        finally:
            os.close(lfd)
        return self._header(f"{d.arcname}/{name}", st, tarfile.SYMTYPE, linkname=target)

    async def _file(self, fd: int, arcname: str) -> AsyncIterator[bytes]:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return  # replaced since the listing by a FIFO, socket or device
        yield self._header(arcname, st, tarfile.REGTYPE, size=st.st_size)
        async for chunk in _file_chunks(fd, st.st_size, arcname, pad=True):
            yield chunk
        if st.st_size % _BLOCK:
            yield bytes(_BLOCK - st.st_size % _BLOCK)


def _child(d: _Dir, name: str) -> bytes:
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
