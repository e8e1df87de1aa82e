"""A full filesystem told apart from every other failure (sandbox/images/store/space.py), and
its HTTP form: 507 `store_full`, naming the store and what to free."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from sandbox.errors import LayerError, StoreFull
from sandbox.images.store import space
from service.errors import from_sandbox


def _sqlite_full(tmp_path: Path) -> sqlite3.Error:
    """A real SQLITE_FULL: a database capped at a few pages, filled."""
    db = sqlite3.connect(tmp_path / "small.db")
    try:
        db.execute("CREATE TABLE t (x BLOB)")
        db.execute("PRAGMA max_page_count = 4")
        with pytest.raises(sqlite3.Error) as caught:
            for _ in range(100):
                db.execute("INSERT INTO t VALUES (?)", (b"x" * 4096,))
        return caught.value
    finally:
        db.close()


def _chained(cause: BaseException) -> LayerError:
    """A layer error raised from `cause`, as unpack reports an OSError of one entry."""
    try:
        try:
            raise cause
        except BaseException as e:
            raise LayerError("unpacking bin/x failed") from e
    except LayerError as wrapped:
        return wrapped


def test_full_is_enospc_edquot_or_sqlite_full_anywhere_in_the_chain(tmp_path: Path) -> None:
    assert space.is_full(OSError(errno.ENOSPC, "No space left on device"))
    assert space.is_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert space.is_full(_chained(OSError(errno.ENOSPC, "No space left on device")))
    assert space.is_full(_sqlite_full(tmp_path))
    assert not space.is_full(OSError(errno.EACCES, "Permission denied"))
    assert not space.is_full(_chained(OSError(errno.EINVAL, "Invalid argument")))
    assert not space.is_full(LayerError("malformed tar"))


def test_reported_turns_a_full_disk_into_store_full_and_nothing_else(tmp_path: Path) -> None:
    def make() -> StoreFull:
        return space.full_error("image store", tmp_path, "2 images")

    with pytest.raises(StoreFull) as caught, space.reported(make):
        raise _chained(OSError(errno.ENOSPC, "No space left on device"))
    assert caught.value.path == str(tmp_path)
    message, detail = str(caught.value), caught.value.detail
    # What fills a store is every tenant's: the operator's log has it, no tenant's answer.
    assert message.startswith("the image store is full: remove images"), message
    assert str(tmp_path) not in message and "2 images" not in message, message
    assert "sbx rmi" in message and "sbx file rm" in message, message
    assert "sbx builder prune" in message, message
    assert detail.startswith(f"the image store at {tmp_path} is full (its filesystem has ")
    assert "it holds 2 images" in detail, detail
    with pytest.raises(LayerError), space.reported(make):
        raise LayerError("malformed tar")


def test_store_full_is_507_without_retry_after(tmp_path: Path) -> None:
    api = from_sandbox(space.full_error("file cache", tmp_path, "3 stored files, 1.0 MiB"))
    assert (api.status, api.code, api.headers) == (507, "store_full", {})
    assert api.message.startswith("the file cache is full: ") and str(tmp_path) not in api.message
