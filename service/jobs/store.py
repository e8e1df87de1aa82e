"""Jobs on disk: `state_dir/jobs/jobs.db` (SQLite, WAL), so a job outlives the process that
took it. A job is a row (its validated body, status, result or error, its callback's
state) and its events, numbered from 1 (what GET .../events replays, then follows).

Statuses: queued -> running -> done | failed | cancelled; queued -> cancelled; running ->
interrupted when the process that ran it ended first (found at the next start). A job
that ends with a callback_url gets its callback state `pending` in the same transaction,
so a delivery cut short by a restart is found again and finished, never lost.

A finished job is kept `ttl_s`, then it is gone to its tenant at once and `expire()`
deletes it. Each tenant also has a callback secret here: random, made at first need."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sandbox import open_database, sqlite_transaction
from service.errors import ApiError

ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled", "interrupted")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,                 -- 'run' (a pipeline is one) or 'batch'
    body BLOB NOT NULL,                 -- the validated body of that kind, JSON
    body_hash TEXT NOT NULL,            -- what an idempotency key is compared by
    idempotency_key TEXT,
    callback_url TEXT,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    result BLOB,                        -- a run's result, JSON
    error BLOB,                         -- why it failed: the API's error body, JSON
    callback_status TEXT,               -- NULL (none asked), pending, delivered, failed
    callback_attempts INTEGER NOT NULL DEFAULT 0,
    callback_error TEXT,
    events INTEGER NOT NULL DEFAULT 0,  -- the number of the last event
    request_id TEXT                     -- the submitting request's (service/logs.py)
)""",
    """CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs(tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs(tenant, status, created)""",
    """CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created)""",
    """CREATE INDEX IF NOT EXISTS jobs_callbacks ON jobs(callback_status)""",
    """CREATE TABLE IF NOT EXISTS events (
    job TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,                 -- {"event": ..., ...}, JSON
    PRIMARY KEY (job, seq)
) WITHOUT ROWID""",
    """-- Each tenant's jobs: queued or running (`active`), and all it keeps, expired ones
-- included until they are dropped; kept by triggers, so a submit checks its caps in constant
-- time however many jobs the tenant has. Jobs are inserted queued.
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT PRIMARY KEY,
    active INTEGER NOT NULL,
    kept INTEGER NOT NULL
)""",
    """CREATE TRIGGER IF NOT EXISTS jobs_added AFTER INSERT ON jobs BEGIN
    INSERT INTO usage VALUES (NEW.tenant, 1, 1) ON CONFLICT (tenant)
        DO UPDATE SET active = active + 1, kept = kept + 1;
END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_ended AFTER UPDATE OF status ON jobs
    WHEN OLD.status IN ('queued', 'running') AND NEW.status NOT IN ('queued', 'running') BEGIN
    UPDATE usage SET active = active - 1 WHERE tenant = NEW.tenant;
END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_dropped AFTER DELETE ON jobs BEGIN
    UPDATE usage SET kept = kept - 1, active = active - (OLD.status IN ('queued', 'running'))
        WHERE tenant = OLD.tenant;
END""",
    """CREATE TABLE IF NOT EXISTS secrets (
    tenant TEXT PRIMARY KEY,
    secret TEXT NOT NULL,               -- 64 hex digits: the key of its callbacks' HMAC
    created REAL NOT NULL
)""",
)
_COLUMNS = ("id, tenant, kind, body, body_hash, idempotency_key, callback_url, status, "
            "created, started, finished, result, error, callback_status, callback_attempts, "
            "callback_error, request_id")


@dataclass(frozen=True)
class Callback:
    status: str                 # pending, delivered, failed
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    kind: str
    body: dict[str, Any]
    body_hash: str
    idempotency_key: str | None
    callback_url: str | None
    status: str
    created: float
    started: float | None
    finished: float | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    callback: Callback | None
    request_id: str | None              # None: taken before jobs kept it

    @classmethod
    def _from_row(cls, row: tuple[Any, ...]) -> Job:
        (id_, tenant, kind, body, body_hash, key, url, status, created, started, finished,
         result, error, cb_status, cb_attempts, cb_error, request_id) = row
        return cls(id_, tenant, kind, orjson.loads(body), body_hash, key, url, status, created,
                   started, finished, None if result is None else orjson.loads(result),
                   None if error is None else orjson.loads(error),
                   None if cb_status is None else Callback(cb_status, cb_attempts, cb_error),
                   request_id)


@dataclass(frozen=True)
class NewJob:
    tenant: str
    kind: str
    body: dict[str, Any]
    body_hash: str
    idempotency_key: str | None
    callback_url: str | None
    request_id: str | None = None


@dataclass(frozen=True)
class Caps:
    queued: int                 # queued or running at once
    kept: int                   # any status, unexpired


def new_id(node: str | None) -> str:
    """In a cluster the id begins with the node that holds the job (see service/cluster)."""
    return ("" if node is None else node + ".") + "job_" + secrets.token_hex(16)


class JobStore:
    """Used from the event loop only (each statement is short); the lock keeps the one
    connection to one transaction at a time all the same."""

    def __init__(self, root: Path, ttl_s: float, node: str | None = None) -> None:
        self.ttl_s = ttl_s
        self.node = node
        root.mkdir(0o700, parents=True, exist_ok=True)
        self._db = open_database(root / "jobs.db", _SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "request_id" not in columns:  # a store from before request ids
            self._db.execute("ALTER TABLE jobs ADD COLUMN request_id TEXT")
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite_transaction(self._db, self._lock)

    def _cutoff(self, now: float) -> float:
        """Jobs finished before this have expired."""
        return now - self.ttl_s

    def expires(self, job: Job) -> float | None:
        return None if job.finished is None else job.finished + self.ttl_s

    # submitting

    def keyed(self, new: NewJob, now: float) -> Job | None:
        """The tenant's unexpired job of `new`'s idempotency key, if any; 409 if that key was
        used for another body."""
        with self._lock:
            return self._keyed(self._db, new, now)

    def _keyed(self, db: sqlite3.Connection, new: NewJob, now: float) -> Job | None:
        if new.idempotency_key is None:
            return None
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE tenant = ? AND idempotency_key "
                         "= ? AND (finished IS NULL OR finished >= ?)",
                         (new.tenant, new.idempotency_key, self._cutoff(now))).fetchone()
        if row is None:
            return None
        job = Job._from_row(row)
        if job.body_hash != new.body_hash:
            raise ApiError(409, "conflict", "Idempotency-Key: this key was used for another "
                           f"job ({job.id}) with a different body; use a new key for a new "
                           "job", "Idempotency-Key")
        return job

    def add(self, new: NewJob, caps: Caps, now: float) -> tuple[Job, bool]:
        """The job stored as queued, or the tenant's job of the same idempotency key (True:
        it was there already). 409 if that key was used for another body; 429 over a cap."""
        with self._tx() as db:
            if (job := self._keyed(db, new, now)) is not None:
                return job, True
            if new.idempotency_key is not None:
                # An expired job's key may be used again: its job goes first.
                self._drop(db, "tenant = ? AND idempotency_key = ?",
                           (new.tenant, new.idempotency_key))
            self._check_caps(db, new.tenant, caps, now)
            job_id = new_id(self.node)
            db.execute("INSERT INTO jobs (id, tenant, kind, body, body_hash, idempotency_key, "
                       "callback_url, status, created, request_id) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
                       (job_id, new.tenant, new.kind, orjson.dumps(new.body), new.body_hash,
                        new.idempotency_key, new.callback_url, now, new.request_id))
            self._append(db, job_id, {"event": "status", "status": "queued"})
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job._from_row(row), False

    def _usage(self, db: sqlite3.Connection, tenant: str) -> tuple[int, int]:
        row = db.execute("SELECT active, kept FROM usage WHERE tenant = ?", (tenant,)).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def _check_caps(self, db: sqlite3.Connection, tenant: str, caps: Caps, now: float) -> None:
        # Count quotas: waiting does not lift them at a known time, so no Retry-After.
        active, kept = self._usage(db, tenant)
        if active >= caps.queued:
            raise ApiError(429, "quota_exceeded", f"you have {active} jobs queued or running, "
                           f"the most allowed (jobs.max_queued_per_tenant = {caps.queued}); "
                           "submit more as they finish, or cancel some "
                           "(POST /v1/jobs/{id}/cancel)")
        if kept >= caps.kept:  # expired jobs not yet swept count too: drop them first
            self._drop(db, "tenant = ? AND finished < ?", (tenant, self._cutoff(now)))
            _, kept = self._usage(db, tenant)
        if kept >= caps.kept:
            raise ApiError(429, "quota_exceeded", f"you keep {kept} jobs, the most allowed "
                           f"(jobs.max_kept_per_tenant = {caps.kept}); delete finished ones "
                           "(DELETE /v1/jobs/{id}) or wait for them to expire "
                           f"({self.ttl_s:g} s after they finish)")

    # reading

    def get(self, tenant: str, job_id: str, now: float) -> Job | None:
        """The tenant's job; None for another tenant's, an unknown or an expired one alike."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ? AND tenant = ? "
                                   "AND (finished IS NULL OR finished >= ?)",
                                   (job_id, tenant, self._cutoff(now))).fetchone()
        return None if row is None else Job._from_row(row)

    def job(self, job_id: str) -> Job | None:
        """Any job by id, for the runner (never for a request: that is `get`)."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
        return None if row is None else Job._from_row(row)

    def list(self, tenant: str, now: float, limit: int,
             status: str | None = None) -> list[Job]:
        """The tenant's jobs, newest first."""
        sql = (f"SELECT {_COLUMNS} FROM jobs WHERE tenant = ? AND (finished IS NULL OR "
               "finished >= ?)")
        args: tuple[Any, ...] = (tenant, self._cutoff(now))
        if status is not None:
            sql += " AND status = ?"
            args += (status,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created DESC LIMIT ?",
                                    (*args, limit)).fetchall()
        return [Job._from_row(r) for r in rows]

    def queued(self) -> list[tuple[str, str]]:
        """(id, tenant) of every queued job, oldest first."""
        with self._lock:
            return self._db.execute("SELECT id, tenant FROM jobs WHERE status = 'queued' "
                                    "ORDER BY created").fetchall()

    def events(self, job_id: str, after: int) -> list[tuple[int, dict[str, Any]]]:
        with self._lock:
            rows = self._db.execute("SELECT seq, data FROM events WHERE job = ? AND seq > ? "
                                    "ORDER BY seq", (job_id, after)).fetchall()
        return [(seq, orjson.loads(data)) for seq, data in rows]

    # changing

    def _append(self, db: sqlite3.Connection, job_id: str, event: dict[str, Any]) -> int:
        (seq,) = db.execute("UPDATE jobs SET events = events + 1 WHERE id = ? RETURNING events",
                            (job_id,)).fetchone()
        db.execute("INSERT INTO events VALUES (?, ?, ?)", (job_id, seq, orjson.dumps(event)))
        return int(seq)

    def append(self, job_id: str, event: dict[str, Any]) -> int:
        with self._tx() as db:
            return self._append(db, job_id, event)

    def start(self, job_id: str, now: float) -> bool:
        """queued -> running; False when it is no longer queued (cancelled meanwhile)."""
        with self._tx() as db:
            if db.execute("UPDATE jobs SET status = 'running', started = ? WHERE id = ? AND "
                          "status = 'queued'", (now, job_id)).rowcount == 0:
                return False
            self._append(db, job_id, {"event": "status", "status": "running"})
        return True

    def finish(self, job_id: str, status: str, now: float, *,
               result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> bool:
        """queued or running -> `status` (with its result or error), its callback now
        pending; False when it had ended already."""
        assert status in FINISHED
        with self._tx() as db:
            return self._finish(db, job_id, status, now, result, error)

    def _finish(self, db: sqlite3.Connection, job_id: str, status: str, now: float,
                result: dict[str, Any] | None, error: dict[str, Any] | None) -> bool:
        if db.execute(
                # The body is needed no more (an idempotency key compares its hash): a kept
                # job holds its result, not its input too.
                "UPDATE jobs SET status = ?, finished = ?, result = ?, error = ?, body = '{}', "
                "callback_status = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END "
                "WHERE id = ? AND status IN ('queued', 'running')",
                (status, now, None if result is None else orjson.dumps(result),
                 None if error is None else orjson.dumps(error), job_id)).rowcount == 0:
            return False
        if result is not None:
            self._append(db, job_id, {"event": "result", "result": result})
        if error is not None:
            self._append(db, job_id, {"event": "error", **error})
        self._append(db, job_id, {"event": "status", "status": status})
        return True

    def interrupt_running(self, now: float) -> list[str]:
        """What a process that ended left running: interrupted (its callback pending)."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE status = 'running'")]
            for job_id in ids:
                self._finish(db, job_id, "interrupted", now, None, {"error": {
                    "code": "interrupted", "message": "sandboxd stopped while this job ran; "
                    "its run was killed and its result is lost: submit it again"}})
        return ids

    def callbacks_pending(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT id FROM jobs WHERE callback_status = 'pending' ORDER BY finished")]

    def callback_attempt(self, job_id: str) -> None:
        """An attempt begins: counted before it is sent, so one a restart cuts short counts
        too (the attempts stay bounded however often the service restarts)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET callback_attempts = callback_attempts + 1 WHERE id = ?",
                       (job_id,))

    def callback_error(self, job_id: str, error: str | None) -> None:
        """How the last attempt ended (None: delivered)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET callback_error = ? WHERE id = ?", (error, job_id))

    def callback_ended(self, job_id: str, delivered: bool, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET callback_status = ?, callback_error = "
                       "coalesce(?, callback_error) WHERE id = ?",
                       ("delivered" if delivered else "failed", error, job_id))

    def delete(self, tenant: str, job_id: str) -> None:
        with self._tx() as db:
            self._drop(db, "id = ? AND tenant = ?", (job_id, tenant))

    def expire(self, now: float) -> int:
        """Delete the jobs (and their events) that finished more than ttl_s ago."""
        with self._tx() as db:
            return self._drop(db, "finished < ?", (self._cutoff(now),))

    def _drop(self, db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> int:
        """Delete the jobs `where` says and their events; how many."""
        ids = [r[0] for r in db.execute(f"SELECT id FROM jobs WHERE {where}", args)]
        for job_id in ids:
            db.execute("DELETE FROM events WHERE job = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return len(ids)

    # callback secrets

    def secret(self, tenant: str, now: float) -> str:
        """The tenant's callback secret, made on first need."""
        with self._lock:
            row = self._db.execute("SELECT secret FROM secrets WHERE tenant = ?",
                                   (tenant,)).fetchone()
        if row is not None:
            return str(row[0])
        with self._tx() as db:
            db.execute("INSERT INTO secrets VALUES (?, ?, ?) ON CONFLICT (tenant) DO NOTHING",
                       (tenant, secrets.token_hex(32), now))
            return str(db.execute("SELECT secret FROM secrets WHERE tenant = ?",
                                  (tenant,)).fetchone()[0])

    def rotate_secret(self, tenant: str, now: float) -> str:
        with self._tx() as db:
            new = secrets.token_hex(32)
            db.execute("INSERT INTO secrets VALUES (?, ?, ?) ON CONFLICT (tenant) DO UPDATE "
                       "SET secret = excluded.secret, created = excluded.created",
                       (tenant, new, now))
            return new

