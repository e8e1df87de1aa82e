"""Copying files into and out of a running container, symlink-safe both ways.

Every path is opened by the container's init (Container.open_path): it resolves it inside
the container's root with openat2 RESOLVE_IN_ROOT and no magic links, as container root,
and hands the descriptor over; this process then only reads or writes through descriptors.
A symlink planted in the container, whenever it is planted, so resolves as it would for the
container's own processes and never reaches the host (CVE-2018-15664, CVE-2019-10152), and
no host code ever loads anything from the container (CVE-2019-14271). Init refuses files
of kernel pseudo filesystems (/proc/self/mem is a regular file) before touching them.

A symlink as the last component of a put's path is followed inside the root, as `docker cp`
does: the file it points to is written (or created).
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import stat
import tarfile
from dataclasses import dataclass

from sandbox.errors import NotFound, PolicyError
from sandbox.runtime.container import Container
from sandbox.runtime.idmap import IdRange

MAX_PUT_BYTES = 256 << 20
MAX_GET_BYTES = 256 << 20
MAX_GET_ENTRIES = 65536
_CHUNK = 1 << 20

# Never block: a FIFO opens at once without a peer (for reading) or fails with ENXIO.
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_NOCTTY
# Entries of a directory being copied out are taken as they are: never followed.
_ENTRY = _READ | os.O_NOFOLLOW
# Entries that vanished or changed kind since the listing, or live on a kernel interface.
_SKIP = (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EPERM, errno.ENOTDIR)


@dataclass(frozen=True)
class Fetched:
    kind: str          # "file" | "dir"
    data: bytes        # the file's bytes, or a tar of the directory
    mode: int


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
    if code == errno.ELOOP:
        return PolicyError(f"{path}: too many symlinks on the way, or one is a /proc magic "
                           "link, which is never followed")
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
    for name, value, ranges in (("uid", ids[0], m.uids), ("gid", ids[1], m.gids)):
        if not any(r.inside <= value < r.inside + r.count for r in ranges):
            raise PolicyError(f"{name} {value} is not mapped in this container")
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
        await asyncio.to_thread(_write_all, fd, content)
    except OSError as e:
        raise _open_error(e, container, norm, writing=True) from e
    finally:
        os.close(fd)


def _read_capped(fd: int, path: str, limit: int) -> bytes:
    """The whole file, refused (naming its size) past `limit` bytes."""
    size = os.fstat(fd).st_size
    if size > limit:
        raise PolicyError(f"{path} is {size} bytes, over the {limit} byte limit for a copy "
                          "out; copy a smaller file or compress it first")
    chunks, total = [], 0
    while chunk := os.read(fd, _CHUNK):
        total += len(chunk)
        if total > limit:
            raise PolicyError(f"{path} grew past the {limit} byte limit for a copy out "
                              "while being read")
        chunks.append(chunk)
    return b"".join(chunks)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


async def get_path(container: Container, path: str, *,
                   max_bytes: int = MAX_GET_BYTES) -> Fetched:
    """A regular file's bytes, or a directory as a tar (symlinks kept as symlinks; FIFOs,
    sockets and devices left out), at most `max_bytes`. Symlinks on the way to `path`
    resolve inside the container's root; `path` itself being a symlink is refused, as raw
    bytes cannot carry a link (docker cp copies the link, not its target)."""
    norm = _normalise(path, allow_root=True)
    await _refuse_symlink(container, norm)
    try:
        fd = await container.open_path(norm, _READ)
    except OSError as e:
        raise _open_error(e, container, norm, writing=False) from e
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            data = await asyncio.to_thread(_read_capped, fd, norm, max_bytes)
            return Fetched("file", data, stat.S_IMODE(st.st_mode))
        if not stat.S_ISDIR(st.st_mode):
            raise PolicyError(f"{norm} is {_kind(st.st_mode)}; only regular files and "
                              "directories can be copied out")
        data = await _Tar(container, max_bytes).build(norm, fd)
        return Fetched("dir", data, stat.S_IMODE(st.st_mode))
    finally:
        os.close(fd)


async def _refuse_symlink(container: Container, path: str) -> None:
    try:
        fd = await container.open_path(path, os.O_PATH | os.O_NOFOLLOW)
    except OSError as e:
        raise _open_error(e, container, path, writing=False) from e
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            target = os.readlink("", dir_fd=fd)
            raise PolicyError(f"{path} is a symbolic link to {target!r}; copy the path it "
                              "points to (resolved inside the container), or its directory "
                              "to get the link itself")
    finally:
        os.close(fd)


class _Tar:
    """A directory tree as a tar, each entry opened by init without following symlinks."""

    def __init__(self, container: Container, max_bytes: int) -> None:
        self.container, self.max_bytes = container, max_bytes
        self.buf = io.BytesIO()
        self.tar = tarfile.TarFile(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.entries = 0

    async def build(self, top: str, fd: int) -> bytes:
        with self.tar:
            await self._dir(top, top.rsplit("/", 1)[1] or ".", fd)
        self._check(0)
        return self.buf.getvalue()

    def _check(self, more: int) -> None:
        if self.buf.tell() + more > self.max_bytes:
            raise PolicyError(f"the directory is over the {self.max_bytes} byte limit for a "
                              "copy out as a tar; copy a subdirectory or fewer files")

    def _info(self, arcname: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        m = self.container.runtime.mapping
        self.entries += 1
        if self.entries > MAX_GET_ENTRIES:
            raise PolicyError(f"the directory holds over {MAX_GET_ENTRIES} entries; copy a "
                              "subdirectory")
        info = tarfile.TarInfo(arcname)
        info.type, info.mode, info.mtime = kind, stat.S_IMODE(st.st_mode), int(st.st_mtime)
        info.uid, info.gid = _inside(m.uids, st.st_uid), _inside(m.gids, st.st_gid)
        return info

    async def _open(self, path: str, flags: int) -> int | None:
        try:
            return await self.container.open_path(path, flags)
        except OSError as e:
            if e.errno in _SKIP:
                return None
            raise _open_error(e, self.container, path, writing=False) from e

    async def _dir(self, path: str, arcname: str, fd: int) -> None:
        st = os.fstat(fd)
        self.tar.addfile(self._info(arcname, st, tarfile.DIRTYPE))
        listing = await asyncio.to_thread(_list, fd)
        for name, kind in listing:
            child, arc = f"{path.rstrip('/')}/{name}", f"{arcname}/{name}"
            if kind == "link":
                await self._link(child, arc)
            elif kind in ("dir", "file"):
                cfd = await self._open(child, _ENTRY | (os.O_DIRECTORY if kind == "dir" else 0))
                if cfd is None:
                    continue
                try:
                    cst = os.fstat(cfd)
                    if stat.S_ISDIR(cst.st_mode):
                        await self._dir(child, arc, cfd)
                    elif stat.S_ISREG(cst.st_mode):
                        await asyncio.to_thread(self._file, cfd, cst, arc)
                finally:
                    os.close(cfd)

    async def _link(self, path: str, arcname: str) -> None:
        lfd = await self._open(path, os.O_PATH | os.O_NOFOLLOW)
        if lfd is None:
            return
        try:
            st = os.fstat(lfd)
            if not stat.S_ISLNK(st.st_mode):
                return  # replaced since the listing; it is not what was listed
            info = self._info(arcname, st, tarfile.SYMTYPE)
            info.linkname = os.readlink("", dir_fd=lfd)
        finally:
            os.close(lfd)
        self.tar.addfile(info)
        self._check(0)

    def _file(self, fd: int, st: os.stat_result, arcname: str) -> None:
        self._check(st.st_size + 1024)
        data = _read_capped(fd, arcname, self.max_bytes)
        info = self._info(arcname, st, tarfile.REGTYPE)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))
        self._check(0)


def _list(fd: int) -> list[tuple[str, str]]:
    """(name, "dir" | "file" | "link" | "other") for each entry, sorted, never following."""
    out = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_symlink():
                kind = "link"
            elif entry.is_dir(follow_symlinks=False):
                kind = "dir"
            elif entry.is_file(follow_symlinks=False):
                kind = "file"
            else:
                kind = "other"
            out.append((entry.name, kind))
    return sorted(out)
