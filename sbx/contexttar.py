"""A build context as the tar stream `POST /v1/build` takes, made while it is sent: a
directory tarred in a worker thread (`tar_directory`), or what a file descriptor holds
(`read_fd`: a tar piped into `sbx build -`). The bytes come through a pipe, so a context is
never whole in memory and the pipe paces the thread. Everything is sent: the service
applies the context's .dockerignore."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import stat
import sys
import tarfile
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import BinaryIO

CHUNK = 256 << 10
PIPE_BYTES = 1 << 20  # Linux's default cap for an unprivileged pipe
# What tells a context tar from a lone Dockerfile on stdin (Docker's `docker build - <
# Dockerfile`), and the compressions the service does not take.
TAR_MAGIC_AT, TAR_MAGIC = 257, b"ustar"
SNIFF_BYTES = 512
COMPRESSIONS = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
                b"\x28\xb5\x2f\xfd": "zstd"}


class ContextError(Exception):
    """The context could not be read: a file sbx may not read, a file that changed."""


def tar_directory(root: str | os.PathLike[str], *, extra: Mapping[str, bytes] | None = None,
                  warn: Callable[[str], object] | None = None) -> AsyncIterator[bytes]:
    """A tar of the tree under root, named relative to it: directories, regular files and
    symlinks (stored as links, never followed), owned by 0:0 as Docker sends them. extra
    are files put first at the top (a Dockerfile from outside the context). A file that
    cannot be read raises ContextError naming it; other kinds (FIFOs, sockets, devices)
    are left out, each with a call of warn (default: a line on stderr)."""
    produce = partial(_write_tree, root=Path(root), extra=dict(extra or {}),
                      warn=warn or _to_stderr)
    return _from_thread(produce, "sbx-context-tar")


def read_fd(fd: int, name: str) -> AsyncGenerator[bytes, None]:
    """What fd holds until its end (name says what it is in errors: "stdin")."""
    return _from_thread(partial(_copy_fd, fd=fd, name=name), f"sbx-read-{name}")


def archive_kind(head: bytes) -> str | None:
    """"tar", "gzip", "bzip2", "xz" or "zstd" from a stream's first bytes; None when it is
    none of them."""
    if head[TAR_MAGIC_AT:TAR_MAGIC_AT + len(TAR_MAGIC)] == TAR_MAGIC:
        return "tar"
    return next((kind for magic, kind in COMPRESSIONS.items() if head.startswith(magic)), None)


async def peek(chunks: AsyncGenerator[bytes, None],
               size: int = SNIFF_BYTES) -> tuple[bytes, AsyncGenerator[bytes, None]]:
    """The first `size` bytes of chunks (fewer if it ends before), and all of it again."""
    head = bytearray()
    while len(head) < size and (chunk := await anext(chunks, b"")):
        head += chunk
    return bytes(head), _prepend(bytes(head), chunks)


def dockerfile_tar(dockerfile: bytes) -> bytes:
    """A context holding only a Dockerfile (`docker build - < Dockerfile`)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_extra_info("Dockerfile", len(dockerfile)), io.BytesIO(dockerfile))
    return buf.getvalue()


def _to_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


async def _prepend(head: bytes,
                   rest: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    try:
        if head:
            yield head
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


async def _from_thread(produce: Callable[[BinaryIO], None],
                       name: str) -> AsyncGenerator[bytes, None]:
    """What produce writes, in a daemon thread, into a pipe whose other end this reads.
    Closing this early closes the pipe: the thread's next write fails and it ends. The
    thread's exception is raised here once its bytes are read."""
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    with suppress(OSError):  # fewer, larger reads; the default 64 KiB does, only slower
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    reader = asyncio.StreamReader(limit=CHUNK)
    pipe = os.fdopen(read_end, "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except BaseException:
        pipe.close()
        os.close(write_end)
        raise
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with open(write_end, "wb", buffering=CHUNK) as out:
                produce(out)
        except BrokenPipeError:
            pass  # the reader left: the request is over
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while chunk := await reader.read(CHUNK):
            yield chunk
        thread.join()  # it closed the pipe: all that is left is to record its exception
        if failure:
            raise failure[0]
    finally:
        transport.close()


def _copy_fd(out: BinaryIO, *, fd: int, name: str) -> None:
    try:
        while chunk := os.read(fd, CHUNK):
            out.write(chunk)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise ContextError(f"cannot read the context from {name}: {e.strerror}") from None


def _extra_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info


def _write_tree(out: BinaryIO, *, root: Path, extra: dict[str, bytes],
                warn: Callable[[str], object]) -> None:
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise _unreadable(root, e) from None
    try:
        # Stream mode: the pipe cannot seek, and nothing is kept to write at the end.
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK,
                          copybufsize=CHUNK) as tar:
            for name, data in extra.items():
                tar.addfile(_extra_info(name, len(data)), io.BytesIO(data))
            _add_dir(tar, top, root, "", warn)
    finally:
        os.close(top)


def _unreadable(path: Path, e: OSError) -> ContextError:
    if isinstance(e, PermissionError):
        return ContextError(f"cannot read {path} for the build context: permission denied; "
                            "make it readable, or move it out of the context directory")
    return ContextError(f"cannot read {path} for the build context: {e.strerror}")


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, stat.S_IMODE(st.st_mode), int(st.st_mtime)
    return info  # uid, gid 0 and no user names: the context says nothing of this host


def _add_dir(tar: tarfile.TarFile, dir_fd: int, where: Path, prefix: str,
             warn: Callable[[str], object]) -> None:
    """dir_fd's entries, through descriptors opened without following links: a directory
    swapped for a link while this runs cannot lead outside the context."""
    try:
        with os.scandir(dir_fd) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as e:
        raise _unreadable(where, e) from None
    for entry in entries:
        name, path = prefix + entry.name, where / entry.name
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                info = _info(name, st, tarfile.SYMTYPE)
                info.linkname = os.readlink(entry.name, dir_fd=dir_fd)
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             dir_fd=dir_fd)
                try:
                    tar.addfile(_info(name, st, tarfile.DIRTYPE))
                    _add_dir(tar, fd, path, name + "/", warn)
                finally:
                    os.close(fd)
            elif stat.S_ISREG(st.st_mode):
                _add_file(tar, dir_fd, entry.name, name, path)
            else:
                warn(f"{path} is left out of the build context: it is a "
                     f"{_kind(st.st_mode)}, and a context holds files, directories and "
                     "symlinks")
        except FileNotFoundError:
            continue  # removed since it was listed
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _unreadable(path, e) from None


def _add_file(tar: tarfile.TarFile, dir_fd: int, entry: str, name: str, path: Path) -> None:
    # O_NONBLOCK: should it have become a FIFO since it was listed, opening must not hang.
    fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                 dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ContextError(f"{path} changed from a file to a {_kind(st.st_mode)} while "
                               "the context was read; build again")
        info = _info(name, st, tarfile.REGTYPE)
        info.size = st.st_size
        try:
            tar.addfile(info, f)
        except OSError as e:
            if e.errno is not None:
                raise
            # tarfile's "unexpected end of data": it shrank while it was read.
            raise ContextError(f"{path} shrank while the context was read; build "
                               "again") from None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"
