"""/v1/files: the caller's file cache. A file is uploaded once (or stored by a run's
`copy_out_cached`) and given to any number of runs by its id (`files[i].file_id`): the
judge's "compile once, run every case". Ids are content hashes; a file belongs to the
tenants that stored it, and to any other its id does not exist (404, as an unknown one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from aiohttp import web
from msgspec import Meta

from sandbox import CachedFile, SandboxError
from service import bodies
from service.api import STORE_FULL, engine, json_response
from service.auth import principal
from service.errors import bad_request, from_sandbox
from service.replies import CachedFile as CachedFileReply
from service.replies import CachedFileList
from service.schemas import ERROR, Param, Reply, Route

log = logging.getLogger("sandboxd.service")
ID = Param("id", "path", Annotated[str, Meta(
    max_length=128, pattern=bodies.FILE_ID,
    description='the file\'s id: "sha256:" and 64 hex digits, as POST /v1/files gave it')])
# A body of bytes, as the document says it.
FILE_BYTES = Annotated[str, Meta(max_length=1 << 40, min_length=1,
                                 description="the file's bytes")]
UPLOAD_CHUNK = 1 << 16
DOWNLOAD_CHUNK = 1 << 20


def file_json(f: CachedFile) -> dict[str, Any]:
    return {"id": f.id, "size": f.size, "created": f.created, "last_used": f.last_used,
            "expires": f.expires}


@contextlib.contextmanager
def about(field: str) -> Iterator[None]:
    """Errors of the file cache reported against `field`: the cache's own messages speak of
    `file_id`, which a request calls `id` (the path) or `files[2].file_id` (a run)."""
    try:
        yield
    except SandboxError as e:
        err = from_sandbox(e, field)
        if err.status in (400, 404):
            err.field = field
            err.message = f"{field}: {err.message.removeprefix('file_id: ')}"
        raise err from e


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; 400 before anything is stored when it is empty."""
    chunks = request.content.iter_chunked(UPLOAD_CHUNK)
    first = await anext(chunks, b"")
    if not first:
        raise bad_request("the body is empty: send the file's bytes as the body, with "
                          "Content-Type: application/octet-stream")

    async def rest() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk
    return rest()


async def put(request: web.Request) -> web.Response:
    eng = engine(request)
    tenant = principal(request).tenant
    entry = await eng.files.put(tenant, await _body(request))
    return json_response(file_json(entry), status=201)


async def list_(request: web.Request) -> web.Response:
    entries = engine(request).files.list(principal(request).tenant)
    return json_response({"files": [file_json(f) for f in entries]})


async def get(request: web.Request) -> web.StreamResponse:
    """The file streamed from the cache's disk. Once the body has begun an error cannot
    become a status: the connection is closed short of the length, and the cause logged."""
    eng = engine(request)
    with about("id"):
        f = eng.files.open(principal(request).tenant, request.match_info["id"])
    with f:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = os.fstat(f.fileno()).st_size
        await resp.prepare(request)
        try:
            while chunk := await asyncio.to_thread(f.read, DOWNLOAD_CHUNK):
                await resp.write(chunk)
        except ConnectionError:
            return resp  # the client went away
        except OSError as e:
            log.warning("download of %s cut short: %s", request.match_info["id"], e)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
    return resp


async def delete(request: web.Request) -> web.Response:
    eng = engine(request)
    with about("id"):
        eng.files.delete(principal(request).tenant, request.match_info["id"])
    return web.Response(status=204)


_TAGS = ("files",)
_BAD = Reply(400, "bad input; `field` names the culprit", ERROR)
_404 = Reply(404, "no such file among yours (never stored, deleted or expired)", ERROR)
ROUTES = [
    Route("POST", "/v1/files", put, "Store a file in your file cache (its id is its SHA-256; "
          "the same bytes give the same id)",
          body=FILE_BYTES,
          body_type="application/octet-stream",
          replies=(Reply(201, "stored (or already there: its expiry moves on)", CachedFileReply),
                   _BAD, Reply(413, "over the size of a file or your bytes quota", ERROR),
                   Reply(429, "over your number of files", ERROR), STORE_FULL), tags=_TAGS),
    Route("GET", "/v1/files", list_, "List your cached files",
          replies=(Reply(200, "your files", CachedFileList),), tags=_TAGS),
    Route("GET", "/v1/files/{id}", get, "Download a cached file", params=(ID,),
          replies=(Reply(200, "the file's bytes", content_type="application/octet-stream"),
                   _BAD, _404), tags=_TAGS),
    Route("DELETE", "/v1/files/{id}", delete, "Delete a file from your cache", params=(ID,),
          replies=(Reply(204, "deleted"), _BAD, _404), tags=_TAGS),
]
