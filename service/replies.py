"""The API's replies other than a run's result (service/results.py): msgspec Structs, the
one declaration that /openapi.json documents (service/schemas.py) and that a client may
check a reply against (`sandbox.convert(reply, Type)`, as loadtest.soakmix does). Their
fields are the JSON keys the handlers give; a field that may be left out is UNSET."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, UnsetType

from sandbox import MAX_PIPELINE_PROCESSES, Status
from service.bodies import INT64, NO_NUL
from service.results import Output, Part, RunResult

# What the replies' text and numbers are when nothing narrower is said of them.
Text = Annotated[str, Meta(max_length=4096, pattern=NO_NUL)]
Message = Annotated[str, Meta(max_length=1 << 16, pattern=NO_NUL)]
Count = Annotated[int, Meta(ge=0, le=INT64)]
Names = Annotated[list[Text], Meta(max_length=1024)]
Many = 1 << 20   # the most items a listing is documented to hold


class ErrorDetail(Part):
    code: Annotated[str, Meta(max_length=64, pattern=NO_NUL)]
    # Both may quote what was sent: a field's name is any JSON key.
    message: Annotated[str, Meta(max_length=1 << 16)]
    field: Annotated[str, Meta(max_length=1 << 40)] | UnsetType = UNSET


class Error(Part):
    error: ErrorDetail


class CachedFile(Part):
    id: Annotated[Text, Meta(description='"sha256:" and the hex SHA-256 of the content')]
    size: Count
    created: Annotated[float, Meta(description="when you first stored it (Unix time)")]
    last_used: Annotated[float, Meta(description="when it was last stored, read or given to "
                                                 "a run")]
    expires: Annotated[float, Meta(description="when it goes unless used before: every use "
                                               "moves it")]


class CachedFileList(Part):
    files: Annotated[list[CachedFile], Meta(max_length=Many)]


class PipeResult(Part):
    captured: Output | None
    truncated: bool


class PipelineResult(Part):
    """A pipeline's result: `status` is the first process's status that is not ok (else
    ok); `pipes[i].captured` is what a pipe with capture_bytes kept, encoded as
    output_encoding says (null for a direct pipe)."""

    status: Status
    processes: Annotated[list[RunResult], Meta(max_length=MAX_PIPELINE_PROCESSES)]
    pipes: Annotated[list[PipeResult], Meta(max_length=MAX_PIPELINE_PROCESSES)]
    image: Text


class StreamEvent(Part):
    """One line of NDJSON (or one SSE event's data, without `event`). `exit` carries the
    RunResult's fields without stdout and stderr; `error` carries `error` as in Error."""

    event: Literal["stdout", "stderr", "exit", "error", "progress", "done"]
    data: Output | UnsetType = UNSET


class Container(Part):
    id: Text
    image: Text
    names: Names
    policy: Text
    created: float
    last_used: float
    alive: bool


class ContainerList(Part):
    containers: Annotated[list[Container], Meta(max_length=Many)]


class Image(Part):
    digest: Text
    config_digest: Text
    names: Names
    platform: Text
    size: Count
    created: float | UnsetType = UNSET
    last_used: float | UnsetType = UNSET


class ImageList(Part):
    images: Annotated[list[Image], Meta(max_length=Many)]


class ImageInspect(Image, kw_only=True):
    """An image's listing, and what makes it: its manifest's media type, layers, config."""

    media_type: Text
    layers: Annotated[list[dict[str, Any]], Meta(max_length=1 << 16)]
    config: dict[str, Any]


class Removed(Part):
    removed: Names


class Tagged(Part):
    name: Text


class Pushed(Part):
    digest: Text


class GcReport(Part):
    images: Annotated[list[Text], Meta(max_length=Many)]
    blobs: Count
    layers: Count
    freed_bytes: Count
    kept_bytes: Count


class BuildPruned(Part):
    removed: Annotated[Count, Meta(description="cached build steps forgotten")]
    freed_bytes: Count


class PolicyLimits(Part):
    defaults: Annotated[dict[str, Any], Meta(description="a run's limits when it asks for "
                                                         "none")]
    maxima: Annotated[dict[str, Any], Meta(description="the most a run may ask for")]


class Info(Part, kw_only=True):
    version: Text
    host: dict[str, Any]
    pools: Annotated[list[dict[str, Any]], Meta(max_length=Many)]
    sessions: Count
    timing: Annotated[dict[str, Any], Meta(description=(
        "CPU slots: the reserved cpus (null: none), policies, enforced_by (cpuset or "
        "affinity), and your own runs in slots or waiting"))] | UnsetType = UNSET
    policies: Annotated[dict[Annotated[str, Meta(pattern="^(?:[a-z0-9][a-z0-9_-]*)$")],
                             PolicyLimits], Meta(max_length=1024)]


class Health(Part):
    status: Text
    error: Message | UnsetType = UNSET
    reason: Message | UnsetType = UNSET
