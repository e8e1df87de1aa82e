"""The file cache: bytes a tenant stores once (POST /v1/files, a run's `copy_out_cached`) and
names by their hash in later runs, so a judge sends its binary once, not with every case.

On disk, under `root` (the state directory's `files/`, never /dev/shm: a cache of binaries
must not eat the memory runs are limited by):

    blobs/sha256/<hex>   the content, stored once however many tenants hold it (0444)
    blobs/sha256/<hex>.x the same content, executable (0555): made when a run first binds
                         it as an executable, deleted with the blob
    tmp/                 uploads in progress, named after their process (store/locks.py)
    files.db             SQLite: files (tenant, id, size, created, last_used), usage

Content is shared, holding it is not: a tenant reaches an id only through its own entry,
made when it stored that content itself, so knowing another tenant's hash gives nothing and
every miss answers alike ("no file ..."), whether the id exists for someone else or not at
all. Quotas count a tenant's own entries whatever the sharing: what it may keep must not
depend on what others happen to store.

An entry lives `ttl_s` after its last use (storing it again, get, read, open: sliding; uses
less than `refresh_s` apart are recorded once, so it may go up to that much sooner); past
that it is gone to its tenant at once, and `expire()` deletes it, then the blobs no entry
holds. Until then it still counts in the `usage` table (kept by triggers, so a put checks
its quotas in constant time however many files the tenant has); a put that finds the tenant
over a quota first drops the tenant's expired entries, so "let them expire" frees room.

Runs get a file by a read-only bind of its blob (Container.bind; the runtime binds
blobs/sha256 into each container's init, out of runs' sight): so blobs are readable by any
id (0444, or 0555 for the executable variant) and their directory searchable (0711), while
everything above it stays 0700, the service's own. A bind shows the blob's own mode, which
a run cannot change: the executable variant is a second inode, not a chmod.

Blobs and entries stay consistent across threads and processes because a blob is renamed
into blobs/, or deleted, only inside the write transaction (BEGIN IMMEDIATE) that adds or
drops the entries naming it: a blob about to gain an entry is never deleted, and none is
left without one except by a crash, which the sweep at start clears. The content is fsynced
before its rename, the directory is not (a second sync per file): a blob lost in a power cut
makes read and open answer "no file", as if it had expired, and drops its entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from sandbox.errors import AtQuota, NotFound, PolicyError, QuotaExceeded, StoreFull
from sandbox.images import digests
from sandbox.images.store import space
from sandbox.images.store.catalog import open_database, transaction
from sandbox.images.store.locks import remove_stale, temp_name
from sandbox.tenants import Tenant

T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS files (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,                   -- 'sha256:<hex>' of the content: blobs/sha256/<hex>
    size INTEGER NOT NULL,
    created REAL NOT NULL,              -- when this tenant first stored it
    last_used REAL NOT NULL,            -- stored again, got, read or opened
    PRIMARY KEY (tenant, id)
) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS files_id ON files(id)""",
    """CREATE INDEX IF NOT EXISTS files_last_used ON files(last_used)""",
    """-- Each tenant's entries, expired ones included until they are dropped. Entries are only
-- inserted and deleted (a refresh updates times, never the size of its content).
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    files INTEGER NOT NULL
)""",
    """CREATE TRIGGER IF NOT EXISTS files_added AFTER INSERT ON files BEGIN
    INSERT INTO usage VALUES (NEW.tenant, NEW.size, 1) ON CONFLICT (tenant)
        DO UPDATE SET bytes = bytes + NEW.size, files = files + 1;
END""",
    """CREATE TRIGGER IF NOT EXISTS files_dropped AFTER DELETE ON files BEGIN
    UPDATE usage SET bytes = bytes - OLD.size, files = files - 1 WHERE tenant = OLD.tenant;
END""",
)

# Bytes gathered from the stream before a worker thread hashes and writes them: few thread
# hops for small chunks, little memory held for large uploads, and no temp file at all for
# content up to this size that is stored already (a judge's binary sent again).
_BATCH = 1 << 20
BLOB_MODE, EXEC_MODE = 0o444, 0o555
EXEC_SUFFIX = ".x"
# Entries expire() drops per transaction: the lock is held while their blobs are deleted,
# and a get from the event loop waits for at most one batch.
_EXPIRE_BATCH = 64
_SEEN_MAX = 10_000        # entries remembered between queries (FileCache._seen)


@dataclass(frozen=True)
class CachedFile:
    id: str            # "sha256:<64 hex>" of the content
    size: int
    created: float     # when this tenant first stored it
    last_used: float
    expires: float     # last_used + ttl (sliding: every use moves it)


@dataclass(frozen=True)
class FileCacheConfig:
    ttl_s: float = 86400.0            # an entry unused this long is dropped
    max_file_bytes: int = 256 << 20   # one file, whatever the tenant's quota
    refresh_s: float = 1.0            # uses closer together than this are recorded once


def _check_id(file_id: object) -> str:
    """Only a well-formed id may reach SQL or name a blob's path."""
    if not isinstance(file_id, str) or not digests.is_digest(file_id):
        raise PolicyError(f"file_id: {repr(file_id)[:100]} is not a file id; expected "
                          "'sha256:' and 64 lowercase hex digits, as POST /v1/files returns")
    return file_id


async def _settled(fn: Callable[[], T]) -> T:
    """`fn()` in a worker thread. A caller cancelled meanwhile still waits for the thread
    to end before it unwinds: its cleanup closes and removes the temp file the thread
    writes, and closing a descriptor in use could let another open reuse its number."""
    task = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


class _Upload:
    """A temp file being written and hashed. The file is made by the first write, in the
    worker thread like every other disk operation of an upload (creating an inode may wait
    for the filesystem's journal, which must not stall the event loop); content that comes
    in one batch and is stored already never needs one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hash = hashlib.sha256()
        self._file: BinaryIO | None = None

    def _opened(self) -> BinaryIO:
        if self._file is None:
            self._file = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                           | os.O_CLOEXEC, 0o600), "wb")
        return self._file

    def hash_in(self, parts: list[bytes]) -> None:
        for part in parts:
            self.hash.update(part)

    def write(self, parts: list[bytes]) -> None:
        f = self._opened()
        for part in parts:
            f.write(part)

    def take(self, batch: list[bytes]) -> None:
        """A batch from the middle of the stream."""
        self.hash_in(batch)
        self.write(batch)

    def store(self, rest: list[bytes]) -> None:
        """The last bytes, then fsync: the content is on disk before it is renamed into
        place, never a name for less than its hash says."""
        self.write(rest)
        f = self._opened()
        f.flush()
        os.fchmod(f.fileno(), BLOB_MODE)
        os.fsync(f.fileno())

    def discard(self) -> None:
        """Close and remove the temp file (gone already once renamed into blobs/)."""
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()  # flushes what is buffered: fails on a full disk, still closes
            finally:
                self.path.unlink(missing_ok=True)


def _copy_executable(source: Path, dest: Path) -> None:
    """`source`'s content as a new 0555 file at `dest` (a temp name), on disk."""
    with open(source, "rb") as src, open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                                 | os.O_CLOEXEC, 0o600), "wb") as out:
        while chunk := src.read(_BATCH):
            out.write(chunk)
        out.flush()
        os.fchmod(out.fileno(), EXEC_MODE)
        os.fsync(out.fileno())


class FileCache:
    """Safe to share between the event loop and worker threads: one lock serialises the
    SQLite connection, and the slow parts of a put (writing, hashing, fsync) run outside
    it, so a big upload never holds up another tenant's get."""

    def __init__(self, root: Path, config: FileCacheConfig = FileCacheConfig()) -> None:
        self.root = root
        self.config = config
        self._blobs = root / "blobs" / "sha256"
        self._tmp = root / "tmp"
        for d in (root, self._blobs.parent, self._blobs, self._tmp):
            d.mkdir(0o700, parents=True, exist_ok=True)
        # Searchable by init and runs of any id (see the module's docstring); not listable.
        self._blobs.chmod(0o711)
        self._db = open_database(root / "files.db", _SCHEMA)
        self._lock = threading.RLock()
        # Entries looked up within refresh_s, by (tenant, id): a judge names the same file
        # case after case, and a query releases the GIL, which a run's request then waits to
        # take back from the runtime's housekeeping thread (~0.15 ms per run, measured).
        # Emptied by every delete.
        self._seen: dict[tuple[str, str], CachedFile] = {}
        # Executable variants known to exist, for the same reason (a stat per run).
        self._executables: set[str] = set()
        self._sweep()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, self._lock)

    def _rows(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _path(self, file_id: str) -> Path:
        return self._blobs / digests.hex_part(file_id)

    @property
    def blob_dir(self) -> Path:
        """Where blobs are, named by the hex digits of their id: for the runtime to bind."""
        return self._blobs

    def _cutoff(self, now: float) -> float:
        """Entries last used before this have expired."""
        return now - self.config.ttl_s

    def _entry(self, file_id: str, size: int, created: float, last_used: float) -> CachedFile:
        return CachedFile(file_id, size, created, last_used, last_used + self.config.ttl_s)

    def missing(self, file_id: str) -> NotFound:
        # One message for every miss: whether another tenant holds the id is not the
        # caller's to learn.
        return NotFound(f"no file {file_id}: store it first (POST /v1/files); a file unused "
                        f"for {self.config.ttl_s:g} s expires")

    # storing

    async def put(self, tenant: Tenant, chunks: AsyncIterator[bytes]) -> CachedFile:
        """Store the stream's bytes for `tenant`; its entry (the id is their SHA-256).

        The bytes go to a temp file as they arrive, hashed on the way, never whole in
        memory; the stream is read no further than one byte past the cap on a file, so an
        endless body costs nothing more. Storing content the tenant holds again refreshes
        its entry and uses no more quota; content another tenant stored is not written
        twice, but counts against this tenant's quota all the same. A stream that fails
        (or a caller cancelled) leaves neither a temp file nor an entry. A full filesystem
        is StoreFull, once expired entries are dropped to make room for a retry.
        """
        cap = self.config.max_file_bytes
        if tenant.max_file_bytes is not None:
            cap = min(cap, tenant.max_file_bytes)
        try:
            with space.reported(self._full):
                return await self._put(tenant, chunks, cap)
        except StoreFull:
            # The stream cannot be read again: room is made for the caller's retry (if the
            # disk lets even that be written: the failure to report is the full store).
            with contextlib.suppress(sqlite3.Error, OSError):
                await asyncio.to_thread(self.expire)
            raise

    def _full(self) -> StoreFull:
        files, nbytes = self._rows("SELECT COALESCE(SUM(files), 0), COALESCE(SUM(bytes), 0) "
                                   "FROM usage", ())[0]
        return space.full_error("file cache", self.root,
                                f"{space.count(files, 'stored file')}, {space.mib(nbytes)}")

    async def _put(self, tenant: Tenant, chunks: AsyncIterator[bytes], cap: int) -> CachedFile:
        upload = _Upload(self._tmp / temp_name("put"))
        try:
            size, batched = 0, 0
            batch: list[bytes] = []
            async for chunk in chunks:
                size += len(chunk)
                if size > cap:
                    raise self._too_big(tenant, cap)
                batch.append(chunk)
                batched += len(chunk)
                if batched > _BATCH:
                    await _settled(functools.partial(upload.take, batch))
                    batch, batched = [], 0
            return await _settled(functools.partial(self._publish, tenant, upload, batch,
                                                    size))
        finally:
            upload.discard()

    async def put_bytes(self, tenant: Tenant, data: bytes) -> CachedFile:
        """`put` for bytes already in memory (a run's copied-out file)."""
        async def one() -> AsyncIterator[bytes]:
            yield data
        return await self.put(tenant, one())

    def _too_big(self, tenant: Tenant, cap: int) -> QuotaExceeded:
        if cap == tenant.max_file_bytes:
            return QuotaExceeded(
                f"the file is over {cap} bytes, your whole quota for stored files "
                "(max_file_bytes): store a smaller file, or ask the operator for a larger "
                "quota")
        return QuotaExceeded(f"the file is over {cap} bytes, the most one stored file may be "
                             "(the service's [files] max_file_bytes): store a smaller file")

    def _publish(self, tenant: Tenant, upload: _Upload, rest: list[bytes],
                 size: int) -> CachedFile:
        """Hash the last bytes, then in one transaction: check the quotas, rename the temp
        file into blobs/ unless the content is there already, record the tenant's entry."""
        try:
            upload.hash_in(rest)
            file_id = "sha256:" + upload.hash.hexdigest()
            blob = self._path(file_id)
            # Outside the lock: a big file's flush to disk must not hold up every other
            # call. Content already stored needs none.
            stored = not blob.exists()
            if stored:
                upload.store(rest)
            now = time.time()
            with self._tx() as db:
                row = db.execute("SELECT created FROM files WHERE tenant=? AND id=? AND "
                                 "last_used >= ?", (tenant.id, file_id, self._cutoff(now))
                                 ).fetchone()
                if row is None:
                    self._make_room(db, tenant, size, now)
                renamed = not blob.exists()
                if renamed:
                    if not stored:  # expire() deleted it since the look above
                        upload.store(rest)
                    os.rename(upload.path, blob)
                created = now if row is None else float(row[0])
                try:
                    db.execute("INSERT INTO files VALUES (?,?,?,?,?) ON CONFLICT (tenant, id) "
                               "DO UPDATE SET created=excluded.created, "
                               "last_used=excluded.last_used",
                               (tenant.id, file_id, size, created, now))
                except BaseException:  # (a full disk): the rollback leaves the blob unheld
                    if renamed:
                        blob.unlink()
                    raise
            return self._entry(file_id, size, created, now)
        finally:
            upload.discard()

    def _make_room(self, db: sqlite3.Connection, tenant: Tenant, size: int,
                   now: float) -> None:
        """Refuse a new entry that would take the tenant over its count or byte quota."""
        def over() -> tuple[bool, bool, int, int]:
            used, count = db.execute("SELECT bytes, files FROM usage WHERE tenant=?",
                                     (tenant.id,)).fetchone() or (0, 0)
            return (tenant.max_files is not None and count >= tenant.max_files,
                    tenant.max_file_bytes is not None and used + size > tenant.max_file_bytes,
                    used, count)

        too_many, too_big, used, count = over()
        if too_many or too_big:  # its expired entries count no more
            self._drop(db, "tenant=? AND last_used < ?", (tenant.id, self._cutoff(now)))
            too_many, too_big, used, count = over()
        what_to_do = ("delete files you no longer need (DELETE /v1/files/{id}) or let them "
                      f"expire (unused for {self.config.ttl_s:g} s), then retry")
        if too_many:
            raise AtQuota(f"you have {count} stored files, your maximum (max_files): "
                                + what_to_do)
        if too_big:
            raise QuotaExceeded(f"this file would bring your stored files to {used + size} "
                                f"bytes, over your quota of {tenant.max_file_bytes} bytes "
                                "(max_file_bytes): " + what_to_do)

    # using

    def get(self, tenant: Tenant, file_id: str) -> CachedFile:
        """The tenant's entry for `file_id`, its use recorded (which moves its expiry). A use
        within `refresh_s` of the one last recorded is not written again: a judge's runs
        name the same file case after case, and a write transaction per case (~75 µs) was a
        quarter of what a run may spend on its cached file."""
        _check_id(file_id)
        now = time.time()
        key = (tenant.id, file_id)
        with self._lock:
            seen = self._seen.get(key)
        if seen is not None and now - seen.last_used < self.config.refresh_s < seen.expires - now:
            return seen
        rows = self._rows("SELECT size, created, last_used FROM files WHERE tenant=? AND id=? "
                          "AND last_used >= ?", (tenant.id, file_id, self._cutoff(now)))
        if rows and now - float(rows[0][2]) >= self.config.refresh_s:
            rows = self._rows("UPDATE files SET last_used=? WHERE tenant=? AND id=? AND "
                              "last_used >= ? RETURNING size, created, last_used",
                              (now, tenant.id, file_id, self._cutoff(now)))
        if not rows:
            raise self.missing(file_id)
        size, created, last_used = rows[0]
        entry = self._entry(file_id, int(size), float(created), float(last_used))
        with self._lock:
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen[key] = entry
        return entry

    def open(self, tenant: Tenant, file_id: str) -> BinaryIO:
        """The content to stream (the caller closes it). Opened under the lock, so neither
        delete() nor expire() can remove the blob between the check and the open; once
        open, it reads whole even if they remove it next."""
        with self._lock:
            self.get(tenant, file_id)
            try:
                return open(self._path(file_id), "rb")
            except FileNotFoundError:  # lost in a crash (see the module's docstring)
                self._db.execute("DELETE FROM files WHERE id=?", (file_id,))
                self._seen.clear()
                raise self.missing(file_id) from None

    def bindable(self, file_id: str, executable: bool) -> str | None:
        """The name (in blob_dir) of the blob to bind for `file_id`, an entry the caller has
        just looked up (`get`); None when the executable variant must be made first
        (`make_executable`, in a worker thread). Either may be gone by the time it is bound
        (deleted, expired): the bind then fails as a missing file."""
        name = digests.hex_part(_check_id(file_id)) + (EXEC_SUFFIX if executable else "")
        if not executable or name in self._executables:
            return name
        if not (self._blobs / name).exists():
            return None
        self._executables.add(name)
        return name

    def make_executable(self, file_id: str) -> str:
        """Make `file_id`'s executable variant (a copy, 0555) if it is missing; its name. The
        copy is written outside the lock, and linked into place only while an entry still
        holds the blob (else the blob is gone: NotFound). Disk work: call it in a thread.

        Never over a variant made meanwhile: the cases of a batch ask for it at once, and
        a bind of the first may be between init's open_tree of that file and its
        move_mount; a rename over it would unlink the file that bind holds, and the move
        fail with ENOENT (seen as the run's path missing)."""
        name = digests.hex_part(_check_id(file_id)) + EXEC_SUFFIX
        variant = self._blobs / name
        if variant.exists():
            return name
        tmp = self._tmp / temp_name("exec")
        try:
            try:
                with space.reported(self._full):
                    _copy_executable(self._path(file_id), tmp)
            except FileNotFoundError:
                raise self.missing(file_id) from None
            with self._tx() as db:
                if db.execute("SELECT 1 FROM files WHERE id=? LIMIT 1",
                              (file_id,)).fetchone() is None:
                    raise self.missing(file_id)
                with contextlib.suppress(FileExistsError):  # made meanwhile: that one stays
                    os.link(tmp, variant)
        finally:
            tmp.unlink(missing_ok=True)
        return name

    def read(self, tenant: Tenant, file_id: str) -> bytes:
        """The whole content (a run's file: at most max_file_bytes)."""
        with self.open(tenant, file_id) as f:
            return f.read()

    def list(self, tenant: Tenant) -> list[CachedFile]:
        """The tenant's live entries, oldest first; listing is not a use."""
        rows = self._rows("SELECT id, size, created, last_used FROM files WHERE tenant=? "
                          "AND last_used >= ? ORDER BY created, id",
                          (tenant.id, self._cutoff(time.time())))
        return [self._entry(str(i), int(s), float(c), float(u))
                for i, s, c, u in rows]

    def usage(self, tenant: Tenant) -> tuple[int, int]:
        """(bytes, files) of the tenant's live entries."""
        rows = self._rows("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM files WHERE tenant=? "
                          "AND last_used >= ?", (tenant.id, self._cutoff(time.time())))
        return int(rows[0][0]), int(rows[0][1])

    # dropping

    def delete(self, tenant: Tenant, file_id: str) -> None:
        """Drop the tenant's entry, and the blob if no other tenant holds it."""
        _check_id(file_id)
        now = time.time()
        with self._tx() as db:
            rows = db.execute("DELETE FROM files WHERE tenant=? AND id=? RETURNING last_used",
                              (tenant.id, file_id)).fetchall()
            self._drop_blobs(db, {file_id} if rows else set())
            self._seen.clear()
        # An expired entry was gone already as far as its tenant knew.
        if not rows or float(rows[0][0]) < self._cutoff(now):
            raise self.missing(file_id)

    def expire(self, now: float | None = None) -> int:
        """Drop every entry unused for ttl_s (as of `now`), then the blobs no entry holds any
        more; how many entries were dropped. Run it now and then, in a worker thread: it
        deletes files."""
        cutoff = self._cutoff(time.time() if now is None else now)
        dropped = 0
        while True:
            with self._tx() as db:
                n = self._drop(db, "(tenant, id) IN (SELECT tenant, id FROM files WHERE "
                               "last_used < ? LIMIT ?)", (cutoff, _EXPIRE_BATCH))
            dropped += n
            if n < _EXPIRE_BATCH:
                return dropped

    def _drop(self, db: sqlite3.Connection, where: str, args: tuple[object, ...]) -> int:
        """Delete the entries `where` selects, then their blobs that no entry holds."""
        rows = db.execute(f"DELETE FROM files WHERE {where} RETURNING id", args).fetchall()
        self._drop_blobs(db, {str(r[0]) for r in rows})
        self._seen.clear()
        return len(rows)

    def _drop_blobs(self, db: sqlite3.Connection, ids: set[str]) -> None:
        """Delete the blobs of `ids` that no entry holds; inside the transaction that
        dropped their entries (see the module's docstring)."""
        for file_id in ids:
            if db.execute("SELECT 1 FROM files WHERE id=? LIMIT 1", (file_id,)).fetchone() is None:
                self._path(file_id).unlink(missing_ok=True)
                variant = digests.hex_part(file_id) + EXEC_SUFFIX
                self._executables.discard(variant)
                self._blobs.joinpath(variant).unlink(missing_ok=True)

    def verify(self) -> list[str]:
        """What is wrong with the cache, one sentence each (empty: consistent): an entry
        whose blob is missing or does not hash to its id, a blob or executable variant no
        entry holds, a temp file left over. Reads every blob: call it in a worker thread,
        when no upload is under way (its temp file counts as left over)."""
        found: list[str] = []
        held = {str(r[0]) for r in self._rows("SELECT DISTINCT id FROM files", ())}
        for file_id in sorted(held):
            try:
                with open(self._path(file_id), "rb") as f:
                    got = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            except FileNotFoundError:
                found.append(f"file {file_id} has entries but no blob")
                continue
            if got != file_id:
                found.append(f"file {file_id} hashes to {got}")
        found += [f"{self._blobs / name} is held by no entry"
                  for name in sorted(os.listdir(self._blobs))
                  if "sha256:" + name.removesuffix(EXEC_SUFFIX) not in held]
        found += [f"{self._tmp / name} is left over" for name in sorted(os.listdir(self._tmp))]
        return found

    def _sweep(self) -> None:
        """What a crashed process left: its temp files, and blobs it renamed into place
        whose entry it never committed; blobs stored before runs bound them (0600) made
        readable."""
        remove_stale(self._tmp, os.unlink)
        with self._tx() as db:
            held = {r[0] for r in db.execute("SELECT DISTINCT id FROM files")}
            for name in os.listdir(self._blobs):
                path = self._blobs / name
                if "sha256:" + name.removesuffix(EXEC_SUFFIX) not in held:
                    path.unlink()
                elif not name.endswith(EXEC_SUFFIX) and (
                        stat.S_IMODE(path.stat().st_mode) != BLOB_MODE):
                    path.chmod(BLOB_MODE)
