"""/v1/jobs: a run (a pipeline is one) or a batch submitted now and run later, its result
kept and, when asked, POSTed to a callback_url (service/jobs/). A job belongs to the tenant
that submitted it: to any other its id does not exist (the same 404 as an unknown one)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from typing import Annotated, Any, Literal

import orjson
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from sandbox import hinted, split_host
from service import bodies
from service.api import json_response, read_json, state
from service.api.batches import BatchEvent, prepare_batch
from service.api.runs import prepare_run
from service.auth import Principal, principal
from service.cluster.routing import NODE_GONE
from service.config import NODE_NAME
from service.errors import ApiError, bad_request
from service.jobs import store
from service.jobs.callbacks import IDEMPOTENCY_KEY, SIGNATURE, TIMESTAMP, target
from service.jobs.runner import JOBS, Jobs, within
from service.logs import current_request_id
from service.replies import Count, ErrorDetail, Message, PipelineResult, Text
from service.results import Part, RunResult
from service.schemas import (
    ERROR,
    JOB_BODY,
    Param,
    Reply,
    Route,
    query_params,
)
from service.streaming import SSE, ClientGone, EventStream, unless_gone

_KINDS = ("run", "batch")
STATUSES = ("queued", "running", *store.FINISHED)
Status = Literal[STATUSES]  # type: ignore[valid-type]
# A run's result or a pipeline's: msgspec cannot tell two Structs apart untagged, so the
# field is documented as the one or the other (they are checked where they are made).
_RESULT = Annotated[Any, Meta(extra_json_schema={"oneOf": [
    {"$ref": f"#/components/schemas/{t.__name__}"} for t in (RunResult, PipelineResult)]})]


class JobCallback(Part):
    status: Literal["pending", "delivered", "failed"]
    attempts: Count
    last_error: Message | None


class Job(Part, kw_only=True):
    """`result`: a finished run's (a PipelineResult for a pipeline); `events`: a batch's
    case and summary events so far; `error`: why it failed; none of them in a listing."""

    id: Text
    kind: Literal["run", "batch"]
    status: Annotated[Status, Meta(description="interrupted: sandboxd stopped while it ran "
                                               "(its run was killed); submit it again")]
    created: float
    started: float | None
    finished: float | None
    expires: Annotated[float, Meta(description="when a finished job is forgotten")] | None
    idempotency_key: Text | UnsetType = UNSET
    callback_url: Text | UnsetType = UNSET
    callback: JobCallback | UnsetType | None = UNSET
    error: ErrorDetail | UnsetType = UNSET
    result: _RESULT | UnsetType = UNSET
    events: Annotated[list[BatchEvent], Meta(max_length=1 << 21)] | UnsetType = UNSET


class JobList(Part):
    jobs: Annotated[list[Job], Meta(max_length=1 << 20)]


class JobEvent(Part):
    """One SSE event (its `id:` is the event's number; send the last one seen as
    Last-Event-ID to resume): `status`, `result` (a run's), `case` and `summary` (a
    batch's, as POST /v1/batches gives them), `error`. The last is a `status` of a finished
    job."""

    status: Status | UnsetType = UNSET
    result: _RESULT | UnsetType = UNSET
    error: dict[str, Any] | UnsetType = UNSET


class CallbackSecret(Part):
    secret: Annotated[Text, Meta(description="the HMAC-SHA256 key (its text, as UTF-8)")]
    algorithm: Text
    signature_header: Text
    timestamp_header: Text
    signed: Annotated[Text, Meta(description="what is signed")]


ID = Param("id", "path", Annotated[str, Meta(max_length=128, pattern=bodies.NO_NUL,
                                              description="the job's id, as POST /v1/jobs "
                                                          "gave it")])
# In a cluster the id begins with its node's name (service/cluster).
_ID_FORM = re.compile(rf"(?:{NODE_NAME.pattern}\.)?job_[0-9a-f]{{32}}")
_KEY_FORM = re.compile(r"[\x21-\x7e]{1,255}")
LIMIT = hinted(r"^0*(?:[1-9][0-9]{0,2}|1000)$", "is not a number from 1 to 1000")
LIST_PARAMS = (Param("status", "query", Status),
               Param("limit", "query", Annotated[str, Meta(
                   max_length=8, pattern=LIMIT,
                   description="at most this many, newest first (1 to 1000; default 100)")]))


def narrow_document(doc: dict[str, Any], callback_hosts: tuple[str, ...]) -> None:
    """The document (in place) as this service checks a job: a callback_url only to the
    operator's jobs.callback_hosts (none listed: no callback_url at all)."""
    props = doc["components"]["schemas"]["JobRequest"]["properties"]
    if not callback_hosts:
        del props["callback_url"]
        return
    hosts = []
    for entry in callback_hosts:
        name, port = split_host(entry)
        host = "".join(f"[{c.upper()}{c}]" if c.isalpha() else re.escape(c) for c in name)
        if ":" in name:
            host = rf"\[{host}\]"
        hosts.append(f"{host}:{port}" if port is not None else rf"{host}(?::[0-9]+)?")
    props["callback_url"]["pattern"] = (rf"^[Hh][Tt][Tt][Pp][Ss]?://(?:{'|'.join(hosts)})"
                                        r"(?:[/?#][^\s\x00]*)?$")


def _jobs(request: web.Request) -> Jobs:
    return request.app[JOBS]


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is None:
        return None
    if not _KEY_FORM.fullmatch(key):
        raise bad_request(f"{IDEMPOTENCY_KEY}: 1 to 255 printable ASCII characters without "
                          "spaces, e.g. a UUID", IDEMPOTENCY_KEY)
    return key


def _check(request: web.Request, who: Principal, kind: str, body: dict[str, Any]) -> None:
    """What the job will run, prepared as it will be: a bad body is refused now, not when
    it runs."""
    st = state(request)
    with within(kind):
        if kind == "run":
            prepare_run(st, who, body)
        else:
            prepare_batch(st, who, body)


async def submit(request: web.Request) -> web.Response:
    st, who = state(request), principal(request)
    body = await read_json(request, JOB_BODY)
    key = _idempotency_key(request)
    url = body.get("callback_url")
    if url is not None:
        target(url, st.config.jobs.callback_hosts)
    kind = next(k for k in _KINDS if k in body)
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    new = store.NewJob(who.tenant.id, kind, body[kind], digest, key, url, current_request_id())
    jobs = _jobs(request)
    # A retried submission answers its job without being checked again: its cached files
    # may be gone by now, and it was checked when it was taken.
    if (job := jobs.store.keyed(new, time.time())) is not None:
        replayed = True
    else:
        _check(request, who, kind, body[kind])
        job, replayed = jobs.submit(new)
    response = json_response(jobs.view(job, full=False), status=202)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _job(request: web.Request) -> store.Job:
    job_id = request.match_info["id"]
    job = None
    if _ID_FORM.fullmatch(job_id):
        job = _jobs(request).store.get(principal(request).tenant.id, job_id, time.time())
    if job is None:
        # One answer for unknown, expired and another tenant's.
        raise ApiError(404, "not_found", f"id: no job {job_id[:64]!r} among yours (never "
                       "submitted, deleted, or expired after jobs.ttl_s)", "id")
    return job


async def get(request: web.Request) -> web.Response:
    return json_response(_jobs(request).view(_job(request)))


async def list_(request: web.Request) -> web.Response:
    query = query_params(request, LIST_PARAMS)
    status = query.get("status")
    raw = query.get("limit", "100")
    # isdigit() alone takes '³', which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1000:
        raise bad_request("limit: give a number from 1 to 1000", "limit")
    jobs = _jobs(request)
    found = jobs.store.list(principal(request).tenant.id, time.time(), int(raw), status)
    return json_response({"jobs": [jobs.view(j, full=False) for j in found]})


async def events(request: web.Request) -> web.StreamResponse:
    """SSE: the stored events, then the new ones as they come, until the job's end."""
    job = _job(request)
    last = request.headers.get("Last-Event-ID", "0")
    if not (last.isascii() and last.isdigit()):
        raise bad_request("Last-Event-ID: the number of the last event you saw", "Last-Event-ID")
    stream = EventStream(request, SSE)

    async def relay() -> None:
        async with contextlib.aclosing(_jobs(request).follow(job.id, int(last))) as events:
            async for seq, event in events:
                await stream.send(event["event"],
                                  {k: v for k, v in event.items() if k != "event"}, seq)

    try:
        # A job may say nothing for minutes: a client gone meanwhile is noticed.
        await unless_gone(request, relay())
    except (ClientGone, ConnectionError, RuntimeError):
        return stream.response  # RuntimeError: aiohttp refuses writes to a closing transport
    return await stream.close()


async def cancel(request: web.Request) -> web.Response:
    jobs = _jobs(request)
    job = _job(request)
    await jobs.cancel(job)
    return json_response(jobs.view(_job(request)))


async def delete(request: web.Request) -> web.Response:
    job = _job(request)
    if job.status not in store.FINISHED:
        raise ApiError(409, "conflict", f"id: job {job.id} is {job.status}; cancel it first "
                       f"(POST /v1/jobs/{job.id}/cancel), then delete it", "id")
    _jobs(request).store.delete(job.tenant, job.id)
    return web.Response(status=204)


def _secret_json(secret: str) -> dict[str, Any]:
    return {"secret": secret, "algorithm": "HMAC-SHA256", "signature_header": SIGNATURE,
            "timestamp_header": TIMESTAMP,
            "signed": f'the {TIMESTAMP} header\'s value, ".", then the body\'s bytes; the '
                      f'{SIGNATURE} header is "sha256=" and the HMAC in hex'}


async def get_secret(request: web.Request) -> web.Response:
    store = _jobs(request).store
    return json_response(_secret_json(store.secret(principal(request).tenant.id, time.time())))


async def rotate_secret(request: web.Request) -> web.Response:
    store = _jobs(request).store
    return json_response(_secret_json(store.rotate_secret(principal(request).tenant.id,
                                                          time.time())))


_TAGS = ("jobs",)
_BAD = Reply(400, "bad input; `field` names the culprit", ERROR)
_404 = Reply(404, "no such job among yours (never submitted, deleted or expired)", ERROR)
_OWNED = (_404, NODE_GONE)   # the replies of every route of one job
# Before /v1/jobs/{id}: the router tries resources in the order they were added.
ROUTES = [
    Route("GET", "/v1/jobs/secret", get_secret, "Your callback secret (made on first use)",
          replies=(Reply(200, "the key your callbacks are signed with", CallbackSecret),),
          tags=_TAGS),
    Route("POST", "/v1/jobs/secret", rotate_secret, "Replace your callback secret (the old "
          "one stops signing at once)",
          replies=(Reply(200, "the new key", CallbackSecret),), tags=_TAGS),
    Route("POST", "/v1/jobs", submit, "Submit a run or batch to run later",
          body=JOB_BODY, replies=(
              Reply(202, "queued (Location: /v1/jobs/{id}); the same Idempotency-Key and "
                    "body again answer the first job (Idempotent-Replayed: true)", Job),
              _BAD, Reply(401, "no or wrong token", ERROR),
              Reply(403, "registry not allowed", ERROR),
              Reply(404, "no such file in your file cache", ERROR),
              Reply(409, "the Idempotency-Key was used for another body", ERROR),
              Reply(429, "too many jobs queued or kept (jobs.max_queued_per_tenant, "
                    "jobs.max_kept_per_tenant)", ERROR)), tags=_TAGS),
    Route("GET", "/v1/jobs", list_, "List your jobs, newest first", params=LIST_PARAMS,
          replies=(Reply(200, "your jobs, without results", JobList), _BAD), tags=_TAGS),
    Route("GET", "/v1/jobs/{id}", get, "A job: status, result or events, callback",
          params=(ID,), replies=(Reply(200, "the job", Job), *_OWNED), tags=_TAGS),
    Route("GET", "/v1/jobs/{id}/events", events, "A job's events as Server-Sent Events: "
          "those so far, then the new ones until it ends", params=(ID,),
          replies=(Reply(200, "the events", JobEvent, content_type=SSE), _BAD, *_OWNED),
          tags=_TAGS),
    Route("POST", "/v1/jobs/{id}/cancel", cancel, "Cancel a job (a running one's run is "
          "killed); a finished one is left as it is", params=(ID,),
          replies=(Reply(200, "the job after it", Job), *_OWNED), tags=_TAGS),
    Route("DELETE", "/v1/jobs/{id}", delete, "Forget a finished job", params=(ID,),
          replies=(Reply(204, "deleted"), *_OWNED,
                   Reply(409, "still queued or running: cancel it first", ERROR)), tags=_TAGS),
]
