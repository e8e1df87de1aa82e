"""A store whose filesystem is full: ENOSPC or EDQUOT from a write, SQLITE_FULL from a
catalog, told apart from every other failure and reported as `StoreFull`, which names the
store, what fills it and what to free.

Anything else a full disk causes (a tar that cannot be unpacked, a download that cannot be
written) must not be blamed on the content or the registry: the stores let these errors
through unwrapped, and `reported` turns them into StoreFull at their edge.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from sandbox.errors import StoreFull

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

WHAT_TO_FREE = ("remove images you no longer need (`sbx rmi NAME`, DELETE /v1/images/{ref}) "
                "and collect what they leave (POST /v1/images/gc), empty your build cache "
                "(`sbx builder prune`), delete cached files you no longer need (`sbx file rm "
                "ID`), or give the state directory's filesystem more room")


def is_full(exc: BaseException) -> bool:
    """Did `exc` (or what it was raised from) come from a full filesystem or quota?"""
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 8:  # a chain is short; never loop on a cycle
        if isinstance(cause, OSError) and cause.errno in FULL_ERRNOS:
            return True
        if (isinstance(cause, sqlite3.Error)
                and getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL):
            return True
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return False


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def full_error(store: str, root: Path, holds: str) -> StoreFull:
    """StoreFull for the store called `store` at `root`, which `holds` (what fills it, as
    the store counts it)."""
    try:
        st = os.statvfs(root)
        room = (f"its filesystem has {mib(st.f_bavail * st.f_frsize)} of "
                f"{mib(st.f_blocks * st.f_frsize)} free")
    except OSError:
        room = "its filesystem cannot be examined"
    return StoreFull(f"the {store} is full: {WHAT_TO_FREE}; then retry", path=str(root),
                     detail=f"the {store} at {root} is full ({room}; it holds {holds})")


@contextlib.contextmanager
def reported(make: Callable[[], StoreFull]) -> Iterator[None]:
    """A full filesystem inside the block raises `make()` instead (from the original)."""
    try:
        yield
    except StoreFull:
        raise
    except Exception as e:
        if not is_full(e):
            raise
        raise make() from e
