"""/v1/build: build an image from a Dockerfile and a build context (a tar in the body), with
its progress and its steps' output streamed as NDJSON; /v1/build/prune empties the caller's
build cache."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any, Literal

from aiohttp import web
from msgspec import Meta

from sandbox import BuildFailed, BuildRequest, Forbidden, Platform, SandboxError
from service import bodies
from service.api import STORE_FULL, engine, json_response, state
from service.auth import principal
from service.errors import ApiError, bad_request, blame, from_sandbox, to_api_error
from service.replies import BuildPruned
from service.schemas import (
    ERROR,
    PLATFORM,
    REFERENCE,
    Param,
    Reply,
    Route,
    check_param,
    query_params,
)
from service.streaming import NDJSON, ClientGone, EventStream, unless_gone

MAX_TAGS = 32
MAX_BUILD_ARGS = 256
TAG = Param("tag", "query", REFERENCE)
# A request line is at most 8190 bytes (aiohttp refuses longer ones before any handler),
# and a character takes up to 12 once percent-encoded: the parameters' caps fit in it.
BUILD_ARG = Param("build_arg", "query", Annotated[str, Meta(
    max_length=256, min_length=1, pattern=bodies.BUILD_ARG,
    description="KEY=VALUE (repeat for several)")])
PARAMS = (
    TAG,
    Param("dockerfile", "query", Annotated[str, Meta(
        max_length=256, min_length=1, pattern=bodies.NO_NUL,
        description="its path in the context (default Dockerfile)")]),
    BUILD_ARG,
    Param("target", "query", Annotated[str, Meta(max_length=64, min_length=1,
                                                 pattern=bodies.NO_NUL,
                                                 description="the stage to build")]),
    Param("no_cache", "query", Literal["true", "false", "1", "0"]),
    Param("platform", "query", PLATFORM),
)


def _request(request: web.Request) -> BuildRequest:
    query = query_params(request, PARAMS)
    tags = request.query.getall("tag", [])
    if len(tags) > MAX_TAGS:
        raise bad_request(f"{len(tags)} tags, over the {MAX_TAGS} allowed", "tag")
    for tag in tags:
        check_param(tag, TAG)
    args: dict[str, str] = {}
    pairs = request.query.getall("build_arg", [])
    if len(pairs) > MAX_BUILD_ARGS:
        raise bad_request(f"{len(pairs)} build args, over the {MAX_BUILD_ARGS} allowed",
                          "build_arg")
    for pair in pairs:
        check_param(pair, BUILD_ARG)
        key, _, value = pair.partition("=")
        args[key] = value
    platform = None
    if "platform" in query:
        with blame("platform"):
            platform = Platform.parse(query["platform"])
    return BuildRequest(dockerfile=query.get("dockerfile", "Dockerfile"), tags=tuple(tags),
                        build_args=args, target=query.get("target"),
                        no_cache=query.get("no_cache") in ("true", "1"), platform=platform)


async def build(request: web.Request) -> web.StreamResponse:
    eng = engine(request)
    req = _request(request)
    who = principal(request)
    for tag in req.tags:
        who.allow_image(tag, "tag")
    with blame("tag"):
        eng.images.check_tags(req.tags, who.tenant)

    def allow(reference: str) -> None:
        # A Dockerfile's FROM and COPY --from pull as this token would: within its registries.
        try:
            who.allow_image(reference, "FROM")
        except ApiError as e:
            raise Forbidden(e.message) from None

    stream = EventStream(request, NDJSON)

    async def emit(event: dict[str, Any]) -> None:
        kind = event.pop("event")
        await stream.send(kind, event)

    try:
        # A build is one of the tenant's runs while it lasts (its RUN steps are).
        async with state(request).admission.slot(who):
            await unless_gone(request, eng.build(
                request.content.iter_chunked(1 << 20), req, tenant=who.tenant, emit=emit,
                allow=allow))
    except ClientGone:
        return stream.response
    except (ConnectionError, RuntimeError) as e:
        if stream.started:  # the client went away: nobody to tell
            return stream.response
        raise to_api_error(e) from e
    except Exception as e:
        if not stream.started:  # the context, the Dockerfile, a base: an ordinary 4xx
            if isinstance(e, SandboxError):
                field = "dockerfile" if str(e).startswith("dockerfile:") else "body"
                raise from_sandbox(e, field) from e
            raise
        if isinstance(e, BuildFailed):
            error: dict[str, Any] = {"code": "build_failed", "message": str(e),
                                     "line": e.line, "step": e.step}
        else:  # logged there when it is a fault of ours
            error = to_api_error(e).body()["error"]
        with contextlib.suppress(ConnectionError, RuntimeError):
            await stream.send("error", {"error": error})
    return await stream.close()


async def prune(request: web.Request) -> web.Response:
    eng = engine(request)
    return json_response(await asyncio.to_thread(eng.prune_build_cache,
                                                 principal(request).tenant))


_TAGS = ("images",)
ROUTES = [
    Route("POST", "/v1/build", build, "Build an image from a Dockerfile (NDJSON progress)",
          body=Annotated[str, Meta(max_length=1 << 40, min_length=1, description=(
              "the build context: a tar (plain or gzip) with the Dockerfile"))],
          body_type="application/x-tar", params=PARAMS,
          replies=(Reply(200, "the build's events, the image last", None,
                         content_type=NDJSON),
                   Reply(400, "bad input; `field` names the culprit", ERROR),
                   Reply(403, "a tag or base image this token may not use", ERROR),
                   Reply(413, "the context is too large", ERROR), STORE_FULL), tags=_TAGS),
    Route("POST", "/v1/build/prune", prune, "Empty your build cache",
          replies=(Reply(200, "what was removed", BuildPruned),), tags=_TAGS),
]
