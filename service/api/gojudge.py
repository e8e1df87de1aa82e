"""go-judge's REST API (criyle/go-judge's README) over sandboxd: `POST /run`, `/file`
(upload, list, download, delete), `GET /version` and `/config`, so a go-judge client moves
here by changing its URL. Off unless the operator's `[gojudge]` table enables it.

Here: the HTTP side (schemas, handlers, go-judge's error style); gojudge_runs.py turns a
request into runs and their results. Units are go-judge's: times in nanoseconds, sizes in
bytes; file ids are the tenant's file cache's (`sha256:…`). A 400 is answered as go-judge
answers it, a JSON string, which names the field of the go-judge request
(`cmd[0].copyIn["a"].fileId: ...`)."""

from __future__ import annotations

import functools
import platform
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from service import bodies
from service.api import VERSION, State, json_response, read_json, ready, state
from service.api.files import UPLOAD_CHUNK, about
from service.api.files import get as get_cached
from service.api.gojudge_runs import (
    FILE_ERROR,
    STATUS,
    FileNames,
    go_words,
    image_field,
    prepare,
    run_apart,
    run_wired,
    wiring_of,
)
from service.auth import principal
from service.config import GojudgeConfig
from service.errors import ApiError, Handler, bad_request
from service.schemas import (
    ERROR,
    REFERENCE,
    Any_,
    Arr,
    Bool,
    Int,
    Map,
    Nullable,
    Obj,
    Param,
    Prop,
    Reply,
    Route,
    Schema,
    Str,
    query_params,
)

MiB = 1 << 20
UINT64 = (1 << 64) - 1
MAX_CMDS = 16

# Request ---------------------------------------------------------------------------------

_U64 = Int(maximum=UINT64)
FILE = Obj("GojudgeFile", (
    Prop("src", Str(description="a host path: refused (runs reach no host file)")),
    Prop("content", Str(max_len=64 * MiB, allow_nul=True)),
    Prop("fileId", Str(max_len=128, min_len=1, description="a file of your file cache")),
    Prop("name", Str(max_len=4096, min_len=1, description="a collector's name (copyOut)")),
    Prop("max", _U64),
    Prop("symlink", Str(description="not supported")),
    Prop("streamIn", Bool()), Prop("streamOut", Bool()), Prop("pipe", Bool()),
), description="One of {content}, {fileId}, {name, max} (a collector, on fd 1 or 2).")
CMD = Obj("GojudgeCmd", (
    Prop("args", Arr(Str(max_len=128 << 10), min_items=1, max_items=4096), required=True),
    Prop("env", Arr(Str(max_len=128 << 10), max_items=4096, description='"NAME=value"')),
    Prop("files", Arr(Nullable(FILE), max_items=3, description="fds 0, 1, 2")),
    Prop("tty", Bool()),
    Prop("cpuLimit", _U64), Prop("realCpuLimit", _U64), Prop("clockLimit", _U64),
    Prop("memoryLimit", _U64), Prop("stackLimit", _U64), Prop("procLimit", _U64),
    Prop("cpuRateLimit", _U64), Prop("cpuSetLimit", Str(max_len=256)),
    Prop("strictMemoryLimit", Bool()), Prop("dataSegmentLimit", Bool()),
    Prop("addressSpaceLimit", Bool()),
    Prop("copyIn", Map(FILE, key_pattern=r"[^\x00]+", key_hint="a path without NUL",
                       max_items=256)),
    Prop("copyOut", Arr(Str(max_len=4096, min_len=1), max_items=64)),
    Prop("copyOutCached", Arr(Str(max_len=4096, min_len=1), max_items=64)),
    Prop("copyOutMax", _U64), Prop("copyOutDir", Str()), Prop("copyOutTruncate", Bool()),
), description="go-judge's Cmd: limits in nanoseconds and bytes.")


def _pipe_end(name: str, fd_from: int, fd_to: int) -> Obj:
    return Obj(name, (Prop("index", Int(maximum=MAX_CMDS - 1), required=True),
                      Prop("fd", Int(minimum=fd_from, maximum=fd_to), required=True)))


# A pipe goes from fd 1 or 2 of one cmd to fd 0 of another.
PIPE = Obj("GojudgePipeMap", (
    Prop("in", _pipe_end("GojudgePipeFrom", 1, 2), required=True),
    Prop("out", _pipe_end("GojudgePipeTo", 0, 0), required=True),
    Prop("name", Str(max_len=4096)), Prop("max", _U64), Prop("proxy", Bool()),
    Prop("disableZeroCopy", Bool())))
def _pipes_within(n: int) -> dict[str, Any]:
    """With at most `n` cmds, a pipe's ends name cmd 0 to n - 1 (wiring_of's check)."""
    end = {"properties": {"index": {"maximum": n - 1}}}
    return {"if": {"properties": {"cmd": {"maxItems": n}}},
            "then": {"properties": {"pipeMapping": {"items": {
                "properties": {"in": end, "out": end}}}}}}


REQUEST = Obj("GojudgeRequest", (
    Prop("requestId", Str(max_len=256)),
    Prop("cmd", Arr(CMD, min_items=1, max_items=MAX_CMDS), required=True),
    Prop("pipeMapping", Arr(PIPE, max_items=64))),
    rules=tuple(_pipes_within(n) for n in range(1, MAX_CMDS)))


@dataclass(frozen=True)
class Lenient(Obj):
    """A request read as Go's encoding/json reads it (see _lenient), then checked."""

    def validate(self, value: Any, path: str) -> dict[str, Any]:
        return REQUEST.validate(_lenient(value, REQUEST), path)


LENIENT_REQUEST = Lenient("GojudgeRequest", REQUEST.props)

# Response --------------------------------------------------------------------------------

RESULT = Obj("GojudgeResult", (
    Prop("status", Str(enum=tuple(dict.fromkeys([*STATUS.values(), FILE_ERROR]))),
         required=True),
    Prop("exitStatus", Int(maximum=255), required=True),
    Prop("error", Str(max_len=1 << 16)),
    Prop("time", Int(description="CPU time, ns"), required=True),
    Prop("memory", Int(description="peak memory, bytes"), required=True),
    Prop("runTime", Int(description="wall time, ns"), required=True),
    Prop("files", Map(Str(max_len=1 << 40, allow_nul=True), key_pattern=".+",
                      key_hint="a name")),
    Prop("fileIds", Map(Str(), key_pattern=".+", key_hint="a name")),
    Prop("fileError", Arr(Obj("GojudgeFileError", (
        Prop("name", Str(), required=True), Prop("type", Str(), required=True),
        Prop("message", Str(max_len=1 << 16))))))))
RESULTS = Arr(RESULT, max_items=MAX_CMDS, description="one result per cmd, in order")
FEATURES = {"copyOutOptional": True, "pipeProxy": True, "symlink": False,
            "addressSpaceLimit": True, "stream": False, "procPeak": False,
            "copyOutTruncate": True, "pipeProxyZeroCopy": False, "fixSymlinkEscape": False}

def _lenient(value: Any, schema: Schema) -> Any:
    """`value` as Go's encoding/json reads it: unknown fields ignored, and a null field of an
    object the same as an absent one (Go clients send every field of their structs)."""
    if isinstance(schema, Nullable):
        return None if value is None else _lenient(value, schema.inner)
    if isinstance(schema, Obj) and isinstance(value, dict):
        props = {p.name: p.schema for p in schema.props}
        return {k: _lenient(v, props[k]) for k, v in value.items()
                if k in props and v is not None}
    if isinstance(schema, Arr) and isinstance(value, list):
        return [_lenient(v, schema.items) for v in value]
    if isinstance(schema, Map) and isinstance(value, dict):
        return {k: _lenient(v, schema.values) for k, v in value.items()}
    return value


def _config(st: State) -> GojudgeConfig:
    gj = st.config.gojudge
    if not gj.enabled:
        raise ApiError(404, "not_found", "go-judge's API is off on this service; its operator "
                       "turns it on with [gojudge] enabled = true and an image in the config")
    return gj


# Handlers --------------------------------------------------------------------------------

def _go_errors(handler: Handler) -> Handler:
    """The endpoint only when enabled (else 404 as for any unknown path); its 400 as
    go-judge gives it, the message as a JSON string. (go-judge's 404 has no body: ours is
    the service's JSON error, which its clients do not read.)"""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        _config(state(request))
        try:
            return await handler(request)
        except ApiError as e:
            if e.status != 400:
                raise
            return json_response(go_words(e.message), status=e.status)
    return wrapped


@_go_errors
async def run(request: web.Request) -> web.Response:
    st, who = state(request), principal(request)
    gj = _config(st)
    try:
        image = query_params(request, (IMAGE,)).get("image")
    except ApiError as e:  # go-judge's errors say where a field came from
        field = image_field("query")
        raise bad_request(e.message.replace("image:", f"{field}:", 1), e.field) from None
    if image is not None:  # go-judge has no images: the query may name one
        gj = replace(gj, image=image)
    req = await read_json(request, LENIENT_REQUEST)
    wiring = wiring_of(req.get("pipeMapping", []), len(req["cmd"]))
    cmds = [prepare(st, who, gj, c, i, wiring, image_field(image))
            for i, c in enumerate(req["cmd"])]
    if wiring.pipes:
        return json_response(await run_wired(st, who, gj, cmds, wiring, image_field(image)))
    return json_response(await run_apart(st, who, cmds))


async def _upload(part: Any) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(UPLOAD_CHUNK):
        yield chunk


@_go_errors
async def post_file(request: web.Request) -> web.Response:
    """go-judge's upload: multipart/form-data with the file in a part named `file`."""
    who = principal(request)
    eng = ready(state(request))
    if request.content_type != "multipart/form-data":
        raise bad_request("file: send the file as multipart/form-data, in a part named "
                          f"file (not {request.content_type})", "file")
    stored = None
    try:
        async for part in await request.multipart():
            # What the schema says: one part, `file` (a form with more is refused whole).
            if getattr(part, "name", None) != "file" or stored is not None:
                name = str(getattr(part, "name", None))[:64]
                raise bad_request(f"file: the form has another part ({name!r}); send the "
                                  "file as its only part, named file", "file")
            with about("file"):
                stored = await eng.files.put(who.tenant, _upload(part))
            FileNames(state(request)).remember(who, {stored.id: part.filename or stored.id})
    except (ValueError, HttpProcessingError) as e:  # aiohttp's words for a malformed form
        why = getattr(e, "message", None) or str(e)
        raise bad_request(f"file: the multipart form is malformed: {why}", "file") from None
    if stored is None:
        raise bad_request("file: no part named file in the form; send the file as the form "
                          "field file", "file")
    return json_response(stored.id)


@_go_errors
async def list_files(request: web.Request) -> web.Response:
    who = principal(request)
    ids = [f.id for f in ready(state(request)).files.list(who.tenant)]
    return json_response(FileNames(state(request)).listed(who, ids))


@_go_errors
async def get_file(request: web.Request) -> web.StreamResponse:
    return await get_cached(request)


@_go_errors
async def delete_file(request: web.Request) -> web.Response:
    with about("id"):
        ready(state(request)).files.delete(principal(request).tenant,
                                           request.match_info["id"])
    return web.Response()  # go-judge's: 200, no body


@_go_errors
async def version(request: web.Request) -> web.Response:
    machine = platform.machine()
    return json_response({"buildVersion": f"sandboxd {VERSION}",
                          "goVersion": f"none (sandboxd is Python {platform.python_version()})",
                          "platform": {"x86_64": "amd64", "aarch64": "arm64"}.get(machine,
                                                                                  machine),
                          "os": "linux", **FEATURES})


@_go_errors
async def config(request: web.Request) -> web.Response:
    return json_response({**FEATURES, "fileStorePath": "", "runnerConfig": {}})


_TAGS = ("go-judge",)
IMAGE = Param("image", "query", REFERENCE)
_GO_400 = Reply(400, "bad input: go-judge's style, a JSON string naming the field",
                Str(max_len=1 << 16))
_GO_404 = Reply(404, "off on this service, or no such file among yours", ERROR)
_ID = Param("id", "path", Str(max_len=128, pattern=bodies.FILE_ID,
                              description="the file's id, as POST /file or copyOutCached "
                                          "gave it"))
ROUTES = [
    Route("POST", "/run", run, "go-judge's /run: commands in the [gojudge] image, results "
          "in go-judge's units (ns, bytes) and status names", body=REQUEST, params=(IMAGE,),
          replies=(Reply(200, "one result per cmd", RESULTS), _GO_400, _GO_404,
                   Reply(401, "no or wrong token", ERROR),
                   Reply(429, "over capacity", ERROR)), tags=_TAGS),
    Route("POST", "/file", post_file, "go-judge's upload: a multipart form's `file` into "
          "your file cache; its id",
          body=Obj("GojudgeUpload", (Prop("file", Str(max_len=1 << 40, allow_nul=True,
                                                      description="the file's bytes"),
                                          required=True),),
                   description="multipart/form-data: the file as its one part"),
          body_type="multipart/form-data",
          replies=(Reply(200, "the file's id", Str()), _GO_400,
                   Reply(413, "over the size of a file or your bytes quota", ERROR),
                   Reply(429, "over your number of files", ERROR)), tags=_TAGS),
    Route("GET", "/file", list_files, "go-judge's list: your file ids and their names",
          replies=(Reply(200, "id -> name", Map(Str(), key_pattern=".+", key_hint="an id")),),
          tags=_TAGS),
    Route("GET", "/file/{id}", get_file, "go-judge's download", params=(_ID,),
          replies=(Reply(200, "the file's bytes", content_type="application/octet-stream"),
                   _GO_400, _GO_404), tags=_TAGS),
    Route("DELETE", "/file/{id}", delete_file, "go-judge's delete", params=(_ID,),
          replies=(Reply(200, "deleted"), _GO_400, _GO_404), tags=_TAGS),
    Route("GET", "/version", version, "go-judge's version and features",
          replies=(Reply(200, "version", Any_()),), auth=False, tags=_TAGS),
    Route("GET", "/config", config, "go-judge's features", replies=(Reply(200, "features",
                                                                             Any_()),),
          auth=False, tags=_TAGS),
]

