"""The runtime benchmark: `python -m loadtest.runtime [--policy judge,default] [--runs N]
[--cold N] [--writable N] [--quick]`.

Every figure is measured in one run, beside its bare baseline measured in the same run on
the same binaries (the tight fork+exec and posix_spawn loops of loadtest.baseline, or what
the figure names), with the ratio, and printed as a table; the last line is one JSON
object (figures of each policy under "policies"). Figures and ratios only: no thresholds,
no verdict. Per policy (`--policy`, both by default):

- exec: container.exec of busybox `true` in a warm container, reset after each run as the
  service's pools do (host-side latency, from the call to the returned result),
  sequential (back to back, and 30 ms apart: init then makes each next run's child
  ahead) and 2 at once, beside the bare loops of the same binary at the same
  concurrency (30 ms apart too: on a VM whose idle CPUs and caches go cold, a bare run
  30 ms after the last costs ~1.6-3x one back to back). Back to back, the same for exit0
  (loadtest/native/exit0.c: exit(0) with no libc, so no C library's start-up), and for
  each program the warm median less the bare one: the sandbox's own time per exec,
  whatever the program's start costs on this machine. The back-to-back series of every
  policy and program take turns, in bursts of 20 (each burst's first run untimed: its
  container was idle through the other turns), so that the VM's drift over the minutes of
  a run falls on each alike;
- cold start: create_container until ready, beside the bare loops of a busybox `unshare`
  of the same namespaces;
- idle memory: USS of idle containers' inits, each with the next run's child it holds after
  a run (as a pool's container between runs), beside the spawner that starts them.

Then, with `default` among the policies:

- a writable run's root: a file-heavy busybox sh script (200 files of 4 KiB written in
  the root, read back, 50 image files deleted, image files read) in a warm `default`
  container reset in place after each run, and each in a fresh `default` container
  (created and destroyed around it, only the exec timed), interleaved;
- back to back in one warm `default` container: a run that writes the root (`touch`; its
  reset makes the root anew before the next run is read) and one that does not (`true`),
  each beside the bare loops of the same binary; and `true` right after a `touch`, against
  `true` after `true`: the part of the reset the next request waits for.

And once, in a container of the first policy: a CPU-bound and a syscall-bound static C
program (workloads/), bare vs in the container, interleaved.

The rootfs and the workloads are built in a temporary directory removed at the end; every
container is destroyed and the runtime closed whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from loadtest.baseline import (
    BenchError,
    Command,
    Loops,
    fastest,
    measure,
    median,
    percentile,
)
from loadtest.baseline import flat as baseline_figures
from loadtest.cbuild import build, build_exit0
from loadtest.http.service import stop_on_sigterm
from loadtest.rows import OwnTime, Row, loop_bases, own_time_rows, policies_arg, table
from sandbox.runtime import _spawn, seccomp
from sandbox.runtime.container import Container
from sandbox.runtime.profiles import Limits
from sandbox.runtime.requests import ContainerSpec, ExecRequest
from sandbox.runtime.results import RunResult, Status
from sandbox.runtime.spawnerclient import Runtime
from testbed import busybox

WORKLOADS = Path(__file__).resolve().parent / "workloads"
ENV = {"PATH": "/bin"}
TRUE = ["true"]
EXIT0 = ["/bin/exit0"]   # no libc: a run's cost apart from the program's start (cbuild.py)
# The programs timed back to back: each figure of `true` has exit0's beside it.
PROGRAMS = {"true": TRUE, "exit0": EXIT0}
POLICIES = ("judge", "default")
WRITABLE = "default"           # the policy whose root a run writes
# A file-heavy run in the root (not a tmpfs), as container root (who owns the image's
# files). Each step fails unless the run starts from the image as pulled: `mkdir` of a
# directory the run before made, `rm` of an image file the run before deleted.
WRITTEN_DIR = "/etc/written"
WRITTEN_FILES = 200
DELETED_FILES = 50
# Applets the script runs: never among those it deletes.
SCRIPT_APPLETS = frozenset({"busybox", "sh", "mkdir", "printf", "seq", "cat", "rm", "touch",
                            "true", "ls"})
# The smallest run that changes the root, as the run user (the image's /work is 0777).
WRITE_ROOT = ["touch", "/work/touched"]
# Long enough for the workloads, within the judge profile's maxima.
LONG = Limits(cpu_ms=30_000, wall_ms=60_000)
IDLE_WAIT_S = 1.0
# Between the spaced runs: traffic sparse enough for init to make each next run's child
# ahead (back to back, or at the rate of the HTTP benchmarks, it does not: native/init.c,
# PREPARE_MIN_GAP_NS).
SPACED_S = 0.03
EXEC_BURST = 20   # back-to-back execs of one policy before the next policy's turn
DEVNULL_STDIO = [
    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
    (os.POSIX_SPAWN_DUP2, 1, 2),
]


@dataclass(frozen=True)
class Counts:
    runs: int                      # sequential execs of `true`, bare and warm
    cold: int                      # container creations per profile
    warmup: int                    # untimed runs before each timed series
    idle: int                      # containers kept idle for the memory figure
    repeats: int                   # interleaved bare/container runs of each workload
    writable: int                  # interleaved warm/fresh runs of the writable script
    spin_args: tuple[str, ...]     # iteration count for spin.c ( (): its default)
    syscall_args: tuple[str, ...]  # iteration count for syscalls.c


def counts_from(args: argparse.Namespace) -> Counts:
    if args.quick:
        return Counts(runs=args.runs or 20, cold=args.cold or 3, warmup=2, idle=3, repeats=2,
                      writable=args.writable or 3, spin_args=("10000000",),
                      syscall_args=("50000",))
    return Counts(runs=args.runs or 500, cold=args.cold or 50, warmup=20, idle=10, repeats=7,
                  writable=args.writable or 40, spin_args=(), syscall_args=())


def ms_since(t0_ns: int) -> float:
    return (time.monotonic_ns() - t0_ns) / 1e6


# --- bare runs ----------------------------------------------------------------------------


def spawn_wait(path: Path, argv: list[str]) -> tuple[float, float]:
    """fork+exec+wait of one program from this process, stdio on /dev/null:
    (wall ms, CPU ms of the child from wait4's rusage)."""
    t0 = time.monotonic_ns()
    pid = os.posix_spawn(path, argv, ENV, file_actions=DEVNULL_STDIO)
    _, status, ru = os.wait4(pid, 0)
    wall = ms_since(t0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise BenchError(f"{path} {argv[1:]} ended with wait status {status:#x}")
    return wall, (ru.ru_utime + ru.ru_stime) * 1000


# The cheapest seccomp filter there is: every sandbox with a filter pays at least this
# much per syscall (the kernel's syscall-entry slow path), whatever its policy.
ALLOW_ALL = seccomp.compile_profile(
    seccomp.load_profile({"defaultAction": "SCMP_ACT_ALLOW"}, name="allow-all")).bpf


def spawn_filtered_wait(path: Path, argv: list[str], bpf: bytes) -> tuple[float, float]:
    """As spawn_wait, through the runtime's own exec child with `bpf` loaded, no namespace."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    t0 = time.monotonic_ns()
    try:
        pid = _spawn.spawn(paths=[str(path).encode()], argv=[a.encode() for a in argv],
                           envp=[b"PATH=/bin"], cwd=b"/", uid=os.getuid(), gid=os.getgid(),
                           set_groups=False, rlimits=[], stdio=(null, null, null),
                           cgroup_fds=[], bpf=bpf, last_cap=-1, err_fd=err_w)
    finally:
        os.close(err_w)
        os.close(null)
    _, status, ru = os.wait4(pid, 0)
    wall = ms_since(t0)
    failure = os.read(err_r, 200)
    os.close(err_r)
    if failure or os.waitstatus_to_exitcode(status) != 0:
        raise BenchError(f"{path} under a filter: {failure!r}, wait status {status:#x}")
    return wall, (ru.ru_utime + ru.ru_stime) * 1000


# --- container runs -----------------------------------------------------------------------


async def checked_exec(c: Container, argv: list[str], limits: Limits | None = None, *,
                       reset_after: bool = False, uid: int | None = None) -> RunResult:
    r = await c.exec(ExecRequest(argv=argv, env=ENV, limits=limits, uid=uid),
                     reset_after=reset_after)
    if r.status != Status.OK:
        raise BenchError(f"{argv} in container {c.id}: {r.status} ({r.error or ''}) "
                         f"{r.stderr[-300:].decode(errors='replace')}")
    return r


async def create(runtime: Runtime, root: Path, profile: str) -> Container:
    return await runtime.create_container(ContainerSpec(layers=(str(root),), policy=profile))


async def exec_loop(c: Container, n: int, argv: list[str] = TRUE) -> list[float]:
    """`n` runs of `argv` one after the other, each reset after as the pools do: the
    host-side latency of each (ms)."""
    latency = []
    for _ in range(n):
        t0 = time.monotonic_ns()
        await checked_exec(c, argv, reset_after=True)
        latency.append(ms_since(t0))
    return latency


@dataclass(frozen=True)
class Bare:
    """The bare loops every policy's figures stand beside, measured once per run."""

    exec_1: Loops      # busybox true, 1 at once
    exec_2: Loops      # 2 at once
    unshare: Loops     # busybox unshare of the container's namespaces, running true
    exit0_1: Loops     # the libc-free exit0, 1 at once
    spaced: Loops      # busybox true, 1 at once, SPACED_S apart


def bare_loops(root: Path, n: Counts) -> tuple[Bare, dict[str, Any]]:
    true = Command(str(root / "bin/true"), tuple(TRUE), ENV)
    # The kernel's share of a cold start: a bare unshare of the user, mount, pid, ipc, uts
    # and net namespaces (busybox has no cgroup-namespace flag) running `true`.
    unshare = Command(str(root / "bin/unshare"), ("unshare", "-r", "-m", "-p", "-f", "-i",
                                                  "-u", "-n", str(root / "bin/true")), ENV)
    exit0 = Command(str(root / "bin/exit0"), ("exit0",), ENV)
    half = max(1, n.runs // 2)
    bare = Bare(measure(true, n.runs, 1, n.warmup), measure(true, 2 * half, 2, n.warmup),
                measure(unshare, n.cold, 1, n.warmup), measure(exit0, n.runs, 1, n.warmup),
                measure(true, half, 1, n.warmup, gap_s=SPACED_S))
    fig = (baseline_figures("bare_exec", bare.exec_1) | baseline_figures("bare_exec_2",
                                                                         bare.exec_2)
           | baseline_figures("bare_unshare", bare.unshare)
           | baseline_figures("bare_exit0", bare.exit0_1)
           | baseline_figures("bare_spaced", bare.spaced))
    return bare, fig


@dataclass
class BackToBack:
    """One policy's timed back-to-back warm execs of one program (sequential_execs)."""

    latency: list[float]
    results: list[RunResult]
    ms: float = 0.0         # the time of its timed runs, for the rate
    prepared: int = 0       # through the child init made ahead
    fallbacks: int = 0      # asked for it, took the vfork path


async def sequential_execs(runtime: Runtime, root: Path, n: Counts, policies: tuple[str, ...]
                           ) -> dict[tuple[str, str], BackToBack]:
    """n.runs back-to-back execs of each of PROGRAMS per policy, one warm container each,
    the (policy, program) series taking turns in bursts of EXEC_BURST (order swapped each
    round). One series after another showed this VM's drift over the minutes between them
    as a difference between them. Each burst's first run is not timed: its container was
    idle through the other turns, which init may use to make its next child ahead."""
    cs: dict[str, Container] = {}
    try:
        for policy in policies:
            cs[policy] = await create(runtime, root, policy)
            for argv in PROGRAMS.values():
                await exec_loop(cs[policy], n.warmup, argv)
        got = {(p, name): BackToBack([], []) for p in policies for name in PROGRAMS}
        order = list(got)
        while any(len(b.latency) < n.runs for b in got.values()):
            for policy, name in order:
                c, b, argv = cs[policy], got[policy, name], PROGRAMS[name]
                burst = min(EXEC_BURST, n.runs - len(b.latency))
                if burst == 0:
                    continue
                await checked_exec(c, argv, reset_after=True)
                counted = c.prepared_runs, c.prepare_fallbacks
                for _ in range(burst):
                    t0 = time.monotonic_ns()
                    b.results.append(await checked_exec(c, argv, reset_after=True))
                    b.latency.append(ms_since(t0))
                    b.ms += b.latency[-1]
                b.prepared += c.prepared_runs - counted[0]
                b.fallbacks += c.prepare_fallbacks - counted[1]
            order.reverse()
        return got
    finally:
        for c in cs.values():
            await c.destroy()


async def bench_exec(runtime: Runtime, root: Path, n: Counts, policy: str, bare: Bare,
                     seq: BackToBack, seq0: BackToBack) -> tuple[list[Row], dict[str, Any]]:
    """`seq`: the policy's back-to-back execs of `true`; `seq0`: of exit0."""
    half = max(1, n.runs // 2)
    results, latency = seq.results, seq.latency
    warm_rate = len(latency) / (seq.ms / 1000)
    prepared, fallbacks = seq.prepared, seq.fallbacks
    c = await create(runtime, root, policy)
    try:
        await exec_loop(c, n.warmup)
        spaced_results: list[RunResult] = []
        spaced: list[float] = []
        counted = c.prepared_runs, c.prepare_fallbacks
        for _ in range(half):
            await asyncio.sleep(SPACED_S)
            t0 = time.monotonic_ns()
            spaced_results.append(await checked_exec(c, TRUE, reset_after=True))
            spaced.append(ms_since(t0))
        spaced_prepared = c.prepared_runs - counted[0]
    finally:
        await c.destroy()

    # Two loops at once, two containers (bare: two worker processes).
    pair: list[Container] = []
    try:
        for _ in range(2):
            pair.append(await create(runtime, root, policy))
        await asyncio.gather(*(exec_loop(p, n.warmup) for p in pair))
        t0 = time.monotonic_ns()
        await asyncio.gather(*(exec_loop(p, half) for p in pair))
        warm_rate2 = 2 * half / (ms_since(t0) / 1000)
    finally:
        for p in pair:
            await p.destroy()

    bare_median = fastest(bare.exec_1).median_ms
    bare_rate = fastest(bare.exec_1, "runs_per_s").runs_per_s
    bare0_median = fastest(bare.exit0_1).median_ms
    apart = f" {SPACED_S * 1000:g} ms apart"
    fig = {
        "warm_exec_median_ms": median(latency), "warm_exec_p99_ms": percentile(latency, 99),
        "warm_exec_result_wall_median_ms": median([r.wall_ms for r in results]),
        "warm_exec_result_setup_median_ms": median([r.setup_ms for r in results]),
        # Runs exec'd through the child init made ahead, and those that took the vfork
        # path although they asked for it (see Container.prepared_runs).
        "warm_exec_prepared": prepared, "warm_exec_prepare_fallbacks": fallbacks,
        "warm_exec_spaced_median_ms": median(spaced),
        "warm_exec_spaced_wall_median_ms": median([r.wall_ms for r in spaced_results]),
        "warm_exec_spaced_prepared": spaced_prepared,
        "warm_exec_runs_per_s": warm_rate, "warm_exec_2_containers_runs_per_s": warm_rate2,
        "warm_exec_vs_bare_median": median(latency) / bare_median,
        "warm_exec_vs_bare_runs_per_s": warm_rate / bare_rate,
        # The sandbox's own time per exec, apart from the program's start: both programs'
        # warm median less their bare one.
        "warm_exec_exit0_median_ms": median(seq0.latency),
        "warm_exec_exit0_p99_ms": percentile(seq0.latency, 99),
        "warm_exec_exit0_vs_bare_median": median(seq0.latency) / bare0_median,
        "warm_exec_over_bare_ms": median(latency) - bare_median,
        "warm_exec_exit0_over_bare_ms": median(seq0.latency) - bare0_median,
    }
    rows = [
        Row(f"{policy}: exec `true` median (ms)", fig["warm_exec_median_ms"],
            loop_bases(bare.exec_1, "p50")),
        Row(f"{policy}: exec `true` p99 (ms)", fig["warm_exec_p99_ms"],
            loop_bases(bare.exec_1, "p99")),
        Row(f"{policy}:   result.wall_ms median (init: release or vfork..reap)",
            fig["warm_exec_result_wall_median_ms"], loop_bases(bare.exec_1, "p50")),
        Row(f"{policy}:   result.setup_ms median (call..started)",
            fig["warm_exec_result_setup_median_ms"]),
        *own_time_rows(policy, "exec", OwnTime(
            fig["warm_exec_exit0_median_ms"], fig["warm_exec_exit0_p99_ms"],
            fig["warm_exec_over_bare_ms"], fig["warm_exec_exit0_over_bare_ms"]), bare.exit0_1),
        Row(f"{policy}:   runs through the child made ahead, of {n.runs}", prepared),
        Row(f"{policy}:   asked for it, took the vfork path", fallbacks),
        Row(f"{policy}: exec `true` {SPACED_S * 1000:g} ms apart, median (ms)",
            fig["warm_exec_spaced_median_ms"], loop_bases(bare.spaced, "p50", apart)),
        Row(f"{policy}:   result.wall_ms median", fig["warm_exec_spaced_wall_median_ms"],
            loop_bases(bare.spaced, "p50", apart)),
        Row(f"{policy}:   runs through the child made ahead, of {half}", spaced_prepared),
        Row(f"{policy}: exec `true` sequential (runs/s)", warm_rate,
            loop_bases(bare.exec_1, "runs_per_s")),
        Row(f"{policy}: exec `true` 2 loops, 2 containers (runs/s)", warm_rate2,
            loop_bases(bare.exec_2, "runs_per_s")),
    ]
    return rows, fig


async def bench_cold(runtime: Runtime, root: Path, n: Counts, policy: str,
                     bare: Bare) -> tuple[list[Row], dict[str, Any]]:
    await (await create(runtime, root, policy)).destroy()  # untimed first one
    made: list[float] = []
    gone: list[float] = []
    for _ in range(n.cold):
        t0 = time.monotonic_ns()
        c = await create(runtime, root, policy)
        made.append(ms_since(t0))
        t0 = time.monotonic_ns()
        await c.destroy()
        gone.append(ms_since(t0))
    fig = {"cold_start_median_ms": median(made), "cold_start_p99_ms": percentile(made, 99),
           "cold_start_destroy_median_ms": median(gone)}
    rows = [Row(f"{policy}: cold start median (ms)", median(made),
                loop_bases(bare.unshare, "p50", " unshare")),
            Row(f"{policy}: cold start p99 (ms)", percentile(made, 99),
                loop_bases(bare.unshare, "p99", " unshare")),
            Row(f"{policy}: destroy median (ms)", median(gone))]
    return rows, fig


def _is_spawner(p: psutil.Process) -> bool:
    try:
        return "sandbox.runtime.spawner" in p.cmdline()
    except psutil.Error:
        return False


def _uss(pid: int) -> tuple[float, str]:
    """USS in MiB; a non-dumpable init is unreadable to an ordinary user (smaps needs ptrace
    access), and then its anonymous RSS (statm, an upper bound) stands in."""
    p = psutil.Process(pid)
    try:
        return p.memory_full_info().uss / 2**20, "uss"
    except psutil.AccessDenied:
        info = p.memory_info()
        return (info.rss - info.shared) / 2**20, "statm:rss-shared"


def _tree(pid: int) -> list[psutil.Process]:
    """Init and its children: between runs, the next run's child waiting (init.c)."""
    p = psutil.Process(pid)
    return [p, *p.children()]


def _uss_tree(pid: int) -> tuple[float, str]:
    measured = [_uss(p.pid) for p in _tree(pid)]
    return sum(m for m, _ in measured), measured[0][1]


def _pss_tree(pid: int) -> float | None:
    """PSS in MiB of init and its child: the pages they share since the fork count in
    neither's USS, and half in each one's PSS. None where smaps is unreadable."""
    try:
        return sum(p.memory_full_info().pss for p in _tree(pid)) / 2**20
    except psutil.AccessDenied:
        return None


async def bench_idle(runtime: Runtime, root: Path, n: Counts,
                     policy: str) -> tuple[list[Row], dict[str, Any]]:
    spawners = [p for p in psutil.Process().children() if _is_spawner(p)]
    if len(spawners) != 1:
        raise BenchError(f"expected one spawner child of this process, found {spawners}")
    containers: list[Container] = []
    try:
        for _ in range(n.idle):
            containers.append(await create(runtime, root, policy))
            # As a pool's container between sparse runs: init then holds the next run's
            # child (the first run finds no cgroup to set aside for the next yet, and init
            # waits to see the runs come apart).
            for _ in range(4):
                await asyncio.sleep(2 * SPACED_S)
                await checked_exec(containers[-1], TRUE, reset_after=True)
        await asyncio.sleep(IDLE_WAIT_S)
        measured = [_uss_tree(c.pid) for c in containers]
        pss = [_pss_tree(c.pid) for c in containers]
        rss = [sum(p.memory_info().rss for p in _tree(c.pid)) / 2**20 for c in containers]
    finally:
        for c in containers:
            await c.destroy()
    spawner_uss, _ = _uss(spawners[0].pid)
    uss = [m for m, _ in measured]
    known_pss = [p for p in pss if p is not None]
    fig = {"idle_container_uss_mib": median(uss), "idle_container_rss_mib": median(rss),
           "idle_container_pss_mib": median(known_pss) if known_pss else None,
           "idle_container_memory_source": measured[0][1], "spawner_uss_mib": spawner_uss,
           "idle_containers": n.idle}
    what = "USS" if measured[0][1] == "uss" else "RSS-shared (USS unreadable)"
    rows = [Row(f"{policy}: idle init + waiting child {what}, median of {n.idle} (MiB)",
                median(uss), (("the spawner's USS", spawner_uss),)),
            Row(f"{policy}: idle init + waiting child RSS median (MiB)", median(rss))]
    if known_pss:
        rows.append(Row(f"{policy}: idle init + waiting child PSS median (MiB)",
                        median(known_pss)))
    return rows, fig


async def compare(c: Container, root: Path, name: str, args: tuple[str, ...],
                  n: Counts) -> dict[str, float]:
    """Bare and in-container runs of /bin/<name>, interleaved; medians of CPU and wall ms."""
    path = root / "bin" / name
    spawn_wait(path, [name, *args])
    await checked_exec(c, [f"/bin/{name}", *args], LONG)
    cpu: dict[str, list[float]] = {"bare": [], "box": [], "filtered": []}
    wall: dict[str, list[float]] = {"bare": [], "box": [], "filtered": []}
    for _ in range(n.repeats):
        w, u = spawn_wait(path, [name, *args])
        wall["bare"].append(w)
        cpu["bare"].append(u)
        w, u = spawn_filtered_wait(path, [name, *args], ALLOW_ALL)
        wall["filtered"].append(w)
        cpu["filtered"].append(u)
        r = await checked_exec(c, [f"/bin/{name}", *args], LONG)
        if r.cpu_ms is None:
            raise BenchError("the container run reported no CPU time")
        wall["box"].append(r.wall_ms)
        cpu["box"].append(r.cpu_ms)
    out = {f"{name}_{kind}_{where}_median_ms": median(v)
           for kind, d in (("cpu", cpu), ("wall", wall)) for where, v in d.items()}
    for kind in ("cpu", "wall"):
        box, bare = out[f"{name}_{kind}_box_median_ms"], out[f"{name}_{kind}_bare_median_ms"]
        out[f"{name}_{kind}_overhead_pct"] = (box / bare - 1) * 100
        floor = out[f"{name}_{kind}_filtered_median_ms"]
        out[f"{name}_{kind}_overhead_vs_allow_all_filter_pct"] = (box / floor - 1) * 100
    return out


async def bench_overhead(runtime: Runtime, root: Path, n: Counts,
                         policy: str) -> tuple[list[Row], dict[str, Any]]:
    c = await create(runtime, root, policy)
    try:
        spin = await compare(c, root, "spin", n.spin_args, n)
        sysc = await compare(c, root, "syscalls", n.syscall_args, n)
    finally:
        await c.destroy()
    fig: dict[str, Any] = {**spin, **sysc, "workload_repeats": n.repeats,
                           "workload_policy": policy,
                           "cpu_overhead_pct": spin["spin_cpu_overhead_pct"],
                           "cpu_overhead_wall_pct": spin["spin_wall_overhead_pct"],
                           "syscall_overhead_pct": sysc["syscalls_cpu_overhead_pct"],
                           "syscall_overhead_wall_pct": sysc["syscalls_wall_overhead_pct"],
                           "syscall_overhead_vs_allow_all_filter_pct":
                               sysc["syscalls_cpu_overhead_vs_allow_all_filter_pct"]}
    rows = []
    for name, what in (("spin", "CPU-bound"), ("syscalls", "syscall-bound")):
        for kind in ("cpu", "wall"):
            rows.append(Row(f"{policy}: {name}.c ({what}) {kind} median (ms)",
                            fig[f"{name}_{kind}_box_median_ms"],
                            (("the same binary bare", fig[f"{name}_{kind}_bare_median_ms"]),
                             ("bare under an allow-all filter",
                              fig[f"{name}_{kind}_filtered_median_ms"]))))
    return rows, fig


# --- a writable root ----------------------------------------------------------------------


def deleted_files(root: Path) -> list[str]:
    """The names in the image's /bin the file-heavy run deletes: none it runs."""
    deleted = sorted(p.name for p in (root / "bin").iterdir()
                     if p.name not in SCRIPT_APPLETS)[-DELETED_FILES:]
    if len(deleted) < DELETED_FILES:
        raise BenchError(f"the rootfs has {len(deleted)} spare files in /bin, "
                         f"{DELETED_FILES} needed")
    return deleted


def writable_script(root: Path) -> list[str]:
    """The file-heavy run: WRITTEN_FILES files of 4 KiB written in the root and read back,
    DELETED_FILES of the image's files deleted (whiteouts in the upper layer), image files
    read. It fails unless it starts from the image as pulled."""
    deleted = deleted_files(root)
    script = "\n".join([
        "set -e",
        f"mkdir {WRITTEN_DIR}",
        "s=$(printf '%4096s' '')",
        f'for i in $(seq {WRITTEN_FILES}); do printf %s "$s" > {WRITTEN_DIR}/f$i; done',
        f"cat {WRITTEN_DIR}/* > /dev/null",
        "rm " + " ".join(f"/bin/{name}" for name in deleted),
        "cat /bin/busybox /etc/passwd /etc/group /etc/hostname > /dev/null",
    ])
    return ["sh", "-c", script]


async def timed_exec(c: Container, argv: list[str], *, reset_after: bool) -> tuple[float, float]:
    """(host-side latency, init's fork..reap wall) of one run as container root, in ms."""
    t0 = time.monotonic_ns()
    r = await checked_exec(c, argv, reset_after=reset_after, uid=0)
    return ms_since(t0), r.wall_ms


async def fresh_exec(runtime: Runtime, root: Path, argv: list[str]) -> tuple[float, float]:
    """One run in a container made for it and destroyed after it; only the exec timed."""
    c = await create(runtime, root, WRITABLE)
    try:
        return await timed_exec(c, argv, reset_after=False)
    finally:
        await c.destroy()


async def bench_writable(runtime: Runtime, root: Path, n: Counts,
                         bare: Bare) -> tuple[list[Row], dict[str, Any]]:
    argv = writable_script(root)
    times: dict[str, list[float]] = {"warm": [], "fresh": []}
    walls: dict[str, list[float]] = {"warm": [], "fresh": []}
    warm = await create(runtime, root, WRITABLE)
    try:
        await timed_exec(warm, argv, reset_after=True)   # untimed first ones
        await fresh_exec(runtime, root, argv)
        for i in range(n.writable):
            # Interleaved, each first in turn: what one run leaves (the kernel's deferred
            # teardown of a destroyed container, caches) falls on both sides alike.
            for side in (("warm", "fresh") if i % 2 == 0 else ("fresh", "warm")):
                t, w = (await timed_exec(warm, argv, reset_after=True) if side == "warm"
                        else await fresh_exec(runtime, root, argv))
                times[side].append(t)
                walls[side].append(w)
        # Back to back in the warm container: the next request waits for the reset of the
        # run before, which makes the root anew only when that run changed it.
        await exec_loop(warm, n.warmup, WRITE_ROOT)
        write_root = await exec_loop(warm, n.runs, WRITE_ROOT)
        await exec_loop(warm, n.warmup)
        no_write = await exec_loop(warm, n.runs)
        # `true` right after a run that wrote the root, against `true` after `true`: the
        # difference is the part of that reset the next request waits for.
        after_write: list[float] = []
        for _ in range(n.runs):
            await exec_loop(warm, 1, WRITE_ROOT)
            after_write += await exec_loop(warm, 1)
    finally:
        await warm.destroy()
    touched = root.parent / "touched-bare"
    touch = Command(str(root / "bin/touch"), ("touch", str(touched)), ENV)
    bare_touch = measure(touch, n.runs, 1, n.warmup)
    fig: dict[str, Any] = {
        "writable_runs": n.writable,
        "writable_warm_reset_median_ms": median(times["warm"]),
        "writable_fresh_median_ms": median(times["fresh"]),
        "writable_warm_reset_wall_median_ms": median(walls["warm"]),
        "writable_fresh_wall_median_ms": median(walls["fresh"]),
        "back_to_back_write_root_median_ms": median(write_root),
        "back_to_back_write_root_p99_ms": percentile(write_root, 99),
        "back_to_back_true_median_ms": median(no_write),
        "back_to_back_true_p99_ms": percentile(no_write, 99),
        "true_after_write_root_median_ms": median(after_write),
        "true_after_write_root_p99_ms": percentile(after_write, 99),
        **baseline_figures("bare_touch", bare_touch),
    }
    fig["writable_warm_vs_fresh_median"] = (fig["writable_warm_reset_median_ms"]
                                            / fig["writable_fresh_median_ms"])
    fig["writable_warm_vs_fresh_wall_median"] = (fig["writable_warm_reset_wall_median_ms"]
                                                 / fig["writable_fresh_wall_median_ms"])
    fig["reset_of_written_root_median_ms"] = (fig["true_after_write_root_median_ms"]
                                              - fig["back_to_back_true_median_ms"])
    fresh = (("a fresh container", fig["writable_fresh_median_ms"]),)
    rows = [
        Row(f"{WRITABLE}: file-heavy run, warm, reset in place (ms)",
            fig["writable_warm_reset_median_ms"], fresh),
        Row(f"{WRITABLE}:   its result.wall_ms (init: fork..reap)",
            fig["writable_warm_reset_wall_median_ms"],
            (("a fresh container", fig["writable_fresh_wall_median_ms"]),)),
        Row(f"{WRITABLE}: back to back, `touch` in the root (ms)",
            fig["back_to_back_write_root_median_ms"], loop_bases(bare_touch, "p50", " touch")),
        Row(f"{WRITABLE}: back to back, `touch` in the root p99 (ms)",
            fig["back_to_back_write_root_p99_ms"], loop_bases(bare_touch, "p99", " touch")),
        Row(f"{WRITABLE}: back to back, `true` (ms)", fig["back_to_back_true_median_ms"],
            loop_bases(bare.exec_1, "p50")),
        Row(f"{WRITABLE}: back to back, `true` p99 (ms)", fig["back_to_back_true_p99_ms"],
            loop_bases(bare.exec_1, "p99")),
        Row(f"{WRITABLE}: `true` right after a `touch` in the root (ms)",
            fig["true_after_write_root_median_ms"],
            (("`true` after `true`", fig["back_to_back_true_median_ms"]),)),
        Row(f"{WRITABLE}:   so the reset of a written root, on the path (ms)",
            fig["reset_of_written_root_median_ms"]),
    ]
    return rows, fig


# --- setup --------------------------------------------------------------------------------


def build_workloads(dest: Path, owner: tuple[int, int]) -> None:
    """gcc -static -O2 each workloads/*.c into dest/bin (the container's /bin), and the
    libc-free exit0 (loadtest/cbuild.py)."""
    built = [build(src, dest / "bin" / src.stem, ("-static", "-O2"))
             for src in sorted(WORKLOADS.glob("*.c"))]
    for out in [*built, build_exit0(dest / "bin")]:
        os.lchown(out, *owner)


def host_info(runtime: Runtime, n: Counts) -> dict[str, Any]:
    return {"runs": n.runs, "cold_runs": n.cold, "warmup_runs": n.warmup,
            **machine_info(runtime)}


def machine_info(runtime: Runtime) -> dict[str, Any]:
    driver = runtime.cgroups.driver
    return {
        "id_mapping": runtime.mapping.method,
        "cgroup_driver": f"v{driver.version}" if driver is not None else "none",
        "kernel": platform.release(), "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def progress(quiet: bool, what: str) -> None:
    if not quiet:
        print(f"... {what}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def prepared() -> AsyncIterator[tuple[Runtime, Path]]:
    """A Runtime and a busybox root with the workloads in its /bin, in a temporary
    directory; the runtime is closed and the directory removed whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="sandboxd-loadtest-"))
    runtime: Runtime | None = None
    try:
        runtime = await Runtime.start()
        m = runtime.mapping
        root = busybox.build_rootfs(tmp / "rootfs", owner=(m.root_uid, m.root_gid))
        build_workloads(root, (m.root_uid, m.root_gid))
        yield runtime, root
    finally:
        if runtime is not None:
            await runtime.close()
        shutil.rmtree(tmp, ignore_errors=True)


async def run(n: Counts, policies: tuple[str, ...],
              quiet: bool) -> tuple[list[Row], dict[str, Any]]:
    async with prepared() as (runtime, root):
        progress(quiet, "bare loops")
        bare, fig = bare_loops(root, n)
        fig = host_info(runtime, n) | {"policy_list": list(policies)} | fig
        rows: list[Row] = []
        per_policy: dict[str, dict[str, Any]] = {p: {} for p in policies}
        progress(quiet, "exec back to back, the policies in turns")
        seq = await sequential_execs(runtime, root, n, policies)
        for policy in policies:
            progress(quiet, f"exec, {policy}")
            more_rows, more = await bench_exec(runtime, root, n, policy, bare,
                                               seq[policy, "true"], seq[policy, "exit0"])
            rows += more_rows
            per_policy[policy] |= more
        for policy in policies:
            progress(quiet, f"cold start, {policy}")
            more_rows, more = await bench_cold(runtime, root, n, policy, bare)
            rows += more_rows
            per_policy[policy] |= more
        for policy in policies:
            progress(quiet, f"idle memory, {policy}")
            more_rows, more = await bench_idle(runtime, root, n, policy)
            rows += more_rows
            per_policy[policy] |= more
        if WRITABLE in policies:
            progress(quiet, "a writable root")
            more_rows, more = await bench_writable(runtime, root, n, bare)
            rows += more_rows
            fig |= more
        progress(quiet, "workloads")
        more_rows, more = await bench_overhead(runtime, root, n, policies[0])
        rows += more_rows
        fig |= more
        fig["policies"] = per_policy
        return rows, fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.runtime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=policies_arg, default=POLICIES,
                    help="policies to measure, comma-separated (default: judge,default)")
    ap.add_argument("--runs", type=int, help="sequential warm execs (default 500)")
    ap.add_argument("--cold", type=int, help="container creations per policy (default 50)")
    ap.add_argument("--writable", type=int,
                    help="runs of the file-heavy script per side, warm and fresh (default 40)")
    ap.add_argument("--quick", action="store_true", help="small counts, for the test suite")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    if any(v is not None and v < 2 for v in (args.runs, args.cold, args.writable)):
        ap.error("--runs, --cold and --writable need at least 2")
    n = counts_from(args)
    try:
        rows, fig = asyncio.run(run(n, args.policy, args.json_only))
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    if not args.json_only:
        print(f"sandboxd runtime benchmark: kernel {fig['kernel']}, python {fig['python']}, "
              f"{fig['cpus']} cpus, id mapping {fig['id_mapping']}, cgroup "
              f"{fig['cgroup_driver']}, policies {', '.join(args.policy)}, {n.runs} execs, "
              f"{n.cold} cold starts per policy, {n.writable} file-heavy runs per side")
        print(table(rows))
    print(json.dumps(fig, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
