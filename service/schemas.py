"""The route table and /openapi.json, built from the same declarations that check what
comes in, so the document cannot drift from the code: JSON bodies are msgspec types
(service/bodies.py, wrapped here as Typed), as is the run's result (service/results.py);
query and path parameters, and the other replies, are this module's small schemas (Str,
Int, Obj...), which validate and document themselves.

Either refuses hostile JSON: exact types (a bool is not an int), unknown fields, sizes,
NUL bytes in strings, absolute paths without `..`. Errors name the field as a JSON path
(`files[2].path`)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from sandbox import MAX_PIPELINE_PROCESSES, Invalid, Status, convert, group_rules, mismatch
from service import bodies, results
from service.errors import ApiError, bad_request

MiB = 1 << 20


def _at(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_error(path: str, want: str, value: Any) -> Exception:
    got = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
           list: "an array", dict: "an object", type(None): "null"}.get(type(value), "a value")
    return bad_request(f"{path or 'body'}: expected {want}, got {got}", path or None)


class Schema:
    description: str = ""

    def validate(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def openapi(self) -> dict[str, Any]:
        raise NotImplementedError

    def _doc(self, d: dict[str, Any]) -> dict[str, Any]:
        if self.description:
            d["description"] = self.description
        return d


@dataclass(frozen=True)
class Str(Schema):
    max_len: int = 4096
    min_len: int = 0
    enum: tuple[str, ...] | None = None
    allow_nul: bool = False
    pattern: str | None = None      # one of service/bodies.py's, which say what fails them
    description: str = ""

    def validate(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _type_error(path, "a string", value)
        if len(value) > self.max_len:
            raise bad_request(f"{path}: longer than {self.max_len} characters", path)
        if len(value) < self.min_len:
            raise bad_request(f"{path}: must not be empty" if self.min_len == 1 else
                              f"{path}: shorter than {self.min_len} characters", path)
        if not self.allow_nul and "\0" in value:
            raise bad_request(f"{path}: contains a NUL byte", path)
        if self.enum is not None and value not in self.enum:
            raise bad_request(f"{path}: {value[:64]!r} is not one of "
                              f"{', '.join(self.enum)}", path)
        if self.pattern is not None and re.search(self.pattern, value) is None:
            raise bad_request(f"{path}: {value[:64]!r} {mismatch(self.pattern, value)}", path)
        return value

    def openapi(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "string", "maxLength": self.max_len}
        if self.min_len:
            d["minLength"] = self.min_len
        if self.enum is not None:
            d["enum"] = list(self.enum)
        elif self.pattern is not None or not self.allow_nul:
            d["pattern"] = self.pattern or bodies.NO_NUL
        return self._doc(d)


@dataclass(frozen=True)
class Int(Schema):
    minimum: int = 0
    maximum: int = (1 << 63) - 1
    description: str = ""

    def validate(self, value: Any, path: str) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 2.0 is an integer to JSON Schema (and to OpenAPI 3.1)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(path, "an integer", value)
        if not self.minimum <= value <= self.maximum:
            raise bad_request(f"{path}: {value} is out of range; give {self.minimum} to "
                              f"{self.maximum}", path)
        return value

    def openapi(self) -> dict[str, Any]:
        return self._doc({"type": "integer", "minimum": self.minimum, "maximum": self.maximum})


@dataclass(frozen=True)
class Num(Schema):
    description: str = ""

    def validate(self, value: Any, path: str) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _type_error(path, "a number", value)
        return value

    def openapi(self) -> dict[str, Any]:
        return self._doc({"type": "number"})


@dataclass(frozen=True)
class Bool(Schema):
    description: str = ""

    def validate(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise _type_error(path, "true or false", value)
        return value

    def openapi(self) -> dict[str, Any]:
        return self._doc({"type": "boolean"})


@dataclass(frozen=True)
class Arr(Schema):
    items: Schema
    max_items: int = 1024
    min_items: int = 0
    description: str = ""

    def validate(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise _type_error(path, "an array", value)
        if len(value) < self.min_items:
            raise bad_request(f"{path}: give at least {self.min_items} item(s)", path)
        if len(value) > self.max_items:
            raise bad_request(f"{path}: more than {self.max_items} items", path)
        return [self.items.validate(v, _at(path, i)) for i, v in enumerate(value)]

    def openapi(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "array", "items": self.items.openapi(),
                             "maxItems": self.max_items}
        if self.min_items:
            d["minItems"] = self.min_items
        return self._doc(d)


@dataclass(frozen=True)
class Map(Schema):
    """An object used as a dictionary: keys are names, every value has one schema."""

    values: Schema
    key_pattern: str = r"[^=\x00]+"
    key_hint: str = "a non-empty name without '=' or NUL"
    max_items: int = 1024
    description: str = ""

    def validate(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _type_error(path, "an object", value)
        if len(value) > self.max_items:
            raise bad_request(f"{path}: more than {self.max_items} entries", path)
        out = {}
        for k, v in value.items():
            if not re.fullmatch(self.key_pattern, k):
                raise bad_request(f"{path}: key {k[:64]!r} must be {self.key_hint}", path)
            out[k] = self.values.validate(v, _at(path, k))
        return out

    def openapi(self) -> dict[str, Any]:
        return self._doc({"type": "object", "additionalProperties": self.values.openapi(),
                          "propertyNames": {"pattern": f"^(?:{self.key_pattern})$"},
                          "maxProperties": self.max_items})


@dataclass(frozen=True)
class Any_(Schema):
    """Free-form JSON (responses only: an image's config, host capabilities)."""

    kind: str = "object"
    description: str = ""

    def validate(self, value: Any, path: str) -> Any:
        return value

    def openapi(self) -> dict[str, Any]:
        return self._doc({"type": self.kind})


@dataclass(frozen=True)
class Nullable(Schema):
    inner: Schema

    def validate(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.validate(value, path)

    def openapi(self) -> dict[str, Any]:
        return {"anyOf": [self.inner.openapi(), {"type": "null"}]}


@dataclass(frozen=True)
class OneOf(Schema):
    """A value of one of several object schemas (a reply that differs with its request)."""

    options: tuple[Obj, ...]

    def validate(self, value: Any, path: str) -> Any:
        for option in self.options[:-1]:
            try:
                return option.validate(value, path)
            except ApiError:
                continue
        return self.options[-1].validate(value, path)

    def openapi(self) -> dict[str, Any]:
        return {"oneOf": [option.openapi() for option in self.options]}


@dataclass(frozen=True)
class Prop:
    name: str
    schema: Schema
    required: bool = False


@dataclass(frozen=True)
class Obj(Schema):
    name: str
    props: tuple[Prop, ...]
    description: str = ""
    # JSON Schema for what its handler checks between fields (e.g. an index into another
    # array): documented here, checked there.
    rules: tuple[dict[str, Any], ...] = ()

    def validate(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _type_error(path, "an object", value)
        known = {p.name: p for p in self.props}
        unknown = [k for k in value if k not in known]
        if unknown:
            where = _at(path, unknown[0])
            raise bad_request(f"{path or 'body'}: unknown field(s) "
                              f"{', '.join(repr(k[:64]) for k in unknown[:5])}; known: "
                              f"{', '.join(known)}", where)
        out: dict[str, Any] = {}
        for p in self.props:
            if p.name in value:
                out[p.name] = p.schema.validate(value[p.name], _at(path, p.name))
            elif p.required:
                raise bad_request(f"{_at(path, p.name)}: required", _at(path, p.name))
        return out

    def openapi(self) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{self.name}"}

    def component(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "object", "additionalProperties": False,
                             "properties": {p.name: p.schema.openapi() for p in self.props}}
        required = [p.name for p in self.props if p.required]
        if required:
            d["required"] = required
        if self.rules:
            d["allOf"] = list(self.rules)
        if self.description:
            d["description"] = self.description
        return d


# Request bodies: msgspec types (service/bodies.py) ---------------------------------------

@dataclass(frozen=True)
class Typed(Schema):
    """A body declared as a msgspec Struct: validated by msgspec, documented by its JSON
    Schema (see _typed_components); handlers get the given fields as a dict."""

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

    def openapi(self) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{self.type.__name__}"}


REFERENCE = Str(max_len=bodies.REFERENCE_MAX, min_len=1, pattern=bodies.REFERENCE_PATTERN,
                description="an image reference: name[:tag][@digest]")
PLATFORM = Str(max_len=64, min_len=1, pattern=bodies.PLATFORM_PATTERN,
               description="os/arch[/variant], e.g. linux/arm64/v8 (default: this machine's)")
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

# Responses ------------------------------------------------------------------------------

ERROR = Obj("Error", (Prop("error", Obj("ErrorDetail", (
    Prop("code", Str(max_len=64), required=True),
    # Both may quote what was sent: a field's name is any JSON key.
    Prop("message", Str(max_len=1 << 16, allow_nul=True), required=True),
    Prop("field", Str(max_len=1 << 40, allow_nul=True)))), required=True),))
_N = Nullable
_STATUS = Str(max_len=32, enum=tuple(map(str, Status)))
CACHED_FILE = Obj("CachedFile", (
    Prop("id", Str(description='"sha256:" and the hex SHA-256 of the content'), required=True),
    Prop("size", Int(), required=True),
    Prop("created", Num(description="when you first stored it (Unix time)"), required=True),
    Prop("last_used", Num(description="when it was last stored, read or given to a run"),
         required=True),
    Prop("expires", Num(description="when it goes unless used before: every use moves it"),
         required=True)))
CACHED_FILE_LIST = Obj("CachedFileList", (Prop("files", Arr(CACHED_FILE, max_items=1 << 20),
                                               required=True),))


RUN_RESULT = Typed(results.RunResult)
PIPELINE_RESULT = Obj("PipelineResult", (
    Prop("status", _STATUS, required=True),
    Prop("processes", Arr(RUN_RESULT, max_items=MAX_PIPELINE_PROCESSES), required=True),
    Prop("pipes", Arr(Obj("PipeResult", (
        Prop("captured", _N(Str(max_len=1 << 40, allow_nul=True)), required=True),
        Prop("truncated", Bool(), required=True))), max_items=MAX_PIPELINE_PROCESSES),
        required=True),
    Prop("image", Str(), required=True)),
    description="A pipeline's result: `status` is the first process's status that is not "
                "ok (else ok); `pipes[i].captured` is what a pipe with capture_bytes kept, "
                "encoded as output_encoding says (null for a direct pipe).")
STREAM_EVENT = Obj("StreamEvent", (
    Prop("event", Str(enum=("stdout", "stderr", "exit", "error", "progress", "done")),
         required=True),
    Prop("data", Str(max_len=1 << 40, allow_nul=True)),
), description="One line of NDJSON (or one SSE event's data, without `event`). `exit` "
               "carries the RunResult's fields without stdout and stderr; `error` carries "
               "`error` as in Error.")
SESSION = Obj("Container", (
    Prop("id", Str(), required=True), Prop("image", Str(), required=True),
    Prop("names", Arr(Str()), required=True), Prop("policy", Str(), required=True),
    Prop("created", Num(), required=True), Prop("last_used", Num(), required=True),
    Prop("alive", Bool(), required=True)))
SESSION_LIST = Obj("ContainerList", (Prop("containers", Arr(SESSION, max_items=1 << 20),
                                          required=True),))
IMAGE = Obj("Image", (
    Prop("digest", Str(), required=True), Prop("config_digest", Str(), required=True),
    Prop("names", Arr(Str()), required=True), Prop("platform", Str(), required=True),
    Prop("size", Int(), required=True), Prop("created", Num()), Prop("last_used", Num())))
IMAGE_LIST = Obj("ImageList", (Prop("images", Arr(IMAGE, max_items=1 << 20), required=True),))
IMAGE_INSPECT = Obj("ImageInspect", (
    Prop("digest", Str(), required=True), Prop("media_type", Str(), required=True),
    Prop("config_digest", Str(), required=True), Prop("platform", Str(), required=True),
    Prop("size", Int(), required=True), Prop("created", Num()), Prop("last_used", Num()),
    Prop("names", Arr(Str()), required=True),
    Prop("layers", Arr(Any_(), max_items=1 << 16), required=True),
    Prop("config", Any_(), required=True)))
REMOVED = Obj("Removed", (Prop("removed", Arr(Str()), required=True),))
TAGGED = Obj("Tagged", (Prop("name", Str(), required=True),))
PUSHED = Obj("Pushed", (Prop("digest", Str(), required=True),))
GC_REPORT = Obj("GcReport", (
    Prop("images", Arr(Str(), max_items=1 << 20), required=True),
    Prop("blobs", Int(), required=True), Prop("layers", Int(), required=True),
    Prop("freed_bytes", Int(), required=True), Prop("kept_bytes", Int(), required=True)))
BUILD_PRUNED = Obj("BuildPruned", (
    Prop("removed", Int(description="cached build steps forgotten"), required=True),
    Prop("freed_bytes", Int(), required=True)))
INFO = Obj("Info", (Prop("version", Str(), required=True), Prop("host", Any_(), required=True),
                    Prop("pools", Arr(Any_(), max_items=1 << 20), required=True),
                    Prop("sessions", Int(), required=True),
                    Prop("timing", Any_(description="CPU slots: the reserved cpus (null: "
                                        "none), policies, enforced_by (cpuset or affinity), "
                                        "and your own runs in slots or waiting")),
                    Prop("policies", Map(Obj("PolicyLimits", (
                        Prop("defaults", Any_(description="a run's limits when it asks for "
                                              "none"), required=True),
                        Prop("maxima", Any_(description="the most a run may ask for"),
                             required=True))), key_pattern=r"[a-z0-9][a-z0-9_-]*",
                        key_hint="a profile name"), required=True)))
HEALTH = Obj("Health", (Prop("status", Str(), required=True), Prop("error", Str(max_len=1 << 16)),
                        Prop("reason", Str(max_len=1 << 16))))


def validate_json(value: Any, schema: Schema) -> dict[str, Any]:
    return schema.validate(value, "")


# Routes: each handler is registered and documented from one Route ------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Param:
    name: str
    where: str                       # "path" | "query"
    schema: Schema
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
    body: Schema | None = None
    body_type: str = "application/json"
    params: tuple[Param, ...] = ()
    replies: tuple[Reply, ...] = ()
    auth: bool = True
    tags: tuple[str, ...] = field(default_factory=tuple)
    # A WebSocket: `body` is its first message, `messages` the client's later ones.
    messages: Schema | None = None


def doc_path(path: str) -> str:
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)


def _components(schemas: list[Schema], out: dict[str, Any]) -> None:
    for s in schemas:
        if isinstance(s, Typed):
            out.setdefault(_TYPED, []).append(s.type)
        elif isinstance(s, Obj):
            if s.name in out:
                continue
            out[s.name] = s.component()
            _components([p.schema for p in s.props], out)
        elif isinstance(s, Arr):
            _components([s.items], out)
        elif isinstance(s, Map):
            _components([s.values], out)
        elif isinstance(s, Nullable):
            _components([s.inner], out)
        elif isinstance(s, OneOf):
            _components(list(s.options), out)


_TYPED = "\0typed"   # where _components gathers the msgspec types, for _typed_components


def _typed_components(types: list[type[msgspec.Struct]]) -> dict[str, Any]:
    """The msgspec types' JSON Schema (2020-12, as OpenAPI 3.1 has it) as components: each
    Grouped class's rules added (msgspec cannot say them), no empty `required`."""
    if not types:
        return {}
    _, components = msgspec.json.schema_components(
        dict.fromkeys(types), ref_template="#/components/schemas/{name}")
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


def _struct_types(types: list[type[msgspec.Struct]]) -> list[type[msgspec.Struct]]:
    """`types` and every Struct type their fields hold."""
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
        elif isinstance(info, msgspec.inspect.ListType | msgspec.inspect.DictType):
            walk(info.item_type if isinstance(info, msgspec.inspect.ListType)
                 else info.value_type)
    for t in types:
        walk(msgspec.inspect.type_info(t))
    return list(seen)


def openapi(routes: list[Route], version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    used: list[Schema] = [ERROR, STREAM_EVENT]
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary,
                              "operationId": f"{r.handler.__module__.rsplit('.', 1)[-1]}_"
                                             f"{r.handler.__name__.rstrip('_')}"}
        if r.tags:
            op["tags"] = list(r.tags)
        if r.params:
            op["parameters"] = [{"name": p.name, "in": p.where,
                                 "required": p.required or p.where == "path",
                                 "schema": p.schema.openapi()} for p in r.params]
        if r.messages is not None:
            used.append(r.messages)
        if r.body is not None:
            used.append(r.body)
        if r.body is not None and r.messages is not None:
            op["x-first-message"] = r.body.openapi()
            op["x-messages"] = r.messages.openapi()
            op["x-events"] = STREAM_EVENT.openapi()
        elif r.body is not None:
            op["requestBody"] = {"required": True, "content": {r.body_type: {
                "schema": r.body.openapi()}}}
        responses: dict[str, Any] = {}
        for rep in r.replies:
            entry: dict[str, Any] = {"description": rep.description}
            if rep.schema is not None:
                used.append(rep.schema)
                content = {rep.content_type: {"schema": rep.schema.openapi()}}
                for extra in rep.streams:
                    content[extra] = {"schema": STREAM_EVENT.openapi()}
                entry["content"] = content
            elif rep.content_type != "application/json":
                entry["content"] = {rep.content_type: {"schema": {"type": "string",
                                                                  "format": "binary"}}}
            responses[str(rep.status)] = entry
        responses["default"] = {"description": "an error",
                                "content": {"application/json": {"schema": ERROR.openapi()}}}
        op["responses"] = responses
        if not r.auth:
            op["security"] = []
        # OpenAPI has no WebSocket: one is an `x-websocket` of its path (an HTTP client
        # would send its GET without the handshake, or take the 101 for a failure).
        method = "x-websocket" if r.messages is not None else r.method.lower()
        paths.setdefault(doc_path(r.path), {})[method] = op
    components: dict[str, Any] = {}
    _components(used, components)
    components.update(_typed_components(components.pop(_TYPED, [])))
    return {
        "openapi": "3.1.0",
        "info": {"title": "sandboxd", "version": version,
                 "description": "Run untrusted code in rootless containers from OCI images."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }


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
                p.schema.validate(request.query[p.name], p.name)
            elif p.required:
                raise bad_request(f"query parameter {p.name!r} is required", p.name)
    return request.query
