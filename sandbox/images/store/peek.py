"""Read a small file of an image as its containers would see it (the topmost layer that has
it wins, a whiteout hides the layers below), without a container and without letting a
symlink in a layer lead out of it. Used for /etc/passwd and /etc/group (the config's User)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from sandbox.runtime.resolve import open_in_root

_ABSENT = (errno.ENOENT, errno.ENOTDIR)  # not in this layer: look lower


def read_from_layers(layers: Sequence[Path], path: str, limit: int) -> bytes | None:
    """At most `limit` bytes of `path` in the merged layers (lowest first), or None when the
    image has no regular file there."""
    rel = path.lstrip("/").encode() or b"."
    for layer in reversed(layers):
        root = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                probe = open_in_root(root, rel, os.O_PATH)
            except OSError as e:
                if e.errno in _ABSENT:
                    continue
                return None
            try:
                st = os.fstat(probe)
            finally:
                os.close(probe)
            if not stat.S_ISREG(st.st_mode):
                return None  # a whiteout (char 0:0), a directory, a device, a FIFO
            fd = open_in_root(root, rel, os.O_RDONLY | os.O_NONBLOCK)
            try:
                return os.read(fd, limit)
            finally:
                os.close(fd)
        finally:
            os.close(root)
    return None
