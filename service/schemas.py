"""Request and response schemas: the one definition that validates every body and query
parameter and generates /openapi.json, so the document cannot drift from the code.

A schema validates hostile JSON: exact types (a bool is not an int), unknown fields, sizes,
NUL bytes in strings, absolute paths without `..`. Errors name the field as a JSON path
(`files[2].path`)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sandbox import (
    ALLOWED_SIGNALS,
    MAX_CHANGE_BYTES,
    MAX_CHANGES,
    MAX_PIPELINE_CAPTURE_BYTES,
    MAX_PIPELINE_PROCESSES,
)
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
    absolute_path: bool = False
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
        if self.absolute_path:
            check_path(value, path)
        return value

    def openapi(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "string", "maxLength": self.max_len}
        if self.min_len:
            d["minLength"] = self.min_len
        if self.enum is not None:
            d["enum"] = list(self.enum)
        if self.absolute_path:
            d["pattern"] = "^/"
        return self._doc(d)


def check_path(value: str, where: str) -> str:
    """An absolute path inside a container, with no `..` component and no NUL byte."""
    if "\0" in value:
        raise bad_request(f"{where}: contains a NUL byte", where)
    if not value.startswith("/"):
        raise bad_request(f"{where}: {value[:200]!r} must be an absolute path inside the "
                          "container (start with /)", where)
    if ".." in value.split("/"):
        raise bad_request(f"{where}: {value[:200]!r} has a '..' component; give the path "
                          "without it", where)
    return value


@dataclass(frozen=True)
class Int(Schema):
    minimum: int = 0
    maximum: int = (1 << 63) - 1
    description: str = ""

    def validate(self, value: Any, path: str) -> int:
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
        return {**self.inner.openapi(), "nullable": True}


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
    not_both: tuple[tuple[str, str], ...] = ()      # at most one of each pair
    one_of: tuple[tuple[str, ...], ...] = ()        # exactly one of each group
    description: str = ""

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
        for a, b in self.not_both:
            if a in out and b in out:
                raise bad_request(f"{path or 'body'}: give {a} or {b}, not both", _at(path, b))
        for group in self.one_of:
            given = [name for name in group if name in out]
            if len(given) != 1:
                raise bad_request(f"{path or 'body'}: give exactly one of {_names(group)}"
                                  + (f"; {_names(tuple(given))} were given" if given else ""),
                                  _at(path, given[-1] if given else group[0]))
        return out

    def openapi(self) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{self.name}"}

    def component(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "object", "additionalProperties": False,
                             "properties": {p.name: p.schema.openapi() for p in self.props}}
        required = [p.name for p in self.props if p.required]
        if required:
            d["required"] = required
        if self.one_of:
            d["allOf"] = [{"oneOf": [{"required": [name]} for name in group]}
                          for group in self.one_of]
        notes = [f"at most one of {a} and {b}" for a, b in self.not_both]
        notes += [f"exactly one of {_names(group)}" for group in self.one_of]
        if self.description or notes:
            d["description"] = " ".join([self.description, *(n + "." for n in notes)]).strip()
        return d


def _names(names: tuple[str, ...]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


# Request bodies -------------------------------------------------------------------------

REFERENCE = Str(max_len=1024, min_len=1,
                description="an image reference: name[:tag][@digest], or a digest")
POLICY = Str(max_len=64, min_len=1, description='a profile name: "default" (writable root, '
             'used once) or "judge" (read-only root, reused)')
NETWORK = Str(max_len=16, enum=("none",), description="only 'none' is supported")
PLATFORM = Str(max_len=64, min_len=1, description="os/arch[/variant], e.g. linux/arm64/v8 "
               "(default: this machine's)")
POSITIVE = Int(minimum=1)
LIMITS = Obj("Limits", tuple(Prop(n, POSITIVE) for n in (
    "cpu_ms", "wall_ms", "memory_bytes", "pids", "output_bytes", "file_size_bytes",
    "open_files")), description="Per-run limits; each must be within the policy's maxima.")
FILE = Obj("File", (
    Prop("path", Str(max_len=4096, min_len=1, absolute_path=True), required=True),
    Prop("content", Str(max_len=64 * MiB, allow_nul=True, description="UTF-8 text")),
    Prop("content_base64", Str(max_len=96 * MiB, description="exact bytes, base64")),
    Prop("file_id", Str(max_len=128, min_len=1, description='a file of your file cache, '
                        'by the id POST /v1/files gave: "sha256:" and 64 hex digits')),
    Prop("mode", Int(minimum=0, maximum=0o7777, description="permission bits; 420 = 0o644")),
    Prop("copy", Bool(description="with file_id: a writable copy of the cached file, owned "
                      "by the run user, instead of a read-only bind of it (default false: "
                      "bound, no copy; executable when mode has an exec bit)")),
), one_of=(("content", "content_base64", "file_id"),))
MAX_COPY_OUT_PATHS = 64
OUTPUT_ENCODING = Str(max_len=16, enum=("utf-8", "base64"),
                      description="how stdout/stderr are given: UTF-8 with invalid bytes "
                                  "replaced (default) or base64 of the exact bytes")
EXEC_PROPS = (
    Prop("cmd", Arr(Str(max_len=128 << 10, min_len=0), min_items=1, max_items=4096,
                    description="argv; replaces the image's Cmd (its Entrypoint is kept)")),
    Prop("env", Map(Str(max_len=128 << 10), description="merged over the image's Env")),
    Prop("cwd", Str(max_len=4096, min_len=1, absolute_path=True)),
    Prop("user", Str(max_len=256, min_len=1, description='"1000", "1000:1000" or a name from '
                     "the image's /etc/passwd")),
    Prop("stdin", Str(max_len=64 * MiB, allow_nul=True)),
    Prop("stdin_base64", Str(max_len=96 * MiB)),
    Prop("files", Arr(FILE, max_items=256)),
    Prop("limits", LIMITS),
    Prop("output_encoding", OUTPUT_ENCODING),
    Prop("copy_out", Arr(Str(max_len=4096, min_len=1, absolute_path=True),
                         max_items=MAX_COPY_OUT_PATHS,
                         description="regular files to return in the result's `files` once "
                                     "the command ends, encoded as output_encoding says")),
    Prop("copy_out_cached", Arr(Str(max_len=4096, min_len=1, absolute_path=True),
                                max_items=MAX_COPY_OUT_PATHS,
                                description="regular files to store in your file cache once "
                                            "the command ends; their ids come back in the "
                                            "result's `file_ids`")),
)
EXEC_BODY = Obj("ExecRequest", EXEC_PROPS, not_both=(("stdin", "stdin_base64"),))
TIMING_PROPS = (
    Prop("repeat", Int(minimum=1, description="run it this many times (each in a reset warm "
                       "container; at most the service's timing.max_repeat): the result is "
                       "the median run's by CPU time, with `repeats` giving the spread")),
    Prop("rerun_near_limit", Bool(description="a time_limit (always near its limit: it was "
                                  "killed there) is run once more and that run's result "
                                  "given, with the first's figures in `rerun`")),
)
# Pipelines (service/api/pipelines.py): a run body with `processes` and `pipes` in place of
# `cmd`.
_PROCESS_KEYS = ("cmd", "env", "cwd", "user", "stdin", "stdin_base64", "files", "limits",
                 "copy_out", "copy_out_cached")
PROCESS = Obj("PipelineProcess", tuple(
    Prop(p.name, p.schema, required=p.name == "cmd") for p in EXEC_PROPS
    if p.name in _PROCESS_KEYS), not_both=(("stdin", "stdin_base64"),),
    description="One process of a pipeline: the body's env, files and limits apply to it, "
                "its own over them (env and limits key by key, files by path).")
_PIPE_END = Arr(Int(minimum=0), min_items=2, max_items=2,
                description="[process index, fd]")
PIPE = Obj("Pipe", (
    Prop("from", _PIPE_END, required=True), Prop("to", _PIPE_END, required=True),
    Prop("capture_bytes", Int(minimum=0, maximum=MAX_PIPELINE_CAPTURE_BYTES,
                              description="relay the pipe through the service and keep its "
                                          "first N bytes in the result (0: a direct pipe; "
                                          "a pipeline's pipes keep at most the maximum in "
                                          "all)"))),
    description="A pipe from fd 1 or 2 of one process to fd 0 of another.")
PIPELINE_PROPS = (
    Prop("processes", Arr(PROCESS, min_items=2, max_items=MAX_PIPELINE_PROCESSES,
                          description="in place of cmd: processes wired by `pipes`, each a "
                                      "run with its own limits, verdict and figures")),
    Prop("pipes", Arr(PIPE, max_items=MAX_PIPELINE_PROCESSES)),
    Prop("container", Str(max_len=16, enum=("shared", "own"),
                          description="the processes share one container (default) or each "
                                      "has its own")),
)
RUN_BODY = Obj("RunRequest", (Prop("image", REFERENCE, required=True), *EXEC_PROPS,
                              Prop("policy", POLICY), Prop("network", NETWORK),
                              Prop("platform", PLATFORM), *TIMING_PROPS, *PIPELINE_PROPS),
               not_both=(("stdin", "stdin_base64"), ("cmd", "processes")))
CONTAINER_BODY = Obj("ContainerRequest", (Prop("image", REFERENCE, required=True),
                                          Prop("policy", POLICY), Prop("network", NETWORK),
                                          Prop("platform", PLATFORM), Prop("limits", LIMITS)))
COMMIT_BODY = Obj("CommitRequest", (
    Prop("reference", REFERENCE, required=True),
    Prop("changes", Arr(Str(max_len=MAX_CHANGE_BYTES, min_len=1), max_items=MAX_CHANGES,
                        description="Dockerfile instructions applied to the new image's "
                                    "config, as `docker commit --change` takes: CMD, "
                                    "ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD, STOPSIGNAL, "
                                    "USER, VOLUME, WORKDIR")),
    Prop("message", Str(max_len=64 << 10, description="the new layer's history comment")),
    Prop("author", Str(max_len=1024, description='e.g. "Jane Doe <jane@example.com>"'))))
PULL_BODY = Obj("PullRequest", (Prop("reference", REFERENCE, required=True),
                                Prop("platform", PLATFORM)))
TAG_BODY = Obj("TagRequest", (Prop("source", REFERENCE, required=True),
                              Prop("target", REFERENCE, required=True)))
PUSH_BODY = Obj("PushRequest", (Prop("source", REFERENCE, required=True),
                                Prop("target", REFERENCE)))
GC_BODY = Obj("GcRequest", (Prop("budget_bytes", Int(minimum=0)),))
SIGNALS = tuple(s.name for s in ALLOWED_SIGNALS)   # what a client may send a running exec
WS_MESSAGE = Obj("WebSocketMessage", (
    Prop("type", Str(max_len=16, enum=("stdin", "close_stdin", "signal")), required=True),
    Prop("data", Str(max_len=16 * MiB, allow_nul=True)),
    Prop("data_base64", Str(max_len=24 * MiB)),
    Prop("signal", Str(max_len=16, enum=SIGNALS)),
), not_both=(("data", "data_base64"),))

# Responses ------------------------------------------------------------------------------

ERROR = Obj("Error", (Prop("error", Obj("ErrorDetail", (
    Prop("code", Str(max_len=64), required=True),
    Prop("message", Str(max_len=1 << 16), required=True),
    Prop("field", Str(max_len=4096)))), required=True),))
_N = Nullable
_STATUS = Str(max_len=32, enum=("ok", "nonzero_exit", "signaled", "time_limit", "wall_limit",
                                "memory_limit", "output_limit", "syscall_blocked",
                                "internal_error"))
_FIGURES = (
    Prop("id", _N(Str()), required=True), Prop("status", _STATUS, required=True),
    Prop("exit_code", _N(Int(minimum=-(1 << 31), maximum=1 << 31)), required=True),
    Prop("signal", _N(Int(maximum=128)), required=True),
    Prop("stdout_truncated", Bool(), required=True),
    Prop("stderr_truncated", Bool(), required=True),
    Prop("cpu_ms", _N(Num()), required=True), Prop("user_ms", _N(Num()), required=True),
    Prop("sys_ms", _N(Num()), required=True), Prop("wall_ms", _N(Num()), required=True),
    Prop("memory_peak_bytes", _N(Int()), required=True),
    Prop("setup_ms", _N(Num()), required=True),
    Prop("measured_by", Map(_N(Str()), key_pattern=".+", key_hint="a name"), required=True),
    Prop("image", Str(), required=True), Prop("pool_hit", Bool(), required=True),
    Prop("warnings", Arr(Str(max_len=1 << 16)), required=True),
    Prop("error", _N(Str(max_len=1 << 16)), required=True),
    Prop("cpus", _N(Str(description='the CPUs the run was kept on, e.g. "1"')), required=True),
    Prop("host_load", _N(Num(description="the part of the run's time (0 to 1) during which "
                                         "a task waited for a CPU (PSI): the run's own on "
                                         "cgroup v2, the host's on v1 (measured_by says); "
                                         "null without PSI")), required=True),
    Prop("dedicated_cpu", Bool(description="the run had a reserved CPU to itself, kept by "
                                           "its cgroup's cpuset"), required=True),
    Prop("near_limit", Bool(description="cpu_ms or wall_ms reached the last 10 % of its "
                                        "limit (or the limit): a verdict that may go either "
                                        "way"), required=True),
)
_SPREAD = Obj("Spread", (Prop("min", Num(), required=True), Prop("median", Num(), required=True),
                         Prop("max", Num(), required=True),
                         Prop("spread", Num(description="(max - min) / median"),
                              required=True),
                         Prop("cv", Num(description="standard deviation / mean (0 for one "
                                        "run)"), required=True)))
_TIMING = (
    Prop("repeats", Obj("Repeats", (
        Prop("n", Int(), required=True), Prop("cpu_ms", _N(_SPREAD), required=True),
        Prop("wall_ms", _SPREAD, required=True),
        Prop("statuses", Map(Int(), key_pattern="[a-z_]+", key_hint="a status"),
             required=True),
        Prop("main", Int(description="which run (from 0) the result is: the median's"),
             required=True)), description="only when repeat was given")),
    Prop("rerun", Obj("Rerun", (
        Prop("first", Obj("FirstRun", (
            Prop("status", _STATUS, required=True), Prop("cpu_ms", _N(Num()), required=True),
            Prop("wall_ms", Num(), required=True), Prop("cpus", _N(Str()), required=True),
            Prop("host_load", _N(Num()), required=True),
            Prop("dedicated_cpu", Bool(), required=True))), required=True),),
        description="only when rerun_near_limit ran it again: the first run's figures")),
)
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


def _by_path(values: Schema, description: str) -> Map:
    return Map(values, key_pattern="/.*", key_hint="an absolute path", description=description)


_COPIED = (
    Prop("files", _by_path(Str(max_len=1 << 40, allow_nul=True),
                           "copy_out's files, encoded as output_encoding says (only when "
                           "copy_out was given)")),
    Prop("file_ids", _by_path(Obj("CachedFileRef", (Prop("id", Str(), required=True),
                                                    Prop("size", Int(), required=True))),
                              "copy_out_cached's files as stored in your file cache (only "
                              "when copy_out_cached was given)")),
    Prop("file_errors", _by_path(Str(max_len=1 << 16),
                                 "why a path of copy_out or copy_out_cached was not copied "
                                 "(missing, not a regular file, too large, over a quota); the "
                                 "run's verdict stands (only when either was given)")),
)
RUN_RESULT = Obj("RunResult", (*_FIGURES, Prop("stdout", Str(max_len=1 << 40, allow_nul=True),
                                               required=True),
                               Prop("stderr", Str(max_len=1 << 40, allow_nul=True),
                                    required=True), *_COPIED, *_TIMING))
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


def validate_json(value: Any, schema: Obj) -> dict[str, Any]:
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


def doc_path(path: str) -> str:
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)


def _components(schemas: list[Schema], out: dict[str, Any]) -> None:
    for s in schemas:
        if isinstance(s, Obj):
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
        if r.body is not None:
            used.append(r.body)
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
        paths.setdefault(doc_path(r.path), {})[r.method.lower()] = op
    components: dict[str, Any] = {}
    _components(used, components)
    return {
        "openapi": "3.0.3",
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
