"""/v1/containers: sessions a caller keeps, exec in them, copy files in and out, commit them
into images. With
tokens, a session belongs to the token that made it: to any other it does not exist (404)."""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated, Any

from aiohttp import web
from msgspec import Meta

from sandbox import (
    Forbidden,
    InvalidReference,
    LayerError,
    Limits,
    OutputCallback,
    RunControl,
    RunOutcome,
    RunSpec,
    SandboxError,
)
from service import bodies
from service.api import (
    STORE_FULL,
    engine,
    image_of,
    json_response,
    policy_of,
    read_json,
    state,
)
from service.api.images import image_json
from service.api.runbodies import exec_spec
from service.api.runs import (
    RUN_REPLIES,
    WS_REPLY,
    PreparedRun,
    execute,
    websocket,
)
from service.auth import principal
from service.cluster.routing import NODE_GONE
from service.errors import ApiError, bad_request, blame, from_sandbox, too_large
from service.netproxy import network_of
from service.replies import Container, ContainerList, Image
from service.schemas import (
    COMMIT_BODY,
    CONTAINER_BODY,
    ERROR,
    EXEC_BODY,
    WS_MESSAGE,
    Param,
    Reply,
    Route,
    query_params,
)

log = logging.getLogger("sandboxd.service")
ID = Param("id", "path", Annotated[str, Meta(max_length=128, pattern=bodies.NO_NUL,
                                              description="the container's id")])
# At most 512 characters: a request line is at most 8190 bytes (aiohttp's cap), and a
# character takes up to 12 once percent-encoded.
PATH = Param("path", "query", Annotated[str, Meta(max_length=512, min_length=1,
                                                  pattern=bodies.PATH)], required=True)
MODE = Param("mode", "query", Annotated[str, Meta(
    max_length=6, pattern=bodies.MODE, description="octal permission bits, e.g. 0644")])
NOT_FOUND = Reply(404, "no such container (deleted or expired) or path", ERROR)
OWNED = (NOT_FOUND, NODE_GONE)   # the replies of every route of one session


async def create(request: web.Request) -> web.Response:
    eng = engine(request)
    body = await read_json(request, CONTAINER_BODY)
    principal(request).allow_image(body["image"], "image")
    policy = policy_of(eng, body)
    network = network_of(state(request).config, principal(request), body)
    limits = None
    if "limits" in body:
        with blame("limits"):
            limits = Limits.from_dict(body["limits"], "limits")
    tenant = principal(request).tenant
    # As a run's: a pull it makes counts in the metrics.
    image = await image_of(state(request), principal(request), body)
    session = await eng.create_session(image, tenant=tenant, policy=policy,
                                       network=network, limits=limits)
    return json_response(session.describe(), status=201)


def _owner(request: web.Request) -> str:
    """The tenant id sessions are kept under."""
    return principal(request).tenant.id


async def list_(request: web.Request) -> web.Response:
    sessions = engine(request).sessions.list(_owner(request))
    return json_response({"containers": [s.describe() for s in sessions]})


async def get(request: web.Request) -> web.Response:
    session = engine(request).sessions.get(request.match_info["id"], _owner(request))
    return json_response(session.describe())


async def delete(request: web.Request) -> web.Response:
    await engine(request).sessions.delete(request.match_info["id"], owner=_owner(request))
    return web.Response(status=204)


def _exec_job(request: web.Request, body: dict[str, Any]) -> PreparedRun:
    eng = engine(request)
    sid = request.match_info["id"]
    owner = _owner(request)
    eng.sessions.get(sid, owner)  # 404 before anything starts
    spec, encoding = exec_spec(state(request), principal(request), body)

    async def start(spec: RunSpec, on_output: OutputCallback | None,
                    control: RunControl | None) -> RunOutcome:
        return await eng.sessions.exec(sid, spec, on_output=on_output, control=control,
                                       owner=owner)

    return PreparedRun(start, spec, encoding)


async def exec_(request: web.Request) -> web.StreamResponse:
    body = await read_json(request, EXEC_BODY)
    return await execute(request, _exec_job(request, body))


async def exec_ws(request: web.Request) -> web.StreamResponse:
    engine(request).sessions.get(request.match_info["id"], _owner(request))
    return await websocket(request, _exec_job, EXEC_BODY)


def _mode(text: str | None) -> int:
    if text is None:
        return 0o644
    try:
        mode = int(text, 8)
    except ValueError:
        raise bad_request(f"mode: {text!r} is not an octal mode such as 0644", "mode") from None
    if not 0 <= mode <= 0o7777:
        raise bad_request(f"mode: {text!r} is out of range 0000-7777", "mode")
    return mode


async def put_file(request: web.Request) -> web.Response:
    eng = engine(request)
    query = query_params(request, (PATH, MODE))
    path = query["path"]
    mode = _mode(query.get("mode"))
    eng.sessions.get(request.match_info["id"], _owner(request))
    cap = state(request).config.limits.file_body_bytes
    if request.content_length is not None and request.content_length > cap:
        raise too_large("the file", cap, "limits.file_body_bytes", request.content_length)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > cap:
            raise too_large("the file", cap, "limits.file_body_bytes")
        chunks.append(chunk)
    with blame("path"):
        await eng.sessions.put_file(request.match_info["id"], path, b"".join(chunks), mode,
                           owner=_owner(request))
    return web.Response(status=204)


async def get_file(request: web.Request) -> web.StreamResponse:
    """Streams the file or tar as init's descriptors are read, at the pace the client takes
    it. Once the body has begun an error cannot become a status: the connection is closed
    before the end of the body (short of its length, or of the last chunk), so no client
    mistakes a cut-short copy for a whole one, and the cause is logged."""
    eng = engine(request)
    query = query_params(request, (PATH,))
    path = query["path"]
    sid = request.match_info["id"]
    opened = eng.sessions.get_path(sid, path, owner=_owner(request))  # 404 for the container
    async with contextlib.AsyncExitStack() as stack:
        with blame("path"):
            got = await stack.enter_async_context(opened)
        ctype = "application/x-tar" if got.kind == "dir" else "application/octet-stream"
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        resp.content_length = got.size
        await resp.prepare(request)
        try:
            async for chunk in got.chunks:
                await resp.write(chunk)
        except ConnectionError:
            return resp  # the client went away
        except (SandboxError, OSError) as e:  # a cap, a changed file, an I/O error
            log.warning("copy out of %s from container %s cut short: %s", path, sid, e)
            _cut(request)
            return resp
        except BaseException:
            _cut(request)
            raise
        await resp.write_eof()
    return resp


async def commit(request: web.Request) -> web.Response:
    """`docker commit`: the session's changes to its root as a new image of the caller's."""
    eng = engine(request)
    tenant = principal(request).tenant
    eng.sessions.get(request.match_info["id"], tenant.id)  # 404 before the body is read
    body = await read_json(request, COMMIT_BODY)
    try:
        image = await eng.sessions.commit(
            request.match_info["id"], body["reference"], tenant=tenant,
            changes=body.get("changes", ()), message=body.get("message", ""),
            author=body.get("author", ""))
    except LayerError as e:  # what the container's own runs wrote, not a registry's
        raise ApiError(400, "invalid_layer", f"the container's changes cannot be made a "
                       f"layer: {e}") from e
    except SandboxError as e:  # an error about changes[i] names it first
        field = "reference" if isinstance(e, InvalidReference | Forbidden) else None
        raise from_sandbox(e, field) from e
    return json_response(image_json(image), status=201)


def _cut(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


_TAGS = ("containers",)
_BAD = Reply(400, "bad input; `field` names the culprit", ERROR)
ROUTES = [
    Route("POST", "/v1/containers", create, "Create a container to keep (a session)",
          body=CONTAINER_BODY, replies=(Reply(201, "created", Container), _BAD,
                                        Reply(404, "unknown image", ERROR)), tags=_TAGS),
    Route("GET", "/v1/containers", list_, "List sessions",
          replies=(Reply(200, "the sessions", ContainerList),), tags=_TAGS),
    Route("GET", "/v1/containers/{id}", get, "One session", params=(ID,),
          replies=(Reply(200, "the session", Container), *OWNED), tags=_TAGS),
    Route("DELETE", "/v1/containers/{id}", delete, "Delete a session and its container",
          params=(ID,), replies=(Reply(204, "deleted"), *OWNED), tags=_TAGS),
    Route("POST", "/v1/containers/{id}/exec", exec_, "Run a command in a session",
          body=EXEC_BODY, params=(ID,), replies=(*RUN_REPLIES, *OWNED), tags=_TAGS),
    Route("GET", "/v1/containers/{id}/exec/ws", exec_ws, "An interactive run in a session",
          body=EXEC_BODY, messages=WS_MESSAGE, params=(ID,), replies=(*WS_REPLY, *OWNED),
          tags=_TAGS),
    Route("POST", "/v1/containers/{id}/commit", commit,
          "Make an image of a session's container (`docker commit`)", body=COMMIT_BODY,
          params=(ID,), replies=(
              Reply(201, "the new image, named `reference` among the caller's images", Image),
              _BAD, Reply(403, "`reference` is a name the operator shares", ERROR), *OWNED,
              Reply(409, "the session has runs in progress", ERROR),
              Reply(413, "over the caller's image quota", ERROR), STORE_FULL), tags=_TAGS),
    Route("PUT", "/v1/containers/{id}/files", put_file, "Write a file into a session",
          body=Annotated[str, Meta(max_length=1 << 40, description="the file's bytes")],
          body_type="application/octet-stream", params=(ID, PATH, MODE),
          replies=(Reply(204, "written"), _BAD, *OWNED), tags=_TAGS),
    Route("GET", "/v1/containers/{id}/files", get_file,
          "Read a file (raw bytes) or a directory (a tar) from a session",
          params=(ID, PATH), replies=(
              Reply(200, "the file's bytes, or a tar of the directory",
                    content_type="application/octet-stream"), _BAD, *OWNED), tags=_TAGS),
]
