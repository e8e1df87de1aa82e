"""The layer a COPY or an ADD makes: its sources placed at the destination as Docker places
them, written as a tar stream for the store's layer intake (layerintake.py).

- A file source lands at the destination itself, or inside it when the destination ends
  in `/` or is a directory in the image; a directory source's contents land inside it.
  Several sources need a destination that ends in `/`.
- The destination resolves through the image's own symlinks, inside the image
  (store/merged.py). Directories on the way that the image has go into the layer as they
  are (an overlay upper directory replaces the lower one's owner and mode); missing ones
  are made (0755, owned as the copied files).
- Owners: `--chown`'s ids, else the source's (context files are root's); modes: `--chmod`,
  else the source's. A local archive given to ADD is unpacked at the destination instead
  (its entries kept to the destination: no `..`, no absolute names, no devices).
"""

from __future__ import annotations

import posixpath
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from sandbox.errors import ImageError
from sandbox.images.buildfiles import Selected, SourceFile
from sandbox.images.store.merged import MergedTree

CHUNK = 1 << 20
_END = b"\0" * 1024
Opener = Callable[[], BinaryIO]


@dataclass(frozen=True)
class CopyTarget:
    dest: str                            # absolute (WORKDIR applied), a trailing / kept
    chown: tuple[int, int] | None = None
    chmod: int | None = None
    where: str = ""                      # how errors name the instruction: "Dockerfile:7"
    keyword: str = "COPY"


@dataclass(frozen=True)
class _Placed:
    path: str                            # inside the image, no leading /
    source: SourceFile


def plan_copy(selected: Sequence[Selected], target: CopyTarget, tree: MergedTree,
              archives: Sequence[bool] = ()) -> tuple[list[_Placed], list[tuple[str, Opener]]]:
    """Where each source entry lands (and, for ADD, which archives unpack where: opened
    only when their turn comes, so nothing is left open when the copy stops early)."""
    multiple = len(selected) > 1
    as_dir = target.dest.endswith("/") or target.dest.endswith("/.")
    if multiple and not as_dir:
        raise ImageError(f"{target.where}: {target.keyword} of several sources needs a "
                         f"destination that ends in '/' ({target.dest}/), the directory "
                         "they go into")
    found = tree.lookup(target.dest)
    dest = found.path if found is not None else posixpath.normpath("/" + target.dest)
    dest_is_dir = as_dir or (found is not None and found.kind == "dir")
    placed: list[_Placed] = []
    unpack: list[tuple[str, Opener]] = []
    for i, sel in enumerate(selected):
        if i < len(archives) and archives[i]:
            opener = sel.files[0].open
            assert opener is not None
            unpack.append((dest, opener))
            continue
        if sel.kind == "dir":
            base = dest
        elif dest_is_dir:
            base = posixpath.join(dest, sel.name)
        else:
            base = dest
        for f in sel.files:
            path = posixpath.join(base, f.path) if f.path else base
            placed.append(_Placed(path.lstrip("/"), f))
    return placed, unpack


def copy_tar(selected: Sequence[Selected], target: CopyTarget, tree: MergedTree, *,
             archives: Sequence[bool] = ()) -> Iterator[bytes]:
    """The layer's tar, in chunks (blocking reads: run it in a worker thread)."""
    placed, unpack = plan_copy(selected, target, tree, archives)
    entries: dict[str, _Placed] = {}
    for p in placed:               # a later source wins over an earlier one, as in Docker
        entries.pop(p.path, None)
        entries[p.path] = p
    out = _Layer(entries, target, tree)
    for path in entries:
        yield from out.parents(path)
    for dest, _ in unpack:  # an archive unpacks into a directory, made if missing
        yield from out.parents(posixpath.join(dest, "-").lstrip("/"))
    for path, p in entries.items():
        if not path or path in out.written:
            continue  # the image's root, or a directory written already as a parent
        if p.source.kind == "dir":
            yield from out.directory(path)
        else:
            out.written.add(path)
            yield from _entry(path, p.source, target)
    for dest, opener in unpack:
        with opener() as stream:
            yield from _unpack(dest.lstrip("/"), stream, target, out.written)
    yield _END


class _Layer:
    """The directories of a copy's layer, each written once, before what it holds."""

    def __init__(self, entries: dict[str, _Placed], target: CopyTarget,
                 tree: MergedTree) -> None:
        self.entries, self.target, self.tree = entries, target, tree
        self.now = int(time.time())
        self.written: set[str] = set()

    def parents(self, path: str) -> Iterator[bytes]:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self.written:
                yield from self.directory(parent)

    def directory(self, path: str) -> Iterator[bytes]:
        """A directory within a copied one as its source has it (owners and modes as the
        copy says). The destination of a directory's contents, and one on the way, as
        the image has it (an upper directory replaces a lower one's mode and owner: /tmp's
        1777), or made 0755 (owned as --chown says) when the image has none, as Docker
        makes them."""
        self.written.add(path)
        placed = self.entries.get(path)
        if placed is not None and placed.source.kind == "dir" and placed.source.path:
            yield from _entry(path, placed.source, self.target)
            return
        found = self.tree.lookup("/" + path, follow=False)
        if found is None:
            uid, gid = self.target.chown or (0, 0)
            yield _header(path, tarfile.DIRTYPE, 0o755, uid, gid, self.now)
        elif found.kind == "dir":
            yield _header(path, tarfile.DIRTYPE, found.mode, found.uid, found.gid,
                          found.mtime)
        else:
            raise ImageError(f"{self.target.where}: cannot {self.target.keyword} to "
                             f"{self.target.dest}: /{path} is not a directory in the image")


def _entry(path: str, f: SourceFile, target: CopyTarget) -> Iterator[bytes]:
    uid, gid = target.chown or (f.uid, f.gid)
    mode = f.mode if target.chmod is None else target.chmod
    if f.kind == "symlink":
        yield _header(path, tarfile.SYMTYPE, 0o777, uid, gid, f.mtime, linkname=f.linkname)
    elif f.kind == "dir":
        yield _header(path, tarfile.DIRTYPE, mode, uid, gid, f.mtime)
    else:
        assert f.open is not None
        yield _header(path, tarfile.REGTYPE, mode, uid, gid, f.mtime, size=f.size)
        with f.open() as src:
            yield from _data(src, f.size, path)


def _data(src: BinaryIO, size: int, path: str) -> Iterator[bytes]:
    left = size
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise ImageError(f"{path}: the source ended {left} bytes short of its size")
        left -= len(chunk)
        yield chunk
    if size % 512:
        yield b"\0" * (512 - size % 512)


def _header(path: str, kind: bytes, mode: int, uid: int, gid: int, mtime: int, *,
            size: int = 0, linkname: str = "") -> bytes:
    ti = tarfile.TarInfo(path)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode & 0o7777, uid, gid, mtime
    ti.size, ti.linkname = size, linkname
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _unpack(dest: str, stream: BinaryIO, target: CopyTarget,
            written: set[str]) -> Iterator[bytes]:
    """ADD of a local archive: its entries under `dest`, read as a stream (any compression
    tarfile knows). Names are kept inside `dest`; hard links only to earlier entries."""
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for ti in archive:
                name = _inside(ti.name, target)
                if name is None:
                    continue
                path = posixpath.join(dest, name) if name != "." else dest
                uid, gid = target.chown or (ti.uid, ti.gid)
                mode = ti.mode if target.chmod is None else target.chmod
                if ti.isdir():
                    if path not in written:
                        written.add(path)
                        yield _header(path, tarfile.DIRTYPE, mode, uid, gid, int(ti.mtime))
                elif ti.issym():
                    yield _header(path, tarfile.SYMTYPE, 0o777, uid, gid, int(ti.mtime),
                                  linkname=ti.linkname)
                elif ti.islnk():
                    link = _inside(ti.linkname, target)
                    if link is None or link not in seen:
                        raise ImageError(f"{target.where}: ADD: the archive's hard link "
                                         f"{ti.name!r} names {ti.linkname!r}, not an earlier "
                                         "file of the archive")
                    yield _header(path, tarfile.LNKTYPE, mode, uid, gid, int(ti.mtime),
                                  linkname=posixpath.join(dest, link))
                elif ti.isreg():
                    src = archive.extractfile(ti)
                    assert src is not None
                    yield _header(path, tarfile.REGTYPE, mode, uid, gid, int(ti.mtime),
                                  size=ti.size)
                    yield from _data(src, ti.size, ti.name)
                else:
                    continue  # devices, FIFOs: an image layer holds none from a build
                seen.add(name)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImageError(f"{target.where}: ADD: the archive cannot be read ({e}); give a "
                         "tar, tar.gz, tar.bz2 or tar.xz file, or use COPY to copy it as "
                         "it is") from None


def _inside(name: str, target: CopyTarget) -> str | None:
    """An archive member's name kept inside the destination: "." for the destination
    itself, None for what is skipped; `..` is refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{target.where}: ADD: the archive's entry {name!r} leads out of "
                         "its destination with '..'; such an archive is refused")
    return "/".join(parts) or "."
