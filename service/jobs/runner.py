"""Runs the queued jobs, follows their events, delivers their callbacks.

At most `[jobs] workers` jobs run at once, and a tenant's at most its token's
max_concurrent_runs; the next to start is the oldest queued job of the tenant whose turn it
is (tenants in turn, as admission.py serves runs). A job's run still takes an admission
slot like any run, so jobs and requests share `max_running` fairly; a slot refused for
capacity (429) is asked for again a moment later, the job stays running meanwhile.

At start, what the last process left running is `interrupted` (its callback says so) and
what it left queued is queued again; callbacks it had not finished are delivered. At
shutdown no job starts, and running ones get the deadline requests get (their tasks are in
State.handlers); those still running then are killed and stay `running` on disk, so the
next start reports them interrupted: one path for a shutdown and a crash."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import orjson
from aiohttp import web

from sandbox import Turns
from service import logs
from service.api import VERSION, State
from service.api.batches import batch_events
from service.api.runs import prepare_run, run_result
from service.auth import Principal
from service.errors import ApiError, to_api_error
from service.jobs.callbacks import Deliverer
from service.jobs.store import FINISHED, Caps, Job, JobStore, NewJob
from service.metrics import Gauge

log = logging.getLogger("sandboxd.service")
# A job whose run found no slot free (429) or the runtime restarting (503) asks again
# after this.
SLOT_RETRY_S = 0.5
# Callbacks being delivered at once (the others wait their turn), and of one tenant: one
# whose receiver hangs holds at most its share, never every other tenant's deliveries.
DELIVERIES = 32
DELIVERIES_PER_TENANT = 8


class Jobs:
    def __init__(self, st: State) -> None:
        self.st = st
        self.config = st.config.jobs
        self._store: JobStore | None = None
        self.deliverer = Deliverer(self.config, f"sandboxd/{VERSION}")
        self._turns: Turns[tuple[str, str]] = Turns()   # queued jobs: (tenant, job id)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._per_tenant: Counter[str] = Counter()
        self._cancelled: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._deliveries = asyncio.Semaphore(DELIVERIES)
        self._shares: dict[str, asyncio.Semaphore] = {}   # per tenant
        self._delivering = 0
        self._closing = False
        st.metrics.gauges += [
            Gauge("sandboxd_jobs_queued", "Jobs waiting for a worker.",
                  lambda: [((), float(len(self._turns)))]),
            Gauge("sandboxd_jobs_running", "Jobs running now.",
                  lambda: [((), float(len(self._running)))]),
            Gauge("sandboxd_job_callbacks_delivering", "Callbacks being delivered (retries "
                  "included).", lambda: [((), float(self._delivering))])]

    @property
    def store(self) -> JobStore:
        assert self._store is not None, "Jobs.start() first"
        return self._store

    # lifecycle

    async def start(self, app: web.Application) -> None:
        now = time.time()
        self._store = JobStore(self.st.config.state_dir / "jobs", self.config.ttl_s,
                               self.st.config.cluster.node)
        self.store.expire(now)
        self.store.interrupt_running(now)
        for job_id, tenant in self.store.queued():
            self._enqueue(job_id, tenant)
        for job_id in self.store.callbacks_pending():
            self._deliver_later(job_id)
        self._spawn(self._sweep())
        self._dispatch()

    async def close(self, app: web.Application) -> None:
        """Start no more jobs or deliveries (pending ones are finished at the next start),
        stop those under way, end event streams. Running jobs are the shutdown's to wait
        for, with the requests."""
        self._closing = True
        for job_id in list(self._waiters):
            self._notify(job_id)
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def cleanup(self, app: web.Application) -> None:
        """After the requests and running jobs: they use the store until they end."""
        await self.deliverer.close()
        if self._store is not None:
            self._store.close()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(self.config.ttl_s / 4, 60.0))
            self.store.expire(time.time())

    # submitting and running

    def submit(self, new: NewJob) -> tuple[Job, bool]:
        if self._closing:
            raise ApiError(503, "unavailable", "sandboxd is shutting down; submit the job "
                           "again after it restarts", headers={"Retry-After": "5"})
        caps = Caps(self.config.max_queued_per_tenant, self.config.max_kept_per_tenant)
        job, replayed = self.store.add(new, caps, time.time())
        if not replayed:
            self._enqueue(job.id, job.tenant)
            self._dispatch()
        return job, replayed

    def _enqueue(self, job_id: str, tenant: str) -> None:
        self._turns.push(tenant, (tenant, job_id))

    def _cap(self, tenant: str) -> int:
        who = self.st.tokens.of_tenant(tenant)
        if who is None or who.max_concurrent_runs is None:
            return self.config.workers
        return who.max_concurrent_runs

    def _dispatch(self) -> None:
        """Start queued jobs while workers are free, tenants in turn."""
        while not self._closing and len(self._running) < self.config.workers:
            queued = self._turns.pop(lambda t: self._per_tenant[t] < self._cap(t))
            if queued is None:
                return
            tenant, job_id = queued
            self._per_tenant[tenant] += 1
            task = self._running[job_id] = asyncio.ensure_future(self._execute(job_id, tenant))
            task.add_done_callback(_log_failure)
            # The shutdown waits for these as for requests: the same deadline, then killed.
            self.st.handlers.add(task)
            task.add_done_callback(self.st.handlers.discard)

    async def _execute(self, job_id: str, tenant: str) -> None:
        ended = False
        try:
            ended = await self._work(job_id, tenant)
        finally:
            del self._running[job_id]
            self._per_tenant[tenant] -= 1
            self._cancelled.discard(job_id)
            self._notify(job_id)
            if ended:
                self._deliver_later(job_id)
            self._dispatch()

    async def _work(self, job_id: str, tenant: str) -> bool:
        """Run the job to its end; True when this ended it (False: cancelled while queued,
        or cut short by the service stopping: left `running`, so interrupted at the next
        start)."""
        while self.st.engine is None:  # jobs queued at start wait for the engine
            await asyncio.sleep(0.1)
        job = self.store.job(job_id)
        if job is None or not self.store.start(job_id, time.time()):
            return False
        self._notify(job_id)
        try:
            who = self.st.tokens.of_tenant(tenant)
            if who is None:
                raise ApiError(403, "forbidden", "the token that submitted this job is no "
                               "longer configured")
            # Its results and log lines carry the id of the request that submitted it.
            with within(job.kind), logs.scope(logs.request_id_of(job.request_id),
                                              lambda: tenant):
                if job.kind == "run":
                    result = await self._run(who, job.body)
                    return self.store.finish(job_id, "done", time.time(), result=result)
                whole = False
                async for event in batch_events(self.st, who, job.body):
                    self.store.append(job_id, event)
                    self._notify(job_id)
                    whole = event["event"] == "summary" and not (event["stopped"]
                                                                 or event["errors"])
            if self._closing and not whole:
                return False  # its cases were refused or not started for the shutdown
            return self.store.finish(job_id, "done", time.time())
        except asyncio.CancelledError:
            if self._closing or job_id not in self._cancelled:
                raise
            return self.store.finish(job_id, "cancelled", time.time())
        except Exception as e:
            if self._closing and isinstance(e, ApiError) and e.status == 503:
                return False  # no slot for the shutdown: not a failure of the job's
            return self.store.finish(job_id, "failed", time.time(),
                                     error=to_api_error(e).body())

    async def _run(self, who: Principal, body: dict[str, Any]) -> dict[str, Any]:
        while True:
            try:
                # Prepared again: the request's preparation (its cached files read) is gone.
                return await run_result(self.st, who, prepare_run(self.st, who, body))
            except Exception as e:
                if not to_api_error(e).passing:
                    raise
            await asyncio.sleep(SLOT_RETRY_S)

    async def cancel(self, job: Job) -> None:
        """Cancel a queued or running job (a running one's run is killed); a finished one
        stays as it is."""
        if job.status == "queued" and self.store.finish(job.id, "cancelled", time.time()):
            self._turns.remove(job.tenant, (job.tenant, job.id))
            self._notify(job.id)
            self._deliver_later(job.id)
            return
        task = self._running.get(job.id)
        if task is not None:
            self._cancelled.add(job.id)
            task.cancel()
            await asyncio.wait([task])

    # events

    def _notify(self, job_id: str) -> None:
        for waiter in self._waiters.pop(job_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def follow(self, job_id: str, after: int) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """The job's events after number `after`, then the new ones as they come, until its
        last (its final status) or the service stops."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            changed: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(job_id, set()).add(changed)  # before reading: none missed
            try:
                for seq, event in self.store.events(job_id, after):
                    yield seq, event
                    after = seq
                    if event["event"] == "status" and event["status"] in FINISHED:
                        return
                if self.store.job(job_id) is None:
                    return  # deleted or expired meanwhile
                await changed
            finally:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(changed)
                    if not waiters:
                        del self._waiters[job_id]

    # views and callbacks

    def view(self, job: Job, *, full: bool = True, callback: bool = True) -> dict[str, Any]:
        """The job as the API shows it: with its result (a run) or events (a batch) when
        `full`; with its callback's state when `callback` (not in the callback itself)."""
        out: dict[str, Any] = {"id": job.id, "kind": job.kind, "status": job.status,
                               "created": job.created, "started": job.started,
                               "finished": job.finished, "expires": self.store.expires(job)}
        if job.idempotency_key is not None:
            out["idempotency_key"] = job.idempotency_key
        if job.callback_url is not None:
            out["callback_url"] = job.callback_url
            if callback:
                cb = job.callback
                out["callback"] = None if cb is None else {
                    "status": cb.status, "attempts": cb.attempts, "last_error": cb.last_error}
        if job.error is not None:
            out["error"] = job.error["error"]
        if full and job.result is not None:
            out["result"] = job.result
        if full and job.kind == "batch":
            out["events"] = [e for _, e in self.store.events(job.id, 0)
                             if e["event"] in ("case", "summary")]
        return out

    def _deliver_later(self, job_id: str) -> None:
        """Deliver its callback (if any) in the background; while stopping, the next start
        does (it stays pending)."""
        if not self._closing:
            self._spawn(self._deliver(job_id))

    def _pending(self, job_id: str) -> Job | None:
        """The job if its callback waits to be delivered."""
        job = self.store.job(job_id)
        if job is None or job.callback is None or job.callback.status != "pending":
            return None
        return job

    async def _deliver(self, job_id: str) -> None:
        job = self._pending(job_id)
        if job is None:
            return
        share = self._shares.setdefault(job.tenant, asyncio.Semaphore(DELIVERIES_PER_TENANT))
        async with share, self._deliveries:
            job = self._pending(job_id)  # as it is now: deleted while it waited, maybe
            if job is None:
                return
            assert job.callback is not None and job.callback_url is not None
            left = self.config.callback_attempts - job.callback.attempts
            if left <= 0:  # a restart in the middle of the last attempt
                self.store.callback_ended(job_id, False)
                return
            body = orjson.dumps(self.view(job, callback=False))
            self._delivering += 1
            try:
                error = await self.deliverer.deliver(
                    job.callback_url, body, f"{job.id}:{job.status}", job.id,
                    lambda: self.store.secret(job.tenant, time.time()),
                    starting=lambda: self.store.callback_attempt(job_id),
                    ended=lambda err: self.store.callback_error(job_id, err),
                    attempts=left, first=job.callback.attempts + 1)
            finally:
                self._delivering -= 1
            self.store.callback_ended(job_id, error is None)


@contextlib.contextmanager
def within(kind: str) -> Iterator[None]:
    """Errors of a job's run or batch body named as fields of the job's (`run.image`)."""
    try:
        yield
    except ApiError as e:
        if e.field is not None:
            if e.message.startswith(e.field + ":"):
                e.message = f"{kind}.{e.message}"
            e.field = f"{kind}.{e.field}"
        raise


def _log_failure(task: asyncio.Task[None]) -> None:
    """A fault of ours in a job's task (the store failing): logged, never left unseen."""
    if not task.cancelled() and (e := task.exception()) is not None:
        log.error("a job's task failed", exc_info=e)


JOBS = web.AppKey("jobs", Jobs)

