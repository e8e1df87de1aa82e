"""POST /v1/runs (JSON, NDJSON or SSE) and GET /v1/runs/ws (interactive), and the run
machinery /v1/containers/{id}/exec shares."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from sandbox import (
    OutputCallback,
    RunControl,
    RunOutcome,
    RunSpec,
    TtySize,
)
from service.api import (
    State,
    engine,
    image_of,
    json_response,
    parse_json,
    pipelines,
    platform_of,
    policy_of,
    read_json,
    ready,
    state,
)
from service.api.runbodies import b64, exec_spec, result_json
from service.auth import Principal, principal
from service.bodies import SIGNALS
from service.errors import ApiError, bad_request, blame, to_api_error
from service.netproxy import network_of
from service.schemas import (
    ERROR,
    PIPELINE_RESULT,
    RUN_BODY,
    RUN_RESULT,
    WS_MESSAGE,
    Reply,
    Route,
)
from service.streaming import NDJSON, SSE, EventStream, OutputEncoder, Pump, stream_kind


@dataclass
class PreparedRun:
    """One run to make: `start` runs it to its end (signalled through the RunControl, when
    one is given)."""

    start: Callable[[RunSpec, OutputCallback | None, RunControl | None], Awaitable[RunOutcome]]
    spec: RunSpec
    encoding: str


def one_shot(request: web.Request,
             body: dict[str, Any]) -> PreparedRun | pipelines.PreparedPipeline:
    return prepare_run(state(request), principal(request), body)


def prepare_run(st: State, who: Principal,
                body: dict[str, Any]) -> PreparedRun | pipelines.PreparedPipeline:
    """A validated run body (RUN_BODY) as a PreparedRun of `who`'s: checked (image allowed, policy,
    limits, files read from the cache) before anything runs. Needs no request: batches
    and jobs prepare their runs with it too. A body with `processes` is a pipeline."""
    if "processes" in body:
        return pipelines.prepare(st, who, body)
    for key in ("pipes", "container"):
        if key in body:
            raise bad_request(f"{key}: only for a pipeline; give `processes` in place of "
                              "`cmd`, or leave it out", key)
    eng = ready(st)
    who.allow_image(body["image"], "image")
    policy = policy_of(eng, body)
    spec, encoding = exec_spec(st, who, body)
    with blame("repeat"):
        eng.check_timing(spec)
    platform_of(body)  # a malformed platform is a 400 before anything runs

    network = network_of(st.config, who, body)

    async def start(spec: RunSpec, on_output: OutputCallback | None,
                    control: RunControl | None) -> RunOutcome:
        return await eng.run(await image_of(st, who, body), spec, tenant=who.tenant,
                             policy=policy, network=network,
                             on_output=on_output, control=control)

    return PreparedRun(start, spec, encoding)


async def _finish(st: State, pump: Pump, enc: OutputEncoder, job: PreparedRun,
                  outcome: RunOutcome) -> None:
    """The end of a streamed run: output still held back by the decoder, then the exit."""
    _observe(st, outcome)
    for name in ("stdout", "stderr"):
        if tail := enc.tail(name):
            pump.put(name, {"data": tail})
    pump.put("exit", result_json(outcome, job.spec, enc, output=False))
    await pump.drain()


def _observe(st: State, outcome: RunOutcome) -> None:
    result = outcome.result
    st.metrics.observe_run(str(result.status), result.setup_ms, result.wall_ms)
    if outcome.network is not None:
        st.metrics.observe_network(outcome.network)


async def run_result(st: State, who: Principal,
                     job: PreparedRun | pipelines.PreparedPipeline) -> dict[str, Any]:
    """Run `job` in one of `who`'s admission slots, to its result as the API gives it. The
    slot is given back before the result is returned."""
    if isinstance(job, pipelines.PreparedPipeline):
        return await pipelines.result(st, who, job)
    async with st.admission.slot(who):
        outcome = await job.start(job.spec, None, None)
    _observe(st, outcome)
    return result_json(outcome, job.spec, OutputEncoder(job.encoding))


async def execute(request: web.Request, job: PreparedRun) -> web.StreamResponse:
    """Run `job` and answer with its result as JSON, or stream it as NDJSON or SSE. The
    run's admission slot is given back before the answer ends, so a client may start its
    next run as soon as it has read this one's result."""
    st = state(request)
    kind = stream_kind(request)
    if kind is None:
        return json_response(await run_result(st, principal(request), job))
    stream = EventStream(request, kind)
    enc = OutputEncoder(job.encoding)
    async with st.admission.slot(principal(request)):
        pump = Pump(stream.send, lambda: task.cancel())
        task: asyncio.Task[RunOutcome] = asyncio.ensure_future(
            job.start(job.spec, pump.output(enc), None))
        try:
            outcome = await task
        except asyncio.CancelledError:
            await pump.cancel()
            if pump.broken:  # the client went away; the run was killed with its task
                return stream.response
            raise
        except Exception as e:
            await pump.drain()
            if not stream.started:
                raise  # nothing sent yet: an ordinary JSON error response
            await _send_quietly(stream, "error", to_api_error(e).body())
            return await stream.close()
    await _finish(st, pump, enc, job, outcome)
    return await stream.close()


async def _send_quietly(stream: EventStream, event: str, payload: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await stream.send(event, payload)


async def post_run(request: web.Request) -> web.StreamResponse:
    body = await read_json(request, RUN_BODY)
    job = one_shot(request, body)
    if isinstance(job, pipelines.PreparedPipeline):
        if stream_kind(request) is not None:
            raise bad_request("processes: a pipeline's result is one JSON object, not a "
                              "stream; ask for application/json", "processes")
        return json_response(await run_result(state(request), principal(request), job))
    return await execute(request, job)


# WebSocket ------------------------------------------------------------------------------

class _Flow(asyncio.Protocol):
    """asyncio's write flow control of the stdin pipe: `full` is a future while the
    transport holds more than its high-water mark, resolved when it is below the low one
    (or the pipe is gone)."""

    def __init__(self) -> None:
        self.full: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self.full = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.full is not None:
            self.full.set_result(None)
            self.full = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.resume_writing()


class _Stdin:
    """The write end of a run's stdin pipe, fed from the event loop."""

    def __init__(self) -> None:
        self.read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        self._file = os.fdopen(write_fd, "wb", buffering=0)
        self._transport: asyncio.WriteTransport | None = None
        self._flow = _Flow()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_write_pipe(lambda: self._flow, self._file)

    @property
    def full(self) -> asyncio.Future[None] | None:
        """While set, the run is not taking its stdin: the WebSocket is not read, so a
        client cannot pile stdin up in the service (TCP holds it back on its side)."""
        return self._flow.full

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing() and data:
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        else:
            self._file.close()

    def release(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            os.close(self.read_fd)

    async def take(self, spec: RunSpec) -> RunSpec:
        """`spec` with this pipe as its stdin, the body's own stdin first in it."""
        await self.open()
        if spec.stdin is not None:
            self.write(bytes(spec.stdin))  # type: ignore[arg-type]
        return RunSpec(**{**spec.__dict__, "stdin": self.read_fd})


class _TerminalInput:
    """A run's input when it has a terminal: through its RunControl to the pty (the body's
    own stdin is typed first by the run itself); the end of input is the terminal's
    end-of-file character."""

    def __init__(self, control: RunControl) -> None:
        self.control = control

    @property
    def full(self) -> asyncio.Future[None] | None:
        return self.control.input_full

    def write(self, data: bytes) -> None:
        self.control.write(data)

    def close(self) -> None:
        self.control.end_input()

    def release(self) -> None:
        pass

    async def take(self, spec: RunSpec) -> RunSpec:
        return spec


async def websocket(request: web.Request,
                    make_job: Callable[[web.Request, dict[str, Any]], PreparedRun],
                    schema: Any) -> web.StreamResponse:
    """An interactive run: the first message is the run body, then stdin and signals."""
    st = state(request)
    engine(request)  # 503 before the upgrade when not ready
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=st.config.limits.json_body_bytes)
    await ws.prepare(request)
    st.websockets.add(ws)
    try:
        await _interactive(request, ws, make_job, schema)
    except Exception as e:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(orjson.dumps({"event": "error", **to_api_error(e).body()}).decode())
    finally:
        st.websockets.discard(ws)
        await ws.close()
    return ws


async def _interactive(request: web.Request, ws: web.WebSocketResponse,
                       make_job: Callable[[web.Request, dict[str, Any]], PreparedRun],
                       schema: Any) -> None:
    st = state(request)
    try:
        first = await ws.receive(timeout=60)
    except TimeoutError:
        raise bad_request("send the run body as the first message within 60 s") from None
    if first.type != WSMsgType.TEXT:
        raise bad_request("the first message must be the run body, as JSON text")
    job = make_job(request, parse_json(first.data, schema))
    if isinstance(job, pipelines.PreparedPipeline):
        raise bad_request("processes: a pipeline runs through POST /v1/runs, not over a "
                          "WebSocket", "processes")
    enc = OutputEncoder(job.encoding)
    control = RunControl()
    stdin = _Stdin() if job.spec.tty is None else _TerminalInput(control)
    try:
        spec = await stdin.take(job.spec)

        async def send(event: str, payload: dict[str, Any]) -> None:
            await ws.send_str(orjson.dumps({"event": event, **payload}).decode())

        async with st.admission.slot(principal(request)):
            pump = Pump(send, lambda: task.cancel())
            task: asyncio.Task[RunOutcome] = asyncio.ensure_future(
                job.start(spec, pump.output(enc), control))
            await _feed(ws, task, stdin, control, tty=spec.tty is not None)
            try:
                outcome = await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the service is shutting down
                await pump.drain()
                return  # the client left, and the run went with it
            except Exception:
                await pump.drain()
                raise
        await _finish(st, pump, enc, job, outcome)
    finally:
        stdin.release()


async def _feed(ws: web.WebSocketResponse, task: asyncio.Task[RunOutcome],
                stdin: _Stdin | _TerminalInput, control: RunControl, *, tty: bool) -> None:
    """Relay the client's messages (stdin as JSON or binary frames, signals, a terminal's
    size) until the run ends."""
    receive: asyncio.Task[Any] | None = None
    try:
        while not task.done():
            if (full := stdin.full) is not None:
                await asyncio.wait({task, full}, return_when=asyncio.FIRST_COMPLETED)
                continue
            receive = asyncio.ensure_future(ws.receive())
            await asyncio.wait({task, receive}, return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                break
            msg = receive.result()
            receive = None
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                            WSMsgType.ERROR):
                task.cancel()  # the client left: the run must not outlive it
                return
            if msg.type == WSMsgType.BINARY:  # raw stdin: a keystroke costs no JSON
                stdin.write(msg.data)
                continue
            if msg.type != WSMsgType.TEXT:
                task.cancel()
                raise bad_request("messages must be JSON text or binary stdin")
            try:
                m = parse_json(msg.data, WS_MESSAGE)
            except ApiError:
                task.cancel()
                raise
            if m["type"] == "stdin":
                stdin.write(m["data"].encode() if "data" in m
                            else b64(m.get("data_base64", ""), "data_base64"))
            elif m["type"] == "close_stdin":
                stdin.close()
            elif m["type"] == "signal":
                if "signal" not in m:
                    task.cancel()
                    raise bad_request(f"signal: name the signal ({', '.join(SIGNALS)})",
                                      "signal")
                # The run goes on until the signal ends it (or not: it may be handled); the
                # exit event then carries its status and figures as for any other run.
                control.signal(m["signal"])
            elif m["type"] == "resize":
                if not tty or "rows" not in m or "cols" not in m:
                    task.cancel()
                    raise bad_request("resize: give rows and cols, for a run with tty: true",
                                      "type" if not tty else "rows")
                control.resize(TtySize(m["rows"], m["cols"]))
    finally:
        if receive is not None:
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receive


async def ws_run(request: web.Request) -> web.StreamResponse:
    return await websocket(request, one_shot, RUN_BODY)


_ERRORS = (Reply(400, "bad input; `field` names the culprit", ERROR),
           Reply(401, "no or wrong token", ERROR), Reply(403, "registry not allowed", ERROR),
           Reply(404, "unknown image, or no such file in your file cache", ERROR),
           Reply(429, "over capacity", ERROR),
           Reply(502, "registry failed", ERROR))
RUN_REPLIES = (Reply(200, "the result, or its events with Accept: application/x-ndjson or "
                     "text/event-stream", RUN_RESULT, streams=(NDJSON, SSE)), *_ERRORS)
# POST /v1/runs: a body with `processes` (a pipeline) answers a PipelineResult.
POST_RUN_REPLIES = (Reply(200, "the result (a PipelineResult for a body with `processes`), or "
                          "a run's events with Accept: application/x-ndjson or "
                          "text/event-stream", (RUN_RESULT, PIPELINE_RESULT),
                          streams=(NDJSON, SSE)), *_ERRORS)
WS_REPLY = (Reply(101, "switching to WebSocket: first client message is the run body; then "
                  "{type: stdin|close_stdin|signal|resize} or binary frames (raw stdin); "
                  "server sends stdout/stderr/exit/error events"),)

ROUTES = [
    Route("POST", "/v1/runs", post_run, "Run a command in a fresh or warm container",
          body=RUN_BODY, replies=POST_RUN_REPLIES, tags=("runs",)),
    Route("GET", "/v1/runs/ws", ws_run, "An interactive run over WebSocket", body=RUN_BODY,
          messages=WS_MESSAGE, replies=WS_REPLY, tags=("runs",)),
]
