"""The runtime benchmark: `python -m loadtest.runtime [--runs N] [--cold N] [--quick]`.

Every figure is measured in one run, beside a baseline measured in the same run on the same
binaries (bare fork+exec from this process), and printed as a table; the last line is one
JSON object. Figures and ratios only: no thresholds, no verdict.

- exec: busybox `true` bare (posix_spawn + wait) vs container.exec in a warm judge container
  (host-side latency, from the call to the returned result), sequential and 2 at once;
- cold start: create_container until ready, judge (directory root) and default (overlay),
  beside a bare `unshare` of the same namespaces;
- idle memory: USS of idle containers' inits, beside the spawner that starts them;
- overhead: a CPU-bound and a syscall-bound static C program (workloads/), bare vs in a
  container under the default seccomp policy, interleaved.

The rootfs and the workloads are built in a temporary directory removed at the end; every
container is destroyed and the runtime closed whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from sandbox import busybox
from sandbox.runtime import _spawn, seccomp
from sandbox.runtime.container import Container, ContainerSpec, ExecRequest, Runtime
from sandbox.runtime.profiles import Limits
from sandbox.runtime.results import RunResult, Status

WORKLOADS = Path(__file__).resolve().parent / "workloads"
ENV = {"PATH": "/bin"}
TRUE = ["true"]
# Long enough for the workloads, within the judge profile's maxima.
LONG = Limits(cpu_ms=30_000, wall_ms=60_000)
IDLE_WAIT_S = 1.0
DEVNULL_STDIO = [
    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
    (os.POSIX_SPAWN_DUP2, 1, 2),
]


class BenchError(RuntimeError):
    """A step of the benchmark did not do what it measures (not a slow result)."""


@dataclass(frozen=True)
class Counts:
    runs: int                      # sequential execs of `true`, bare and warm
    cold: int                      # container creations per profile
    warmup: int                    # untimed runs before each timed series
    idle: int                      # containers kept idle for the memory figure
    repeats: int                   # interleaved bare/container runs of each workload
    spin_args: tuple[str, ...]     # iteration count for spin.c ( (): its default)
    syscall_args: tuple[str, ...]  # iteration count for syscalls.c


def counts_from(args: argparse.Namespace) -> Counts:
    if args.quick:
        return Counts(runs=args.runs or 20, cold=args.cold or 3, warmup=2, idle=3, repeats=2,
                      spin_args=("10000000",), syscall_args=("50000",))
    return Counts(runs=args.runs or 500, cold=args.cold or 50, warmup=20, idle=10, repeats=7,
                  spin_args=(), syscall_args=())


# --- figures ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    s = sorted(values)
    if not s:
        raise BenchError("no samples")
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ms_since(t0_ns: int) -> float:
    return (time.monotonic_ns() - t0_ns) / 1e6


@dataclass(frozen=True)
class Row:
    figure: str
    value: float
    baseline: float | None = None
    baseline_is: str = ""


def table(rows: list[Row]) -> str:
    lines = [f"{'figure':<44} {'value':>10} {'baseline':>10} {'ratio':>8}  baseline is"]
    for r in rows:
        base = f"{r.baseline:10.3f}" if r.baseline is not None else f"{'-':>10}"
        ratio = (f"{r.value / r.baseline:7.2f}x" if r.baseline else f"{'-':>8}")
        lines.append(f"{r.figure:<44} {r.value:10.3f} {base} {ratio}  {r.baseline_is}")
    return "\n".join(lines)


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


def bare_loop(path: Path, argv: list[str], n: int) -> list[float]:
    return [spawn_wait(path, argv)[0] for _ in range(n)]


# --- container runs -----------------------------------------------------------------------


async def checked_exec(c: Container, argv: list[str], limits: Limits | None = None) -> RunResult:
    r = await c.exec(ExecRequest(argv=argv, env=ENV, limits=limits))
    if r.status != Status.OK:
        raise BenchError(f"{argv} in container {c.id}: {r.status} ({r.error or ''}) "
                         f"{r.stderr[-300:].decode(errors='replace')}")
    return r


async def create(runtime: Runtime, root: Path, profile: str) -> Container:
    return await runtime.create_container(ContainerSpec(layers=(str(root),), profile=profile))


async def exec_loop(c: Container, n: int) -> list[RunResult]:
    return [await checked_exec(c, TRUE) for _ in range(n)]


async def bench_exec(runtime: Runtime, root: Path, n: Counts) -> tuple[list[Row], dict[str, Any]]:
    true = root / "bin/true"
    bare_loop(true, TRUE, n.warmup)
    t0 = time.monotonic_ns()
    bare = bare_loop(true, TRUE, n.runs)
    bare_rate = n.runs / (ms_since(t0) / 1000)

    c = await create(runtime, root, "judge")
    try:
        await exec_loop(c, n.warmup)
        latency: list[float] = []
        results: list[RunResult] = []
        t_all = time.monotonic_ns()
        for _ in range(n.runs):
            t0 = time.monotonic_ns()
            results.append(await checked_exec(c, TRUE))
            latency.append(ms_since(t0))
        warm_rate = n.runs / (ms_since(t_all) / 1000)
    finally:
        await c.destroy()

    # Two loops at once: two threads bare, two containers in the sandbox.
    half = max(1, n.runs // 2)
    t0 = time.monotonic_ns()
    await asyncio.gather(*(asyncio.to_thread(bare_loop, true, TRUE, half) for _ in range(2)))
    bare_rate2 = 2 * half / (ms_since(t0) / 1000)
    pair: list[Container] = []
    try:
        for _ in range(2):
            pair.append(await create(runtime, root, "judge"))
        await asyncio.gather(*(exec_loop(p, n.warmup) for p in pair))
        t0 = time.monotonic_ns()
        await asyncio.gather(*(exec_loop(p, half) for p in pair))
        warm_rate2 = 2 * half / (ms_since(t0) / 1000)
    finally:
        for p in pair:
            await p.destroy()

    bare_med, bare_p99 = median(bare), percentile(bare, 99)
    fig = {
        "bare_exec_median_ms": bare_med, "bare_exec_p99_ms": bare_p99,
        "warm_exec_median_ms": median(latency), "warm_exec_p99_ms": percentile(latency, 99),
        "warm_exec_result_wall_median_ms": median([r.wall_ms for r in results]),
        "warm_exec_result_setup_median_ms": median([r.setup_ms for r in results]),
        "bare_exec_runs_per_s": bare_rate, "warm_exec_runs_per_s": warm_rate,
        "bare_exec_2_threads_runs_per_s": bare_rate2,
        "warm_exec_2_containers_runs_per_s": warm_rate2,
    }
    b = "bare posix_spawn+wait4 of the same busybox"
    rows = [
        Row("exec `true` median (ms)", fig["warm_exec_median_ms"], bare_med, b),
        Row("exec `true` p99 (ms)", fig["warm_exec_p99_ms"], bare_p99, b),
        Row("  result.wall_ms median (init: fork..reap)", fig["warm_exec_result_wall_median_ms"],
            bare_med, b),
        Row("  result.setup_ms median (call..started)", fig["warm_exec_result_setup_median_ms"]),
        Row("exec `true` sequential (runs/s)", warm_rate, bare_rate, "bare, one loop"),
        Row("exec `true` 2 loops, 2 containers (runs/s)", warm_rate2, bare_rate2,
            "bare, two threads"),
    ]
    return rows, fig


async def bench_cold(runtime: Runtime, root: Path, n: Counts) -> tuple[list[Row], dict[str, Any]]:
    # Baseline: the kernel's share, a bare unshare of the user, mount, pid, ipc, uts and net
    # namespaces (busybox has no cgroup-namespace flag) running `true`.
    unshare = [str(root / "bin/unshare"), "-r", "-m", "-p", "-f", "-i", "-u", "-n",
               str(root / "bin/true")]
    bare_loop(root / "bin/unshare", unshare, n.warmup)
    bare = bare_loop(root / "bin/unshare", unshare, n.cold)
    bare_med, bare_p99 = median(bare), percentile(bare, 99)
    b = "bare busybox unshare -rmpfiun true"
    fig: dict[str, Any] = {"bare_unshare_median_ms": bare_med, "bare_unshare_p99_ms": bare_p99}
    rows: list[Row] = []
    for profile, key in (("judge", "cold_start"), ("default", "cold_start_default")):
        await (await create(runtime, root, profile)).destroy()  # untimed first one
        made: list[float] = []
        gone: list[float] = []
        for _ in range(n.cold):
            t0 = time.monotonic_ns()
            c = await create(runtime, root, profile)
            made.append(ms_since(t0))
            t0 = time.monotonic_ns()
            await c.destroy()
            gone.append(ms_since(t0))
        fig |= {f"{key}_median_ms": median(made), f"{key}_p99_ms": percentile(made, 99),
                f"{key}_destroy_median_ms": median(gone)}
        what = "directory root" if profile == "judge" else "overlay root"
        rows += [Row(f"cold start {profile} ({what}) median (ms)", median(made), bare_med, b),
                 Row(f"cold start {profile} p99 (ms)", percentile(made, 99), bare_p99, b),
                 Row(f"destroy {profile} median (ms)", median(gone))]
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


async def bench_idle(runtime: Runtime, root: Path, n: Counts) -> tuple[list[Row], dict[str, Any]]:
    spawners = [p for p in psutil.Process().children() if _is_spawner(p)]
    if len(spawners) != 1:
        raise BenchError(f"expected one spawner child of this process, found {spawners}")
    containers: list[Container] = []
    try:
        for _ in range(n.idle):
            containers.append(await create(runtime, root, "judge"))
        await asyncio.sleep(IDLE_WAIT_S)
        measured = [_uss(c.pid) for c in containers]
        rss = [psutil.Process(c.pid).memory_info().rss / 2**20 for c in containers]
    finally:
        for c in containers:
            await c.destroy()
    spawner_uss, _ = _uss(spawners[0].pid)
    uss = [m for m, _ in measured]
    fig = {"idle_container_uss_mib": median(uss), "idle_container_rss_mib": median(rss),
           "idle_container_memory_source": measured[0][1], "spawner_uss_mib": spawner_uss,
           "idle_containers": n.idle}
    what = "USS" if measured[0][1] == "uss" else "RSS-shared (USS unreadable)"
    rows = [Row(f"idle init {what}, median of {n.idle} (MiB)", median(uss), spawner_uss,
                "the spawner's USS"),
            Row("idle init RSS median (MiB)", median(rss))]
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


async def bench_overhead(runtime: Runtime, root: Path,
                         n: Counts) -> tuple[list[Row], dict[str, Any]]:
    c = await create(runtime, root, "judge")
    try:
        spin = await compare(c, root, "spin", n.spin_args, n)
        sysc = await compare(c, root, "syscalls", n.syscall_args, n)
    finally:
        await c.destroy()
    fig: dict[str, Any] = {**spin, **sysc, "workload_repeats": n.repeats,
                           "cpu_overhead_pct": spin["spin_cpu_overhead_pct"],
                           "cpu_overhead_wall_pct": spin["spin_wall_overhead_pct"],
                           "syscall_overhead_pct": sysc["syscalls_cpu_overhead_pct"],
                           "syscall_overhead_wall_pct": sysc["syscalls_wall_overhead_pct"],
                           "syscall_overhead_vs_allow_all_filter_pct":
                               sysc["syscalls_cpu_overhead_vs_allow_all_filter_pct"]}
    rows = []
    for name, what in (("spin", "CPU-bound"), ("syscalls", "syscall-bound")):
        for kind in ("cpu", "wall"):
            rows.append(Row(f"{name}.c ({what}) {kind} median (ms)",
                            fig[f"{name}_{kind}_box_median_ms"],
                            fig[f"{name}_{kind}_bare_median_ms"], "the same binary, bare"))
            rows.append(Row("", fig[f"{name}_{kind}_box_median_ms"],
                            fig[f"{name}_{kind}_filtered_median_ms"],
                            "bare under an allow-all seccomp filter"))
    return rows, fig


# --- setup --------------------------------------------------------------------------------


def build_workloads(dest: Path, owner: tuple[int, int]) -> None:
    """gcc -static -O2 each workloads/*.c into dest/bin (the container's /bin)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc is needed for the workloads: apt-get install gcc libc6-dev")
    for src in sorted(WORKLOADS.glob("*.c")):
        out = dest / "bin" / src.stem
        done = subprocess.run([gcc, "-static", "-O2", "-o", str(out), str(src)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"cannot build {src.name} (static libc: libc6-dev):\n"
                             f"{done.stderr.strip()}")
        os.chmod(out, 0o755)
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


async def run(n: Counts, quiet: bool) -> tuple[list[Row], dict[str, Any]]:
    async with prepared() as (runtime, root):
        rows: list[Row] = []
        fig = host_info(runtime, n)
        for what, step in (("exec", bench_exec), ("cold start", bench_cold),
                           ("idle memory", bench_idle), ("workloads", bench_overhead)):
            progress(quiet, what)
            more_rows, more = await step(runtime, root, n)
            rows += more_rows
            fig |= more
        return rows, fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.runtime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, help="sequential warm execs (default 500)")
    ap.add_argument("--cold", type=int, help="container creations per profile (default 50)")
    ap.add_argument("--quick", action="store_true", help="small counts, for the test suite")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    if (args.runs is not None and args.runs < 2) or (args.cold is not None and args.cold < 2):
        ap.error("--runs and --cold need at least 2")
    n = counts_from(args)
    try:
        rows, fig = asyncio.run(run(n, args.json_only))
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    if not args.json_only:
        print(f"sandboxd runtime benchmark: kernel {fig['kernel']}, python {fig['python']}, "
              f"{fig['cpus']} cpus, id mapping {fig['id_mapping']}, cgroup "
              f"{fig['cgroup_driver']}, {n.runs} execs, {n.cold} cold starts per profile")
        print(table(rows))
    print(json.dumps(fig, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
