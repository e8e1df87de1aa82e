"""go-judge's `/ws`: `/run`'s requests over one WebSocket, many at once. Each message is a
request (its `requestId` names it, unique among those still running on the connection)
or `{"cancelRequestId": id}`; each request is answered when it ends, in go-judge's
Response: `{requestId, results, error?}`. A request that go-judge would refuse gets its
`error` here and the connection goes on (go-judge closes it). A cancelled request's runs
are killed and its answer is the error "request cancelled". When the connection ends,
its requests' runs end with it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

import orjson
from aiohttp import WSMsgType, web
from msgspec import UNSET, Meta, UnsetType

from service import bodies
from service.api import State, parse_json, state
from service.api.gojudge import (
    MAX_CMDS,
    REQUEST,
    RESULTS,
    GojudgeCmd,
    GojudgePipeMap,
    GoStruct,
    GoTyped,
    go_errors,
    image_of,
    results,
)
from service.api.gojudge_runs import go_words
from service.auth import Principal, principal
from service.errors import ApiError, bad_request, to_api_error
from service.replies import Message
from service.results import Part
from service.schemas import Reply, Route

# "" is no id (Go's zero value: a Go client sends every field of its struct).
_ID = Annotated[str, Meta(max_length=256, pattern=bodies.NO_NUL)]


class GojudgeWsMessage(GoStruct, kw_only=True):
    """A request as /run's body with its requestId, or only cancelRequestId."""

    requestId: _ID | UnsetType = UNSET
    cmd: Annotated[list[GojudgeCmd], Meta(min_length=1, max_length=MAX_CMDS)] | UnsetType = UNSET
    pipeMapping: Annotated[list[GojudgePipeMap], Meta(max_length=64)] | UnsetType = UNSET
    cancelRequestId: _ID | UnsetType = UNSET


class GojudgeWsResponse(Part):
    requestId: str
    results: RESULTS
    error: Message | UnsetType = UNSET


MESSAGE = GoTyped(GojudgeWsMessage)


class _Connection:
    """One /ws connection: its requests running, by id, and one writer at a time."""

    def __init__(self, st: State, who: Principal, image: str | None,
                 sock: web.WebSocketResponse) -> None:
        self.st, self.who, self.image, self.sock = st, who, image, sock
        self.running: dict[str, asyncio.Task[None]] = {}
        self._sending = asyncio.Lock()

    async def answer(self, request_id: str, found: list[dict[str, Any]],
                     error: str | None = None) -> None:
        reply: dict[str, Any] = {"requestId": request_id, "results": found}
        if error is not None:
            reply["error"] = error
        async with self._sending:
            with contextlib.suppress(ConnectionError, RuntimeError):  # the client left
                await self.sock.send_str(orjson.dumps(reply).decode())

    def take(self, raw: str) -> None:
        """A message: a request started, or a running one cancelled. Raises a 400 (for
        this message only) when it is neither."""
        msg = parse_json(raw, MESSAGE)
        if cancel := msg.get("cancelRequestId"):  # as go-judge: the rest is not read then
            task = self.running.get(cancel)
            if task is not None:
                task.cancel()
            return
        request_id = msg.pop("requestId", "")
        msg.pop("cancelRequestId", None)
        if not request_id:
            raise bad_request("requestId: empty request id; name each request (unique "
                              "among those running on this connection): its answer "
                              "carries it", "requestId")
        if request_id in self.running:
            raise ApiError(400, "bad_request", f"requestId: duplicated request id: "
                           f"{request_id!r} is still running", "requestId")
        # The checks /run makes (cmd required, and the rest), through its own schema.
        req = REQUEST.validate(msg, "")
        self.running[request_id] = asyncio.ensure_future(self._serve(request_id, req))

    async def _serve(self, request_id: str, req: dict[str, Any]) -> None:
        found: list[dict[str, Any]] = []
        error = None
        try:
            found = await results(self.st, self.who, self.image, req)
        except asyncio.CancelledError:
            if self.sock.closed:  # the connection's end, not a cancel message
                raise
            error = "request cancelled"
        except Exception as e:  # a fault of ours is logged there; the connection goes on
            error = go_words(to_api_error(e).message)
        finally:
            self.running.pop(request_id, None)
        await self.answer(request_id, found, error)

    async def close(self) -> None:
        """The client left: its requests' runs must not outlive it."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@go_errors
async def ws(request: web.Request) -> web.StreamResponse:
    st = state(request)
    image = image_of(request)
    sock = web.WebSocketResponse(heartbeat=50, max_msg_size=st.config.limits.json_body_bytes)
    await sock.prepare(request)
    st.websockets.add(sock)
    conn = _Connection(st, principal(request), image, sock)
    try:
        async for msg in sock:
            if msg.type != WSMsgType.TEXT:
                await conn.answer("", [], "send each request as JSON text")
                continue
            try:
                conn.take(msg.data)
            except ApiError as e:
                request_id = _request_id(msg.data)
                await conn.answer(request_id, [], go_words(e.message))
    finally:
        st.websockets.discard(sock)
        await conn.close()
        await sock.close()
    return sock


def _request_id(raw: str) -> str:
    """The requestId a refused message gave, if any, for its answer to carry."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    rid = value.get("requestId") if isinstance(value, dict) else None
    return rid if isinstance(rid, str) else ""


ROUTES = [
    Route("GET", "/ws", ws, "go-judge's /ws: /run's requests over one WebSocket, many at once",
          body=MESSAGE, messages=MESSAGE, events=GojudgeWsResponse,
          replies=(Reply(101, "switching to WebSocket: each message a request with its "
                         "requestId, or {cancelRequestId}; each request answered when it "
                         "ends: {requestId, results, error?}"),),
          tags=("go-judge",)),
]
