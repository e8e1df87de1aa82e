"""POST /v1/batches: one program over many cases (a judge's test cases). The body is the
shared part of a run and `cases`, each with its own stdin, files, limits (and cmd, env);
the whole batch is checked before its first case runs, then the cases run in parallel up
to the tenant's allowance, each as a run of its own (an admission slot, a warm container
reset after it), and the answer streams as NDJSON in the order they finish, then a
summary.

Jobs run batches too: `prepare_batch` refuses a bad body before anything runs, and
`batch_events` is the events as dicts (cancelling its consumer cancels the cases)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from sandbox import FileSpec, Limits
from service.api import State, image_of, read_json, ready, state
from service.api.runbodies import stdin_of
from service.api.runs import PreparedRun, prepare_run, run_result
from service.auth import Principal, principal
from service.bodies import BATCH_SHARED
from service.errors import ApiError, bad_request, blame, to_api_error
from service.replies import Count, ErrorDetail, Text
from service.results import Part, RunResult
from service.schemas import (
    BATCH_BODY,
    ERROR,
    Reply,
    Route,
)
from service.streaming import NDJSON, ClientGone, unless_gone


class BatchEvent(Part):
    """One NDJSON line: `case` (index, id, and result or error) per case in the order they
    finish, then `summary` (cases = ran + errors + skipped); `error` only for a fault of the
    service's."""

    event: Literal["case", "summary", "error"]
    index: Annotated[Count, Meta(description="case: its place in `cases`, from 0")] \
        | UnsetType = UNSET
    id: Annotated[Text, Meta(description="case: its id, or null")] | UnsetType | None = UNSET
    result: RunResult | UnsetType = UNSET
    error: ErrorDetail | UnsetType = UNSET
    elapsed_ms: Annotated[float, Meta(description=(
        "case: its time in the service, from the moment it was taken up (waiting for a run "
        "slot included) to its result"))] | UnsetType = UNSET
    cases: Count | UnsetType = UNSET
    ran: Annotated[Count, Meta(description="cases with a result")] | UnsetType = UNSET
    errors: Annotated[Count, Meta(description="cases that could not run (an `error` instead "
                                              "of a result)")] | UnsetType = UNSET
    skipped: Annotated[Count, Meta(description="cases never started "
                                               "(stop_on_failure)")] | UnsetType = UNSET
    by_status: Annotated[dict[Annotated[str, Meta(pattern="^(?:[a-z_]+)$")], Count],
                         Meta(max_length=1024)] | UnsetType = UNSET
    parallelism: Count | UnsetType = UNSET
    wall_ms: float | UnsetType = UNSET
    stopped: bool | UnsetType = UNSET


@dataclass(frozen=True)
class PreparedBatch:
    """A checked batch: the shared part prepared once (its files read or looked up once,
    shared by every case), the cases as given, and those without files of their own
    prepared (the others are prepared again as they start: holding their files' contents
    for the whole batch would take those bytes times the cases)."""

    shared: PreparedRun
    body: dict[str, Any]
    cases: list[dict[str, Any]]
    prepared: list[PreparedRun | None]
    policy: str | None
    parallelism: int
    stop_on_failure: bool


def prepare_batch(st: State, who: Principal, body: dict[str, Any]) -> PreparedBatch:
    """A validated BATCH_BODY, every case checked as the run it will be (a 4xx naming
    `cases[i].field` for the first bad one) before anything runs."""
    batch = _shared_part(st, who, body)
    for _ in _check_cases(st, who, batch):
        pass
    return batch


# Cases checked between two turns of the event loop: 10,000 cases take 0.5-1 s to check
# on a busy 2-core host, which must not stall every other request.
CHECK_STEP = 256


async def _prepare_batch_yielding(st: State, who: Principal,
                                  body: dict[str, Any]) -> PreparedBatch:
    """prepare_batch, letting the service serve others every CHECK_STEP cases, and the
    image found (pulled on first use): an image that is not there is the batch's 404
    before any case runs, not an error in every case's event."""
    batch = _shared_part(st, who, body)
    for i in _check_cases(st, who, batch):
        if i % CHECK_STEP == CHECK_STEP - 1:
            await asyncio.sleep(0)
    await image_of(st, who, body)
    return batch


def _shared_part(st: State, who: Principal, body: dict[str, Any]) -> PreparedBatch:
    """The batch with its shared part checked and prepared, its cases not yet checked."""
    cases = body["cases"]
    cap = st.config.limits.batch_cases
    if len(cases) > cap:
        raise bad_request(f"cases: {len(cases)} cases, more than this service takes in one "
                          f"batch ({cap}, limits.batch_cases); split them into batches of at "
                          "most that many", "cases")
    shared = {k: v for k, v in body.items() if k in BATCH_SHARED}
    job = _prepared(st, who, shared)
    _check_limits(st, body.get("policy"), job.spec.limits)
    allowance = st.config.limits.max_running
    if who.max_concurrent_runs is not None:
        allowance = min(allowance, who.max_concurrent_runs)
    # One case per CPU unless asked: more CPU-bound cases than CPUs would each take longer
    # in wall time (a verdict must not depend on the neighbours); light cases may ask more.
    wanted = body.get("parallelism", len(os.sched_getaffinity(0)))
    return PreparedBatch(job, shared, cases, [None] * len(cases), body.get("policy"),
                         min(wanted, allowance, len(cases)), body.get("stop_on_failure", False))


def _check_cases(st: State, who: Principal, batch: PreparedBatch) -> Iterator[int]:
    """Each case checked as the run it will be (its index yielded once it is)."""
    for i, case in enumerate(batch.cases):
        prepared = _prepare_case(st, who, batch, i)
        if "files" not in case:
            batch.prepared[i] = prepared
        yield i


def _check_limits(st: State, policy: str | None, limits: Limits | None) -> None:
    """Above the policy's maxima is a 400 now, not when the case's turn comes."""
    if limits is not None:
        with blame("limits"):
            ready(st).policy(policy).limits(limits)


@contextlib.contextmanager
def _in_case(i: int) -> Iterator[None]:
    """Errors about a case's body name the field as `cases[i].field`."""
    try:
        yield
    except ApiError as e:
        where = f"cases[{i}]"
        if e.field is not None and e.message.startswith(e.field):
            field, message = f"{where}.{e.field}", f"{where}.{e.message}"
        else:
            field, message = (f"{where}.{e.field}" if e.field else where), f"{where}: {e.message}"
        raise ApiError(e.status, e.code, message, field, e.headers) from e


def _prepared(st: State, who: Principal, body: dict[str, Any]) -> PreparedRun:
    job = prepare_run(st, who, body)
    assert isinstance(job, PreparedRun)  # a batch's body has no `processes` (no pipeline)
    return job


def _case_body(shared: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """The run body of a case without the shared files (they are prepared once)."""
    body = {k: v for k, v in shared.items() if k != "files"}
    for key in ("env", "limits"):
        if key in case:
            body[key] = {**shared.get(key, {}), **case[key]}
    for key in ("cmd", "stdin", "stdin_base64", "files"):
        if key in case:
            body[key] = case[key]
    return body


# A case that gives no more than its stdin (a judge's mostly do) is the shared run with
# that stdin: checking it whole again (image, policy, limits) took ~0.3 ms a case, a fifth
# of the service's time for one (measured in a batch of 1,000).
_STDIN_ONLY = frozenset(("id", "stdin", "stdin_base64"))


def _prepare_case(st: State, who: Principal, batch: PreparedBatch, i: int) -> PreparedRun:
    case = batch.cases[i]
    if case.keys() <= _STDIN_ONLY:
        with _in_case(i):
            stdin = stdin_of(case)
        return dataclasses.replace(batch.shared,
                                   spec=dataclasses.replace(batch.shared.spec, stdin=stdin))
    with _in_case(i):
        job = _prepared(st, who, _case_body(batch.body, case))
        _check_limits(st, batch.policy, job.spec.limits)
        files = _merged(st, batch.shared.spec.files, job.spec.files)
    return dataclasses.replace(job, spec=dataclasses.replace(job.spec, files=files))


def _merged(st: State, shared: tuple[FileSpec, ...],
            own: tuple[FileSpec, ...]) -> tuple[FileSpec, ...]:
    """The shared files with the case's over them by path, within the caps of one run."""
    if not own:
        return shared
    by_path = {f.path: f for f in shared} | {f.path: f for f in own}
    caps = st.config.limits
    if len(by_path) > caps.files_count:
        raise bad_request(f"files: with the batch's files, more than {caps.files_count} "
                          "files (limits.files_count)", "files")
    total = sum(len(f.content) for f in by_path.values())
    if total > caps.files_bytes:
        raise bad_request(f"files: with the batch's files, over {caps.files_bytes} bytes in "
                          "all (limits.files_bytes); give fewer or smaller files", "files")
    return tuple(by_path.values())


async def batch_events(st: State, who: Principal, body: dict[str, Any]
                       ) -> AsyncIterator[dict[str, Any]]:
    """A validated BATCH_BODY run: its events as dicts, `case` ones in the order the cases
    finish, then `summary`. Raises the 4xx of prepare_batch before any case runs.
    Cancelling the consumer's task (or closing the iterator) kills the running cases and
    starts no more."""
    batch = await _prepare_batch_yielding(st, who, body)
    async with contextlib.aclosing(event_groups(st, who, batch)) as groups:
        async for group in groups:
            for event in group:
                yield event


async def event_groups(st: State, who: Principal, batch: PreparedBatch
                       ) -> AsyncIterator[list[dict[str, Any]]]:
    """The events of a prepared batch (see batch_events), each time all those ready: a
    stream writes them at once (one write per case cost ~10 % of the service's time in a
    batch of `true` cases)."""
    started = time.monotonic()
    total = len(batch.cases)
    # Bounded: a consumer that does not keep up holds the workers back (each with at most
    # one finished result), never the service's memory.
    done: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=batch.parallelism)
    order = iter(range(total))
    stop = asyncio.Event()

    async def worker() -> None:
        # A service shutting down starts no more cases (their slots would be 503s).
        while not (stop.is_set() or st.stopping) and (i := next(order, None)) is not None:
            event = await _case(st, who, batch, i)
            if batch.stop_on_failure and not _ok(event):
                stop.set()
            await done.put(event)
        await done.put(None)

    workers = [asyncio.ensure_future(worker()) for _ in range(batch.parallelism)]
    ran = errors = 0
    by_status: Counter[str] = Counter()
    try:
        finished = 0
        while finished < len(workers):
            group = []
            item = await done.get()
            while True:
                if item is None:
                    finished += 1
                else:
                    group.append(item)
                    if "result" in item:
                        ran += 1
                        by_status[item["result"]["status"]] += 1
                    else:
                        errors += 1
                if done.empty():
                    break
                item = done.get_nowait()
            if group:
                yield group
        yield [{"event": "summary", "cases": total, "ran": ran, "errors": errors,
               "skipped": total - ran - errors, "by_status": dict(by_status),
               "parallelism": batch.parallelism,
               "wall_ms": round((time.monotonic() - started) * 1000, 3),
               "stopped": ran + errors < total}]
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def _ok(event: dict[str, Any]) -> bool:
    return "result" in event and event["result"]["status"] == "ok"


# Waiting for room when the service or the token is at its limit: a batch's case waits its
# turn rather than fail (the batch was accepted whole).
BUSY_WAIT_S = (0.02, 1.0)


async def _case(st: State, who: Principal, batch: PreparedBatch, i: int) -> dict[str, Any]:
    """Case i's event: its result, or why it could not run (its image gone, a cached file
    deleted since the batch was checked, the service stopping), and its time in the
    service from the moment it was taken up (its slot's wait included)."""
    started = time.monotonic()
    event: dict[str, Any] = {"event": "case", "index": i, "id": batch.cases[i].get("id")}
    wait = BUSY_WAIT_S[0]
    while True:
        try:
            job = batch.prepared[i] or _prepare_case(st, who, batch, i)
            batch.prepared[i] = None  # what it holds (its stdin) goes with its run
            outcome = {"result": await run_result(st, who, job)}
            break
        except Exception as e:  # a fault of ours is logged there, and the batch goes on
            error = to_api_error(e)
            if not error.passing:
                outcome = error.body()
                break
        await asyncio.sleep(wait)
        wait = min(wait * 2, BUSY_WAIT_S[1])
    return event | outcome | {"elapsed_ms": round((time.monotonic() - started) * 1000, 3)}


async def post_batch(request: web.Request) -> web.StreamResponse:
    st, who = state(request), principal(request)
    batch = await _prepare_batch_yielding(st, who, await read_json(request, BATCH_BODY))
    # Accepted: the headers go now, so a client knows before the first case ends.
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)

    async def relay() -> None:
        async with contextlib.aclosing(event_groups(st, who, batch)) as groups:
            async for group in groups:
                await response.write(b"".join(orjson.dumps(e) + b"\n" for e in group))

    try:
        await unless_gone(request, relay())
    except (ClientGone, ConnectionError, RuntimeError):
        # The client went away (RuntimeError: aiohttp refuses writes to a closing
        # transport): its cases were cancelled, the running ones killed.
        return response
    except Exception as e:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(orjson.dumps({"event": "error", **to_api_error(e).body()})
                                 + b"\n")
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


ROUTES = [
    Route("POST", "/v1/batches", post_batch, "Run many cases of one program (a judge's tests)",
          body=BATCH_BODY, replies=(
              Reply(200, "the cases' events as they finish, then a summary (NDJSON)",
                    BatchEvent, content_type=NDJSON),
              Reply(400, "bad input, checked before any case runs; `field` names the "
                    "culprit (cases[i].field for a case's)", ERROR),
              Reply(401, "no or wrong token", ERROR),
              Reply(403, "registry not allowed", ERROR),
              Reply(404, "unknown image, or no such file in your file cache", ERROR),
              Reply(503, "not ready, or shutting down", ERROR)), tags=("runs",)),
]
