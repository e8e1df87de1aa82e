"""What every endpoint shares: the service's state on the app, the engine once it is ready,
and reading a JSON body against its schema."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from sandbox import Engine, Image, Platform, Policy
from service.admission import Admission
from service.auth import Principal, Tokens
from service.config import ServiceConfig
from service.errors import ApiError, bad_request, blame, too_large
from service.metrics import Metrics, PullWatcher
from service.schemas import ERROR, Reply, Typed

# What every route that writes to the image store or the file cache may answer.
STORE_FULL = Reply(507, "store_full: the store has no room left; the message says what to "
                   "free", ERROR)

VERSION = "0.1.0"


@dataclass
class State:
    config: ServiceConfig
    tokens: Tokens
    admission: Admission
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    start_error: str | None = None
    stopping: bool = False
    websockets: set[web.WebSocketResponse] = field(default_factory=set)
    handlers: set[asyncio.Task[Any]] = field(default_factory=set)   # requests being served


STATE = web.AppKey("state", State)


def state(request: web.Request) -> State:
    return request.app[STATE]


def engine(request: web.Request) -> Engine:
    return ready(state(request))


def ready(st: State) -> Engine:
    """The engine, or the 503 that says why there is none to serve with."""
    if st.stopping:
        raise ApiError(503, "unavailable", "sandboxd is shutting down; retry after it restarts",
                       headers={"Retry-After": "5"})
    if st.engine is None:
        if st.start_error:  # the cause is in the log, not for callers
            raise ApiError(503, "not_ready", "sandboxd failed to start; its operator will "
                           "find why in its log")
        raise ApiError(503, "not_ready", "sandboxd is still starting; retry in a moment",
                       headers={"Retry-After": "1"})
    return st.engine


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def parse_json(raw: bytes | str, schema: Typed) -> dict[str, Any]:
    if (body := schema.parse(raw)) is not None:
        return body
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"the body is not valid JSON: {e}; send one JSON object") from None
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object")
    return schema.validate(value, "")


def is_json(request: web.Request) -> bool:
    """application/json or a +json type, e.g. application/merge-patch+json."""
    if "Content-Type" not in request.headers:  # aiohttp would say application/octet-stream
        return False
    kind, _, sub = request.content_type.partition("/")
    return kind == "application" and (sub == "json" or sub.endswith("+json"))


async def read_json(request: web.Request, schema: Typed) -> dict[str, Any]:
    """The body as JSON, checked against `schema` (size, type, fields)."""
    # A JSON body must say so: a browser sends a cross-site form or a text/plain body, or
    # one without a Content-Type, with no preflight, so reading those as JSON would let
    # any web page drive the service.
    if not is_json(request):
        given = (f"not {request.content_type}" if "Content-Type" in request.headers
                 else "none was sent")
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with the "
                       f"header Content-Type: application/json ({given})")
    cap = state(request).config.limits.json_body_bytes
    if request.content_length is not None and request.content_length > cap:
        raise too_large("the body", cap, "limits.json_body_bytes", request.content_length)
    return parse_json(await request.read(), schema)


def policy_of(eng: Engine, body: dict[str, Any]) -> Policy | None:
    """The body's `policy` (runs, pipelines, sessions), resolved once; None when it names
    none (the engine's default then)."""
    if "policy" not in body:
        return None
    with blame("policy"):
        return eng.policy(body["policy"])


def platform_of(body: dict[str, Any]) -> Platform | None:
    """The body's `platform` (pull, run, session), parsed; None when it names none."""
    if "platform" not in body:
        return None
    with blame("platform"):
        return Platform.parse(body["platform"])


async def image_of(st: State, who: Principal, body: dict[str, Any]) -> Image:
    """The image a run, pipeline or batch body names, as its tenant sees it: pulled the
    first time (counted in the metrics), for the body's `platform`; errors name `image`."""
    platform = platform_of(body)
    watcher = PullWatcher(st.metrics)
    with blame("image"):
        image = await ready(st).image(body["image"], tenant=who.tenant, platform=platform,
                                      on_progress=watcher)
    watcher.finish()
    return image
