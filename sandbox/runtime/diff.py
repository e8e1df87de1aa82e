"""What a container changed in its writable root, as an OCI image layer (image-spec
layer.md): the tar a commit makes its new top layer of.

A writable root is an overlay whose upper directory holds exactly what runs changed: new
and modified files (copied up whole), the directories on their way, whiteouts (character
devices 0/0) for what they deleted from the image, and opaque directories
(user.overlay.opaque "y") where they removed a directory of the image and made it again.
The layer is that directory written out with OCI's names for the last two: `.wh.<name>`
for a whiteout, `.wh..wh..opq` inside an opaque directory.

It is read as copies out are (files.py): init opens every entry, from its directory's
descriptor, in the upper directory, never following a symlink, and tells whether each
directory is opaque (the service may lack the permission to read the files, directories
and xattrs of other container users; it only reads the descriptors init hands over). So
an entry removed during the walk is left out, and a directory swapped for a link is
neither followed nor read through: the layer never holds more than the upper directory.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import AsyncIterator, Mapping
from typing import ClassVar

from sandbox.errors import Busy, PolicyError
from sandbox.runtime.container import Container
from sandbox.runtime.files import TreeDir, TreeTar
from sandbox.runtime.protocol import Base, Opened

# The upper directory's own size (the profile's upper_size) bounds what a layer holds;
# these bound one commit's work, and the listings it keeps (~100 bytes per entry).
MAX_LAYER_BYTES = 8 << 30
MAX_LAYER_ENTRIES = 1 << 20

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


async def layer_tar(container: Container, *, max_bytes: int = MAX_LAYER_BYTES,
                    max_entries: int = MAX_LAYER_ENTRIES) -> AsyncIterator[bytes]:
    """The container's changes as an uncompressed OCI layer tar, yielded as it is read;
    wrap it in `contextlib.aclosing`.

    Entries are named as in Docker's layers ("etc", "etc/passwd": no "/" or "./"), each
    directory before what it holds, entries sorted by name, in PAX format: directories,
    regular files with their content, symlinks (their target as it is, never followed),
    FIFOs, and a regular file with more than one name in the layer stored once, its other
    names as hard links to the first. Owners are the container's ids; modes keep setuid,
    setgid and sticky; mtimes whole seconds. Whiteouts and opaque directories are OCI's
    marker files: empty regular files with their directory's owner and mtime (mode 0 for
    a whiteout, the directory's permissions for an opaque one).
    Left out: sockets and device nodes, xattrs (file capabilities among them; overlayfs's
    own user.overlay.* are never part of a layer), the root directory's own mode and owner.

    A read-only root changed nothing: the layer is an empty archive (two zero blocks), as
    Docker commits one. The container should have no run going on meanwhile (what a run
    changes during the walk may or may not be in the layer); a reset during the walk
    raises Busy. Over `max_bytes`, `max_entries` or files.MAX_GET_DEPTH nested directories,
    a file named `.wh.*` (which a layer cannot hold: it would read as a whiteout), or a
    failure to read: PolicyError, possibly after part of the tar was yielded.
    """
    if not container.rootfs.writable:
        yield bytes(2 * tarfile.BLOCKSIZE)
        return
    top = await _open_top(container)
    try:
        st = os.fstat(top)
        layer = _Layer(container, max_bytes, max_entries)
        async with contextlib.aclosing(layer.walk(b"", "", top, st)) as chunks:
            async for chunk in chunks:
                yield chunk
        again = await _open_top(container)
        try:
            now = os.fstat(again)
        finally:
            os.close(again)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise Busy(f"container {container.id} was reset while its changes were read; "
                       "commit it again when no run is using it")
    finally:
        os.close(top)
    yield bytes(2 * tarfile.BLOCKSIZE)


async def _open_top(container: Container) -> int:
    try:
        return await container.open_path("/", os.O_RDONLY | os.O_DIRECTORY, base="upper")
    except OSError as e:
        raise PolicyError(f"cannot read what container {container.id} changed: "
                          f"{e.strerror}") from e


class _Layer(TreeTar):
    """The upper directory as a layer: whiteouts and opaque directories in OCI's words,
    hard links kept."""

    base: Base = "upper"
    # Whiteouts and FIFOs are opened (O_PATH) to be told apart from sockets and devices.
    opens: ClassVar[Mapping[str, int]] = {**TreeTar.opens, "other": os.O_PATH | os.O_NOFOLLOW}
    too_many = ("the container changed over {} entries, the limit for a layer; commit a "
                "container that changed fewer files")
    too_deep = ("the container's changes nest deeper than {} directories, the limit for a "
                "layer")
    too_big = ("the container's changes are over the {} byte limit for a layer; remove "
               "what the image need not hold, then commit")

    def __init__(self, container: Container, max_bytes: int, max_entries: int) -> None:
        super().__init__(container, max_bytes, max_entries)
        self.names: dict[tuple[int, int], str] = {}   # (dev, ino) -> its first name
        # The runtime's own files (/etc/hosts...) are the container's, not the image's:
        # what a run did to them stays out of the layer, as Docker's and buildah's binds
        # keep it out of theirs.
        self.provided = {path.lstrip("/") for path, _ in container.rootfs.provided}

    async def _enter(self, path: bytes, arcname: str, fd: int, st: os.stat_result) -> TreeDir:
        d = await super()._enter(path, arcname, fd, st)
        d.entries = [(name, kind) for name, kind in d.entries
                     if (f"{arcname}/{name}" if arcname else name) not in self.provided]
        for name, _kind in d.entries:
            if name.startswith(WHITEOUT):
                shown = os.fsdecode(os.path.join(b"/", path, os.fsencode(name)))
                raise PolicyError(f"{shown}: a layer cannot hold a name that begins with "
                                  f"{WHITEOUT}, which OCI reserves for deletions; rename or "
                                  "remove it, then commit")
        return d

    def _dir(self, arcname: str, st: os.stat_result, opened: Opened) -> list[bytes]:
        headers = super()._dir(arcname, st, opened)
        if opened.opaque:
            headers.append(self._header(f"{arcname}/{OPAQUE}", st, tarfile.REGTYPE,
                                        mode=stat.S_IMODE(st.st_mode) & 0o777))
        return headers

    def _other(self, d: TreeDir, name: str, arcname: str, fd: int) -> bytes | None:
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:   # overlayfs's whiteout
            # Owned by whoever mounted the overlay (init's own id once a reset made it):
            # the marker takes its directory's owner and mtime instead, the same whoever
            # made it.
            whiteout = arcname[:len(arcname) - len(name)] + WHITEOUT + name
            return self._header(whiteout, os.fstat(d.fd), tarfile.REGTYPE, mode=0)
        if stat.S_ISFIFO(st.st_mode):
            return self._header(arcname, st, tarfile.FIFOTYPE)
        return None  # a socket or a device: no layer holds them

    def _file(self, fd: int, arcname: str, st: os.stat_result) -> tuple[bytes, int]:
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            first = self.names.setdefault((st.st_dev, st.st_ino), arcname)
            if first != arcname:
                return self._header(arcname, st, tarfile.LNKTYPE, linkname=first), 0
        return super()._file(fd, arcname, st)
