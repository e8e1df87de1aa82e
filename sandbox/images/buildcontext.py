"""The build context of `POST /v1/build`: the tar a client sends (plain or gzip), kept as
one plain tar file in the build's work directory and indexed, never extracted.

Every name in it is hostile input. A member named with `..` or an absolute path, a device
or FIFO, a hard link to anything but an earlier regular file, or a member below a
non-directory refuses the whole context; names are normalised (`./a/` is `a`), the last
member of a name wins (as tar extraction), and directories a path implies exist. Nothing
is written but the tar, nothing read but it: symlinks stay symlinks, and when a COPY
source or the Dockerfile goes through one it is resolved inside the context (`..` and
absolute targets stop at its root), as BuildKit resolves them, never on the host.

What COPY and ADD see is the context less what `.dockerignore` excludes (`dockerignore.py`;
`<Dockerfile>.dockerignore` first, as BuildKit); the Dockerfile and ignore file are read
whatever it says. Each regular file is hashed (sha256) as it is indexed, so a copy's cache
key (`digest_of`) costs no read of the content.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import tarfile
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, cast

from sandbox.errors import ImageError, NotFound, QuotaExceeded
from sandbox.images.buildfiles import Kind, Selected, SourceFile
from sandbox.images.dockerignore import BadPattern, IgnoreRules, clean, glob, has_wildcards
from sandbox.images.store.layerstream import write_all

_CHUNK = 1 << 20
_HEADER_CAP = 1 << 20          # a PAX record or long name tarfile reads into memory whole
_PATH_MAX = 4096
_PATHS_CAP = 64 << 20          # bytes of all indexed paths: deep trees imply many long ones
_MAX_HOPS = 40                 # symlinks followed in one lookup, as Linux allows
_TAR_FILE = "context.tar"
_GZIP = b"\x1f\x8b"
_REFUSED = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_SMALLER = ("build from a directory that holds only what the build needs (the whole "
            "directory is sent: .dockerignore only hides files from COPY and ADD)")


@dataclass(frozen=True)
class ContextLimits:
    max_bytes: int = 1 << 30              # the tar, uncompressed
    max_entries: int = 100_000            # members, and directories their paths imply
    # A Dockerfile or .dockerignore. BuildKit's parser holds the GIL (the event loop with
    # it) ~0.5 µs a byte: 256 KiB is ~0.14 s, and a Dockerfile that long is unheard of.
    max_dockerfile_bytes: int = 256 << 10


@dataclass(frozen=True, slots=True)
class _Entry:
    kind: Kind
    mode: int
    mtime: int
    size: int = 0
    linkname: str = ""
    offset: int = 0            # a file's data in the stored tar
    sha256: str = ""


def _show(name: str) -> str:
    return repr(name if len(name) <= 200 else name[:200] + "...")


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


# -- receiving --------------------------------------------------------------------------------

class _Intake:
    """The body written to the tar file by worker threads, one call at a time (the lock):
    gunzipped when it is gzip, counted against the byte cap, then indexed. `close` stops
    a call at work at its next MiB."""

    def __init__(self, fd: int, limits: ContextLimits) -> None:
        self.fd, self.limits = fd, limits
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.head = b""                    # bytes kept until the compression is known
        self.gzip: zlib._Decompress | None = None
        self.started = False
        self.pending = b""                 # after a gzip member: too few bytes to tell what
        self.received = self.written = 0

    def feed(self, data: bytes, last: bool = False) -> None:
        with self.lock:
            self.received += len(data)
            # Gzip adds little even to incompressible data; anything longer is not a context.
            if self.received > self.limits.max_bytes * 1.01 + (1 << 20):
                raise self._too_big()
            if not self.started:
                self.head += data
                if len(self.head) < 6 and not last:
                    return
                data, self.head, self.started = self.head, b"", True
                if not data:
                    raise ImageError("the request body is empty: send the build context as a "
                                     "tar (plain or gzip) holding a Dockerfile")
                for magic, kind in _REFUSED.items():
                    if data.startswith(magic):
                        raise ImageError(f"the build context is {kind}-compressed: send it as "
                                         "a plain or gzip tar")
                if data.startswith(_GZIP):
                    self.gzip = zlib.decompressobj(31)
            if self.gzip is None:
                self._write(data)
            else:
                self._inflate(data)
            if last and self.gzip is not None and (not self.gzip.eof or self.pending):
                raise ImageError("the build context's gzip stream ends in the middle: the "
                                 "upload was cut short; send it again")

    def _inflate(self, data: bytes) -> None:
        data, self.pending = self.pending + data, b""
        try:
            while data:
                assert self.gzip is not None
                if self.gzip.eof:  # pigz and others write several members
                    data = data.lstrip(b"\0")
                    if len(data) < 3:
                        self.pending = data
                        return
                    if not data.startswith(_GZIP):
                        raise ImageError("the build context has bytes after its gzip stream "
                                         "that are not gzip: send one tar, compressed once")
                    self.gzip = zlib.decompressobj(31)
                self._write(self.gzip.decompress(data, _CHUNK))
                data = self.gzip.unused_data if self.gzip.eof else self.gzip.unconsumed_tail
        except zlib.error as e:
            raise ImageError(f"the build context is not valid gzip ({e}): send a plain or "
                             "gzip tar") from None

    def _write(self, data: bytes) -> None:
        if self.stop.is_set():
            raise ImageError("the build context upload was abandoned")
        if self.written + len(data) > self.limits.max_bytes:
            raise self._too_big()
        write_all(self.fd, data)
        self.written += len(data)

    def _too_big(self) -> QuotaExceeded:
        return QuotaExceeded(f"the build context is over {self.limits.max_bytes} bytes "
                             "uncompressed, the limit (build.max_context_bytes): "
                             f"{_SMALLER}, or ask the operator to raise "
                             "build.max_context_bytes")

    def index(self) -> _Index:
        with self.lock, os.fdopen(os.dup(self.fd), "rb") as f:
            f.seek(0)  # the descriptor's offset is where the writes ended
            index = _Index(self.limits, self.stop)
            index.read(f, self.written)
            return index

    def close(self) -> None:
        self.stop.set()
        with self.lock:  # a worker thread still at it is done once this is taken
            pass


class _Headers:
    """The stored tar as tarfile reads it: a header's body (PAX records, a long name) is
    read whole into memory, so a hostile size is refused before it is read."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def read(self, n: int = -1) -> bytes:
        if not 0 <= n <= _HEADER_CAP:
            raise ImageError("a tar header in the build context is over 1 MiB: the tar is "
                             "malformed or hostile, and the context is refused")
        return self._f.read(n)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()


@dataclass
class _Index:
    limits: ContextLimits
    stop: threading.Event
    entries: dict[str, _Entry] = field(default_factory=lambda: {"": _Entry("dir", 0o755, 0)})
    children: dict[str, set[str]] = field(default_factory=lambda: {"": set()})
    count: int = 0
    path_bytes: int = 0

    def read(self, f: BinaryIO, size: int) -> None:
        try:
            tf = tarfile.open(fileobj=cast(BinaryIO, _Headers(f)), mode="r:",  # noqa: SIM115
                              encoding="utf-8", errors="surrogateescape")
        except tarfile.TarError as e:
            raise ImageError(f"the build context is not a tar archive ({e}): send a tar "
                             "(plain or gzip) of the context directory") from None
        with tf:
            while True:
                if self.stop.is_set():
                    raise ImageError("the build context upload was abandoned")
                try:
                    ti = tf.next()
                except tarfile.TarError as e:
                    raise ImageError(f"the build context's tar is malformed after {self.count} "
                                     f"entries ({e})") from None
                if ti is None:
                    break
                tf.members.clear()  # tarfile keeps every member otherwise
                self._add(ti, f.fileno(), size)
            # tarfile ends quietly at a header it cannot parse, too.
            end = os.pread(f.fileno(), tarfile.BLOCKSIZE, tf.offset)
            if end.strip(b"\0") or 0 < len(end) < tarfile.BLOCKSIZE:
                raise ImageError(f"the build context's tar has an invalid header at byte "
                                 f"{tf.offset}: it is corrupt or cut short")

    def _add(self, ti: tarfile.TarInfo, fd: int, size: int) -> None:
        path = _member_path(ti.name, "entry")
        self._count(path)
        mode = ti.mode & 0o7777
        try:
            mtime = int(ti.mtime)
        except (OverflowError, ValueError):
            mtime = 0
        mtime = mtime if -(1 << 63) <= mtime < 1 << 63 else 0
        if ti.isreg():
            if ti.sparse is not None or ti.offset_data + ti.size > size:
                raise ImageError(f"the build context's file {_show(ti.name)} is sparse or "
                                 "cut short: send an ordinary tar of the context directory")
            entry = _Entry("file", mode, mtime, ti.size, "", ti.offset_data,
                           self._hash(fd, ti.offset_data, ti.size))
        elif ti.isdir():
            entry = _Entry("dir", mode, mtime)
        elif ti.issym():
            link = ti.linkname
            if not link or "\0" in link or len(link.encode("utf-8", "surrogateescape")) \
                    >= _PATH_MAX:
                raise ImageError(f"the build context's symlink {_show(ti.name)} has an "
                                 "empty, over-long or NUL-holding target: it is malformed")
            entry = _Entry("symlink", mode, mtime, linkname=link)
        elif ti.islnk():
            target = _member_path(ti.linkname, "hard link target")
            found = self.entries.get(target)
            if found is None or found.kind != "file" or target == path:
                raise ImageError(f"the build context's hard link {_show(ti.name)} -> "
                                 f"{_show(ti.linkname)} does not name an earlier regular "
                                 "file of the context: the context is refused")
            entry = found  # one inode: the target's content and mode
        else:
            what = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                    tarfile.FIFOTYPE: "FIFO"}.get(ti.type, f"entry of type {ti.type!r}")
            raise ImageError(f"the build context's {_show(ti.name)} is a {what}: a build "
                             "context holds files, directories and links; leave it out")
        if not path:
            if entry.kind != "dir":
                raise ImageError(f"the build context's entry {_show(ti.name)} would make its "
                                 "root a non-directory: the context is refused")
            self.entries[""] = entry
            return
        parent, _, name = path.rpartition("/")
        self._parents(parent, ti.name)
        old = self.entries.get(path)
        if old is not None and old.kind == "dir" and entry.kind != "dir":
            self._drop_below(path)  # as extraction removes a directory a file replaces
        self.entries[path] = entry
        if entry.kind == "dir":
            self.children.setdefault(path, set())
        self.children[parent].add(name)

    def _count(self, path: str) -> None:
        self.count += 1
        self.path_bytes += len(path)
        if self.count > self.limits.max_entries:
            raise QuotaExceeded(f"the build context has more than {self.limits.max_entries} "
                                "entries (with the directories their paths imply), the limit "
                                f"(build.max_context_entries): {_SMALLER}, or ask the "
                                "operator to raise build.max_context_entries")
        if self.path_bytes > _PATHS_CAP:
            raise QuotaExceeded(f"the build context's paths add up to over {_PATHS_CAP >> 20} "
                                "MiB (very deep or long names): send a context with shorter "
                                "paths")

    def _parents(self, parent: str, name: str) -> None:
        """Directories a member's path implies are made (0755); one that is there must be
        a directory (then so are all above it)."""
        missing = []
        while parent not in self.entries:
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        if self.entries[parent].kind != "dir":
            raise ImageError(f"the build context's entry {_show(name)} is below "
                             f"{_show(parent)}, which is not a directory: the context is "
                             "refused")
        for path in reversed(missing):
            self._count(path)
            self.entries[path] = _Entry("dir", 0o755, 0)
            self.children[path] = set()
            up, _, base = path.rpartition("/")
            self.children[up].add(base)

    def _drop_below(self, top: str) -> None:
        todo = [top]
        while todo:
            parent = todo.pop()
            for name in self.children.pop(parent, ()):
                path = _join(parent, name)
                if self.entries.pop(path).kind == "dir":
                    todo.append(path)

    def _hash(self, fd: int, offset: int, size: int) -> str:
        h = hashlib.sha256()
        end = offset + size
        while offset < end:
            if self.stop.is_set():
                raise ImageError("the build context upload was abandoned")
            data = os.pread(fd, min(_CHUNK, end - offset), offset)
            if not data:
                raise ImageError("the build context's tar file was cut short while read")
            h.update(data)
            offset += len(data)
        return h.hexdigest()


def _member_path(name: str, what: str) -> str:
    """A member's path, normalised ("" for the root); hostile names refuse the context."""
    shown = _show(name)
    if name.startswith("/"):
        raise ImageError(f"the build context's {what} {shown} is an absolute path: a context "
                         "holds paths relative to its root; the context is refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"the build context's {what} {shown} contains '..': a context holds "
                         "paths inside its root; the context is refused")
    path = "/".join(parts)
    if "\0" in path or len(path.encode("utf-8", "surrogateescape")) >= _PATH_MAX:
        raise ImageError(f"the build context's {what} {shown} holds a NUL or is over "
                         f"{_PATH_MAX - 1} bytes: the context is refused")
    return path


# -- reading ----------------------------------------------------------------------------------

class _MemberReader(io.RawIOBase):
    """One file's data in the stored tar, through a descriptor of its own (pread: no
    offset shared with anyone)."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self._size - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos) if n else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@dataclass(frozen=True, eq=False)
class _Member:
    """`SourceFile.open` of a context file; also carries its content hash."""

    context: BuildContext
    entry: _Entry

    def __call__(self) -> BinaryIO:
        return self.context._open(self.entry)


class BuildContext:
    """A received context: see the module docstring. `dockerfile()` first (it picks the
    ignore file), then `select()` per COPY or ADD source; `close()` at the end (the caller
    removes the work directory)."""

    def __init__(self, fd: int, index: _Index, limits: ContextLimits) -> None:
        self._fd, self._limits = fd, limits
        self._entries, self._children = index.entries, index.children
        self._lock = threading.Lock()
        self._rules: IgnoreRules | None = None
        self._ignore_file = ".dockerignore"
        self._shown: set[str] | None = None   # what the ignore rules leave; None: all

    @classmethod
    async def receive(cls, chunks: AsyncIterator[bytes], workdir: Path,
                      limits: ContextLimits = ContextLimits()) -> BuildContext:
        """Store and index the context tar `chunks` bring, in `workdir` (an empty directory
        the caller made and removes). ImageError when it is not a safe context tar,
        QuotaExceeded past `limits`."""
        fd = os.open(workdir / _TAR_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        intake = _Intake(fd, limits)
        try:
            buf = bytearray()
            async for chunk in chunks:
                buf += chunk
                if len(buf) >= _CHUNK:
                    await asyncio.to_thread(intake.feed, bytes(buf))
                    buf.clear()
            await asyncio.to_thread(intake.feed, bytes(buf), True)
            return cls(fd, await asyncio.to_thread(intake.index), limits)
        except BaseException:
            intake.close()
            os.close(fd)
            raise

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _open(self, entry: _Entry) -> BinaryIO:
        with self._lock:
            if self._fd < 0:
                raise ImageError("the build context is closed: its files can no longer be read")
            fd = os.dup(self._fd)
        return cast(BinaryIO, io.BufferedReader(_MemberReader(fd, entry.offset, entry.size),
                                                1 << 16))

    # The Dockerfile and the ignore file ------------------------------------------------------

    def dockerfile(self, name: str = "Dockerfile") -> str:
        """The Dockerfile's text, `name` a path inside the context (a symlink followed
        inside it); "Dockerfile" also finds "dockerfile". Its `<name>.dockerignore`, or
        the root's `.dockerignore`, then decides what `select` sees."""
        what = f"dockerfile: {name!r}"
        if name.startswith("/"):
            raise ImageError(f"{what} is an absolute path: give the Dockerfile's path inside "
                             "the build context, e.g. 'Dockerfile' or 'docker/app.Dockerfile'")
        path = self._inside(name, what)
        found = self._resolve(path, what, visible=False)
        if found is None and path == "Dockerfile":
            path = "dockerfile"
            found = self._resolve(path, what, visible=False)
        if found is None:
            raise NotFound(f"dockerfile: there is no {name!r} in the build context: put a "
                           "Dockerfile at its root, or name yours (sbx build -f PATH)")
        text = self._text(found, what)
        if self._rules is None:
            self._load_ignore(path)
        return text

    def _text(self, path: str, what: str) -> str:
        entry = self._entries[path]
        if entry.kind != "file":
            raise ImageError(f"{what} is a directory, not a file")
        cap = self._limits.max_dockerfile_bytes
        if entry.size > cap:
            raise QuotaExceeded(f"{what} is {entry.size} bytes, over the {cap} a Dockerfile "
                                "or .dockerignore may have")
        with self._open(entry) as f:
            data = f.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ImageError(f"{what} is not UTF-8 text (byte {e.start}): save it as "
                             "UTF-8") from None

    def _load_ignore(self, dockerfile: str) -> None:
        rules = IgnoreRules()
        for name in (f"{dockerfile}.dockerignore", ".dockerignore"):
            found = self._resolve(name, name, visible=False)
            if found is not None and self._entries[found].kind == "file":
                rules = IgnoreRules.parse(self._text(found, name), name)
                self._ignore_file = name
                break
        self._shown = self._visible(rules) if rules else None
        self._rules = rules  # last: a file that fails to parse is tried again, never skipped

    def _visible(self, rules: IgnoreRules) -> set[str]:
        """Every path the rules leave, and the directories above them (as BuildKit sends
        an excluded directory that holds an exception)."""
        shown = {""}
        todo: list[tuple[str, tuple[bool, ...] | None]] = [("", None)]
        while todo:
            parent, matched = todo.pop()
            for name in self._children[parent]:
                path = _join(parent, name)
                here = rules.step(path, matched)
                if not rules.decide(here):
                    up = path
                    while up not in shown:
                        shown.add(up)
                        up = up.rpartition("/")[0]
                if path in self._children:
                    todo.append((path, here))
        return shown

    # COPY and ADD sources -------------------------------------------------------------------

    def select(self, source: str, *, where: str, instruction: str = "COPY") -> list[Selected]:
        """What the COPY or ADD source `source` (variables expanded) names in the context:
        a path from its root (a leading `/` is the root), symlinks followed inside it, or a
        wildcard pattern (every match, sorted). ImageError naming `where` (e.g.
        "Dockerfile:7") when it leaves the context or names nothing."""
        if self._rules is None:
            self._load_ignore("Dockerfile")
        what = f"{where}: {instruction} source {source!r}"
        path = self._inside(source.lstrip("/"), what)
        if not has_wildcards(path):
            found = self._resolve(path, what, visible=True)
            if found is None:
                raise self._missing(what, self._resolve(path, what, visible=False) is not None)
            return [self._selected(path.rpartition("/")[2] or ".", found)]
        out = []
        for match in self._matches(path, what, visible=True):
            found = self._resolve(match, what, visible=True)
            if found is None:
                raise ImageError(f"{what}: {match!r} is a symbolic link to nothing in the "
                                 "build context")
            out.append(self._selected(match.rpartition("/")[2], found))
        if not out:
            raise self._missing(what, bool(self._matches(path, what, visible=False)))
        return out

    def _missing(self, what: str, ignored: bool) -> ImageError:
        if ignored:
            return ImageError(f"{what} is excluded by {self._ignore_file}: remove the line "
                              "that matches it there, or add a '!' exception after it")
        return ImageError(f"{what} names nothing in the build context (paths are relative "
                          "to the context directory, not to the Dockerfile)")

    def _inside(self, path: str, what: str) -> str:
        cleaned = clean(path)
        if cleaned == ".." or cleaned.startswith("../"):
            raise ImageError(f"{what} is outside the build context; only files inside the "
                             "directory sent can be used: move it into the context")
        return "" if cleaned == "." else cleaned

    def _entry(self, path: str, visible: bool) -> _Entry | None:
        if visible and self._shown is not None and path not in self._shown:
            return None
        return self._entries.get(path)

    def _resolve(self, path: str, what: str, *, visible: bool) -> str | None:
        """The entry `path` names, every symlink on the way followed inside the context:
        `..` and absolute targets stop at its root. None when nothing (with `visible`,
        nothing the ignore rules leave) is there; ImageError for a loop."""
        todo = [p for p in reversed(path.split("/")) if p]
        here, hops = "", 0
        while todo:
            name = todo.pop()
            if name == ".":
                continue
            if name == "..":
                here = here.rpartition("/")[0]
                continue
            nxt = _join(here, name)
            entry = self._entry(nxt, visible)
            if entry is None:
                return None
            if entry.kind == "symlink":
                hops += 1
                if hops > _MAX_HOPS:
                    raise ImageError(f"{what}: more than {_MAX_HOPS} symbolic links in a row "
                                     f"at {nxt!r} (a loop?)")
                if entry.linkname.startswith("/"):
                    here = ""
                todo.extend(p for p in reversed(entry.linkname.split("/")) if p)
                continue
            if todo and entry.kind != "dir":
                return None
            here = nxt
        return here

    def _matches(self, pattern: str, what: str, *, visible: bool) -> list[str]:
        """The paths a wildcard source matches: its plain leading directories resolved,
        then each component matched among real directories (as BuildKit walks them)."""
        parts = pattern.split("/")
        first = next(i for i, p in enumerate(parts) if has_wildcards(p))
        top = self._resolve("/".join(parts[:first]), what, visible=visible)
        if top is None or self._entries[top].kind != "dir":
            return []
        found, written = [top], ["/".join(parts[:first])]
        for depth, part in enumerate(parts[first:], first + 1):
            try:
                regex = glob(part)
            except BadPattern as e:
                raise ImageError(f"{what} is not a valid pattern: {e}") from None
            last = depth == len(parts)
            nxt, nxt_written = [], []
            for path, shown in zip(found, written, strict=True):
                for name in sorted(self._children.get(path, ())):
                    child = _join(path, name)
                    entry = self._entry(child, visible)
                    if entry is not None and regex.fullmatch(name) and (
                            last or entry.kind == "dir"):
                        nxt.append(child)
                        nxt_written.append(_join(shown, name))
            found, written = nxt, nxt_written
        return written

    def _selected(self, name: str, path: str) -> Selected:
        top = self._entries[path]
        if top.kind == "file":
            return Selected(name, "file", (self._source("", top),))
        files = []
        todo = [(path, "")]
        while todo:
            here, rel = todo.pop()
            files.append(self._source(rel, self._entries[here]))
            below = [n for n in self._children.get(here, ())
                     if self._entry(_join(here, n), True) is not None]
            todo.extend((_join(here, n), _join(rel, n)) for n in sorted(below, reverse=True))
        return Selected(name, "dir", tuple(files))

    def _source(self, rel: str, e: _Entry) -> SourceFile:
        return SourceFile(rel, e.kind, e.mode, e.size, e.mtime, e.linkname, 0, 0,
                          _Member(self, e) if e.kind == "file" else None)

    def digest(self, selected: Sequence[Selected]) -> str:
        return digest_of(selected)


def digest_of(selected: Sequence[Selected]) -> str:
    """The cache key of copying `selected`: names, paths, kinds, modes, owners, link targets
    and content hashes, never mtimes (as BuildKit's content checksum), so only a change to
    what a copy would write changes it. A file not from a context is read to hash it."""
    h = hashlib.sha256()
    for sel in selected:
        _line(h, ["source", sel.name, sel.kind])
        for f in sel.files:
            _line(h, [f.path, f.kind, f.mode, f.linkname, f.uid, f.gid, _content(f)])
    return "sha256:" + h.hexdigest()


def _line(h: hashlib._Hash, fields: list[object]) -> None:
    h.update(json.dumps(fields, separators=(",", ":")).encode() + b"\n")


def _content(f: SourceFile) -> str:
    if isinstance(f.open, _Member):
        return f.open.entry.sha256
    if f.kind != "file" or f.open is None:
        return ""
    h = hashlib.sha256()
    with f.open() as r:
        while data := r.read(_CHUNK):
            h.update(data)
    return h.hexdigest()


_COMPRESSED: dict[bytes, Callable[[BinaryIO], IO[bytes]]] = {
    b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


def is_archive(f: SourceFile) -> bool:
    """Whether ADD would unpack the file: a tar, plain or gzip, bzip2 or xz compressed
    (told by magic bytes, then a valid first tar header, as Docker checks)."""
    if f.kind != "file" or f.open is None:
        return False
    with f.open() as r:
        head = r.read(6)
        r.seek(0)
        unpack = next((u for magic, u in _COMPRESSED.items() if head.startswith(magic)), None)
        try:
            with unpack(r) if unpack else r as stream:
                tarfile.TarInfo.frombuf(stream.read(tarfile.BLOCKSIZE), "utf-8",
                                        "surrogateescape")
        except (tarfile.HeaderError, OSError, EOFError, lzma.LZMAError, zlib.error):
            return False
    return True
