"""A pipeline: processes of one image wired by pipes (an interactor and a solution), each a
run of its own: its own run cgroup, limits, verdict and figures (one's CPU time never
counts against another's).

A pipe is a kernel pipe the host makes and hands to init with the exec of each end's
process (ExecRequest.stdio); the host's copies are closed as soon as init has them, so
when one side's processes are gone the other sees EOF or SIGPIPE, never a hang. A pipe
with `capture_bytes` is two pipes and a Relay between them on the host. The processes
share one container (several runs at once in it, then one reset) or each has its own;
every container comes from the tenant's own pool (tenant, image, policy), as a run's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace

from sandbox.engine.copyout import copy_out, wanted
from sandbox.engine.filecache import FileCache
from sandbox.engine.pool import Pools
from sandbox.engine.relay import Relay
from sandbox.engine.specs import (
    NOTHING,
    CopiedOut,
    PipelineOutcome,
    PipelineSpec,
    RunOutcome,
    RunSpec,
)
from sandbox.errors import ImageError, PolicyError
from sandbox.images import Image
from sandbox.runtime.container import Container
from sandbox.runtime.idmap import IdMapping
from sandbox.runtime.network import NO_NETWORK, NetworkRequest
from sandbox.runtime.policy import Policy
from sandbox.runtime.requests import ExecRequest, validate
from sandbox.runtime.results import RunResult
from sandbox.tenants import Tenant

MAX_PROCESSES = 16
# What a pipeline's captured pipes keep in all: held in memory until the result is sent.
MAX_CAPTURE_BYTES = 64 << 20
PutFiles = Callable[[Container, RunSpec, ExecRequest], Awaitable[None]]


def requests_of(spec: PipelineSpec,
                make: Callable[[RunSpec], ExecRequest]) -> list[ExecRequest]:
    """Each process's request (`make`: the engine's, as for a run), an error naming the
    process it is about."""
    out = []
    for i, process in enumerate(spec.processes):
        try:
            out.append(make(process))
        except (ImageError, PolicyError) as e:
            raise PolicyError(f"processes[{i}]: {e}") from None
    return out


def check_requests(requests: list[ExecRequest], mapping: IdMapping,
                   most_output: int | None) -> None:
    """The processes' requests checked before anything is made for them: once a pipe's end
    is in a request, its exec must take it. Their output limits together stay within what
    one run may hold (`most_output`, the policy's maximum): the service keeps every
    process's output until the pipeline ends."""
    for i, req in enumerate(requests):
        try:
            validate(req, mapping)
        except PolicyError as e:
            raise PolicyError(f"processes[{i}].{e}") from None
    total = sum((r.limits.output_bytes or 0) if r.limits else 0 for r in requests)
    if most_output is not None and total > most_output:
        raise PolicyError(f"processes: their output limits add up to {total} bytes, over the "
                          f"{most_output} one run may have (the policy's output_bytes "
                          "maximum); give the processes lower limits.output_bytes")


def check(spec: PipelineSpec) -> None:
    """PolicyError, its message starting with the field, for a pipeline that cannot be
    wired as asked; needs no image (a service checks it before the pipeline is queued)."""
    n = len(spec.processes)
    if not 1 <= n <= MAX_PROCESSES:
        raise PolicyError(f"processes: give 1 to {MAX_PROCESSES} processes, not {n}")
    for i, process in enumerate(spec.processes):
        if isinstance(process.stdin, int):
            raise PolicyError(f"processes[{i}].stdin: give bytes; a pipe goes in `pipes`")
        if process.repeat != 1 or process.rerun_near_limit:
            raise PolicyError(f"processes[{i}].repeat: a pipeline's processes run once; "
                              "leave out repeat and rerun_near_limit")
    taken: dict[tuple[int, int], str] = {}
    for k, pipe in enumerate(spec.pipes):
        for end, (i, fd), fds in (("src", pipe.src, (1, 2)), ("dst", pipe.dst, (0,))):
            where = f"pipes[{k}].{end}"
            if not 0 <= i < n:
                raise PolicyError(f"{where}: process {i} does not exist (0 to {n - 1})")
            if fd not in fds:
                raise PolicyError(f"{where}: fd {fd} cannot be piped here; a pipe goes from "
                                  "fd 1 or 2 of one process to fd 0 of another")
            if (i, fd) in taken:
                raise PolicyError(f"{where}: fd {fd} of process {i} is already piped "
                                  f"({taken[(i, fd)]}); each fd takes one pipe")
            taken[(i, fd)] = where
        if spec.processes[pipe.dst[0]].stdin is not None:
            raise PolicyError(f"pipes[{k}].dst: process {pipe.dst[0]} has stdin of its own; "
                              "give it stdin or a pipe, not both")
        if pipe.capture_bytes < 0:
            raise PolicyError(f"pipes[{k}].capture_bytes: must not be negative")
    if sum(pipe.capture_bytes for pipe in spec.pipes) > MAX_CAPTURE_BYTES:
        raise PolicyError(f"pipes: capture_bytes over {MAX_CAPTURE_BYTES} bytes in all; "
                          "capture less, or only the pipes you need to see")
    if spec.shared_container:
        seen: dict[str, tuple[int, object]] = {}
        for i, process in enumerate(spec.processes):
            for f in process.files:
                first = seen.setdefault(f.path, (i, f))
                if first[1] != f:
                    raise PolicyError(
                        f"processes[{i}].files: {f.path} is also given by process {first[0]}, "
                        "with other content or mode, and they share one container; use "
                        "another path, or a container of its own for each")


async def run(pools: Pools, cache: FileCache, put_files: PutFiles, image: Image,
              policy: Policy, tenant: Tenant, spec: PipelineSpec,
              requests: list[ExecRequest],
              network: NetworkRequest = NO_NETWORK) -> PipelineOutcome:
    """Run the pipeline (checked by `check`) to its end: every process's outcome, and what
    each captured pipe kept. A process's network figures are its container's (in a shared
    container, every process shows the same)."""
    n = len(spec.processes)
    async with contextlib.AsyncExitStack() as stack:
        loans = [pools.lend(image, policy, tenant, network)
                 for _ in range(1 if spec.shared_container else n)]
        held = [await stack.enter_async_context(loan) for loan in loans]
        containers = held * n if spec.shared_container else held
        placed: set[str] = set()
        for c, process, req in zip(containers, spec.processes, requests, strict=True):
            if spec.shared_container:  # each path once (check() made sure they agree)
                process = replace(process, files=tuple(
                    f for f in process.files if f.path not in placed))
                placed.update(f.path for f in process.files)
            await put_files(c, process, req)
        results, relays = await _wired(spec, requests, containers)
        # Files to copy out are read before the reset that would take them away; a shared
        # container's runs were exec'd without one.
        copied: list[CopiedOut] = []
        for c, process in zip(containers, spec.processes, strict=True):
            copied.append(await copy_out(c, process, tenant, cache) if wanted(process)
                          else NOTHING)
        if spec.shared_container:
            await held[0].reset()
        else:
            for c, process in zip(held, spec.processes, strict=True):
                if wanted(process):
                    await c.reset()
    warm = [loan.warm for loan in loans] * (n if spec.shared_container else 1)
    traffic = [loan.traffic for loan in loans] * (n if spec.shared_container else 1)
    return PipelineOutcome(
        processes=tuple(RunOutcome(r, w, image.digest, cp, network=t)
                        for r, w, cp, t in zip(results, warm, copied, traffic, strict=True)),
        captured=tuple(bytes(r.captured) if r else b"" for r in relays),
        truncated=tuple(bool(r and r.truncated) for r in relays))


async def _wired(spec: PipelineSpec, requests: list[ExecRequest], containers: list[Container]
                 ) -> tuple[list[RunResult], list[Relay | None]]:
    """The pipes made, every process exec'd with its ends, all awaited: the results, and
    each pipe's relay (None: a direct pipe). A process that fails to run (its container
    gone) takes the others with it: they are killed."""
    n = len(spec.processes)
    stdio: list[dict[int, int]] = [{} for _ in range(n)]
    unsent: set[int] = set()         # pipe ends no exec has taken yet: closed at the end
    relays: list[Relay | None] = []
    tasks: list[asyncio.Task[RunResult]] = []
    try:
        for pipe in spec.pipes:
            (i, out_fd), (j, in_fd) = pipe.src, pipe.dst
            r, w = os.pipe2(os.O_CLOEXEC)
            unsent.update((r, w))
            if pipe.capture_bytes:
                r2, w2 = os.pipe2(os.O_CLOEXEC)
                unsent.update((r2, w2))
                relays.append(Relay(r, w2, pipe.capture_bytes))
                unsent.difference_update((r, w2))   # the relay's to close from here on
                r = r2
            else:
                relays.append(None)
            stdio[i][out_fd], stdio[j][in_fd] = w, r
        shared = spec.shared_container

        async def one(i: int) -> RunResult:
            req = replace(requests[i], stdio=stdio[i])
            unsent.difference_update(stdio[i].values())   # the run's from here on
            try:
                return await containers[i].exec(
                    req, reset_after=not shared and not wanted(spec.processes[i]))
            finally:
                # Its processes are gone: a relay into it has no reader any more.
                for pipe, relay in zip(spec.pipes, relays, strict=True):
                    if relay is not None and pipe.dst[0] == i:
                        relay.close()

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t in done and (e := t.exception()) is not None:
                raise e
        return [t.result() for t in tasks], relays
    finally:
        for t in tasks:
            t.cancel()   # no-op for those done; a run cancelled is killed (Run.execute)
        # Closed before waiting, so that a second cancellation cannot leave them open: a
        # task that had not started when cancelled never runs, so never takes its ends.
        for relay in relays:
            if relay is not None:
                relay.close()
        for fd in unsent:
            os.close(fd)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
