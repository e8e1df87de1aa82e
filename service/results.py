"""A run's result as the API gives it: one msgspec Struct that /openapi.json documents
(service/schemas.py's RUN_RESULT) and whose fields runbodies.result_json fills, the engine's
figures by name from sandbox's RunResult (ENGINE_FIGURES), so a figure is added in two
places only: where it is measured and here."""

from __future__ import annotations

import dataclasses
import operator
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from sandbox import MEMORY_PEAK_CARRY_MAX, Status
from sandbox import RunResult as EngineResult

Text = Annotated[str, Meta(max_length=1 << 16)]
Output = Annotated[str, Meta(max_length=1 << 40)]   # encoded as output_encoding says


class Part(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """A part of a reply: no field but its own (a client may check a reply against it)."""


class Spread(Part):
    min: float
    median: float
    max: float
    spread: Annotated[float, Meta(description="(max - min) / median")]
    cv: Annotated[float, Meta(description="standard deviation / mean (0 for one run)")]


class Repeats(Part):
    """Only when repeat was given."""

    n: int
    cpu_ms: Spread | None
    wall_ms: Spread
    statuses: dict[Annotated[str, Meta(pattern=r"^[a-z_]+$")], int]
    main: Annotated[int, Meta(description="which run (from 0) the result is: the median's")]


class FirstRun(Part):
    status: Status
    cpu_ms: float | None
    wall_ms: float
    cpus: str | None
    host_load: float | None
    dedicated_cpu: bool


class Rerun(Part):
    """Only when rerun_near_limit ran it again: the first run's figures."""

    first: FirstRun


class CachedFileRef(Part):
    id: str
    size: int


class RunNetwork(Part):
    """Only when the run's network was not none: bytes as the sandbox sent and received
    them."""

    mode: Literal["proxy", "full"]
    bytes_sent: int
    bytes_received: int
    connections: Annotated[int, Meta(description="connections the proxy made for the run")]
    denied: Annotated[int, Meta(description="connections the proxy refused")]


ByPath = Annotated[str, Meta(pattern="^/")]


class RunResult(Part):
    """A run's verdict, output and figures."""

    id: str | None
    status: Status
    exit_code: Annotated[int, Meta(ge=-(1 << 31), le=1 << 31)] | None
    signal: Annotated[int, Meta(ge=0, le=128)] | None
    stdout_truncated: bool
    stderr_truncated: bool
    cpu_ms: float | None
    user_ms: float | None
    sys_ms: float | None
    wall_ms: float | None
    memory_peak_bytes: Annotated[int, Meta(description=(
        "the run's peak memory, from its cgroup where measured_by says so; the kernel charges "
        "memory in batches of 64 pages, and on cgroup v1 the peak may count up to "
        f"{MEMORY_PEAK_CARRY_MAX >> 10} KiB that the container's run before left charged"
    ))] | None
    setup_ms: float | None
    measured_by: dict[str, str | None]
    image: str
    pool_hit: bool
    warnings: list[Text]
    error: Text | None
    cpus: Annotated[str, Meta(description='the CPUs the run was kept on, e.g. "1"')] | None
    host_load: Annotated[float, Meta(description=(
        "the part of the run's time (0 to 1) during which a task waited for a CPU (PSI): the "
        "run's own on cgroup v2, the host's on v1 (measured_by says); null without "
        "PSI"))] | None
    dedicated_cpu: Annotated[bool, Meta(description=(
        "the run had a reserved CPU to itself, kept by its cgroup's cpuset"))]
    near_limit: Annotated[bool, Meta(description=(
        "cpu_ms or wall_ms reached the last 10 % of its limit (or the limit): a verdict that "
        "may go either way"))]
    request_id: Annotated[str, Meta(max_length=128, description=(
        "the id of the HTTP request that made the run (its X-Request-Id, when it was 1-128 of "
        "[A-Za-z0-9._:-], else one made for it)"))]
    stdout: Output
    stderr: Output
    network: RunNetwork | UnsetType = UNSET
    files: Annotated[dict[ByPath, Output], Meta(description=(
        "copy_out's files, encoded as output_encoding says (only when copy_out was "
        "given)"))] | UnsetType = UNSET
    file_ids: Annotated[dict[ByPath, CachedFileRef], Meta(description=(
        "copy_out_cached's files as stored in your file cache (only when copy_out_cached "
        "was given)"))] | UnsetType = UNSET
    file_errors: Annotated[dict[ByPath, Text], Meta(description=(
        "why a path of copy_out or copy_out_cached was not copied (missing, not a regular "
        "file, too large, over a quota); the run's verdict stands (only when either was "
        "given)"))] | UnsetType = UNSET
    repeats: Repeats | UnsetType = UNSET
    rerun: Rerun | UnsetType = UNSET


# The result's fields the engine measures, copied by name: not stdout and stderr (encoded
# as the run asked).
ENGINE_FIGURES = tuple(
    f.name for f in msgspec.structs.fields(RunResult)
    if f.name in {e.name for e in dataclasses.fields(EngineResult)}
    and f.name not in ("stdout", "stderr"))
# In one C call (a run's result is made on the warm path).
engine_figures = operator.attrgetter(*ENGINE_FIGURES)
FIRST_RUN_FIGURES = tuple(f.name for f in msgspec.structs.fields(FirstRun))
