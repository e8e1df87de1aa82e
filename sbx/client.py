"""The Python client of sandboxd's REST API v1: `Client` (asyncio, aiohttp) and `SyncClient`.

    async with Client("http://127.0.0.1:8643", token) as c:
        result = await c.run("busybox:latest", ["echo", "hi"], limits={"wall_ms": 2000})
        async for event in c.run_stream("busybox:latest", ["sh", "-c", "echo a; echo b >&2"]):
            ...  # Output(stream, data) as output arrives, then Exit(result)
        async for event in c.build(tar_directory("app"), tags=["app:1"]):  # sbx.contexttar
            ...  # BuildStep, BuildOutput, StepDone, BuildWarning as the build goes, then Built
        # Compile once, run every case from the file cache:
        built = await c.run("gcc:13", ["gcc", "-o", "/tmp/a", "/tmp/a.c"], files=[...],
                            copy_out_cached=["/tmp/a"])
        binary = FromCache("/a", built.file_ids["/tmp/a"]["id"], 0o755)
        case = await c.run("gcc:13", ["/a"], files=[binary], stdin="1 2\n")
        # Every case at once, results as they finish (a bad case: ApiError, nothing ran):
        async for event in c.batch("gcc:13", [Case("t1", stdin="1 2\n"), Case("t2", stdin="3 4\n")],
                                   ["/a"], files=[binary], policy="judge"):
            ...  # CaseDone(index, id, result or error) per case, then BatchSummary

Every error the service reports (and every failure to reach it) is raised as `ApiError`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal as signals
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypedDict, TypeVar, Unpack
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

Json = dict[str, Any]
T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8643"
# One NDJSON line or SSE event; output arrives in chunks far below this, and the largest
# event, the exit, holds at most the service's 64 MiB of copy_out files (base64: 86 MiB), so
# a longer line means a broken or hostile peer rather than a big run.
MAX_EVENT_BYTES = 128 << 20
MAX_ERROR_BODY = 1 << 20
COPY_CHUNK = 256 << 10


class ApiError(Exception):
    """The service refused a request or could not be reached (status 0).

    code is the service's snake_case error code ("unreachable" and "timeout" for transport
    failures, "http_<status>" when the body was not the contract's JSON error); field is
    the JSON path of the field to blame, when one is.
    """

    def __init__(self, status: int, code: str, message: str, field: str | None = None, *,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.message} (field: {self.field})" if self.field else self.message

    def __repr__(self) -> str:
        return (f"ApiError({self.status!r}, {self.code!r}, {self.message!r}, {self.field!r})")


class BuildError(ApiError):
    """A build that failed once begun (its stream's error event); step and line are the
    build step and the Dockerfile line to blame, when the service names them."""

    def __init__(self, code: str, message: str, *, step: int | None = None,
                 line: int | None = None) -> None:
        super().__init__(0, code, message)
        self.step = step
        self.line = line


@dataclass(frozen=True, slots=True)
class File:
    """A file placed in the container before the command starts."""

    path: str
    content: bytes | str
    mode: int = 0o644

    def to_json(self) -> Json:
        if isinstance(self.content, bytes):
            return {"path": self.path, "mode": self.mode,
                    "content_base64": base64.b64encode(self.content).decode()}
        return {"path": self.path, "mode": self.mode, "content": self.content}


@dataclass(frozen=True, slots=True)
class FromCache:
    """A file of the caller's file cache (put_cached_file's id) placed in the container
    before the command starts."""

    path: str
    file_id: str
    mode: int = 0o644

    def to_json(self) -> Json:
        return {"path": self.path, "mode": self.mode, "file_id": self.file_id}


class RunOptions(TypedDict, total=False):
    """What a run or an exec may carry besides the image and the command."""

    env: Mapping[str, str]
    cwd: str
    user: str
    stdin: str | bytes  # bytes travel as stdin_base64
    files: Sequence[File | FromCache]
    limits: Mapping[str, int]
    binary: bool  # output as exact bytes (output_encoding "base64") instead of UTF-8 text
    copy_out: Sequence[str]  # files to bring back in the result's `files`
    copy_out_cached: Sequence[str]  # files to store in the file cache: the result's `file_ids`
    tty: bool  # a terminal in the container is the command's stdin, stdout and stderr
    tty_size: tuple[int, int]  # (rows, cols) of that terminal (default 24 x 80)


@dataclass(frozen=True, slots=True)
class RunResult:
    """A run's verdict and figures; raw keeps the whole JSON object as the service sent it.
    files, file_ids and file_errors answer copy_out and copy_out_cached: the files' contents
    (bytes when the run asked for binary output), {"id", "size"} of those stored in the file
    cache, and why a path was not copied."""

    id: str
    status: str
    exit_code: int | None
    signal: int | None
    stdout: str | bytes
    stderr: str | bytes
    stdout_truncated: bool
    stderr_truncated: bool
    cpu_ms: float | None
    wall_ms: float | None
    memory_peak_bytes: int | None
    setup_ms: float | None
    pool_hit: bool | None
    warnings: list[str]
    raw: Json = field(repr=False)
    files: dict[str, str | bytes] = field(default_factory=dict)
    file_ids: dict[str, Json] = field(default_factory=dict)
    file_errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Json, *, binary: bool) -> RunResult:
        status = obj.get("status")
        if not isinstance(status, str):
            raise ApiError(0, "bad_response",
                           f"the service sent a run result without a status: {_clip(obj)}")
        return cls(
            id=str(obj.get("id", "")), status=status, exit_code=obj.get("exit_code"),
            signal=_signal_number(obj.get("signal")),
            stdout=_decode_output(obj.get("stdout", ""), binary),
            stderr=_decode_output(obj.get("stderr", ""), binary),
            stdout_truncated=bool(obj.get("stdout_truncated")),
            stderr_truncated=bool(obj.get("stderr_truncated")),
            cpu_ms=obj.get("cpu_ms"), wall_ms=obj.get("wall_ms"),
            memory_peak_bytes=obj.get("memory_peak_bytes"), setup_ms=obj.get("setup_ms"),
            pool_hit=obj.get("pool_hit"), warnings=list(obj.get("warnings") or []), raw=obj,
            files={str(k): _decode_output(v, binary) for k, v in _object(obj, "files").items()},
            file_ids={str(k): v for k, v in _object(obj, "file_ids").items()
                      if isinstance(v, dict)},
            file_errors={str(k): str(v) for k, v in _object(obj, "file_errors").items()})


def _object(obj: Json, key: str) -> Json:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(0, "bad_response", f"the service sent {key} that is not a JSON object: "
                       f"{_clip(value)}")
    return value


@dataclass(frozen=True, slots=True)
class Output:
    """A piece of the command's output, as it arrived."""

    stream: str  # "stdout" or "stderr"
    data: str | bytes  # bytes when the run asked for binary output


@dataclass(frozen=True, slots=True)
class Exit:
    """The last event of a streamed run (stdout and stderr are empty: they were streamed)."""

    result: RunResult


RunEvent = Output | Exit


@dataclass(frozen=True, slots=True)
class PullProgress:
    layer: str
    status: str
    done: int
    total: int | None


@dataclass(frozen=True, slots=True)
class Pulled:
    """The last event of a streamed pull: the image, as the plain pull returns it."""

    image: Json


@dataclass(frozen=True, slots=True)
class BuildStep:
    """A build step begins: `Step step/steps : instruction` (steps count across the stages
    the target needs, FROM included); line is the instruction's line in the Dockerfile."""

    step: int
    steps: int
    stage: str | None
    line: int
    instruction: str


@dataclass(frozen=True, slots=True)
class BuildOutput:
    """A piece of what a step's command wrote, as it arrived (text; invalid UTF-8 replaced)."""

    step: int
    stream: str  # "stdout" or "stderr"
    data: str


@dataclass(frozen=True, slots=True)
class StepDone:
    """A step ended: from the cache or run; layer is None when it changed only the config."""

    step: int
    cached: bool
    layer: str | None
    seconds: float


@dataclass(frozen=True, slots=True)
class BuildWarning:
    message: str


@dataclass(frozen=True, slots=True)
class Built:
    """The last event of a build that succeeded; config_digest is the image id."""

    digest: str
    config_digest: str
    names: tuple[str, ...]


BuildEvent = BuildStep | BuildOutput | StepDone | BuildWarning | Built
BuildContext = bytes | BinaryIO | AsyncIterable[bytes]


@dataclass(frozen=True, slots=True)
class FileData:
    """What GET /files returned: a file's bytes, or a tar of a directory."""

    data: bytes
    is_tar: bool


@dataclass(frozen=True, slots=True)
class Case:
    """One case of a batch: its fields over the batch's (files merged by path, env and
    limits key by key, cmd replaced); id is given back in its event."""

    id: str | None = None
    stdin: str | bytes | None = None  # bytes travel as stdin_base64
    files: Sequence[File | FromCache] = ()
    limits: Mapping[str, int] | None = None
    cmd: Sequence[str] | None = None
    env: Mapping[str, str] | None = None

    def to_json(self) -> Json:
        body: Json = {}
        if self.id is not None:
            body["id"] = self.id
        if isinstance(self.stdin, bytes):
            body["stdin_base64"] = base64.b64encode(self.stdin).decode()
        elif self.stdin is not None:
            body["stdin"] = self.stdin
        if self.files:
            body["files"] = [f.to_json() for f in self.files]
        for key, value in (("limits", self.limits), ("env", self.env)):
            if value is not None:
                body[key] = dict(value)
        if self.cmd is not None:
            body["cmd"] = list(self.cmd)
        return body


@dataclass(frozen=True, slots=True)
class CaseDone:
    """A batch's case finished: its result, or (error) why it could not run; elapsed_ms is
    its time in the service (its wait for a run slot included)."""

    index: int
    id: str | None
    result: RunResult | None
    error: ApiError | None
    elapsed_ms: float | None
    raw: Json = field(repr=False)


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """The last event of a batch: cases = ran + errors + skipped; stopped when some were
    never started (stop_on_failure, or the service stopping)."""

    cases: int
    ran: int
    errors: int
    skipped: int
    by_status: dict[str, int]
    wall_ms: float
    stopped: bool
    raw: Json = field(repr=False)


BatchEvent = CaseDone | BatchSummary


def _clip(obj: object, limit: int = 200) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "…"


def _signal_number(value: object) -> int | None:
    if isinstance(value, int) or value is None:
        return value
    if isinstance(value, str):
        try:
            return int(signals.Signals[value if value.startswith("SIG") else "SIG" + value])
        except KeyError:
            return None
    return None


def _decode_output(data: object, binary: bool) -> str | bytes:
    if not isinstance(data, str):
        raise ApiError(0, "bad_response", f"the service sent output that is not a string: "
                       f"{_clip(data)}")
    if not binary:
        return data
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as e:
        raise ApiError(0, "bad_response", f"the service sent output that is not base64 "
                       f"({e}): {_clip(data)}") from None


def _parse_json(raw: bytes, what: str) -> Json:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(0, "bad_response", f"the service sent {what} that is not JSON ({e}): "
                       f"{_clip(raw)}") from None
    if not isinstance(obj, dict):
        raise ApiError(0, "bad_response", f"the service sent {what} that is not a JSON "
                       f"object: {_clip(obj)}")
    return obj


def _error_from_json(status: int, body: Json) -> ApiError:
    err = body.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return ApiError(status, str(err.get("code") or f"http_{status}"), err["message"],
                        err.get("field") if isinstance(err.get("field"), str) else None)
    return ApiError(status, f"http_{status}", f"HTTP {status}: {_clip(body)}")


class NdjsonDecoder:
    """Splits a byte stream into JSON objects, one per line, whatever the chunking."""

    def __init__(self, max_line: int = MAX_EVENT_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_line

    def feed(self, chunk: bytes) -> list[Json]:
        self._buf += chunk
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        if len(self._buf) > self._max:
            raise ApiError(0, "bad_response", f"an event line of the stream exceeds "
                           f"{self._max} bytes; the service or a proxy is broken")
        return [_parse_json(bytes(line), "a stream line") for line in lines if line.strip()]

    def close(self) -> list[Json]:
        """The last line, when the stream did not end with a newline."""
        rest, self._buf = bytes(self._buf), bytearray()
        return [_parse_json(rest, "a stream line")] if rest.strip() else []


class SseDecoder:
    """Server-sent events (the WHATWG parsing rules) into contract events: the event name
    becomes "event", the JSON in data its other fields."""

    def __init__(self, max_event: int = MAX_EVENT_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_event
        self._after_cr = False  # a CR ended the last chunk: a LF next belongs to it
        self._event = ""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[Json]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = False
        self._buf += chunk
        out: list[Json] = []
        start = 0
        buf = self._buf
        while True:
            ends = [i for i in (buf.find(b"\r", start), buf.find(b"\n", start)) if i >= 0]
            if not ends:
                break
            end = min(ends)
            line = bytes(buf[start:end])
            if buf[end] == 0x0D:  # \r\n is one line ending, but the \n may be in the next chunk
                if end + 1 == len(buf):
                    self._after_cr = True
                elif buf[end + 1] == 0x0A:
                    end += 1
            start = end + 1
            event = self._line(line)
            if event is not None:
                out.append(event)
        del buf[:start]
        if len(buf) + self._size > self._max:
            raise ApiError(0, "bad_response", f"an event of the stream exceeds {self._max} "
                           "bytes; the service or a proxy is broken")
        return out

    def _line(self, line: bytes) -> Json | None:
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"data":
            self._data.append(value)
            self._size += len(value)
        return None

    def _dispatch(self) -> Json | None:
        event, data = self._event or "message", self._data
        self._event, self._data, self._size = "", [], 0
        if not data:
            return None
        obj = _parse_json(b"\n".join(data), f"the data of an SSE {event!r} event")
        return {**obj, "event": event}

    def close(self) -> list[Json]:
        return []  # an event without its blank line is incomplete: the spec drops it


async def _read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[Json]:
    sse = resp.content_type == "text/event-stream"
    decoder: NdjsonDecoder | SseDecoder = SseDecoder() if sse else NdjsonDecoder()
    async for chunk in resp.content.iter_any():
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.close():
        yield event


def _stream_error(event: Json) -> ApiError:
    err = event.get("error")
    body = {"error": err} if isinstance(err, dict) else {"error": event}
    return _error_from_json(0, body)


def _run_event(event: Json, binary: bool) -> RunEvent | None:
    kind = event.get("event")
    if kind in ("stdout", "stderr"):
        return Output(str(kind), _decode_output(event.get("data", ""), binary))
    if kind == "exit":
        return Exit(RunResult.from_json(event, binary=binary))
    if kind == "error":
        raise _stream_error(event)
    return None  # an event this client does not know yet (a newer service)


def _batch_event(event: Json, binary: bool) -> BatchEvent | None:
    kind = event.get("event")
    if kind == "case":
        case_id, result, took = event.get("id"), event.get("result"), event.get("elapsed_ms")
        return CaseDone(_int(event.get("index")), case_id if isinstance(case_id, str) else None,
                        RunResult.from_json(result, binary=binary)
                        if isinstance(result, dict) else None,
                        None if isinstance(result, dict) else _stream_error(event),
                        float(took) if isinstance(took, int | float) else None, event)
    if kind == "summary":
        wall = event.get("wall_ms")
        return BatchSummary(_int(event.get("cases")), _int(event.get("ran")),
                            _int(event.get("errors")), _int(event.get("skipped")),
                            {str(k): _int(v) for k, v in _object(event, "by_status").items()},
                            float(wall) if isinstance(wall, int | float) else 0.0,
                            event.get("stopped") is True, event)
    if kind == "error":
        raise _stream_error(event)
    return None  # an event this client does not know yet (a newer service)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _build_event(event: Json) -> BuildEvent | None:
    kind = event.get("event")
    if kind == "step":
        stage = event.get("stage")
        return BuildStep(_int(event.get("step")), _int(event.get("steps")),
                         stage if isinstance(stage, str) else None, _int(event.get("line")),
                         str(event.get("instruction", "")))
    if kind in ("stdout", "stderr"):
        return BuildOutput(_int(event.get("step")), str(kind), str(event.get("data", "")))
    if kind == "step_done":
        layer, seconds = event.get("layer"), event.get("seconds")
        return StepDone(_int(event.get("step")), event.get("cached") is True,
                        layer if isinstance(layer, str) else None,
                        float(seconds) if isinstance(seconds, int | float) else 0.0)
    if kind == "warning":
        return BuildWarning(str(event.get("message", "")))
    if kind == "image":
        names = event.get("names")
        return Built(str(event.get("digest", "")), str(event.get("config_digest", "")),
                     tuple(str(n) for n in names) if isinstance(names, list) else ())
    if kind == "error":
        err = _stream_error(event)
        where = event.get("error") if isinstance(event.get("error"), dict) else event
        raise BuildError(err.code, err.message, step=_int(where.get("step")) or None,
                         line=_int(where.get("line")) or None)
    return None  # an event this client does not know yet (a newer service)


def _build_query(tags: Sequence[str], dockerfile: str | None,
                 build_args: Mapping[str, str] | None, target: str | None, no_cache: bool,
                 platform: str | None) -> list[tuple[str, str]]:
    query = [("tag", tag) for tag in tags]
    query += [("build_arg", f"{key}={value}") for key, value in (build_args or {}).items()]
    given = {"dockerfile": dockerfile, "target": target, "platform": platform}
    query += [(key, value) for key, value in given.items() if value is not None]
    return query + ([("no_cache", "true")] if no_cache else [])


async def _context_chunks(context: BuildContext,
                          failure: list[BaseException]) -> AsyncGenerator[bytes, None]:
    """The request body: the context's bytes as they come. What reading it raised is kept
    in `failure`: aiohttp only reports the request as broken."""
    try:
        if isinstance(context, bytes):
            yield context
        elif isinstance(context, AsyncIterable):
            async for chunk in context:
                yield chunk
        else:
            while chunk := await asyncio.to_thread(context.read, COPY_CHUNK):
                yield chunk
    except Exception as e:
        failure.append(e)
        raise


def _run_body(cmd: Sequence[str] | None, options: RunOptions) -> Json:
    body: Json = {}
    if cmd is not None:
        body["cmd"] = list(cmd)
    for key in ("cwd", "user"):
        if key in options:
            body[key] = options[key]  # type: ignore[literal-required]
    if "env" in options:
        body["env"] = dict(options["env"])
    if "limits" in options:
        body["limits"] = dict(options["limits"])
    if "files" in options:
        body["files"] = [f.to_json() for f in options["files"]]
    stdin = options.get("stdin")
    if isinstance(stdin, bytes):
        body["stdin_base64"] = base64.b64encode(stdin).decode()
    elif stdin is not None:
        body["stdin"] = stdin
    if options.get("binary"):
        body["output_encoding"] = "base64"
    for key in ("copy_out", "copy_out_cached"):
        if key in options:
            body[key] = list(options[key])  # type: ignore[literal-required]
    if options.get("tty"):
        body["tty"] = True
        if "tty_size" in options:
            rows, cols = options["tty_size"]
            body["tty_size"] = {"rows": rows, "cols": cols}
    return body


def _image_body(image: str, policy: str | None, network: str | None,
                platform: str | None) -> Json:
    given = {"policy": policy, "network": network, "platform": platform}
    return {"image": image} | {k: v for k, v in given.items() if v is not None}


def _seg(value: str) -> str:
    """One path segment: a reference's slashes, colons and @ must not split the path."""
    return quote(value, safe="")


class Client:
    """An asyncio client of one sandboxd service. Use it as an async context manager, or
    call close(). timeout bounds each plain request (None: no bound; a plain run lasts as
    long as its wall limit); streams and WebSockets have only the connect timeout."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float | None = 600.0, connect_timeout: float = 10.0) -> None:
        url = url or os.environ.get("SANDBOXD_URL") or DEFAULT_URL
        base = URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"the service URL {url!r} is not an http(s) URL with a host; "
                             f"give one like {DEFAULT_URL}")
        self.url = str(base).rstrip("/")
        self.token = token if token is not None else os.environ.get("SANDBOXD_TOKEN") or None
        self._plain = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._streaming = aiohttp.ClientTimeout(total=None, connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers, json_serialize=_dumps,
                                                  timeout=self._streaming)
        return self._session

    def _url(self, path: str) -> URL:
        return URL(self.url + path, encoded=True)

    @asynccontextmanager
    async def _open(self, method: str, path: str, *, body: Json | None = None,
                    data: Any = None,
                    params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
                    headers: Mapping[str, str] | None = None,
                    stream: bool = False) -> AsyncIterator[aiohttp.ClientResponse]:
        hdrs = dict(headers or {})
        if body is not None:
            data = orjson.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        try:
            async with self._http().request(
                    method, self._url(path), data=data, params=params, headers=hdrs,
                    timeout=self._streaming if stream else self._plain) as resp:
                if resp.status >= 400:
                    raise await _error_of(resp)
                yield resp
        except aiohttp.ClientConnectorError as e:
            raise _unreachable(self.url, e) from None
        except TimeoutError:  # before ClientError: aiohttp's timeouts are both
            raise ApiError(0, "timeout", f"sandboxd at {self.url} did not answer {method} "
                           f"{path} in time; raise the client's timeout or check the "
                           "service") from None
        except aiohttp.ClientError as e:
            raise _broken(self.url, e) from None

    async def _json(self, method: str, path: str, **kw: Any) -> Json:
        async with self._open(method, path, **kw) as resp:
            raw = await resp.read()
        return _parse_json(raw, f"an answer to {method} {path}") if raw.strip() else {}

    async def _events(self, path: str, body: Json, sse: bool) -> AsyncIterator[Json]:
        accept = "text/event-stream" if sse else "application/x-ndjson"
        async with self._open("POST", path, body=body, headers={"Accept": accept},
                              stream=True) as resp:
            if resp.content_type not in ("text/event-stream", "application/x-ndjson"):
                # A service that ignored Accept sent the whole result at once.
                yield {**_parse_json(await resp.read(), "a result"), "event": "exit"}
                return
            async for event in _read_events(resp):
                yield event

    async def _run_events(self, path: str, body: Json, sse: bool,
                          binary: bool) -> AsyncIterator[RunEvent]:
        async for raw in self._events(path, body, sse):
            event = _run_event(raw, binary)
            if event is not None:
                yield event
                if isinstance(event, Exit):
                    return
        raise ApiError(0, "stream_ended", "the service closed the stream before the run's "
                       "exit event; see the service's log")

    # Runs

    async def run(self, image: str, cmd: Sequence[str] | None = None, *,
                  policy: str | None = None, network: str | None = None,
                  platform: str | None = None, **options: Unpack[RunOptions]) -> RunResult:
        body = _image_body(image, policy, network, platform) | _run_body(cmd, options)
        return RunResult.from_json(await self._json("POST", "/v1/runs", body=body),
                                   binary=bool(options.get("binary")))

    def run_stream(self, image: str, cmd: Sequence[str] | None = None, *,
                   policy: str | None = None, network: str | None = None,
                   platform: str | None = None, sse: bool = False,
                   **options: Unpack[RunOptions]) -> AsyncIterator[RunEvent]:
        """Output events as the output arrives, then one Exit; an error the service reports
        mid-stream is raised as ApiError. sse=True asks for text/event-stream."""
        body = _image_body(image, policy, network, platform) | _run_body(cmd, options)
        return self._run_events("/v1/runs", body, sse, bool(options.get("binary")))

    def batch(self, image: str, cases: Sequence[Case], cmd: Sequence[str] | None = None, *,
              policy: str | None = None, network: str | None = None,
              platform: str | None = None, parallelism: int | None = None,
              stop_on_failure: bool = False,
              **options: Unpack[RunOptions]) -> AsyncIterator[BatchEvent]:
        """Run `cmd` once per case (POST /v1/batches): a CaseDone per case in the order they
        finish, then a BatchSummary. `options` are the batch's shared part (files, limits,
        env, ...; stdin belongs to the cases). A bad case is an ApiError before any runs."""
        body = _image_body(image, policy, network, platform) | _run_body(cmd, options)
        body["cases"] = [c.to_json() for c in cases]
        if parallelism is not None:
            body["parallelism"] = parallelism
        if stop_on_failure:
            body["stop_on_failure"] = True
        return self.batch_body(body)

    async def batch_body(self, body: Json) -> AsyncIterator[BatchEvent]:
        """batch() from a whole request body, as POST /v1/batches takes it (JSON)."""
        binary = body.get("output_encoding") == "base64"
        async for raw in self._events("/v1/batches", body, False):
            event = _batch_event(raw, binary)
            if event is not None:
                yield event
                if isinstance(event, BatchSummary):
                    return
        raise ApiError(0, "stream_ended", "the service closed the stream before the batch's "
                       "summary; see the service's log")

    # Sessions

    async def create_container(self, image: str, *, policy: str | None = None,
                               network: str | None = None, platform: str | None = None,
                               limits: Mapping[str, int] | None = None) -> Json:
        body = _image_body(image, policy, network, platform)
        if limits is not None:
            body["limits"] = dict(limits)
        return await self._json("POST", "/v1/containers", body=body)

    async def commit_container(self, container_id: str, reference: str, *,
                               changes: Sequence[str] = (), message: str | None = None,
                               author: str | None = None) -> Json:
        """`docker commit`: a new image named `reference` of what the container changed;
        `changes` are Dockerfile instructions (CMD, ENV, ...) for its config."""
        body: Json = {"reference": reference}
        if changes:
            body["changes"] = list(changes)
        if message is not None:
            body["message"] = message
        if author is not None:
            body["author"] = author
        return await self._json("POST", f"/v1/containers/{_seg(container_id)}/commit",
                                body=body)

    async def list_containers(self) -> list[Json]:
        return list((await self._json("GET", "/v1/containers")).get("containers", []))

    async def get_container(self, container_id: str) -> Json:
        return await self._json("GET", f"/v1/containers/{_seg(container_id)}")

    async def delete_container(self, container_id: str) -> None:
        async with self._open("DELETE", f"/v1/containers/{_seg(container_id)}"):
            pass

    async def exec(self, container_id: str, cmd: Sequence[str] | None = None,
                   **options: Unpack[RunOptions]) -> RunResult:
        body = _run_body(cmd, options)
        path = f"/v1/containers/{_seg(container_id)}/exec"
        return RunResult.from_json(await self._json("POST", path, body=body),
                                   binary=bool(options.get("binary")))

    def exec_stream(self, container_id: str, cmd: Sequence[str] | None = None, *,
                    sse: bool = False, **options: Unpack[RunOptions]) -> AsyncIterator[RunEvent]:
        path = f"/v1/containers/{_seg(container_id)}/exec"
        return self._run_events(path, _run_body(cmd, options), sse, bool(options.get("binary")))

    async def put_file(self, container_id: str, path: str, data: bytes | BinaryIO, *,
                       mode: int | None = None) -> None:
        params = {"path": path} | ({"mode": f"{mode:04o}"} if mode is not None else {})
        async with self._open("PUT", f"/v1/containers/{_seg(container_id)}/files", data=data,
                              params=params,
                              headers={"Content-Type": "application/octet-stream"}):
            pass

    async def get_file(self, container_id: str, path: str) -> FileData:
        """A file's bytes or a directory's tar, in memory (copy_out streams it instead)."""
        buf = io.BytesIO()
        is_tar = await self.copy_out(container_id, path, buf.write)
        return FileData(buf.getvalue(), is_tar)

    async def copy_out(self, container_id: str, path: str,
                       sink: Callable[[bytes], object]) -> bool:
        """Stream a file's bytes, or a directory's tar, into `sink` as they arrive; True
        when it is a tar. A copy the service cut short (the path changed while it was read,
        or went over a copy-out cap) raises ApiError "incomplete", whatever `sink` got."""
        async with self._open("GET", f"/v1/containers/{_seg(container_id)}/files",
                              params={"path": path}, stream=True) as resp:
            try:
                async for chunk in resp.content.iter_chunked(COPY_CHUNK):
                    sink(chunk)
            except aiohttp.ClientPayloadError:
                raise ApiError(0, "incomplete", f"the copy of {path} out of container "
                               f"{container_id} stopped partway: the service cut it short "
                               "(the path changed while it was read, or it went over a "
                               "copy-out cap; the service's log says which). Copy it again, "
                               "or a smaller part of it") from None
            return resp.content_type == "application/x-tar"

    # File cache

    async def put_cached_file(self, data: bytes | BinaryIO | os.PathLike[str]) -> Json:
        """Store a file in the caller's file cache, sent as it is read: {"id": "sha256:…",
        "size", "created", "last_used", "expires"}. The same bytes give the same id (storing
        them again only moves the expiry on); runs take it as FromCache(path, id)."""
        headers = {"Content-Type": "application/octet-stream"}
        if isinstance(data, os.PathLike):
            with Path(data).open("rb") as f:
                return await self._json("POST", "/v1/files", data=f, headers=headers)
        return await self._json("POST", "/v1/files", data=data, headers=headers)

    async def list_cached_files(self) -> list[Json]:
        return list((await self._json("GET", "/v1/files")).get("files", []))

    async def get_cached_file(self, file_id: str) -> bytes:
        """A cached file's bytes, in memory (download_cached_file streams them instead)."""
        buf = io.BytesIO()
        await self.download_cached_file(file_id, buf.write)
        return buf.getvalue()

    async def download_cached_file(self, file_id: str,
                                   sink: Callable[[bytes], object]) -> int:
        """Stream a cached file's bytes into `sink` as they arrive; returns their number. A
        download the service cut short raises ApiError "incomplete"."""
        size = 0
        async with self._open("GET", f"/v1/files/{_seg(file_id)}", stream=True) as resp:
            try:
                async for chunk in resp.content.iter_chunked(COPY_CHUNK):
                    sink(chunk)
                    size += len(chunk)
            except aiohttp.ClientPayloadError:
                raise ApiError(0, "incomplete", f"the download of {file_id} stopped partway "
                               "(the service's log says why); download it again") from None
        return size

    async def delete_cached_file(self, file_id: str) -> None:
        async with self._open("DELETE", f"/v1/files/{_seg(file_id)}"):
            pass

    # Jobs

    async def submit_job(self, body: Json, *, callback_url: str | None = None,
                         idempotency_key: str | None = None) -> Json:
        """Submit a job (POST /v1/jobs): `body` is {"run": ...} or {"batch": ...}, as that
        endpoint takes it. The job as queued: {"id", "status", ...}. The same
        idempotency_key and body again give the same job (safe to retry)."""
        if callback_url is not None:
            body = {**body, "callback_url": callback_url}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return await self._json("POST", "/v1/jobs", body=body, headers=headers)

    async def get_job(self, job_id: str) -> Json:
        return await self._json("GET", f"/v1/jobs/{_seg(job_id)}")

    async def list_jobs(self, status: str | None = None, limit: int | None = None
                        ) -> list[Json]:
        params = {k: str(v) for k, v in (("status", status), ("limit", limit)) if v is not None}
        return list((await self._json("GET", "/v1/jobs", params=params)).get("jobs", []))

    async def cancel_job(self, job_id: str) -> Json:
        return await self._json("POST", f"/v1/jobs/{_seg(job_id)}/cancel")

    async def delete_job(self, job_id: str) -> None:
        async with self._open("DELETE", f"/v1/jobs/{_seg(job_id)}"):
            pass

    async def job_events(self, job_id: str, after: int = 0) -> AsyncIterator[Json]:
        """The job's events (SSE) after number `after`, then the new ones until it ends:
        {"event": "status"|"result"|"case"|"summary"|"error", ...}."""
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
        async with self._open("GET", f"/v1/jobs/{_seg(job_id)}/events", headers=headers,
                              stream=True) as resp:
            async for event in _read_events(resp):
                yield event

    async def wait_job(self, job_id: str) -> Json:
        """The job once it has ended (its events followed until then)."""
        while True:
            async for _ in self.job_events(job_id):
                pass
            job = await self.get_job(job_id)
            if job.get("status") not in ("queued", "running"):
                return job

    async def job_secret(self, *, rotate: bool = False) -> str:
        """The key your jobs' callbacks are signed with (rotate: a new one from now on)."""
        answer = await self._json("POST" if rotate else "GET", "/v1/jobs/secret")
        return str(answer.get("secret", ""))

    # Interactive (WebSocket)

    @asynccontextmanager
    async def interactive(self, image: str | None = None, cmd: Sequence[str] | None = None, *,
                          container: str | None = None, policy: str | None = None,
                          network: str | None = None, platform: str | None = None,
                          **options: Unpack[RunOptions]) -> AsyncIterator[Interactive]:
        """A run (image) or an exec (container) whose stdin is fed as it goes."""
        if (image is None) == (container is None):
            raise ValueError("interactive() takes an image (a run) or a container (an exec)")
        if image is not None:
            path, body = "/v1/runs/ws", _image_body(image, policy, network, platform)
        else:
            path, body = f"/v1/containers/{_seg(str(container))}/exec/ws", {}
        body |= _run_body(cmd, options)
        try:
            ws = await self._http().ws_connect(self._url(path), timeout=aiohttp.ClientWSTimeout(
                ws_receive=None, ws_close=10.0), max_msg_size=MAX_EVENT_BYTES)
        except aiohttp.WSServerHandshakeError as e:
            raise ApiError(e.status, f"http_{e.status}", f"the service refused the WebSocket "
                           f"for {path}: HTTP {e.status} {e.message}") from None
        except aiohttp.ClientConnectorError as e:
            raise _unreachable(self.url, e) from None
        except aiohttp.ClientError as e:
            raise _broken(self.url, e) from None
        async with ws:
            await ws.send_str(_dumps(body))
            yield Interactive(ws, bool(options.get("binary")))

    # Images

    async def pull(self, reference: str, *, platform: str | None = None) -> Json:
        return await self._json("POST", "/v1/images/pull", body=_pull_body(reference, platform))

    async def pull_stream(self, reference: str, *,
                          platform: str | None = None) -> AsyncIterator[PullProgress | Pulled]:
        """Progress per layer, then Pulled; an error mid-pull is raised as ApiError."""
        async for event in self._events("/v1/images/pull", _pull_body(reference, platform),
                                        sse=False):
            kind = event.get("event")
            if kind == "progress":
                total = event.get("total")
                yield PullProgress(str(event.get("layer", "")), str(event.get("status", "")),
                                   int(event.get("done") or 0),
                                   int(total) if isinstance(total, int) else None)
            elif kind in ("done", "exit"):
                yield Pulled({k: v for k, v in event.items() if k != "event"})
                return
            elif kind == "error":
                raise _stream_error(event)
        raise ApiError(0, "stream_ended", "the service closed the pull's stream before it "
                       "finished; see the service's log")

    async def images(self) -> list[Json]:
        return list((await self._json("GET", "/v1/images")).get("images", []))

    async def inspect_image(self, reference: str) -> Json:
        return await self._json("GET", f"/v1/images/{_seg(reference)}")

    async def tag_image(self, source: str, target: str) -> str:
        answer = await self._json("POST", "/v1/images/tag",
                                  body={"source": source, "target": target})
        return str(answer.get("name", target))

    async def push_image(self, source: str, target: str | None = None) -> str:
        body = {"source": source} | ({"target": target} if target is not None else {})
        return str((await self._json("POST", "/v1/images/push", body=body)).get("digest", ""))

    async def import_image(self, tar: bytes | BinaryIO | os.PathLike[str],
                           reference: str) -> Json:
        """Import a root-filesystem tar (plain, gzip or zstd) as reference."""
        headers = {"Content-Type": "application/x-tar"}
        if isinstance(tar, os.PathLike):
            with Path(tar).open("rb") as f:
                return await self._json("POST", "/v1/images/import", data=f,
                                        params={"reference": reference}, headers=headers)
        return await self._json("POST", "/v1/images/import", data=tar,
                                params={"reference": reference}, headers=headers)

    async def remove_image(self, reference: str, *, force: bool = False) -> list[str]:
        params = {"force": "true"} if force else None
        answer = await self._json("DELETE", f"/v1/images/{_seg(reference)}", params=params)
        return [str(n) for n in answer.get("removed", [])]

    async def gc(self, budget_bytes: int | None = None) -> Json:
        body = {"budget_bytes": budget_bytes} if budget_bytes is not None else {}
        return await self._json("POST", "/v1/images/gc", body=body)

    # Builds

    async def build(self, context: BuildContext, *, tags: Sequence[str] = (),
                    dockerfile: str | None = None, build_args: Mapping[str, str] | None = None,
                    target: str | None = None, no_cache: bool = False,
                    platform: str | None = None) -> AsyncIterator[BuildEvent]:
        """`docker build`: context is a tar (plain or gzip) of the build context, sent in
        chunks as it is read (sbx.contexttar.tar_directory tars a directory on the fly).
        Yields BuildStep, BuildOutput, StepDone and BuildWarning as the build goes, then
        Built. A refusal before the build (a bad tag, no Dockerfile) raises ApiError; a
        failed build raises BuildError after the events before it; a stream that ends
        without either raises ApiError "stream_ended". An exception from reading `context`
        is raised as it is, and the service never sees the body end."""
        query = _build_query(tags, dockerfile, build_args, target, no_cache, platform)
        failure: list[BaseException] = []
        body = _context_chunks(context, failure)
        headers = {"Content-Type": "application/x-tar", "Accept": "application/x-ndjson"}
        try:
            async with self._open("POST", "/v1/build", data=body, params=query,
                                  headers=headers, stream=True) as resp:
                async for raw in _read_events(resp):
                    event = _build_event(raw)
                    if event is not None:
                        yield event
                        if isinstance(event, Built):
                            return
        except ApiError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            # A body left unfinished (the service answered before the end, the request
            # broke) is closed now, and with it the context (a tar's thread). RuntimeError:
            # aiohttp's cancelled writer is still inside it, and its cancellation closes it.
            with suppress(RuntimeError):
                await body.aclose()
        raise ApiError(0, "stream_ended", "the service closed the build's stream before it "
                       "finished; see the service's log")

    async def prune_build_cache(self) -> Json:
        """Empty the caller's build cache: {"removed": entries, "freed_bytes": bytes}."""
        return await self._json("POST", "/v1/build/prune")

    # System

    async def info(self) -> Json:
        return await self._json("GET", "/v1/info")

    async def health(self) -> Json:
        return await self._json("GET", "/healthz")

    async def ready(self) -> bool:
        try:
            await self._json("GET", "/readyz")
        except ApiError as e:
            if e.status == 503:
                return False
            raise
        return True


def _unreachable(url: str, e: Exception) -> ApiError:
    return ApiError(0, "unreachable", f"cannot reach sandboxd at {url} ({e}); start it "
                    "(sandboxd serve) or point --url / SANDBOXD_URL at it")


def _broken(url: str, e: Exception) -> ApiError:
    return ApiError(0, "disconnected", f"the connection to sandboxd at {url} failed "
                    f"mid-answer ({type(e).__name__}: {e}); see the service's log")


def _pull_body(reference: str, platform: str | None) -> Json:
    return {"reference": reference} | ({"platform": platform} if platform else {})


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


async def _error_of(resp: aiohttp.ClientResponse) -> ApiError:
    retry = resp.headers.get("Retry-After")
    raw = await resp.content.read(MAX_ERROR_BODY)
    try:
        err = _error_from_json(resp.status, _parse_json(raw, "an error"))
    except ApiError:
        text = raw.decode("utf-8", "replace").strip()
        err = ApiError(resp.status, f"http_{resp.status}",
                       f"HTTP {resp.status} {resp.reason or ''}: {_clip(text)}".strip())
    # An HTTP date instead of seconds is rare from this service, and only a hint.
    with suppress(ValueError):
        err.retry_after = float(retry) if retry is not None else None
    return err


class Interactive:
    """One interactive run: feed stdin, send signals, iterate over Output and Exit."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, binary: bool) -> None:
        self._ws = ws
        self._binary = binary
        self.result: RunResult | None = None

    async def send_stdin(self, data: bytes | str) -> None:
        if isinstance(data, bytes):
            await self._send({"type": "stdin", "data_base64": base64.b64encode(data).decode()})
        else:
            await self._send({"type": "stdin", "data": data})

    async def close_stdin(self) -> None:
        """End the input: on a terminal (tty), its end-of-file character (Ctrl-D)."""
        await self._send({"type": "close_stdin"})

    async def send_bytes(self, data: bytes) -> None:
        """Raw input as a binary frame: no JSON, no base64 (a keystroke on a terminal)."""
        if not self._ws.closed:
            await self._ws.send_bytes(data)

    async def resize(self, rows: int, cols: int) -> None:
        """The run's terminal (tty) is now rows x cols: its programs get SIGWINCH."""
        await self._send({"type": "resize", "rows": rows, "cols": cols})

    async def signal(self, name: str = "SIGKILL") -> None:
        await self._send({"type": "signal", "signal": name})

    async def _send(self, message: Json) -> None:
        if not self._ws.closed:  # after the exit the run has nothing left to receive
            await self._ws.send_str(_dumps(message))

    async def __aiter__(self) -> AsyncIterator[RunEvent]:
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                event = _run_event(_parse_json(msg.data.encode(), "a WebSocket message"),
                                   self._binary)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                event = _run_event(_parse_json(msg.data, "a WebSocket message"), self._binary)
            else:
                break
            if event is not None:
                yield event
                if isinstance(event, Exit):
                    self.result = event.result
                    return
        raise ApiError(0, "stream_ended", "the service closed the WebSocket before the run's "
                       "exit event; see the service's log")


class SyncClient:
    """The same API, blocking: an event loop in a private daemon thread runs a Client.
    Streams become ordinary iterators. Use it as a context manager, or call close()."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float | None = 600.0, connect_timeout: float = 10.0) -> None:
        self._client = Client(url, token, timeout=timeout, connect_timeout=connect_timeout)
        self.url = self._client.url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="sandboxd-client", daemon=True)
        self._thread.start()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("this SyncClient is closed; create a new one")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C: the request must not go on in the background
            raise

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> T:
            return await anext(stream)

        try:
            while True:
                try:
                    yield self._call(step())
                except StopAsyncIteration:
                    return
        finally:
            aclose: Callable[[], Awaitable[None]] | None = getattr(stream, "aclose", None)
            if aclose is not None and not self._loop.is_closed():
                self._call(_await(aclose()))

    def run(self, image: str, cmd: Sequence[str] | None = None, *, policy: str | None = None,
            network: str | None = None, **options: Unpack[RunOptions]) -> RunResult:
        return self._call(self._client.run(image, cmd, policy=policy, network=network,
                                           **options))

    def run_stream(self, image: str, cmd: Sequence[str] | None = None, *,
                   policy: str | None = None, network: str | None = None, sse: bool = False,
                   **options: Unpack[RunOptions]) -> Iterator[RunEvent]:
        return self._iterate(self._client.run_stream(image, cmd, policy=policy,
                                                     network=network, sse=sse, **options))

    def batch(self, image: str, cases: Sequence[Case], cmd: Sequence[str] | None = None, *,
              policy: str | None = None, network: str | None = None,
              parallelism: int | None = None, stop_on_failure: bool = False,
              **options: Unpack[RunOptions]) -> Iterator[BatchEvent]:
        return self._iterate(self._client.batch(
            image, cases, cmd, policy=policy, network=network, parallelism=parallelism,
            stop_on_failure=stop_on_failure, **options))

    def batch_body(self, body: Json) -> Iterator[BatchEvent]:
        return self._iterate(self._client.batch_body(body))

    def create_container(self, image: str, *, policy: str | None = None,
                         network: str | None = None,
                         limits: Mapping[str, int] | None = None) -> Json:
        return self._call(self._client.create_container(image, policy=policy, network=network,
                                                        limits=limits))

    def list_containers(self) -> list[Json]:
        return self._call(self._client.list_containers())

    def get_container(self, container_id: str) -> Json:
        return self._call(self._client.get_container(container_id))

    def delete_container(self, container_id: str) -> None:
        self._call(self._client.delete_container(container_id))

    def exec(self, container_id: str, cmd: Sequence[str] | None = None,
             **options: Unpack[RunOptions]) -> RunResult:
        return self._call(self._client.exec(container_id, cmd, **options))

    def exec_stream(self, container_id: str, cmd: Sequence[str] | None = None, *,
                    sse: bool = False, **options: Unpack[RunOptions]) -> Iterator[RunEvent]:
        return self._iterate(self._client.exec_stream(container_id, cmd, sse=sse, **options))

    def put_file(self, container_id: str, path: str, data: bytes | BinaryIO, *,
                 mode: int | None = None) -> None:
        self._call(self._client.put_file(container_id, path, data, mode=mode))

    def get_file(self, container_id: str, path: str) -> FileData:
        return self._call(self._client.get_file(container_id, path))

    def copy_out(self, container_id: str, path: str, sink: Callable[[bytes], object]) -> bool:
        return self._call(self._client.copy_out(container_id, path, sink))

    def put_cached_file(self, data: bytes | BinaryIO | os.PathLike[str]) -> Json:
        return self._call(self._client.put_cached_file(data))

    def list_cached_files(self) -> list[Json]:
        return self._call(self._client.list_cached_files())

    def get_cached_file(self, file_id: str) -> bytes:
        return self._call(self._client.get_cached_file(file_id))

    def download_cached_file(self, file_id: str, sink: Callable[[bytes], object]) -> int:
        return self._call(self._client.download_cached_file(file_id, sink))

    def delete_cached_file(self, file_id: str) -> None:
        self._call(self._client.delete_cached_file(file_id))

    def pull(self, reference: str, *, platform: str | None = None) -> Json:
        return self._call(self._client.pull(reference, platform=platform))

    def pull_stream(self, reference: str, *,
                    platform: str | None = None) -> Iterator[PullProgress | Pulled]:
        return self._iterate(self._client.pull_stream(reference, platform=platform))

    def images(self) -> list[Json]:
        return self._call(self._client.images())

    def inspect_image(self, reference: str) -> Json:
        return self._call(self._client.inspect_image(reference))

    def tag_image(self, source: str, target: str) -> str:
        return self._call(self._client.tag_image(source, target))

    def push_image(self, source: str, target: str | None = None) -> str:
        return self._call(self._client.push_image(source, target))

    def import_image(self, tar: bytes | BinaryIO | os.PathLike[str], reference: str) -> Json:
        return self._call(self._client.import_image(tar, reference))

    def remove_image(self, reference: str, *, force: bool = False) -> list[str]:
        return self._call(self._client.remove_image(reference, force=force))

    def gc(self, budget_bytes: int | None = None) -> Json:
        return self._call(self._client.gc(budget_bytes))

    def build(self, context: BuildContext, *, tags: Sequence[str] = (),
              dockerfile: str | None = None, build_args: Mapping[str, str] | None = None,
              target: str | None = None, no_cache: bool = False,
              platform: str | None = None) -> Iterator[BuildEvent]:
        return self._iterate(self._client.build(
            context, tags=tags, dockerfile=dockerfile, build_args=build_args, target=target,
            no_cache=no_cache, platform=platform))

    def prune_build_cache(self) -> Json:
        return self._call(self._client.prune_build_cache())

    def info(self) -> Json:
        return self._call(self._client.info())

    def health(self) -> Json:
        return self._call(self._client.health())

    def ready(self) -> bool:
        return self._call(self._client.ready())


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable
