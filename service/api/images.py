"""/v1/images: pull (with NDJSON progress), list, inspect, remove, tag, push, import, gc."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
from typing import Annotated, Any, Literal

from aiohttp import web
from msgspec import Meta

from sandbox import Image, LayerError, PullProgress, SandboxError
from service import bodies, replies
from service.api import STORE_FULL, engine, json_response, platform_of, read_json, state
from service.auth import principal
from service.errors import ApiError, bad_request, blame, from_sandbox, to_api_error, too_large
from service.metrics import PullWatcher
from service.schemas import (
    ERROR,
    GC_BODY,
    PULL_BODY,
    PUSH_BODY,
    REFERENCE,
    TAG_BODY,
    Param,
    Reply,
    Route,
    query_params,
)
from service.streaming import NDJSON, EventStream, Pump, stream_kind

REF = Param("ref", "path", Annotated[str, Meta(
    max_length=bodies.REFERENCE_MAX, min_length=1, pattern=bodies.IMAGE_REF,
    description="a digest, or a URL-encoded reference")])
FORCE = Param("force", "query", Literal["true", "false"])
IMPORT_REF = Param("reference", "query", REFERENCE, required=True)


def image_json(image: Image) -> dict[str, Any]:
    return {"digest": image.digest, "config_digest": image.config_digest,
            "names": list(image.names), "platform": image.platform, "size": image.size}


def _progress(p: PullProgress) -> dict[str, Any]:
    return {"layer": p.layer, "status": p.status, "done": p.done, "total": p.total}


async def pull(request: web.Request) -> web.StreamResponse:
    eng = engine(request)
    body = await read_json(request, PULL_BODY)
    who = principal(request)
    who.allow_image(body["reference"], "reference")
    tenant = who.tenant
    platform = platform_of(body)
    metrics = state(request).metrics
    if stream_kind(request) != NDJSON:
        watcher = PullWatcher(metrics)
        with blame("reference"):
            image = await eng.images.pull(body["reference"], tenant=tenant, platform=platform,
                                          on_progress=watcher)
        watcher.finish()
        return json_response(image_json(image))
    stream = EventStream(request, NDJSON)
    watcher = PullWatcher(metrics, lambda p: pump.put("progress", _progress(p)))
    task: asyncio.Task[Image] = asyncio.ensure_future(eng.images.pull(
        body["reference"], tenant=tenant, platform=platform, on_progress=watcher))
    pump = Pump(stream.send, task.cancel)
    try:
        with blame("reference"):
            image = await task
    except asyncio.CancelledError:
        await pump.cancel()
        if pump.broken:
            return stream.response
        raise
    except Exception as e:
        await pump.drain()
        if not stream.started:
            raise
        with contextlib.suppress(ConnectionError, RuntimeError):
            await stream.send("error", to_api_error(e).body())
        return await stream.close()
    watcher.finish()
    pump.put("done", image_json(image))
    await pump.drain()
    return await stream.close()


async def list_(request: web.Request) -> web.Response:
    images = engine(request).images.list(tenant=principal(request).tenant)
    return json_response({"images": [dataclasses.asdict(i) for i in images]})


async def inspect(request: web.Request) -> web.Response:
    eng = engine(request)
    with blame("ref"):
        return json_response(eng.images.inspect(request.match_info["ref"],
                                                tenant=principal(request).tenant))


async def remove(request: web.Request) -> web.Response:
    eng = engine(request)
    query = query_params(request, (FORCE,))
    with blame("ref"):
        removed = await eng.remove_image(request.match_info["ref"],
                                         tenant=principal(request).tenant,
                                         force=query.get("force") == "true")
    return json_response({"removed": removed})


async def tag(request: web.Request) -> web.Response:
    eng = engine(request)
    body = await read_json(request, TAG_BODY)
    try:
        name = eng.images.tag(body["source"], body["target"], tenant=principal(request).tenant)
    except SandboxError as e:
        field = "target" if "target" in str(e) else "source"
        raise from_sandbox(e, field) from e
    return json_response({"name": name}, status=201)


async def push(request: web.Request) -> web.Response:
    eng = engine(request)
    body = await read_json(request, PUSH_BODY)
    target = body.get("target", body["source"])
    who = principal(request)
    who.allow_image(target, "target" if "target" in body else "source")
    with blame("target" if "target" in body else "source"):
        digest = await eng.images.push(body["source"], body.get("target"), tenant=who.tenant)
    return json_response({"digest": digest})


async def import_(request: web.Request) -> web.Response:
    eng = engine(request)
    query = query_params(request, (IMPORT_REF,))
    cap = state(request).config.limits.import_body_bytes
    if request.content_length is not None and request.content_length > cap:
        raise too_large("the tar", cap, "limits.import_body_bytes", request.content_length)
    tmp_dir = state(request).config.state_dir
    with tempfile.TemporaryFile(dir=tmp_dir, prefix="import-") as f:
        size = 0
        async for chunk in request.content.iter_chunked(1 << 20):
            size += len(chunk)
            if size > cap:
                raise too_large("the tar", cap, "limits.import_body_bytes")
            await asyncio.to_thread(f.write, chunk)
        if size == 0:
            raise bad_request("the body is empty: send a root-filesystem tar (plain, gzip "
                              "or zstd)")
        f.seek(0)
        try:
            image = await eng.images.import_tar(f, query["reference"],
                                                tenant=principal(request).tenant)
        except LayerError as e:  # the caller's own tar, not a registry's
            raise ApiError(400, "invalid_tar", f"the tar cannot be imported: {e}") from e
        except SandboxError as e:
            raise from_sandbox(e, "reference") from e
    return json_response(image_json(image), status=201)


async def gc(request: web.Request) -> web.Response:
    eng = engine(request)
    body = await read_json(request, GC_BODY)
    report = await asyncio.to_thread(eng.images.gc, body.get("budget_bytes", 0),
                                     tenant=principal(request).tenant)
    return json_response(dataclasses.asdict(report))


_TAGS = ("images",)
_BAD = Reply(400, "bad input; `field` names the culprit", ERROR)
_404 = Reply(404, "no such image", ERROR)
ROUTES = [
    Route("POST", "/v1/images/pull", pull, "Pull an image (NDJSON progress when asked)",
          body=PULL_BODY, replies=(Reply(200, "the image", replies.Image, streams=(NDJSON,)), _BAD,
                                   _404, Reply(502, "the registry failed", ERROR), STORE_FULL),
          tags=_TAGS),
    Route("GET", "/v1/images", list_, "List local images",
          replies=(Reply(200, "the images", replies.ImageList),), tags=_TAGS),
    Route("POST", "/v1/images/tag", tag, "Give a local image another name", body=TAG_BODY,
          replies=(Reply(201, "tagged", replies.Tagged), _BAD, _404), tags=_TAGS),
    Route("POST", "/v1/images/push", push, "Push a local image to a registry", body=PUSH_BODY,
          replies=(Reply(200, "pushed", replies.Pushed), _BAD, _404,
                   Reply(502, "the registry failed", ERROR)), tags=_TAGS),
    Route("POST", "/v1/images/import", import_, "Import a root-filesystem tar as an image",
          body=Annotated[str, Meta(max_length=1 << 40, min_length=1,
                                   description="a tar (plain, gzip, zstd)")],
          body_type="application/x-tar", params=(IMPORT_REF,),
          replies=(Reply(201, "imported", replies.Image), _BAD,
                   Reply(413, "the tar is too large", ERROR), STORE_FULL), tags=_TAGS),
    Route("POST", "/v1/images/gc", gc, "Remove unused images until the store fits a budget",
          body=GC_BODY, replies=(Reply(200, "what was removed", replies.GcReport),), tags=_TAGS),
    Route("GET", "/v1/images/{ref:.+}", inspect, "Inspect a local image", params=(REF,),
          replies=(Reply(200, "the image", replies.ImageInspect), _BAD, _404), tags=_TAGS),
    Route("DELETE", "/v1/images/{ref:.+}", remove, "Remove a name, or an image by digest",
          params=(REF, FORCE),
          replies=(Reply(200, "the names removed", replies.Removed), _BAD, _404,
                   Reply(409, "the image is in use", ERROR)),
          tags=_TAGS),
]
