"""The route table and /openapi.json, built from the same declarations that check what
comes in, so the document cannot drift from the code: msgspec types all of them. JSON
bodies are service/bodies.py's (wrapped here as Typed), the run's result is
service/results.py's, the other replies service/replies.py's, and a query or path
parameter is a Param of a msgspec type (a string's constraints, a Literal's choices).

msgspec refuses hostile JSON: exact types (a bool is not an int), unknown fields, sizes,
NUL bytes in strings, absolute paths without `..`; sandbox's `convert` words its errors,
naming the field as a JSON path (`files[2].path`)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from sandbox import Invalid, convert, group_rules
from service import bodies, replies, results
from service.errors import bad_request

# Request bodies: msgspec types (service/bodies.py) ---------------------------------------

@dataclass(frozen=True)
class Typed:
    """A body declared as a msgspec Struct: validated by msgspec, documented by its JSON
    Schema (see _Document); handlers get the given fields as a dict."""

    type: type[msgspec.Struct]
    decoder: msgspec.json.Decoder[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder", msgspec.json.Decoder(self.type))

    def parse(self, raw: bytes | str) -> dict[str, Any] | None:
        """The body straight from its JSON (the warm path: no dict is made to be checked),
        or None when it does not fit, for `validate` to say why."""
        try:
            return bodies.as_dict(self.decoder.decode(raw))
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None

    def validate(self, value: Any, path: str) -> dict[str, Any]:
        try:
            return bodies.as_dict(convert(value, self.type, prefix=path, whole_floats=True))
        except Invalid as e:
            raise bad_request(e.message, e.field or None) from None


REFERENCE = bodies.Reference
PLATFORM = bodies.Platform
RUN_BODY = Typed(bodies.RunRequest)
EXEC_BODY = Typed(bodies.ExecRequest)
CONTAINER_BODY = Typed(bodies.ContainerRequest)
COMMIT_BODY = Typed(bodies.CommitRequest)
PULL_BODY = Typed(bodies.PullRequest)
TAG_BODY = Typed(bodies.TagRequest)
PUSH_BODY = Typed(bodies.PushRequest)
GC_BODY = Typed(bodies.GcRequest)
WS_MESSAGE = Typed(bodies.WebSocketMessage)
BATCH_BODY = Typed(bodies.BatchRequest)
JOB_BODY = Typed(bodies.JobRequest)

# Responses: service/results.py's and service/replies.py's types ---------------------------

ERROR = replies.Error
RUN_RESULT = results.RunResult
PIPELINE_RESULT = replies.PipelineResult
STREAM_EVENT = replies.StreamEvent


# Routes: each handler is registered and documented from one Route ------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A msgspec type (a Struct, str, list[...], an Annotated with its Meta), or, for a value
# that is one of several Structs (which msgspec cannot tell apart untagged), a tuple of
# them: the document's oneOf.
Schema = Any


@dataclass(frozen=True)
class Param:
    name: str
    where: str                       # "path" | "query"
    type: Schema                     # a query's is checked against it (query_params)
    required: bool = False


@dataclass(frozen=True)
class Reply:
    status: int
    description: str
    schema: Schema | None = None
    content_type: str = "application/json"
    streams: tuple[str, ...] = ()    # more content types the same status may carry


@dataclass(frozen=True)
class Route:
    method: str
    path: str                        # aiohttp syntax; a `{name:regex}` is documented as {name}
    handler: Handler
    summary: str
    # A JSON body is a Typed (checked); another (bytes, a form) a type documenting it.
    body: Typed | Schema | None = None
    body_type: str = "application/json"
    params: tuple[Param, ...] = ()
    replies: tuple[Reply, ...] = ()
    auth: bool = True
    tags: tuple[str, ...] = field(default_factory=tuple)
    # A WebSocket: `body` is its first message, `messages` the client's later ones,
    # `events` what the server sends (None: a run's stream events).
    messages: Typed | None = None
    events: Schema | None = None


def doc_path(path: str) -> str:
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)


def _types(schema: Schema) -> tuple[Any, ...]:
    """The msgspec types of a declaration (a body's, a reply's, a parameter's)."""
    if isinstance(schema, Typed):
        return (schema.type,)
    return schema if isinstance(schema, tuple) else (schema,)


class _Document:
    """The JSON Schema of every type the routes name, made in one msgspec call so that
    each Struct is one component the others refer to."""

    def __init__(self, declared: list[Schema]) -> None:
        types = list(dict.fromkeys(t for d in declared for t in _types(d)))
        inline, components = msgspec.json.schema_components(
            types, ref_template="#/components/schemas/{name}")
        self._of = dict(zip(types, inline, strict=True))
        self.components = _tidy(components, types)

    def of(self, schema: Schema) -> dict[str, Any]:
        if isinstance(schema, tuple):
            return {"oneOf": [self._of[t] for t in schema]}
        return dict(self._of[_types(schema)[0]])


def _tidy(components: dict[str, Any], types: list[Any]) -> dict[str, Any]:
    """msgspec's components (JSON Schema 2020-12, as OpenAPI 3.1 has it) with each Grouped
    class's rules added (msgspec cannot say them), no title, no empty `required`."""
    by_name = {t.__name__: t for t in _struct_types(types)}
    for name, schema in components.items():
        schema.pop("title", None)
        if not schema.get("required", True):
            del schema["required"]
        cls = by_name.get(name)
        if cls is not None and issubclass(cls, bodies.Body):
            rules, notes = group_rules(cls)
            if rules:
                schema["allOf"] = rules
                schema["description"] = " ".join([schema.get("description", ""), *notes]
                                                  ).strip()
    return components


def _struct_types(types: list[Any]) -> list[type[msgspec.Struct]]:
    """Every Struct type `types` are or hold."""
    seen: dict[type[msgspec.Struct], None] = {}

    def walk(info: Any) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in seen:
                return
            seen[info.cls] = None
            for f in info.fields:
                walk(f.type)
        elif isinstance(info, msgspec.inspect.Metadata):
            walk(info.type)
        elif isinstance(info, msgspec.inspect.UnionType):
            for t in info.types:
                walk(t)
        elif isinstance(info, msgspec.inspect.ListType):
            walk(info.item_type)
        elif isinstance(info, msgspec.inspect.DictType):
            walk(info.value_type)
    for t in types:
        walk(msgspec.inspect.type_info(t))
    return list(seen)


def openapi(routes: list[Route], version: str) -> dict[str, Any]:
    declared: list[Schema] = [ERROR, STREAM_EVENT]
    for r in routes:
        declared += [p.type for p in r.params]
        declared += [s for s in (r.body, r.messages, r.events) if s is not None]
        declared += [rep.schema for rep in r.replies if rep.schema is not None]
    doc = _Document(declared)
    error = {"application/json": {"schema": doc.of(ERROR)}}
    paths: dict[str, Any] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary,
                              "operationId": f"{r.handler.__module__.rsplit('.', 1)[-1]}_"
                                             f"{r.handler.__name__.rstrip('_')}"}
        if r.tags:
            op["tags"] = list(r.tags)
        if r.params:
            op["parameters"] = [{"name": p.name, "in": p.where,
                                 "required": p.required or p.where == "path",
                                 "schema": doc.of(p.type)} for p in r.params]
        if r.body is not None and r.messages is not None:
            op["x-first-message"] = doc.of(r.body)
            op["x-messages"] = doc.of(r.messages)
            op["x-events"] = doc.of(r.events or STREAM_EVENT)
        elif r.body is not None:
            op["requestBody"] = {"required": True, "content": {r.body_type: {
                "schema": doc.of(r.body)}}}
        responses: dict[str, Any] = {}
        for rep in r.replies:
            entry: dict[str, Any] = {"description": rep.description}
            if rep.schema is not None:
                content = {rep.content_type: {"schema": doc.of(rep.schema)}}
                for extra in rep.streams:
                    content[extra] = {"schema": doc.of(STREAM_EVENT)}
                entry["content"] = content
            elif rep.content_type != "application/json":
                entry["content"] = {rep.content_type: {"schema": {"type": "string",
                                                                  "format": "binary"}}}
            responses[str(rep.status)] = entry
        responses["default"] = {"description": "an error", "content": error}
        op["responses"] = responses
        if not r.auth:
            op["security"] = []
        # OpenAPI has no WebSocket: one is an `x-websocket` of its path (an HTTP client
        # would send its GET without the handshake, or take the 101 for a failure).
        method = "x-websocket" if r.messages is not None else r.method.lower()
        paths.setdefault(doc_path(r.path), {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "sandboxd", "version": version,
                 "description": "Run untrusted code in rootless containers from OCI images."},
        "paths": paths,
        "components": {"schemas": doc.components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }


def check_param(value: str, p: Param) -> str:
    """`value` if it fits p's type, else a 400 naming the parameter."""
    try:
        convert(value, p.type, prefix=p.name)
    except Invalid as e:
        raise bad_request(e.message, e.field or p.name) from None
    return value


def query_params(request: web.Request, params: tuple[Param, ...]) -> Mapping[str, str]:
    """The query string checked against the route's declared parameters."""
    known = {p.name for p in params if p.where == "query"}
    for key in request.query:
        if key not in known:
            raise bad_request(f"query parameter {key[:64]!r} is unknown; known: "
                              f"{', '.join(sorted(known)) or 'none'}", key)
    for p in params:
        if p.where == "query":
            if p.name in request.query:
                check_param(request.query[p.name], p)
            elif p.required:
                raise bad_request(f"query parameter {p.name!r} is required", p.name)
    return request.query
