"""The job store (service/jobs/store.py) on a real SQLite file: what a restart finds, each
tenant's jobs its own, idempotency keys, caps, expiry, callback secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import ApiError
from service.jobs.store import Caps, JobStore, NewJob

CAPS = Caps(queued=3, kept=5)
TTL = 100.0


def _new(tenant: str = "a", key: str | None = None, body: str = "x",
         url: str | None = None) -> NewJob:
    return NewJob(tenant, "run", {"image": body}, f"hash-{body}", key, url)


def test_a_restart_finds_running_jobs_interrupted_and_queued_ones_queued(
        tmp_path: Path) -> None:
    store = JobStore(tmp_path, TTL)
    running, _ = store.add(_new(url="http://h/"), CAPS, 1.0)
    queued, _ = store.add(_new(), CAPS, 2.0)
    assert store.start(running.id, 3.0)
    store.close()

    again = JobStore(tmp_path, TTL)
    assert again.interrupt_running(4.0) == [running.id]
    job = again.job(running.id)
    assert job is not None and job.status == "interrupted" and job.finished == 4.0
    assert job.error is not None and job.error["error"]["code"] == "interrupted"
    assert job.callback is not None and job.callback.status == "pending"
    assert again.callbacks_pending() == [running.id]
    assert again.queued() == [(queued.id, "a")]
    assert [e["status"] for _, e in again.events(running.id, 0) if e["event"] == "status"] == [
        "queued", "running", "interrupted"]
    assert not again.finish(running.id, "done", 5.0)  # ended once, never twice


def test_another_tenants_job_is_not_found(tmp_path: Path) -> None:
    store = JobStore(tmp_path, TTL)
    job, _ = store.add(_new("a"), CAPS, 1.0)
    assert store.get("a", job.id, 2.0) is not None
    assert store.get("b", job.id, 2.0) is None
    assert store.list("b", 2.0, 10) == []
    store.delete("b", job.id)
    assert store.get("a", job.id, 2.0) is not None


def test_an_idempotency_key_answers_its_job_and_refuses_another_body(tmp_path: Path) -> None:
    store = JobStore(tmp_path, TTL)
    first, replayed = store.add(_new(key="k"), CAPS, 1.0)
    assert not replayed
    again, replayed = store.add(_new(key="k"), CAPS, 2.0)
    assert replayed and again.id == first.id
    with pytest.raises(ApiError) as e:
        store.add(_new(key="k", body="other"), CAPS, 3.0)
    assert (e.value.status, e.value.field) == (409, "Idempotency-Key")
    other, replayed = store.add(_new("b", key="k"), CAPS, 3.0)
    assert not replayed and other.id != first.id
    # Once the job has expired, its key makes a new one.
    store.finish(first.id, "done", 4.0, result={})
    later, replayed = store.add(_new(key="k", body="other"), CAPS, 4.0 + TTL + 1)
    assert not replayed and later.id != first.id


def test_caps_count_active_then_kept_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path, TTL)
    jobs = [store.add(_new(), CAPS, float(i))[0] for i in range(3)]
    with pytest.raises(ApiError) as e:
        store.add(_new(), CAPS, 3.0)
    assert (e.value.status, e.value.code) == (429, "quota_exceeded")
    assert "max_queued_per_tenant" in e.value.message and not e.value.headers
    store.add(_new("b"), CAPS, 3.0)  # another tenant's caps are its own
    for job in jobs:
        store.finish(job.id, "cancelled", 4.0)
    store.add(_new(), CAPS, 5.0)
    store.add(_new(), CAPS, 5.0)
    with pytest.raises(ApiError) as e:
        store.add(_new(), CAPS, 6.0)
    assert "max_kept_per_tenant" in e.value.message
    store.delete("a", jobs[0].id)
    store.add(_new(), CAPS, 6.0)
    for job in store.list("a", 6.0, 10, "queued"):
        store.finish(job.id, "done", 6.0)
    # At the cap, jobs expired but not yet swept are dropped to make room.
    store.add(_new(), CAPS, 4.0 + TTL + 1)
    assert store.job(jobs[1].id) is None and store.job(jobs[2].id) is None


def test_finished_jobs_expire_after_the_ttl(tmp_path: Path) -> None:
    store = JobStore(tmp_path, TTL)
    job, _ = store.add(_new(), CAPS, 1.0)
    store.finish(job.id, "done", 2.0, result={"stdout": "x"})
    finished = store.get("a", job.id, 2.0 + TTL)
    assert finished is not None and store.expires(finished) == 2.0 + TTL
    assert store.get("a", job.id, 2.0 + TTL + 1) is None  # gone to its tenant at once
    assert store.expire(2.0 + TTL + 1) == 1
    assert store.job(job.id) is None and store.events(job.id, 0) == []


def test_a_tenant_secret_is_kept_until_rotated(tmp_path: Path) -> None:
    store = JobStore(tmp_path, TTL)
    secret = store.secret("a", 1.0)
    assert len(secret) == 64 and store.secret("a", 2.0) == secret
    assert store.secret("b", 1.0) != secret
    store.close()
    again = JobStore(tmp_path, TTL)
    assert again.secret("a", 3.0) == secret
    rotated = again.rotate_secret("a", 4.0)
    assert rotated != secret and again.secret("a", 5.0) == rotated
