"""Files a build copies into an image (COPY and ADD), as their sources give them: a build
context (buildcontext.py) or an earlier stage's layers. What a copy does with them (where
they land, whose they become) is copylayer.py's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal

Kind = Literal["file", "dir", "symlink"]


@dataclass(frozen=True)
class SourceFile:
    """One entry to copy. `path` is relative to what the COPY source named: "" for the
    source itself (a file, or the directory whose contents are copied), "sub/a.txt" below
    a directory source."""

    path: str
    kind: Kind
    mode: int                    # permission bits, 0o7777 at most
    size: int = 0                # a file's bytes
    mtime: int = 0
    linkname: str = ""           # a symlink's target, as written (never followed)
    uid: int = 0                 # owner as found (context files: 0, as Docker copies them)
    gid: int = 0
    open: Callable[[], BinaryIO] | None = None   # a file's content, read from the start


@dataclass(frozen=True)
class Selected:
    """What one COPY source (a path or a wildcard match) stands for: a file (one entry,
    path "") or a directory (its own entry, path "", then its contents)."""

    name: str                    # the source's base name: where a file lands in a dest dir
    kind: Kind
    files: tuple[SourceFile, ...]
