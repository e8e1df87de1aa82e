"""What every endpoint shares: the service's state on the app, the engine once it is ready,
and reading a JSON body against its schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from sandbox.engine import Engine
from service.auth import Admission, Tokens
from service.config import ServiceConfig
from service.errors import ApiError, bad_request, too_large
from service.metrics import Metrics
from service.schemas import Obj, validate_json

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


STATE = web.AppKey("state", State)


def state(request: web.Request) -> State:
    return request.app[STATE]


def engine(request: web.Request) -> Engine:
    st = state(request)
    if st.stopping:
        raise ApiError(503, "unavailable", "sandboxd is shutting down; retry after it restarts",
                       headers={"Retry-After": "5"})
    if st.engine is None:
        why = f": {st.start_error}" if st.start_error else "; retry in a moment"
        raise ApiError(503, "not_ready", f"sandboxd is still starting{why}",
                       headers={"Retry-After": "1"})
    return st.engine


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def parse_json(raw: bytes | str, schema: Obj) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"the body is not valid JSON: {e}; send one JSON object") from None
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object")
    return validate_json(value, schema)


async def read_json(request: web.Request, schema: Obj) -> dict[str, Any]:
    """The body as JSON, checked against `schema` (size, type, fields)."""
    ctype = request.content_type
    # aiohttp reports a missing Content-Type as application/octet-stream.
    if ctype not in ("application/json", "application/octet-stream") or (
            ctype == "application/octet-stream" and "Content-Type" in request.headers):
        raise ApiError(415, "unsupported_media_type",
                       f"send the body as application/json, not {ctype}")
    cap = state(request).config.limits.json_body_bytes
    if request.content_length is not None and request.content_length > cap:
        raise too_large("the body", cap, "limits.json_body_bytes", request.content_length)
    return parse_json(await request.read(), schema)
