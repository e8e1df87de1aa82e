"""Request bodies: each a msgspec Struct, the one declaration that validates the body and
becomes its schema in /openapi.json (service/schemas.py), so the document says all that is
checked here: types, sizes, patterns, enums, and the fields given together or not at all.

Hostile JSON is refused by these types: exact types (a bool is not an int), unknown fields,
sizes, NUL bytes in strings, absolute paths without `..`. A field not given is UNSET, and
the dict a handler gets (`as_dict`) holds only the fields that were given."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from sandbox import (
    ALLOWED_SIGNALS,
    MAX_CHANGE_BYTES,
    MAX_CHANGES,
    MAX_PIPELINE_CAPTURE_BYTES,
    MAX_PIPELINE_PROCESSES,
    Grouped,
    InvalidReference,
    hinted,
    parse_reference,
)
from service.errors import bad_request

MiB = 1 << 20
MAX_COPY_OUT_PATHS = 64
# The schema's own ceiling on a batch's cases; the service's is limits.batch_cases.
MAX_CASES = 1 << 20
INT64 = (1 << 63) - 1


def _path_problem(value: str) -> str:
    if "\0" in value:
        return "contains a NUL byte"
    if not value.startswith("/"):
        return "must be an absolute path inside the container (start with /)"
    return "has a '..' component; give the path without it"


def _reference_problem(value: str) -> str:
    try:
        parse_reference(value)
    except InvalidReference as e:   # "invalid image reference '...': why; examples"
        return f"is not an image reference: {str(e).split(chr(39) + ': ', 1)[-1]}"
    return ("is not an image reference sandboxd accepts: give name[:tag][@sha256:<64 hex "
            "digits>] of at most 247 characters, e.g. 'python:3.12-slim'")


# Patterns: what the server checks, in a form a client's generator can read too (ECMA
# regex as JSON Schema has it, without lookbehind).
NO_NUL = hinted(r"^[^\x00]*$", "contains a NUL byte")
# A path's component other than `..` (empty: `//`), no NUL.
PATH_COMPONENT = r"(?:[^./\x00][^/\x00]*|\.(?:[^./\x00][^/\x00]*)?|\.\.[^/\x00]+)"
# An absolute path, each component other than `..`, no NUL.
PATH = hinted(rf"^(?:/{PATH_COMPONENT}?)+$", _path_problem)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HUB_FIRST = r"[a-z0-9]+(?:(?:_|__|-+)[a-z0-9]+)*"   # no '.': that would make it a host
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# A bracketed IPv6 host names a registry only with a ':' in or after it (parse() reads
# "[fd]/x" as a Docker Hub path, which is invalid).
_DOMAIN = (rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
           r"|\[[a-fA-F0-9]*:[a-fA-F0-9:]*\](?::[0-9]+)?|\[[a-fA-F0-9]+\]:[0-9]+)")
# sandbox.images.reference.parse's grammar (docker's): [host[:port]/]path[:tag][@digest],
# not a bare 64-hex image id. Its length caps (a 255-character path) hold through the
# reference's own cap, REFERENCE_MAX.
REFERENCE_PATTERN = hinted(
    rf"^(?![a-f0-9]{{64}}$)(?:{_DOMAIN}/{_COMPONENT}(?:/{_COMPONENT})*"
    rf"|{_HUB_FIRST}(?:/{_COMPONENT})+|{_COMPONENT})"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$",
    _reference_problem)
REFERENCE_MAX = 247   # 255 less "library/", which a Docker Hub name gets
# What names a stored image: a reference, or an image's or its config's digest.
IMAGE_REF = hinted(rf"^sha256:[a-f0-9]{{64}}$|{REFERENCE_PATTERN}", _reference_problem)
BASE64 = hinted(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
                "is not valid base64 (standard alphabet, padded)")
FILE_ID = hinted(r"^sha256:[0-9a-f]{64}$", "is not a file id; expected 'sha256:' and 64 "
                 "lowercase hex digits, as POST /v1/files returns")
_PLATFORM_WORD = r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}"
PLATFORM_PATTERN = hinted(rf"^{_PLATFORM_WORD}/{_PLATFORM_WORD}(?:/{_PLATFORM_WORD})?$",
                          "is not 'os/arch[/variant]'; write e.g. 'linux/amd64' or "
                          "'linux/arm64/v8'")
MODE = hinted(r"^0{0,2}[0-7]{1,4}$", "is not an octal mode such as 0644")
BUILD_ARG = hinted(r"^[^=\x00]+=[^\x00]*$", "is not KEY=VALUE; give the value (the sbx CLI "
                   "takes it from your environment for a bare KEY)")
ENV_NAME = hinted(r"^[^=\x00]+$", "must be a non-empty name without '=' or NUL")

Reference = Annotated[str, Meta(min_length=1, max_length=REFERENCE_MAX,
                                pattern=REFERENCE_PATTERN,
                                description="an image reference: name[:tag][@digest]")]
Policy = Annotated[str, Meta(min_length=1, max_length=64, pattern=NO_NUL,
                             description='a profile name: "default" (writable root, used '
                                         'once) or "judge" (read-only root, reused)')]
Network = Literal["none", "proxy", "full"]
NetworkField = Annotated[Network, Meta(
    description='"none" (default): no network; "proxy": outbound HTTP(S) through the '
                "service's filtering proxy, to the hosts the operator allows; \"full\": "
                "user-mode networking (only when the operator enables it)")]
Platform = Annotated[str, Meta(min_length=1, max_length=64, pattern=PLATFORM_PATTERN,
                               description="os/arch[/variant], e.g. linux/arm64/v8 "
                                           "(default: this machine's)")]
ContainerPath = Annotated[str, Meta(min_length=1, max_length=4096, pattern=PATH)]
Positive = Annotated[int, Meta(ge=1, le=INT64)]
Arg = Annotated[str, Meta(max_length=128 << 10, pattern=NO_NUL)]
Cmd = Annotated[list[Arg], Meta(min_length=1, max_length=4096,
                                description="argv; replaces the image's Cmd (its Entrypoint "
                                            "is kept)")]
Env = Annotated[dict[Annotated[str, Meta(pattern=ENV_NAME)], Arg],
                Meta(max_length=1024, description="merged over the image's Env")]
User = Annotated[str, Meta(min_length=1, max_length=256, pattern=NO_NUL,
                           description='"1000", "1000:1000" or a name from the image\'s '
                                       "/etc/passwd")]
Stdin = Annotated[str, Meta(max_length=64 * MiB)]
StdinBase64 = Annotated[str, Meta(max_length=96 * MiB, pattern=BASE64)]
CopyOut = Annotated[list[ContainerPath], Meta(
    max_length=MAX_COPY_OUT_PATHS,
    description="regular files to return in the result's `files` once the command ends, "
                "encoded as output_encoding says")]
CopyOutCached = Annotated[list[ContainerPath], Meta(
    max_length=MAX_COPY_OUT_PATHS,
    description="regular files to store in your file cache once the command ends; their "
                "ids come back in the result's `file_ids`")]
OutputEncoding = Annotated[Literal["utf-8", "base64"], Meta(
    description="how stdout/stderr are given: UTF-8 with invalid bytes replaced (default) "
                "or base64 of the exact bytes")]


class Body(Grouped, omit_defaults=True, kw_only=True):
    """What every body shares: unknown fields refused, absent fields left out of as_dict."""


class Limits(Body):
    """Per-run limits; each must be within the policy's maxima."""

    cpu_ms: Positive | UnsetType = UNSET
    wall_ms: Positive | UnsetType = UNSET
    memory_bytes: Positive | UnsetType = UNSET
    pids: Positive | UnsetType = UNSET
    output_bytes: Positive | UnsetType = UNSET
    file_size_bytes: Positive | UnsetType = UNSET
    open_files: Positive | UnsetType = UNSET


LIMIT_NAMES = tuple(f.name for f in msgspec.structs.fields(Limits))


class File(Body):
    """A file put in the container before the command starts."""

    __one_of__ = (("content", "content_base64", "file_id"),)

    path: ContainerPath
    content: Annotated[str, Meta(max_length=64 * MiB, description="UTF-8 text")] | UnsetType \
        = UNSET
    content_base64: Annotated[str, Meta(max_length=96 * MiB, pattern=BASE64,
                                        description="exact bytes, base64")] | UnsetType = UNSET
    file_id: Annotated[str, Meta(max_length=128, min_length=1, pattern=FILE_ID,
                                 description='a file of your file cache, by the id POST '
                                             '/v1/files gave: "sha256:" and 64 hex '
                                             'digits')] | UnsetType = UNSET
    mode: Annotated[int, Meta(ge=0, le=0o7777, description="permission bits; 420 = "
                                                           "0o644")] | UnsetType = UNSET
    copy: Annotated[bool, Meta(description="with file_id: a writable copy of the cached file, "
                                           "owned by the run user, instead of a read-only "
                                           "bind of it (default false: bound, no copy; "
                                           "executable when mode has an exec bit)")] \
        | UnsetType = UNSET


Files = Annotated[list[File], Meta(max_length=256)]


class TtySize(Body):
    """A terminal's size in characters."""

    rows: Annotated[int, Meta(ge=1, le=1000)]
    cols: Annotated[int, Meta(ge=1, le=1000)]


class Command(Body):
    """What a command is given and what it gives back: a pipeline's process and an exec
    (a run's too) share them."""

    __not_both__ = (("stdin", "stdin_base64"),)

    env: Env | UnsetType = UNSET
    cwd: ContainerPath | UnsetType = UNSET
    user: User | UnsetType = UNSET
    stdin: Stdin | UnsetType = UNSET
    stdin_base64: StdinBase64 | UnsetType = UNSET
    files: Files | UnsetType = UNSET
    limits: Limits | UnsetType = UNSET
    copy_out: CopyOut | UnsetType = UNSET
    copy_out_cached: CopyOutCached | UnsetType = UNSET


class PipelineProcess(Command, kw_only=True):
    """One process of a pipeline: the body's env, files and limits apply to it, its own over
    them (env and limits key by key, files by path)."""

    cmd: Cmd


# [process index, fd]; which fds and processes a pipe may join, the pipeline's check says
# (sandbox.engine.pipeline.check: the 400 names `pipes[i].from` or `.to`).
PipeEnd = Annotated[list[Annotated[int, Meta(ge=0, le=INT64)]],
                    Meta(min_length=2, max_length=2, description="[process index, fd]")]


class Pipe(Body, rename={"from_": "from"}):
    """A pipe from fd 1 or 2 of one process to fd 0 of another."""

    from_: PipeEnd
    to: PipeEnd
    capture_bytes: Annotated[int, Meta(
        ge=0, le=MAX_PIPELINE_CAPTURE_BYTES,
        description="relay the pipe through the service and keep its first N bytes in the "
                    "result (0: a direct pipe; a pipeline's pipes keep at most the maximum "
                    "in all)")] | UnsetType = UNSET


class ExecRequest(Command, kw_only=True):
    """A command in a container: a session's (POST /v1/containers/{id}/exec) or, with
    `image`, a run's."""

    __only_with__ = (("tty_size", "tty"),)

    cmd: Cmd | UnsetType = UNSET
    output_encoding: OutputEncoding | UnsetType = UNSET
    tty: Annotated[bool, Meta(description="a terminal inside the container is the run's "
                                          "stdin, stdout and stderr (stderr is merged into "
                                          "stdout; the result's stderr is \"\"); not in "
                                          "batches and pipelines")] | UnsetType = UNSET
    tty_size: Annotated[TtySize, Meta(description="the terminal's size (default 24 x 80); "
                                                  "only with tty")] | UnsetType = UNSET
    network: NetworkField | UnsetType = UNSET


class RunRequest(ExecRequest, kw_only=True):
    """A run: a command (or, with `processes`, a pipeline) in a fresh or warm container of
    an image."""

    # A pipeline's processes have their own cmd, stdin and copy_out; a pipeline is neither
    # repeated nor on a terminal.
    __not_both__ = (("stdin", "stdin_base64"), ("cmd", "processes"),
                    *(("processes", name) for name in (
                        "stdin", "stdin_base64", "copy_out", "copy_out_cached", "repeat",
                        "rerun_near_limit", "tty")))
    __only_with__ = (("tty_size", "tty"), ("pipes", "processes"), ("container", "processes"))

    image: Reference
    policy: Policy | UnsetType = UNSET
    platform: Platform | UnsetType = UNSET
    repeat: Annotated[int, Meta(ge=1, le=INT64, description=(
        "run it this many times (each in a reset warm container; at most the service's "
        "timing.max_repeat): the result is the median run's by CPU time, with `repeats` "
        "giving the spread"))] | UnsetType = UNSET
    rerun_near_limit: Annotated[bool, Meta(description=(
        "a time_limit (always near its limit: it was killed there) is run once more and "
        "that run's result given, with the first's figures in `rerun`"))] | UnsetType = UNSET
    processes: Annotated[list[PipelineProcess], Meta(
        min_length=2, max_length=MAX_PIPELINE_PROCESSES,
        description="in place of cmd: processes wired by `pipes`, each a run with its own "
                    "limits, verdict and figures")] | UnsetType = UNSET
    pipes: Annotated[list[Pipe], Meta(max_length=MAX_PIPELINE_PROCESSES)] | UnsetType = UNSET
    container: Annotated[Literal["shared", "own"], Meta(
        description="the processes share one container (default) or each has its "
                    "own")] | UnsetType = UNSET


class ContainerRequest(Body):
    """A session: a container kept for its caller's execs."""

    image: Reference
    policy: Policy | UnsetType = UNSET
    network: NetworkField | UnsetType = UNSET
    platform: Platform | UnsetType = UNSET
    limits: Limits | UnsetType = UNSET


class CommitRequest(Body):
    """A session's container as a new image."""

    reference: Reference
    changes: Annotated[list[Annotated[str, Meta(min_length=1, max_length=MAX_CHANGE_BYTES,
                                                 pattern=NO_NUL)]],
                       Meta(max_length=MAX_CHANGES, description=(
                           "Dockerfile instructions applied to the new image's config, as "
                           "`docker commit --change` takes: CMD, ENTRYPOINT, ENV, EXPOSE, "
                           "LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME, WORKDIR"))] \
        | UnsetType = UNSET
    message: Annotated[str, Meta(max_length=64 << 10, pattern=NO_NUL,
                                 description="the new layer's history comment")] \
        | UnsetType = UNSET
    author: Annotated[str, Meta(max_length=1024, pattern=NO_NUL,
                                description='e.g. "Jane Doe <jane@example.com>"')] \
        | UnsetType = UNSET


class PullRequest(Body):
    reference: Reference
    platform: Platform | UnsetType = UNSET


class TagRequest(Body):
    source: Reference
    target: Reference


class PushRequest(Body):
    source: Reference
    target: Reference | UnsetType = UNSET


class GcRequest(Body):
    budget_bytes: Annotated[int, Meta(ge=0, le=INT64)] | UnsetType = UNSET


SIGNALS = tuple(s.name for s in ALLOWED_SIGNALS)   # what a client may send a running exec


class WebSocketMessage(Body):
    """A client's message on an exec WebSocket after the run body."""

    __not_both__ = (("data", "data_base64"),)

    type: Literal["stdin", "close_stdin", "signal", "resize"]
    data: Annotated[str, Meta(max_length=16 * MiB)] | UnsetType = UNSET
    data_base64: Annotated[str, Meta(max_length=24 * MiB, pattern=BASE64)] | UnsetType = UNSET
    signal: Literal[SIGNALS] | UnsetType = UNSET  # type: ignore[valid-type]
    # "resize" (a run with tty only): the terminal's new size
    rows: Annotated[int, Meta(ge=1, le=1000)] | UnsetType = UNSET
    cols: Annotated[int, Meta(ge=1, le=1000)] | UnsetType = UNSET


class BatchCase(Body):
    """One case: its fields over the batch's (files merged by path, env and limits key by
    key, cmd replaced)."""

    __not_both__ = (("stdin", "stdin_base64"),)

    id: Annotated[str, Meta(min_length=1, max_length=256, pattern=NO_NUL,
                            description="your name for the case, given back in its "
                                        "event")] | UnsetType = UNSET
    stdin: Stdin | UnsetType = UNSET
    stdin_base64: StdinBase64 | UnsetType = UNSET
    cmd: Cmd | UnsetType = UNSET
    env: Env | UnsetType = UNSET
    files: Files | UnsetType = UNSET
    limits: Limits | UnsetType = UNSET


class BatchRequest(Body, kw_only=True):
    """The shared part of a run (as in RunRequest) and its cases."""

    image: Reference
    cmd: Cmd | UnsetType = UNSET
    env: Env | UnsetType = UNSET
    cwd: ContainerPath | UnsetType = UNSET
    user: User | UnsetType = UNSET
    files: Files | UnsetType = UNSET
    limits: Limits | UnsetType = UNSET
    output_encoding: OutputEncoding | UnsetType = UNSET
    copy_out: CopyOut | UnsetType = UNSET
    copy_out_cached: CopyOutCached | UnsetType = UNSET
    policy: Policy | UnsetType = UNSET
    network: NetworkField | UnsetType = UNSET
    platform: Platform | UnsetType = UNSET
    cases: Annotated[list[BatchCase], Meta(
        min_length=1, max_length=MAX_CASES,
        description="at most the service's limits.batch_cases (default 10,000)")]
    parallelism: Annotated[int, Meta(ge=1, le=INT64, description=(
        "cases at once (default: the service's CPUs; at most your allowance, the token's "
        "max_concurrent_runs and the service's limits.max_running)"))] | UnsetType = UNSET
    stop_on_failure: Annotated[bool, Meta(description=(
        "start no case after one whose status is not ok (or that could not run); cases "
        "already running finish and are reported"))] | UnsetType = UNSET


# The fields a batch's shared part has in common with a run (its cases' fields go over them).
BATCH_SHARED = tuple(f.name for f in msgspec.structs.fields(BatchRequest)
                     if f.name not in ("cases", "parallelism", "stop_on_failure"))
CALLBACK_URL = hinted(r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#\s@\x00]+(?:[/?#][^\s\x00]*)?$",
                      "is not an http:// or https:// URL with a host (and no credentials)")


class JobRequest(Body):
    """A run (a pipeline is a run with `processes`) or a batch, to run later. Send an
    Idempotency-Key header to submit safely again after a network error: the same key and
    body give the same job."""

    __one_of__ = (("run", "batch"),)

    run: RunRequest | UnsetType = UNSET
    batch: BatchRequest | UnsetType = UNSET
    callback_url: Annotated[str, Meta(min_length=1, max_length=2048, pattern=CALLBACK_URL,
                                      description=(
        "POSTed the job (as GET /v1/jobs/{id} gives it, without `callback`) once it ends, "
        "signed: see GET /v1/jobs/secret. Its host must be one the operator listed in "
        "jobs.callback_hosts"))] | UnsetType = UNSET


def as_dict(body: msgspec.Struct) -> dict[str, Any]:
    """A validated body as the handlers read it: the given fields only, nested bodies as
    dicts."""
    # A str subclass passes as a str (a config's Workdir, say); its value is what is kept.
    out: dict[str, Any] = msgspec.to_builtins(body, enc_hook=str)
    return out


def check_path(value: str, where: str) -> str:
    """`value` if it is a ContainerPath (a query parameter's, say), else a 400 naming
    `where`."""
    if len(value) > 4096 or not value or re.search(PATH, value) is None:
        problem = _path_problem(value) if value else "must not be empty"
        if len(value) > 4096:
            problem = "is longer than 4096 characters"
        raise bad_request(f"{where}: {value[:200]!r} {problem}", where)
    return value
