"""What the store holds, in SQLite: images (one platform's manifest each), their layers,
the names (tags and digests) that point at them, where blobs came from, layer sizes, last
use, and leases held by live containers. Blob and layer bytes live in files, not here.

Several processes may share a store: WAL mode and a busy timeout serialise writers.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

from sandbox import pids

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY,            -- the platform manifest's digest
    media_type TEXT NOT NULL,
    config TEXT NOT NULL,               -- config digest (Docker's image id)
    platform TEXT NOT NULL,
    size INTEGER NOT NULL,              -- config + layer blobs, as the manifest says
    created REAL NOT NULL,
    last_used REAL NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS image_layers (
    image TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    diff_id TEXT NOT NULL,
    blob TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (image, position)
)""",
    """CREATE INDEX IF NOT EXISTS image_layers_diff ON image_layers(diff_id)""",
    """CREATE TABLE IF NOT EXISTS names (
    tenant TEXT NOT NULL,               -- whose name it is ('' for the operator's public ones)
    name TEXT NOT NULL,                 -- normalised reference: repo:tag or repo@digest
    repository TEXT NOT NULL,
    tag TEXT,                           -- NULL for a name by digest
    target TEXT NOT NULL,               -- what the registry served (may be an index)
    image TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE,
    updated REAL NOT NULL,
    PRIMARY KEY (tenant, name)
)""",
    """CREATE INDEX IF NOT EXISTS names_image ON names(image)""",
    """CREATE TABLE IF NOT EXISTS layers (
    diff_id TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,             -- file bytes once unpacked
    entries INTEGER NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS blob_sources (
    tenant TEXT NOT NULL,
    blob TEXT NOT NULL,
    repository TEXT NOT NULL,           -- domain/path it was pulled from or pushed to
    PRIMARY KEY (tenant, blob, repository)
)""",
    """-- Content a tenant has shown it holds: a blob it fetched (verified) or uploaded, a diff_id
-- one of its blobs was verified to decompress to. Only these it may use from the store.
CREATE TABLE IF NOT EXISTS holdings (
    tenant TEXT NOT NULL,
    digest TEXT NOT NULL,               -- a blob digest or a layer's diff_id
    PRIMARY KEY (tenant, digest)
)""",
    """-- A build's steps, per tenant: the image a step made, by the step's key (its parent's
-- key, the instruction as expanded, the content it copied). Cached images are kept by gc.
CREATE TABLE IF NOT EXISTS build_cache (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    image TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    PRIMARY KEY (tenant, key)
)""",
    """CREATE INDEX IF NOT EXISTS build_cache_image ON build_cache(image)""",
    """CREATE TABLE IF NOT EXISTS leases (
    holder TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    pid INTEGER NOT NULL,
    created REAL NOT NULL
)""",
)



@dataclass(frozen=True)
class LayerRecord:
    diff_id: str
    blob: str
    media_type: str
    size: int


@dataclass(frozen=True)
class ImageRecord:
    digest: str
    media_type: str
    config: str
    platform: str
    size: int
    created: float
    last_used: float
    layers: tuple[LayerRecord, ...]


@dataclass(frozen=True)
class NameRecord:
    tenant: str
    name: str
    repository: str
    tag: str | None
    target: str
    image: str
    updated: float



def _busy(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and "locked" in str(e)


# Switching a new database to WAL needs it to itself: a process doing so while another is
# makes SQLite answer "database is locked" at once, without waiting out the busy timeout.
@retry(retry=retry_if_exception(_busy), wait=wait_exponential(multiplier=0.005, max=0.2),
       stop=stop_after_delay(30), reraise=True)
def open_database(path: Path, schema: Sequence[str] = ()) -> sqlite3.Connection:
    """A connection for the event loop and worker threads alike (its owner serialises it
    with a lock, and takes write transactions with `transaction`): autocommit, WAL,
    synchronous=NORMAL, `schema`'s statements run. The file is made 0600 first: SQLite
    gives its -wal and -shm files the database's mode."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    for statement in schema:
        db.execute(statement)
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection,
                lock: contextlib.AbstractContextManager[object]) -> Iterator[sqlite3.Connection]:
    """A write transaction taken at once (BEGIN IMMEDIATE: no upgrade from a read that
    another writer could deadlock), under `lock`, rolled back on any error."""
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


_VERSION = 1


def _migrate(db: sqlite3.Connection) -> None:
    """Version 0 had one namespace of names: they become the local tenant's (a service
    with tokens never serves that tenant, so its old names are left to gc)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= _VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = {r[1] for r in db.execute("PRAGMA table_info(names)")}
        if columns and "tenant" not in columns:
            db.execute("ALTER TABLE names RENAME TO names_v0")
            db.execute("ALTER TABLE blob_sources RENAME TO blob_sources_v0")
            db.execute("DROP INDEX IF EXISTS names_image")
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("INSERT INTO names SELECT 'local', * FROM names_v0")
            db.execute("INSERT INTO blob_sources SELECT 'local', * FROM blob_sources_v0")
            db.execute("DROP TABLE names_v0")
            db.execute("DROP TABLE blob_sources_v0")
        db.execute(f"PRAGMA user_version={_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class Catalog:
    """Safe to share between the event loop and worker threads (gc, imports): one lock
    serialises every statement and transaction on the connection."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path)
        self._lock = threading.RLock()
        self.generation = 0  # bumped by every change to images or names made here
        self._db.execute("PRAGMA foreign_keys=ON")
        _migrate(self._db)
        for statement in _SCHEMA:
            self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: tuple[object, ...] | dict[str, object] = ()
              ) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple[object, ...] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, self._lock)

    # images

    def add_image(self, rec: ImageRecord) -> None:
        self.generation += 1
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO images VALUES (?,?,?,?,?,?,?)",
                       (rec.digest, rec.media_type, rec.config, rec.platform, rec.size,
                        rec.created, rec.last_used))
            db.executemany("INSERT OR IGNORE INTO image_layers VALUES (?,?,?,?,?,?)",
                           [(rec.digest, i, lr.diff_id, lr.blob, lr.media_type, lr.size)
                            for i, lr in enumerate(rec.layers)])

    def _layers(self, digest: str) -> tuple[LayerRecord, ...]:
        rows = self._rows("SELECT diff_id, blob, media_type, size FROM image_layers "
                          "WHERE image=? ORDER BY position", (digest,))
        return tuple(LayerRecord(*r) for r in rows)

    def _image(self, row: tuple[object, ...] | None) -> ImageRecord | None:
        if row is None:
            return None
        digest = str(row[0])
        return ImageRecord(digest, str(row[1]), str(row[2]), str(row[3]), int(row[4]),  # type: ignore[call-overload]
                           float(row[5]), float(row[6]), self._layers(digest))  # type: ignore[arg-type]

    def image(self, digest: str) -> ImageRecord | None:
        return self._image(next(iter(self._rows("SELECT * FROM images WHERE digest=?",
                                                (digest,))), None))

    def images(self) -> list[ImageRecord]:
        rows = self._rows("SELECT * FROM images ORDER BY last_used DESC")
        return [r for r in (self._image(row) for row in rows) if r is not None]

    def touch(self, digest: str) -> None:
        self._write("UPDATE images SET last_used=? WHERE digest=?", (time.time(), digest))

    def remove_image(self, digest: str) -> None:
        self.generation += 1
        self._write("DELETE FROM images WHERE digest=?", (digest,))

    # names: each tenant's own; PUBLIC ('') holds the operator's shared ones

    def set_name(self, tenant: str, name: str, repository: str, tag: str | None, target: str,
                 image: str) -> None:
        self.generation += 1
        self._write("INSERT OR REPLACE INTO names VALUES (?,?,?,?,?,?,?)",
                    (tenant, name, repository, tag, target, image, time.time()))

    def lookup(self, tenant: str, name: str) -> NameRecord | None:
        rows = self._rows("SELECT * FROM names WHERE tenant=? AND name=?", (tenant, name))
        return NameRecord(*rows[0]) if rows else None

    def names(self, tenants: tuple[str, ...] | None = None,
              image: str | None = None) -> list[NameRecord]:
        """Names of `tenants` (None: every tenant's), of one image or of all."""
        where, args = [], []
        if tenants is not None:
            where.append(f"tenant IN ({','.join('?' * len(tenants))})")
            args += tenants
        if image is not None:
            where.append("image=?")
            args.append(image)
        sql = "SELECT * FROM names" + (" WHERE " + " AND ".join(where) if where else "")
        return [NameRecord(*r) for r in self._rows(sql + " ORDER BY name", tuple(args))]

    def remove_name(self, tenant: str, name: str) -> bool:
        self.generation += 1
        return self._write("DELETE FROM names WHERE tenant=? AND name=?", (tenant, name)) > 0

    # What a tenant keeps: the images its names and its build cache hold.
    _KEPT = ("SELECT image FROM names WHERE tenant=:t UNION "
             "SELECT image FROM build_cache WHERE tenant=:t")

    def usage(self, tenant: str, plus: str | None = None) -> int:
        """Bytes of content the tenant's names and build cache use (and image `plus`, if
        given): each layer's blob and unpacked files, counted once however many images
        share it."""
        rows = self._rows(
            "SELECT COALESCE(SUM(x.size + COALESCE(l.bytes, 0)), 0) FROM (SELECT il.diff_id, "
            f"il.size FROM image_layers il WHERE il.image IN ({self._KEPT}) "
            "UNION SELECT diff_id, size FROM image_layers WHERE image=:plus) x "
            "LEFT JOIN layers l ON l.diff_id = x.diff_id", {"t": tenant, "plus": plus or ""})
        return int(rows[0][0])

    def diff_ids_of(self, tenant: str) -> set[str]:
        """The layers the tenant's names and build cache use."""
        return {r[0] for r in self._rows(
            f"SELECT DISTINCT diff_id FROM image_layers WHERE image IN ({self._KEPT})",
            {"t": tenant})}

    # the build cache: a tenant's steps, by key (see sandbox/engine/builder.py)

    def cache_put(self, tenant: str, key: str, image: str) -> None:
        now = time.time()
        self._write("INSERT OR REPLACE INTO build_cache VALUES (?,?,?,?,?)",
                    (tenant, key, image, now, now))

    def cache_get(self, tenant: str, key: str) -> str | None:
        """The image the tenant's step `key` made, if cached (its use is recorded)."""
        rows = self._rows("UPDATE build_cache SET last_used=? WHERE tenant=? AND key=? "
                          "RETURNING image", (time.time(), tenant, key))
        return str(rows[0][0]) if rows else None

    def cache_clear(self, tenant: str) -> int:
        """Forget the tenant's build cache; the number of steps forgotten."""
        return self._write("DELETE FROM build_cache WHERE tenant=?", (tenant,))

    def cached_image(self, tenant: str, digest: str) -> str | None:
        """The image of the tenant's build cache whose digest or config digest is `digest`
        (an untagged build's result is known by these only)."""
        rows = self._rows("SELECT i.digest FROM build_cache b JOIN images i ON i.digest = "
                          "b.image WHERE b.tenant=? AND ? IN (i.digest, i.config) LIMIT 1",
                          (tenant, digest))
        return str(rows[0][0]) if rows else None

    def cached_images(self) -> set[str]:
        """Images some tenant's build cache holds: gc keeps them."""
        return {r[0] for r in self._rows("SELECT DISTINCT image FROM build_cache")}

    # holdings: content a tenant has shown it holds (see sandbox/tenants.py)

    def hold(self, tenant: str, *digests: str) -> None:
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO holdings VALUES (?,?)",
                                 [(tenant, d) for d in digests])

    def holds(self, tenant: str, digest: str) -> bool:
        return bool(self._rows("SELECT 1 FROM holdings WHERE tenant=? AND digest=?",
                               (tenant, digest)))

    # layers and blobs

    def record_layer(self, diff_id: str, nbytes: int, entries: int) -> None:
        self._write("INSERT OR REPLACE INTO layers VALUES (?,?,?)", (diff_id, nbytes, entries))

    def totals(self) -> tuple[int, int, int]:
        """(images, bytes of their blobs as the manifests say, bytes of unpacked layers)."""
        images, blob_bytes = self._rows("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM images")[0]
        layer_bytes = self._rows("SELECT COALESCE(SUM(bytes), 0) FROM layers")[0][0]
        return int(images), int(blob_bytes), int(layer_bytes)

    def layer_bytes(self, diff_id: str) -> int:
        rows = self._rows("SELECT bytes FROM layers WHERE diff_id=?", (diff_id,))
        return int(rows[0][0]) if rows else 0

    def forget_layer(self, diff_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM layers WHERE diff_id=?", (diff_id,))
            db.execute("DELETE FROM holdings WHERE digest=?", (diff_id,))

    def add_source(self, tenant: str, blob: str, repository: str) -> None:
        self._write("INSERT OR IGNORE INTO blob_sources VALUES (?,?,?)",
                    (tenant, blob, repository))

    def sources(self, tenant: str, blob: str) -> list[str]:
        """Repositories the tenant pulled `blob` from or pushed it to (mount sources)."""
        return [r[0] for r in self._rows("SELECT repository FROM blob_sources WHERE tenant=? "
                                         "AND blob=?", (tenant, blob))]

    def forget_blob(self, blob: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM blob_sources WHERE blob=?", (blob,))
            db.execute("DELETE FROM holdings WHERE digest=?", (blob,))

    # leases: an image in use by a live container is never collected

    def lease(self, holder: str, image: str, pid: int | None = None) -> None:
        self._write("INSERT OR REPLACE INTO leases VALUES (?,?,?,?)",
                    (holder, image, os.getpid() if pid is None else pid, time.time()))

    def release(self, holder: str) -> None:
        self._write("DELETE FROM leases WHERE holder=?", (holder,))

    def leased(self) -> set[str]:
        """Images leased by a live process; leases of dead processes are dropped."""
        live: set[str] = set()
        for holder, image, pid in self._rows("SELECT holder, image, pid FROM leases"):
            if pids.alive(pid):
                live.add(image)
            else:
                self.release(holder)
        return live
