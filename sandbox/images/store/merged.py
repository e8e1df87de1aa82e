"""An image's tree as its containers see it, read from its unpacked layers without a
container: the topmost layer that has an entry wins, a whiteout hides the layers below, an
opaque directory hides the lower directories of its name, and symlinks resolve inside the
image (`..` and absolute targets stop at its root), never on the host.

A build looks here before it copies files in: where a destination lands (through the
image's own symlinks) and what the directories on the way are (their owners and modes go
into the new layer, which must not change them).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sandbox.errors import ImageError
from sandbox.images.buildfiles import Selected, SourceFile
from sandbox.images.dockerignore import BadPattern, glob, has_wildcards
from sandbox.images.store.unpack import Ownership, container_mode, container_owner
from sandbox.runtime.resolve import open_in_root

MAX_HOPS = 40                      # symlinks followed in one lookup, as Linux allows
_OPAQUE = "user.overlay.opaque"


@dataclass(frozen=True)
class Entry:
    path: str                      # absolute, every symlink on the way resolved
    kind: str                      # "dir" | "file" | "symlink" | "other"
    mode: int                      # permission bits
    uid: int
    gid: int
    mtime: int
    linkname: str = ""
    size: int = 0
    layer: int = -1                # the layer that holds it (-1: the image's root)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "symlink" if stat.S_ISLNK(mode) else "other"


class MergedTree:
    """Lookups in the merged view of `layers` (lowest first)."""

    def __init__(self, layers: Sequence[Path], ownership: Ownership) -> None:
        self.layers = tuple(layers)
        self.ownership = ownership

    def lookup(self, path: str, *, follow: bool = True) -> Entry | None:
        """The entry at `path` (None: absent), symlinks on the way followed inside the image,
        the last one too when `follow`. ImageError when a loop of links never ends."""
        todo = [p for p in path.split("/") if p not in ("", ".")]
        done: list[str] = []
        hops = 0
        # Layers whose directory at `done` takes part in the merged view, topmost first.
        under = list(range(len(self.layers) - 1, -1, -1))
        while todo:
            name = todo.pop(0)
            if name == "..":
                if done:
                    done.pop()
                under = self._dirs_at(done)
                continue
            found = self._child(under, done, name)
            if found is None:
                return None
            index, st = found
            here = [*done, name]
            if stat.S_ISLNK(st.st_mode) and (todo or follow):
                hops += 1
                if hops > MAX_HOPS:
                    raise ImageError(f"/{'/'.join(here)}: more than {MAX_HOPS} symbolic links "
                                     "in a row (a loop?) in the image")
                target = os.readlink(self._host(index, here))
                if target.startswith("/"):
                    done = []
                todo = [p for p in target.split("/") if p not in ("", ".")] + todo
                under = self._dirs_at(done)
                continue
            if todo and not stat.S_ISDIR(st.st_mode):
                return None  # a file where a directory is needed on the way
            done = here
            if not todo:
                return self._entry(index, done, st)
            under = self._below(under, index, done)
        return self._root_entry()

    def select(self, source: str, *, where: str) -> list[Selected]:
        """What `COPY --from=<this image> source` copies (see buildfiles.Selected): a path
        resolved inside the image, or a wildcard in its last component (every match,
        sorted). ImageError naming `where` when nothing is there."""
        parent, _, last = posixpath.normpath("/" + source).rpartition("/")
        if has_wildcards(last):
            found = self.lookup(parent or "/")
            try:
                pattern = glob(last)
            except BadPattern as e:
                raise ImageError(f"{where}: {source!r} is not a valid pattern ({e})") from None
            names = sorted(n for n in self._list(found.path) if pattern.fullmatch(n)
                           ) if found is not None and found.kind == "dir" else []
            paths = [posixpath.join(found.path, n) for n in names] if found else []
        else:
            paths = [posixpath.join(parent or "/", last)]
        out = []
        for path in paths:
            entry = self.lookup(path)
            if entry is not None and entry.kind in ("file", "dir"):
                # Named as written or matched (`COPY link /d/` makes /d/link), as Docker does.
                out.append(Selected(posixpath.basename(path) or "/", entry.kind,
                                    tuple(self._files(entry))))
        if not out:
            raise ImageError(f"{where}: {source!r} is not in the stage or image copied from "
                             "(a file or a directory, looked up as its containers see it)")
        return out

    def _files(self, top: Entry) -> Iterator[SourceFile]:
        todo = [("", top)]
        while todo:
            rel, entry = todo.pop()
            yield self._source(rel, entry)
            if entry.kind == "dir":
                children = self._list(entry.path)
                for name in sorted(children, reverse=True):
                    child = self.lookup(posixpath.join(entry.path, name), follow=False)
                    if child is not None and child.kind != "other":
                        todo.append((posixpath.join(rel, name) if rel else name, child))

    def _source(self, rel: str, e: Entry) -> SourceFile:
        def opener() -> BinaryIO:
            root = os.open(self.layers[e.layer], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = open_in_root(root, e.path.lstrip("/").encode(), os.O_RDONLY,
                                  no_symlinks=True)
            finally:
                os.close(root)
            return os.fdopen(fd, "rb")
        return SourceFile(rel, e.kind, e.mode, e.size, e.mtime,  # type: ignore[arg-type]
                          e.linkname, e.uid, e.gid, opener if e.kind == "file" else None)

    def _list(self, path: str) -> list[str]:
        """The names in the merged directory `path` (resolved), whiteouts left out."""
        parts = [p for p in path.split("/") if p]
        names: dict[str, bool] = {}
        for index in self._dirs_at(parts):
            with os.scandir(self._host(index, parts)) as it:
                for d in it:
                    if d.name not in names:
                        st = d.stat(follow_symlinks=False)
                        names[d.name] = not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0)
        return [n for n, shown in names.items() if shown]

    def _host(self, index: int, parts: Sequence[str]) -> str:
        return os.path.join(self.layers[index], *parts)

    def _child(self, under: list[int], parent: list[str], name: str
               ) -> tuple[int, os.stat_result] | None:
        for index in under:
            try:
                st = os.lstat(self._host(index, [*parent, name]))
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                raise
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return None  # a whiteout
            return index, st
        return None

    def _below(self, under: list[int], top: int, parts: list[str]) -> list[int]:
        """The layers that merge into the directory `parts`, whose topmost is `top`: it and
        the lower ones with a directory there, down to an opaque one."""
        out = []
        for index in under[under.index(top):]:
            host = self._host(index, parts)
            try:
                st = os.lstat(host)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                break  # a file or a whiteout there hides everything below
            out.append(index)
            if _opaque(host):
                break
        return out

    def _dirs_at(self, parts: list[str]) -> list[int]:
        """The layers that merge at `parts` (a directory known to be one), from the root."""
        under = list(range(len(self.layers) - 1, -1, -1))
        for i in range(len(parts)):
            found = self._child(under, parts[:i], parts[i])
            if found is None:
                return []
            under = self._below(under, found[0], parts[:i + 1])
        return under

    def _entry(self, index: int, parts: list[str], st: os.stat_result) -> Entry:
        fd = os.open(self._host(index, parts), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            uid, gid = container_owner(fd, st, self.ownership)
            mode = container_mode(fd, st)
        finally:
            os.close(fd)
        link = os.readlink(self._host(index, parts)) if stat.S_ISLNK(st.st_mode) else ""
        return Entry("/" + "/".join(parts), _kind(st.st_mode), mode, uid, gid,
                     int(st.st_mtime), link, st.st_size, index)

    def _root_entry(self) -> Entry:
        for index in range(len(self.layers) - 1, -1, -1):
            return self._entry(index, [], os.lstat(self.layers[index]))
        return Entry("/", "dir", 0o755, 0, 0, 0)


def _opaque(host: str) -> bool:
    try:
        return os.getxattr(host, _OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False
