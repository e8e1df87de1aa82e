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
import os
import platform
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from msgspec import UNSET, Meta, UnsetType

from sandbox import Limits as EngineLimits
from sandbox import PolicyError, load_profile
from service import bodies
from service.api import VERSION, State, gojudge_runs, json_response, read_json, ready, state
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
from service.auth import Principal, principal
from service.config import GojudgeConfig, ServiceConfig
from service.errors import ApiError, Handler, bad_request
from service.replies import Count, Message, Output, Text
from service.results import Part
from service.schemas import ERROR, REFERENCE, Param, Reply, Route, Typed, query_params

MiB = 1 << 20
MAX_CMDS = 16

# Request ---------------------------------------------------------------------------------

# A Go uint64 as far as sandboxd counts (its limits and sizes are int64 throughout).
U64 = Annotated[int, Meta(ge=0, le=bodies.INT64)]
_TEXT = Annotated[str, Meta(max_length=4096, pattern=bodies.NO_NUL)]
_NAME = Annotated[str, Meta(min_length=1, max_length=4096, pattern=bodies.NO_NUL)]


class GoStruct(msgspec.Struct, kw_only=True):
    """Read as Go's encoding/json reads it: unknown fields ignored, and null the same as
    absent (Go clients send every field of their structs; GoTyped drops the nulls)."""


class GojudgeFile(GoStruct):
    """One of {content}, {fileId}, {name, max} (a collector, on fd 1 or 2)."""

    src: Annotated[_TEXT, Meta(description="a host path: refused (runs reach no host "
                                           "file)")] | UnsetType = UNSET
    content: Annotated[str, Meta(max_length=64 * MiB)] | UnsetType = UNSET
    fileId: Annotated[str, Meta(min_length=1, max_length=128, pattern=bodies.NO_NUL,
                                description="a file of your file cache")] | UnsetType = UNSET
    name: Annotated[_NAME, Meta(description="a collector's name (copyOut)")] | UnsetType = UNSET
    max: U64 | UnsetType = UNSET
    symlink: Annotated[_TEXT, Meta(description="not supported")] | UnsetType = UNSET
    streamIn: bool | UnsetType = UNSET
    streamOut: bool | UnsetType = UNSET
    pipe: bool | UnsetType = UNSET


_ARG = Annotated[str, Meta(max_length=128 << 10, pattern=bodies.NO_NUL)]
_COPY_OUT = Annotated[list[_NAME], Meta(max_length=64)]


class GojudgeCmd(GoStruct):
    """go-judge's Cmd: limits in nanoseconds and bytes."""

    args: Annotated[list[_ARG], Meta(min_length=1, max_length=4096)]
    # At most as many as a run's env holds (the names must differ there).
    env: Annotated[list[_ARG], Meta(max_length=1024, description='"NAME=value"')] \
        | UnsetType = UNSET
    files: Annotated[list[GojudgeFile | None], Meta(max_length=3, description=(
        "fds 0, 1, 2; a piped fd's entry is not used (give null)"))] | UnsetType = UNSET
    tty: bool | UnsetType = UNSET
    cpuLimit: U64 | UnsetType = UNSET
    realCpuLimit: U64 | UnsetType = UNSET
    clockLimit: U64 | UnsetType = UNSET
    memoryLimit: U64 | UnsetType = UNSET
    stackLimit: U64 | UnsetType = UNSET
    procLimit: U64 | UnsetType = UNSET
    cpuRateLimit: U64 | UnsetType = UNSET
    cpuSetLimit: Annotated[str, Meta(max_length=256, pattern=bodies.NO_NUL)] | UnsetType = UNSET
    strictMemoryLimit: bool | UnsetType = UNSET
    dataSegmentLimit: bool | UnsetType = UNSET
    addressSpaceLimit: bool | UnsetType = UNSET
    copyIn: Annotated[dict[Annotated[str, Meta(pattern=r"^[^\x00]+$")], GojudgeFile],
                      Meta(max_length=256)] | UnsetType = UNSET
    copyOut: _COPY_OUT | UnsetType = UNSET
    copyOutCached: _COPY_OUT | UnsetType = UNSET
    copyOutMax: U64 | UnsetType = UNSET
    copyOutDir: _TEXT | UnsetType = UNSET
    copyOutTruncate: bool | UnsetType = UNSET


class GojudgePipeFrom(GoStruct):
    index: Annotated[int, Meta(ge=0, le=MAX_CMDS - 1)]
    fd: Annotated[int, Meta(ge=1, le=2)]


class GojudgePipeTo(GoStruct):
    index: Annotated[int, Meta(ge=0, le=MAX_CMDS - 1)]
    fd: Annotated[int, Meta(ge=0, le=0)]


class GojudgePipeMap(GoStruct, rename={"in_": "in"}):
    """A pipe from fd 1 or 2 of one cmd to fd 0 of another. With `proxy` and `name`, what
    it carries is also copied out under `name` (the writing cmd's copyOut), up to `max`
    (default 64 MiB); a request's proxied pipes keep at most 64 MiB in all, the later ones
    less when the earlier ones ask for it all."""

    in_: GojudgePipeFrom
    out: GojudgePipeTo
    name: _TEXT | UnsetType = UNSET
    max: U64 | UnsetType = UNSET
    proxy: bool | UnsetType = UNSET
    disableZeroCopy: bool | UnsetType = UNSET


class GojudgeRequest(GoStruct, kw_only=True):
    requestId: Annotated[str, Meta(max_length=256, pattern=bodies.NO_NUL)] | UnsetType = UNSET
    cmd: Annotated[list[GojudgeCmd], Meta(min_length=1, max_length=MAX_CMDS)]
    pipeMapping: Annotated[list[GojudgePipeMap], Meta(max_length=64)] | UnsetType = UNSET


def _without_nulls(value: Any) -> Any:
    """`value` with its objects' null members left out."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


@dataclass(frozen=True)
class GoTyped(Typed):
    """A go-judge body: a null member is an absent one (as Go reads it)."""

    def validate(self, value: Any, path: str) -> dict[str, Any]:
        return super().validate(_without_nulls(value), path)


REQUEST = GoTyped(GojudgeRequest)
_GO_TYPES = (GojudgeFile, GojudgeCmd, GojudgePipeFrom, GojudgePipeTo, GojudgePipeMap,
             GojudgeRequest)


# What the translation (gojudge_runs.py) checks beyond the types, for the document: JSON
# Schema for the fields it refuses or takes apart, and the [gojudge] policy's maxima in
# go-judge's units. Checked there, said here (narrow_document).
_NOT_TRUE = {"enum": [False, None]}
_ABSENT = {"type": "null"}
_FALSY = {"enum": [0, None]}        # a limit of 0 is no limit (Go's zero value)
_ANY_FILE = {"anyOf": [
    {"required": ["content"], "properties": {"content": {"type": "string"}}},
    {"required": ["fileId"], "properties": {"fileId": {"type": "string"}}}]}
_FILE_ID = {"anyOf": [{"type": "string", "pattern": bodies.FILE_ID}, _ABSENT]}
# A relative path that check_path takes once joined to the working directory.
_RELATIVE = rf"{bodies.PATH_COMPONENT}(?:/{bodies.PATH_COMPONENT}?)*"


def _go_path(workdir: str, optional: bool = False) -> dict[str, Any]:
    """A go-judge path (with `optional`, maybe a '?' after it: copyOut's "may be missing"):
    absolute, or relative to `workdir`, with no '..' component and at most 4096
    characters once joined."""
    room = 4096 - len(workdir.rstrip("/")) - 1
    mark = r"\??" if optional else ""
    return {"anyOf": [
        {"pattern": f"^(?:/{bodies.PATH_COMPONENT}?)+{mark}$", "maxLength": 4096 + optional},
        {"pattern": f"^{_RELATIVE}{mark}$", "maxLength": room + optional}]}


def _cpu_list(cpus: frozenset[int]) -> str:
    """A cpuset list (parse_cpuset's syntax: "0-1,3") naming only `cpus`."""
    def num(n: int) -> str:
        return f"0{{0,{5 - len(str(n))}}}{n}"
    parts = []
    for a in sorted(cpus):
        parts.append(num(a))
        b = a
        while b in cpus:
            parts.append(f"{num(a)}-{num(b)}")
            b += 1
    part = f"(?:{'|'.join(parts)})" if parts else "(?!)"
    return f"^(?:{part}(?:,{part})*)?$"


def _allowed(cpuset: str, maxima: EngineLimits) -> bool:
    """Whether a run may ask for `cpuset` (the check gojudge_runs._within makes)."""
    try:
        EngineLimits(cpuset=cpuset).check_within(maxima)
    except PolicyError:
        return False
    return True


def _limits(maxima: EngineLimits) -> list[dict[str, Any]]:
    """A cmd's limits within the policy's maxima (gojudge_runs._within), in ns and bytes;
    0 is no limit. Without a clock limit the CPU limit is the wall clock's too."""
    def top(name: str, scale: int = 1) -> int:
        value = getattr(maxima, name)
        return bodies.INT64 if value is None else min(bodies.INT64, round(value * scale))
    ns = gojudge_runs.NS_PER_MS
    wall = top("wall_ms", ns)
    rate = min(4_096_000, top("cpu_quota_cores", 1000))
    output = top("output_bytes")
    collector = {"anyOf": [_ABSENT, {"properties": {"max": {"maximum": output}}}]}
    cpus = {cpu for cpu in os.sched_getaffinity(0) if _allowed(str(cpu), maxima)}
    return [
        {"properties": {
            "cpuLimit": {"maximum": top("cpu_ms", ns)}, "realCpuLimit": {"maximum": wall},
            "memoryLimit": {"maximum": top("memory_bytes")},
            "stackLimit": {"maximum": top("stack_bytes")}, "procLimit": {"maximum": top("pids")},
            # go-judge's 1000 is one CPU; a cgroup's quota is 1 % of one at least.
            "cpuRateLimit": {"anyOf": [_FALSY, {"minimum": 10, "maximum": rate}]},
            "cpuSetLimit": {"anyOf": [_ABSENT, {"pattern": _cpu_list(frozenset(cpus))}]},
            "files": {"anyOf": [_ABSENT, {"prefixItems": [{}, collector, collector]}]}}},
        {"if": {"properties": {"realCpuLimit": _FALSY}},
         "then": {"properties": {"clockLimit": {"maximum": wall}}}},
        {"if": {"properties": {"clockLimit": _FALSY, "realCpuLimit": _FALSY}},
         "then": {"properties": {"cpuLimit": {"maximum": wall}}}},
        # RLIMIT_AS is set to memoryLimit.
        {"if": {"required": ["addressSpaceLimit"],
                "properties": {"addressSpaceLimit": {"const": True}}},
         "then": {"required": ["memoryLimit"],
                  "properties": {"memoryLimit": {"type": "integer", "minimum": 1}}}},
    ]


def _wiring() -> list[dict[str, Any]]:
    """gojudge_runs.wiring_of's checks: a pipe's ends name cmds that exist, and an fd takes
    one pipe."""
    rules: list[dict[str, Any]] = [
        {"if": {"properties": {"cmd": {"maxItems": n}}},
         "then": {"properties": {"pipeMapping": {"anyOf": [_ABSENT, {"items": {"properties": {
             "in": {"properties": {"index": {"maximum": n - 1}}},
             "out": {"properties": {"index": {"maximum": n - 1}}}}}}]}}}}
        for n in range(1, MAX_CMDS)]
    for end, fds in (("in", (1, 2)), ("out", (0,))):
        for i in range(MAX_CMDS):
            for fd in fds:
                piped = {"properties": {end: {"properties": {"index": {"const": i},
                                                             "fd": {"const": fd}}}}}
                rules.append({"properties": {"pipeMapping": {"anyOf": [_ABSENT, {
                    "contains": piped, "minContains": 0, "maxContains": 1}]}}})
    return rules


def narrow_document(doc: dict[str, Any], config: ServiceConfig) -> None:
    """The document (in place) as this service checks a go-judge request: what the
    translation refuses, and the limits of the [gojudge] policy (as the config sets them
    when the service starts)."""
    schemas = doc["components"]["schemas"]
    for go_type in _GO_TYPES:   # null is as good as absent
        schema = schemas[go_type.__name__]
        for name, prop in schema["properties"].items():
            if name not in schema.get("required", ()):
                schema["properties"][name] = {"anyOf": [prop, _ABSENT]}
    gj = config.gojudge
    workdir = gj.workdir
    # (prefixItems, not items: 2020-12's `items` is for the items after them)
    no_stream = {"streamIn": _NOT_TRUE, "streamOut": _NOT_TRUE}
    stdin = {"anyOf": [_ABSENT, {**_ANY_FILE, "properties": {
        **no_stream, "src": _ABSENT, "fileId": _FILE_ID}}]}
    collector = {"anyOf": [_ABSENT, {"required": ["name", "max"], "properties": {
        **no_stream, "name": {"type": "string"}, "max": {"type": "integer"}}}]}
    cmd_rules: list[dict[str, Any]] = [{"properties": {
        "tty": _NOT_TRUE,
        "env": {"anyOf": [_ABSENT, {"items": {"pattern": r"^[^=\x00]+=[^\x00]*$"}}]},
        "files": {"anyOf": [_ABSENT, {"prefixItems": [stdin, collector, collector]}]},
        "copyIn": {"anyOf": [_ABSENT, {
            "propertyNames": _go_path(workdir),
            "additionalProperties": {"anyOf": [_ABSENT, {**_ANY_FILE, "properties": {
                "src": _ABSENT, "symlink": _ABSENT, "fileId": _FILE_ID}}]}}]},
        "copyOut": {"anyOf": [_ABSENT, {"items": _go_path(workdir, optional=True)}]},
        "copyOutCached": {"anyOf": [_ABSENT, {"items": _go_path(workdir, optional=True)}]},
    }}]
    if gj.enabled:
        name = gj.policy or config.default_policy
        profile = load_profile(name)
        if name in config.policy_limits:
            profile = config.policy_limits[name].applied_to(profile)
        cmd_rules += _limits(profile.maxima)
    schemas["GojudgeCmd"]["allOf"] = cmd_rules
    schemas["GojudgeRequest"]["allOf"] = _wiring()

# Response --------------------------------------------------------------------------------

class GojudgeFileError(Part):
    name: Text
    type: Text
    message: Message | UnsetType = UNSET


_Named = dict[Annotated[str, Meta(pattern="^(?:.+)$")], Text]


class GojudgeResult(Part, kw_only=True):
    status: Literal[tuple(dict.fromkeys([*STATUS.values(), FILE_ERROR]))]  # type: ignore[misc]
    exitStatus: Annotated[int, Meta(ge=0, le=255)]
    error: Message | UnsetType = UNSET
    time: Annotated[Count, Meta(description="CPU time, ns")]
    memory: Annotated[Count, Meta(description="peak memory, bytes")]
    runTime: Annotated[Count, Meta(description="wall time, ns")]
    files: Annotated[dict[Annotated[str, Meta(pattern="^(?:.+)$")], Output],
                     Meta(max_length=1024)] | UnsetType = UNSET
    fileIds: Annotated[_Named, Meta(max_length=1024)] | UnsetType = UNSET
    fileError: Annotated[list[GojudgeFileError], Meta(max_length=1024)] | UnsetType = UNSET


RESULTS = Annotated[list[GojudgeResult], Meta(max_length=MAX_CMDS,
                                              description="one result per cmd, in order")]
FEATURES = {"copyOutOptional": True, "pipeProxy": True, "symlink": False,
            "addressSpaceLimit": True, "stream": False, "procPeak": False,
            "copyOutTruncate": True, "pipeProxyZeroCopy": False, "fixSymlinkEscape": False}



def _config(st: State) -> GojudgeConfig:
    gj = st.config.gojudge
    if not gj.enabled:
        raise ApiError(404, "not_found", "go-judge's API is off on this service; its operator "
                       "turns it on with [gojudge] enabled = true and an image in the config")
    return gj


# Handlers --------------------------------------------------------------------------------

def go_errors(handler: Handler) -> Handler:
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


def image_of(request: web.Request) -> str | None:
    """The image the query names (go-judge has none: the config's serves), or None."""
    try:
        return query_params(request, (IMAGE,)).get("image")
    except ApiError as e:  # go-judge's errors say where a field came from
        field = image_field("query")
        raise bad_request(e.message.replace("image:", f"{field}:", 1), e.field) from None


async def results(st: State, who: Principal, image: str | None,
                  req: dict[str, Any]) -> list[dict[str, Any]]:
    """A checked REQUEST run, in the query's image (None: the config's): one result per
    cmd, in go-judge's words."""
    gj = _config(st)
    if image is not None:
        gj = replace(gj, image=image)
    wiring = wiring_of(req.get("pipeMapping", []), len(req["cmd"]))
    cmds = [prepare(st, who, gj, c, i, wiring, image_field(image))
            for i, c in enumerate(req["cmd"])]
    if wiring.pipes:
        return await run_wired(st, who, gj, cmds, wiring, image_field(image))
    return await run_apart(st, who, cmds)


@go_errors
async def run(request: web.Request) -> web.Response:
    image = image_of(request)
    req = await read_json(request, REQUEST)
    return json_response(await results(state(request), principal(request), image, req))


async def _upload(part: Any) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(UPLOAD_CHUNK):
        yield chunk


@go_errors
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


@go_errors
async def list_files(request: web.Request) -> web.Response:
    who = principal(request)
    ids = [f.id for f in ready(state(request)).files.list(who.tenant)]
    return json_response(FileNames(state(request)).listed(who, ids))


@go_errors
async def get_file(request: web.Request) -> web.StreamResponse:
    return await get_cached(request)


@go_errors
async def delete_file(request: web.Request) -> web.Response:
    with about("id"):
        ready(state(request)).files.delete(principal(request).tenant,
                                           request.match_info["id"])
    return web.Response()  # go-judge's: 200, no body


@go_errors
async def version(request: web.Request) -> web.Response:
    machine = platform.machine()
    return json_response({"buildVersion": f"sandboxd {VERSION}",
                          "goVersion": f"none (sandboxd is Python {platform.python_version()})",
                          "platform": {"x86_64": "amd64", "aarch64": "arm64"}.get(machine,
                                                                                  machine),
                          "os": "linux", **FEATURES})


@go_errors
async def config(request: web.Request) -> web.Response:
    return json_response({**FEATURES, "fileStorePath": "", "runnerConfig": {}})


_TAGS = ("go-judge",)
IMAGE = Param("image", "query", REFERENCE)
_GO_400 = Reply(400, "bad input: go-judge's style, a JSON string naming the field", Message)
_GO_404 = Reply(404, "off on this service, or no such file among yours", ERROR)
_ID = Param("id", "path", Annotated[str, Meta(
    max_length=128, pattern=bodies.FILE_ID,
    description="the file's id, as POST /file or copyOutCached gave it")])


class GojudgeUpload(Part):
    """multipart/form-data: the file as its one part"""

    file: Annotated[str, Meta(max_length=1 << 40, description="the file's bytes")]

ROUTES = [
    Route("POST", "/run", run, "go-judge's /run: commands in the [gojudge] image, results "
          "in go-judge's units (ns, bytes) and status names", body=REQUEST, params=(IMAGE,),
          replies=(Reply(200, "one result per cmd", RESULTS), _GO_400, _GO_404,
                   Reply(401, "no or wrong token", ERROR),
                   Reply(429, "over capacity", ERROR)), tags=_TAGS),
    Route("POST", "/file", post_file, "go-judge's upload: a multipart form's `file` into "
          "your file cache; its id",
          body=GojudgeUpload,
          body_type="multipart/form-data",
          replies=(Reply(200, "the file's id", Text), _GO_400,
                   Reply(413, "over the size of a file or your bytes quota", ERROR),
                   Reply(429, "over your number of files", ERROR)), tags=_TAGS),
    Route("GET", "/file", list_files, "go-judge's list: your file ids and their names",
          replies=(Reply(200, "id -> name", Annotated[_Named, Meta(max_length=1024)]),),
          tags=_TAGS),
    Route("GET", "/file/{id}", get_file, "go-judge's download", params=(_ID,),
          replies=(Reply(200, "the file's bytes", content_type="application/octet-stream"),
                   _GO_400, _GO_404), tags=_TAGS),
    Route("DELETE", "/file/{id}", delete_file, "go-judge's delete", params=(_ID,),
          replies=(Reply(200, "deleted"), _GO_400, _GO_404), tags=_TAGS),
    Route("GET", "/version", version, "go-judge's version and features",
          replies=(Reply(200, "version", dict[str, Any]),), auth=False, tags=_TAGS),
    Route("GET", "/config", config, "go-judge's features", replies=(Reply(200, "features",
                                                                             dict[str, Any]),),
          auth=False, tags=_TAGS),
]

