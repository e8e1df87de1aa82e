"""Pipelines: processes of one image wired by pipes (an interactor and a solution), each a run
of its own. Real registry, real containers, busybox sh on both sides."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from sandbox import MAX_PIPELINE_PROCESSES
from sandbox.engine import (
    FileSpec,
    PipelineOutcome,
    PipelineSpec,
    PipeSpec,
    PoolConfig,
    ProcessSpec,
)
from sandbox.engine.cpuslots import TimingConfig
from sandbox.errors import PolicyError
from sandbox.runtime.idmap import MAPPER_NAME
from sandbox.runtime.profiles import Limits
from sandbox.runtime.results import Status
from sandbox.runtime.spawner import HELPER_NAME
from sandbox.tenants import Tenant
from tests.integration.test_engine import Running
from tests.support.interactive import INTERACTOR, SOLUTION

A, B = Tenant("tenant-a"), Tenant("tenant-b")
BOTH_WAYS = (PipeSpec((0, 1), (1, 0)), PipeSpec((1, 1), (0, 0)))
FLOOD = "while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"


@pytest.fixture
def eng(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path / "state", pools=PoolConfig(min_idle=1, max_idle=4))
    yield r
    r.close()


def sh(script: str, **limits: int) -> ProcessSpec:
    return ProcessSpec(cmd=["sh", "-c", script], env={"PATH": "/bin"},
                       limits=Limits(**limits) if limits else None)


def pipeline(eng: Running, images: Any, *processes: ProcessSpec,
             pipes: tuple[PipeSpec, ...] = BOTH_WAYS, shared: bool = True,
             tenant: Tenant = A) -> PipelineOutcome:
    out: PipelineOutcome = eng.run(eng.engine.pipeline(
        images.oci, PipelineSpec(processes, pipes, shared_container=shared), tenant=tenant,
        policy="judge"))
    return out


def statuses(out: PipelineOutcome) -> list[Status]:
    return [p.result.status for p in out.processes]


def open_fds() -> list[str]:
    """What this process (the engine's) holds open."""
    return sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}"))


def open_pipes() -> list[str]:
    """The pipes among them (a warm container's count varies with the pools; pipes do not)."""
    return [f for f in open_fds() if f.startswith("pipe:")]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own"])
def test_an_interactor_and_a_solution_play_a_guessing_game(eng: Running, images: Any,
                                                           shared: bool) -> None:
    out = pipeline(eng, images, sh(INTERACTOR), sh(SOLUTION), shared=shared)
    inter, sol = (p.result for p in out.processes)
    assert statuses(out) == [Status.OK, Status.OK], (inter, sol)
    assert inter.stderr == b"found in 3\n"      # 50, 25, 37
    # Piped outputs are the other side's input, not the result's.
    assert inter.stdout == sol.stdout == b""
    assert out.captured == (b"", b"") and out.truncated == (False, False)
    ids = [r.id.rsplit("-", 1)[0] for r in (inter, sol)]   # the containers they ran in
    assert (ids[0] == ids[1]) is shared


def test_a_captured_pipe_is_relayed_and_its_first_bytes_kept(eng: Running,
                                                             images: Any) -> None:
    pipes = (PipeSpec((0, 1), (1, 0), capture_bytes=64),
             PipeSpec((1, 1), (0, 0), capture_bytes=5))
    out = pipeline(eng, images, sh(INTERACTOR), sh(SOLUTION), pipes=pipes)
    assert statuses(out) == [Status.OK, Status.OK], out
    assert out.captured == (b"lower\nhigher\ncorrect\n", b"50\n25")
    assert out.truncated == (False, True)


@pytest.mark.parametrize("capture", [0, 16], ids=["direct", "relayed"])
def test_an_interactor_that_ends_early_stops_a_writing_solution_with_sigpipe(
        eng: Running, images: Any, capture: int) -> None:
    # The solution floods a pipe nobody reads any more: SIGPIPE, not its wall limit.
    out = pipeline(eng, images, sh("read line; exit 0"), sh(FLOOD, wall_ms=60000),
                   pipes=(PipeSpec((1, 1), (0, 0), capture),))
    inter, sol = (p.result for p in out.processes)
    assert inter.status == Status.OK
    assert sol.status == Status.SIGNALED and sol.signal == signal.SIGPIPE, sol


@pytest.mark.parametrize("capture", [0, 16], ids=["direct", "relayed"])
def test_a_solution_that_ends_gives_the_reading_interactor_eof(eng: Running, images: Any,
                                                               capture: int) -> None:
    reader = "while read g; do :; done; echo eof >&2"
    out = pipeline(eng, images, sh(reader, wall_ms=60000), sh("echo 1; exit 4"),
                   pipes=(PipeSpec((1, 1), (0, 0), capture),))
    inter, sol = (p.result for p in out.processes)
    assert (inter.status, inter.stderr) == (Status.OK, b"eof\n")
    assert (sol.status, sol.exit_code) == (Status.NONZERO_EXIT, 4)


def test_a_solution_that_never_reads_ends_at_its_own_wall_limit(eng: Running,
                                                                images: Any) -> None:
    # The interactor blocks writing to the sleeping solution until the solution's wall
    # limit ends it; then the interactor's write fails (SIGPIPE), long before its own.
    out = pipeline(eng, images, sh(FLOOD, wall_ms=60000), sh("sleep 1000", wall_ms=500),
                   pipes=(PipeSpec((0, 1), (1, 0)),))
    assert statuses(out) == [Status.SIGNALED, Status.WALL_LIMIT], out
    assert out.processes[0].result.signal == signal.SIGPIPE


def test_an_interactor_that_never_reads_ends_at_its_wall_limit_and_frees_the_solution(
        eng: Running, images: Any) -> None:
    out = pipeline(eng, images, sh("sleep 1000", wall_ms=500), sh(FLOOD, wall_ms=60000),
                   pipes=(PipeSpec((1, 1), (0, 0), capture_bytes=8),))
    assert statuses(out) == [Status.WALL_LIMIT, Status.SIGNALED], out
    assert out.processes[1].result.signal == signal.SIGPIPE
    assert out.captured == (b"xxxxxxxx",) and out.truncated == (True,)


def test_each_process_has_its_own_verdict_and_cpu_time(eng: Running, images: Any) -> None:
    """The solution spins past its CPU limit; the interactor, waiting on it, is ok and is not
    charged for the solution's CPU time."""
    out = pipeline(eng, images, sh("read g; echo done >&2", wall_ms=60000),
                   sh("while :; do :; done", cpu_ms=300, wall_ms=60000))
    inter, sol = (p.result for p in out.processes)
    assert (inter.status, inter.stderr) == (Status.OK, b"done\n"), inter
    assert sol.status == Status.TIME_LIMIT, sol
    assert inter.cpu_ms is not None and sol.cpu_ms is not None
    assert sol.cpu_ms >= 300 and inter.cpu_ms < sol.cpu_ms / 10


def test_a_process_that_cannot_start_gives_the_other_eof(eng: Running, images: Any) -> None:
    missing = ProcessSpec(cmd=["/no/such/program"], env={"PATH": "/bin"})
    out = pipeline(eng, images, sh("read g || echo eof >&2", wall_ms=60000), missing)
    inter, sol = (p.result for p in out.processes)
    assert (inter.status, inter.stderr) == (Status.OK, b"eof\n")
    assert sol.status == Status.NONZERO_EXIT and sol.exit_code == 127


def test_files_and_copy_out_per_process_in_a_shared_container(eng: Running,
                                                              images: Any) -> None:
    inter = ProcessSpec(cmd=["sh", "/tmp/i.sh"], env={"PATH": "/bin"},
                        files=(FileSpec("/tmp/i.sh", INTERACTOR.encode()),),
                        copy_out=("/tmp/log",))
    sol = ProcessSpec(cmd=["sh", "-c", f"trap 'echo left > /tmp/log' EXIT; {SOLUTION}"],
                      env={"PATH": "/bin"})
    out = pipeline(eng, images, inter, sol)
    assert statuses(out) == [Status.OK, Status.OK], out
    assert out.processes[0].copied.files == {"/tmp/log": b"left\n"}
    eng.settle()
    # The shared container was reset once after both: nothing of theirs is left.
    after = eng.run(eng.engine.run(images.oci, sh("ls -A /tmp"), tenant=A, policy="judge"))
    assert after.pool_hit and after.result.stdout == b""


def test_a_pipeline_that_cannot_be_wired_is_refused_before_anything_runs(
        eng: Running, images: Any) -> None:
    eng.run(eng.engine.image(images.oci, tenant=A))   # pulled: the store's files open
    fds = open_fds()
    bad: list[tuple[tuple[ProcessSpec, ...], tuple[PipeSpec, ...], str]] = [
        ((sh("true"), sh("true")), (PipeSpec((0, 0), (1, 0)),), "pipes[0].src: fd 0"),
        ((sh("true"), sh("true")), (PipeSpec((0, 1), (2, 0)),), "pipes[0].dst: process 2"),
        ((sh("true"), sh("true")), (PipeSpec((0, 1), (1, 0)), PipeSpec((0, 2), (1, 0))),
         "pipes[1].dst: fd 0 of process 1 is already piped"),
        ((sh("true"), ProcessSpec(cmd=["cat"], stdin=b"x")), (PipeSpec((0, 1), (1, 0)),),
         "stdin of its own"),
        ((sh("true"), ProcessSpec(cmd=["x\0"])), (), "processes[1]: cmd"),
        ((sh("true"), sh("true", cpu_ms=10**9)), (), "processes[1]: limits.cpu_ms"),
        ((sh("true", output_bytes=40 << 20), sh("true", output_bytes=40 << 20)), (),
         "processes: their output limits add up"),
        ((sh("true"), sh("true")), (PipeSpec((0, 1), (1, 0), 64 << 20),
                                    PipeSpec((0, 2), (0, 0), 1)), "pipes: capture_bytes over"),
    ]
    for processes, pipes, message in bad:
        with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
            pipeline(eng, images, *processes, pipes=pipes)
    assert eng.engine.pools.stats() == [] and open_fds() == fds


def test_own_containers_are_the_tenants_own(eng: Running, images: Any) -> None:
    """Each process in a container of its own comes from its tenant's pool: never one that
    served another tenant's run or pipeline."""
    def containers(out: PipelineOutcome) -> set[str]:
        return {p.result.id.rsplit("-", 1)[0] for p in out.processes}

    a_first = pipeline(eng, images, sh(INTERACTOR), sh(SOLUTION), shared=False, tenant=A)
    assert statuses(a_first) == [Status.OK, Status.OK] and len(containers(a_first)) == 2
    eng.settle()

    async def b_runs() -> list[str]:
        outs = await asyncio.gather(*(eng.engine.run(images.oci, sh("true"), tenant=B,
                                                     policy="judge") for _ in range(4)))
        return [o.result.id.rsplit("-", 1)[0] for o in outs]

    b_ids = set(eng.run(b_runs()))
    b_pipe = pipeline(eng, images, sh(INTERACTOR), sh(SOLUTION), shared=False, tenant=B)
    b_ids |= containers(b_pipe)
    eng.settle()
    a_again = pipeline(eng, images, sh(INTERACTOR), sh(SOLUTION), shared=False, tenant=A)
    assert all(p.pool_hit for p in a_again.processes)
    a_ids = containers(a_first) | containers(a_again)
    assert not a_ids & b_ids, (a_ids, b_ids)
    by_tenant = {t.id: {s["idle"] + s["busy"] for s in eng.engine.pools.stats(t)}
                 for t in (A, B)}
    assert all(by_tenant.values()), by_tenant


def test_nothing_is_left_behind(eng: Running, images: Any) -> None:
    """Pipes, relays and processes are gone after pipelines that end every way, a cancelled
    one included."""
    pipeline(eng, images, sh(INTERACTOR), sh(SOLUTION))   # warm: the pools' own fds
    eng.settle()
    pipes = open_pipes()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    relayed = tuple(PipeSpec(p.src, p.dst, capture_bytes=4) for p in BOTH_WAYS)
    pipeline(eng, images, sh(INTERACTOR), sh(SOLUTION), pipes=relayed)
    pipeline(eng, images, sh("exit 0"), sh(FLOOD, wall_ms=60000), pipes=relayed)
    pipeline(eng, images, sh("sleep 1000", wall_ms=300), sh(FLOOD), shared=False)

    async def cancelled() -> None:
        task = asyncio.ensure_future(eng.engine.pipeline(
            images.oci, PipelineSpec((sh("sleep 1000"), sh(FLOOD)), relayed), tenant=A,
            policy="judge"))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    eng.run(cancelled())
    eng.settle()
    assert open_pipes() == pipes
    # The runtime's spawner and inits only: every run's processes are gone (an idle init
    # may hold the next run's child, made ahead: a fork of init, named as init). The
    # spawner's own helpers made ahead and its id mapper are not runs'.
    ours = (HELPER_NAME, MAPPER_NAME)
    after = {p.pid for p in psutil.Process().children(recursive=True)
             if not (p.name() == "sbx-init" == psutil.Process(p.ppid()).name())
             and p.name() not in ours}
    inits = {int(c.pid) for pool in eng.engine.pools._pools.values() for c in pool.idle}
    assert after - before <= inits


def test_a_pipeline_under_a_timing_policy_takes_one_reserved_cpu(tmp_path: Path,
                                                                 images: Any) -> None:
    """With a CPU reserved for judge runs, the whole pipeline takes one slot: both
    processes run on that CPU (one slot, so a pipeline never waits for a second one)."""
    r = Running(tmp_path / "state", timing=TimingConfig(cpus="1"))
    try:
        out = pipeline(r, images, sh(INTERACTOR), sh(SOLUTION))
        assert statuses(out) == [Status.OK, Status.OK], out
        assert [p.result.cpus for p in out.processes] == ["1", "1"]
    finally:
        r.close()


def test_a_writable_root_shared_by_a_pipeline_is_made_anew_after_it(eng: Running,
                                                                     images: Any) -> None:
    out = eng.run(eng.engine.pipeline(images.oci, PipelineSpec(
        (replace(sh("echo mark > /mark; echo go"), user="0"), sh("read go; cat /mark")),
        (PipeSpec((0, 1), (1, 0)),)), tenant=A, policy="default"))
    assert statuses(out) == [Status.OK, Status.OK], out
    assert out.processes[1].result.stdout == b"mark\n"
    eng.settle()
    after = eng.run(eng.engine.run(images.oci, sh("cat /mark 2>&1"), tenant=A,
                                   policy="default"))
    assert b"No such file" in after.result.stdout, after


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own"])
def test_a_chain_of_the_most_processes_passes_its_data_along(eng: Running, images: Any,
                                                             shared: bool) -> None:
    n = MAX_PIPELINE_PROCESSES
    processes = (sh("seq 1 1000"), *(sh("cat") for _ in range(n - 2)), sh("wc -l"))
    chain = tuple(PipeSpec((i, 1), (i + 1, 0), capture_bytes=4 if i == n // 2 else 0)
                  for i in range(n - 1))
    out = pipeline(eng, images, *processes, pipes=chain, shared=shared)
    assert statuses(out) == [Status.OK] * n, out
    assert out.processes[-1].result.stdout.strip() == b"1000"
    assert out.captured[n // 2] == b"1\n2\n" and out.truncated[n // 2]
